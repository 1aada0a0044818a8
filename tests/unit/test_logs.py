"""common/logs.py: one JSON object per line (fields, extras, exceptions) or text with key=value
extras; setup_logging is what every service's __main__ calls."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import pathlib

import pytest

from common.logs import JsonFormatter, TextFormatter, setup_logging

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _record(msg="request", extra=None, exc_info=None) -> logging.LogRecord:
    logger = logging.getLogger("services.router.router")
    return logger.makeRecord(logger.name, logging.INFO, __file__, 1, msg, (), exc_info, extra=extra)


def test_json_line_has_the_fields_and_the_extras():
    line = JsonFormatter("router").format(_record(extra={"event": "request", "request_id": "r1", "ttft_s": 0.25,
                                                         "predicted_ttft_s": None, "nan": float("nan")}))
    assert "\n" not in line
    d = json.loads(line)
    assert d["level"] == "INFO" and d["logger"] == "services.router.router" and d["msg"] == "request"
    assert d["service"] == "router" and d["ts"].endswith("+00:00")
    assert (d["event"], d["request_id"], d["ttft_s"], d["predicted_ttft_s"], d["nan"]) == \
           ("request", "r1", 0.25, None, None)


def test_json_keeps_a_traceback_on_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        line = JsonFormatter("decode").format(_record("failed", exc_info=sys.exc_info()))
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exc"]


def test_text_appends_the_extras():
    line = TextFormatter().format(_record(extra={"request_id": "r1", "outcome": "stop", "error": "a b"}))
    assert line.endswith('INFO services.router.router: request request_id=r1 outcome=stop error="a b"')


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_setup_logging_replaces_the_root_handlers(fmt, monkeypatch):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    try:
        setup_logging("kvstore", fmt)
        setup_logging("kvstore", fmt)                   # idempotent: one handler
        assert len(root.handlers) == 1
        logging.getLogger("x").info("hello", extra={"request_id": "r2"})
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    out = buf.getvalue().strip()
    if fmt == "json":
        assert json.loads(out)["request_id"] == "r2"
    else:
        assert out.endswith("x: hello request_id=r2")


def test_a_service_logs_json_lines_with_log_format_json():
    """The kvstore's one error line when Redis never answers, as JSON; a bad setting is reported
    in text (the config that names the format failed)."""
    env = {"PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "services.kvstore", "--log-format", "json", "--port", "0",
                        "--metrics-port", "-1", "--redis-url", "redis://127.0.0.1:1/0",
                        "--redis-connect-timeout-s", "0.2"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 1, r.stderr
    lines = [json.loads(line) for line in r.stderr.strip().splitlines()]
    assert lines[-1]["level"] == "ERROR" and lines[-1]["service"] == "kvstore" and "Redis" in lines[-1]["msg"]
    bad = subprocess.run([sys.executable, "-m", "services.kvstore", "--log-format", "json", "--lease-s", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "ERROR kvstore: kvstore: lease_s must be positive" in bad.stderr
