"""Log lines of the services: one setup per process, text for people or JSON for log pipelines.

    setup_logging("router", config.observability.log_format)      # in each service's __main__
    log.info("request", extra={"event": "request", "request_id": rid, "ttft_s": 0.21})

JSON: one object per line on stderr with `ts` (UTC, ISO 8601, milliseconds), `level`, `logger`,
`msg` (the formatted message), `service`, every `extra=` field of the record, and `exc` (the
traceback) when there is one. Text: "<time> <LEVEL> <logger>: <msg>", then the extra fields as
key=value, so the per-request line reads the same in both. stdlib logging only.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from datetime import datetime, timezone
from typing import Any, Literal, NoReturn

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has: what is not among them came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call passed with `extra=` (in the order given)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _plain(value: Any) -> Any:
    """A JSON-safe value: NaN/inf as null (JSON has neither), other objects as str."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
            "service": self.service}
        for k, v in extra_fields(record).items():
            out.setdefault(k, _plain(v))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, then the record's extra fields as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = extra_fields(record)
        if not extra:
            return line
        head, sep, tail = line.partition("\n")        # a traceback stays below the fields
        fields = " ".join(f"{k}={json.dumps(_plain(v)) if isinstance(v, str) and (not v or ' ' in v) else v}"
                          for k, v in extra.items())
        return f"{head} {fields}{sep}{tail}"


def setup_logging(service: str, fmt: Literal["text", "json"] = "text", level: int = logging.INFO) -> None:
    """Replaces the root logger's handlers with one stderr handler in format `fmt` (what
    logging.basicConfig did before). Idempotent: a second call replaces the first."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


def exit_process(code: int) -> NoReturn:
    """Ends a service process that has shut itself down in order (servers stopped, engine and workers
    joined, tracing flushed): flushes the logs and standard streams, then `os._exit`, skipping the
    interpreter's teardown of torch's and transformers' modules, which took seconds per process and
    delayed every stop (make up's Ctrl-C, a supervisor's restart, a rolling update)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
