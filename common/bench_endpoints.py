"""The wire side of `mnemosyne bench serve` (common/bench_serve.py): one streamed request over gRPC
(the Router API) or HTTP (an OpenAI-compatible API, through the `openai` client), timed here and
written into a `Record`.

An endpoint is `info` (the served model), `send(record, prompt, stopping)` (blocking; called from
many threads at once), `cancel_all()` (Ctrl-C: cancels every stream in flight) and `close()`.
Outcomes: "ok" (the stream finished), "rejected" (RESOURCE_EXHAUSTED / HTTP 429: admission or
capacity; `reason` is admission's reason when the server names it, else "capacity"), "cancelled"
(by Ctrl-C), else "error" with the status and message.
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

from common.auth import bearer, resolve_api_key
from common.bench_serve import BenchConfig, Record
from common.errors import ConfigError

ADMISSION_REASON = re.compile(r"rejected by admission \((\w+)\)")


@dataclass(frozen=True)
class ModelInfo:
    """What the endpoint serves. vocab_size is None over HTTP (/v1/models does not say)."""
    name: str
    max_model_len: int | None
    vocab_size: int | None = None
    special_ids: tuple[int, ...] = ()         # EOS and BOS ids: never put into a generated prompt
    ignore_eos: str = "off"                   # "sent" | "off"


def parse_endpoint(url: str) -> tuple[str, str]:
    """("grpc", "host:port") or ("http", base URL ending in /v1 unless it names another path)."""
    url = url.strip()
    if url.startswith("grpc://"):
        address = url.removeprefix("grpc://").rstrip("/")
    elif url.startswith(("http://", "https://")):
        p = urlparse(url)
        if not p.netloc:
            raise ConfigError(f"bench: endpoint {url!r} has no host (--endpoint)")
        path = p.path.rstrip("/") or "/v1"
        return "http", f"{p.scheme}://{p.netloc}{path}"
    elif "://" in url:
        raise ConfigError(f"bench: endpoint {url!r}: use grpc://HOST:PORT or http(s)://HOST:PORT/v1 (--endpoint)")
    else:
        address = url
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"bench: endpoint {url!r} is not HOST:PORT (--endpoint)")
    return "grpc", address


def open_endpoint(cfg: BenchConfig) -> "GrpcEndpoint | HttpEndpoint":
    kind, address = parse_endpoint(cfg.endpoint)
    return GrpcEndpoint(address, cfg) if kind == "grpc" else HttpEndpoint(address, cfg)


class _Inflight:
    """Cancel functions of the streams in flight, for Ctrl-C."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancels: dict[int, Callable[[], Any]] = {}

    def add(self, key: int, cancel: Callable[[], Any]) -> None:
        with self._lock:
            self._cancels[key] = cancel

    def remove(self, key: int) -> None:
        with self._lock:
            self._cancels.pop(key, None)

    def cancel_all(self) -> None:
        with self._lock:
            cancels = list(self._cancels.values())
        for cancel in cancels:
            cancel()


class _Clock:
    """TTFT and gaps of one stream, from its creation (just before the request is sent): `tokens(n)`
    for each chunk that carries n >= 1 tokens, `done()` when the stream ended normally."""

    def __init__(self, rec: Record) -> None:
        self.rec = rec
        self.t0 = self.last = time.monotonic()

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        if self.rec.ttft_s is None:
            self.rec.ttft_s = now - self.t0
        else:
            self.rec.tbt_s.append(now - self.last)
        self.last = now
        self.rec.output_tokens += n

    def done(self) -> None:
        self.rec.outcome = "ok"
        self.rec.e2e_s = time.monotonic() - self.t0


# ---- gRPC ---------------------------------------------------------------------------------------------
class GrpcEndpoint:
    """The Router API (proto/mnemosyne/v1/router.proto) on one channel shared by every thread."""

    def __init__(self, address: str, cfg: BenchConfig) -> None:
        import grpc
        from common import client as router_client        # imported here, not in the senders' threads
        from common.rpc import client as rpc_client
        from common.rpc import status
        from common.rpc.protos import router_pb2, router_pb2_grpc
        self.grpc, self.router_client, self.retry_after_s = grpc, router_client, status.retry_after_s
        self.cfg = cfg
        self.address = address
        # No retry policy (and max_retries=0 over HTTP): a rejection is what this tool measures.
        self.channel = rpc_client.blocking_channel(address, default_deadline_s=cfg.timeout_s)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.metadata = bearer(resolve_api_key(cfg.api_key))
        self.inflight = _Inflight()
        try:
            m = self.stub.ModelInfo(router_pb2.ModelInfoRequest(), timeout=30, metadata=self.metadata)
        except grpc.RpcError as e:
            self.channel.close()
            raise ConfigError(f"bench: ModelInfo at {address}: {e.code().name} {e.details()}") from None
        note = "sent" if cfg.ignore_eos else "off"
        bos = (m.bos_token_id,) if m.HasField("bos_token_id") else ()
        self.info = ModelInfo(m.name, m.max_model_len or None, m.vocab_size or None,
                              tuple(m.eos_token_ids) + bos, note)

    def _request(self, rec: Record, prompt: list[int] | str) -> Any:
        cfg = self.cfg
        slo = cfg.send_slo
        req = self.router_client.RouterClient.request(
            text=prompt if isinstance(prompt, str) else None,
            token_ids=prompt if isinstance(prompt, list) else None, chat=cfg.api == "chat",
            max_tokens=rec.output_tokens_requested, logprobs=False, request_id=f"bench-{os.getpid()}-{rec.index}",
            ttft_slo_s=cfg.ttft_slo_s if slo else None, tbt_slo_s=cfg.tbt_slo_s if slo else None,
            ignore_eos=cfg.ignore_eos)
        return req

    def send(self, rec: Record, prompt: list[int] | str, stopping: threading.Event) -> None:
        grpc, routes, finish = self.grpc, self.router_client.ROUTES, self.router_client.FINISH_REASONS
        req = self._request(rec, prompt)
        clock = _Clock(rec)
        call = self.stub.Generate(req, timeout=self.cfg.timeout_s, metadata=self.metadata)
        self.inflight.add(rec.index, call.cancel)
        try:
            for ev in call:
                kind = ev.WhichOneof("event")
                if kind == "started":
                    rec.request_id, rec.prompt_tokens = ev.started.request_id, ev.started.prompt_tokens
                    rec.route = routes.get(ev.started.route, "")
                    if ev.started.HasField("predicted_ttft_s"):
                        rec.predicted_ttft_s = ev.started.predicted_ttft_s
                elif kind == "delta" and ev.delta.token_ids:
                    clock.tokens(len(ev.delta.token_ids))
                elif kind == "finished":
                    rec.finish_reason = finish.get(ev.finished.finish_reason, "")
                    rec.server_ttft_s = ev.finished.timings.ttft_s or None
            clock.done()
        except grpc.RpcError as e:
            code = e.code()
            rec.status, rec.message = code.name, e.details() or ""
            if code == grpc.StatusCode.CANCELLED and stopping.is_set():
                rec.outcome = "cancelled"
            elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                rec.outcome = "rejected"
                m = ADMISSION_REASON.search(rec.message)
                rec.reason = m.group(1) if m else "capacity"
                rec.retry_after_s = self.retry_after_s(e)
            else:
                rec.outcome, rec.reason = "error", code.name.lower()
        finally:
            self.inflight.remove(rec.index)

    def cancel_all(self) -> None:
        self.inflight.cancel_all()

    def close(self) -> None:
        self.channel.close()


# ---- HTTP (OpenAI-compatible) -------------------------------------------------------------------------
class HttpEndpoint:
    """/v1/completions (token-id prompts) or /v1/chat/completions, streamed with usage; logprobs are
    asked for so each chunk says how many tokens it carries (a chunk whose text is still an
    incomplete character would otherwise look empty)."""

    def __init__(self, base_url: str, cfg: BenchConfig) -> None:
        import openai
        self.openai = openai
        self.cfg = cfg
        key = resolve_api_key(cfg.api_key) or os.environ.get("OPENAI_API_KEY") or "unused"
        self.client = openai.OpenAI(base_url=base_url, api_key=key,
                                    max_retries=0, timeout=cfg.timeout_s)
        self.inflight = _Inflight()
        try:
            models = self.client.models.list().data
        except openai.OpenAIError as e:
            self.client.close()
            raise ConfigError(f"bench: GET {base_url}/models: {e}") from None
        if not models:
            raise ConfigError(f"bench: {base_url}/models lists no model")
        m = models[0]
        _ = self.client.completions, self.client.chat.completions   # lazy imports, here rather than in a sender
        max_len = (m.model_extra or {}).get("max_model_len")
        self.info = ModelInfo(m.id, int(max_len) if max_len else None, None, (),
                              "sent" if cfg.ignore_eos else "off")

    def _body(self, rec: Record) -> dict[str, Any]:
        cfg = self.cfg
        extra: dict[str, Any] = {}
        if cfg.send_slo:
            extra.update({k: v for k, v in (("ttft_slo_s", cfg.ttft_slo_s), ("tbt_slo_s", cfg.tbt_slo_s))
                          if v is not None})
        if cfg.ignore_eos:
            extra["ignore_eos"] = True
        return dict(model=self.info.name, max_tokens=rec.output_tokens_requested, stream=True,
                    stream_options={"include_usage": True}, extra_body=extra or None)

    def send(self, rec: Record, prompt: list[int] | str, stopping: threading.Event) -> None:
        openai = self.openai
        clock = _Clock(rec)
        counted = None
        try:
            if isinstance(prompt, str):
                stream = self.client.chat.completions.create(
                    messages=[{"role": "user", "content": prompt}], logprobs=True, **self._body(rec))
            else:
                stream = self.client.completions.create(prompt=prompt, logprobs=0, **self._body(rec))
            self.inflight.add(rec.index, stream.close)
            for chunk in stream:
                # Mnemosyne's extension: the first chunk names the request, the last one has its timings.
                entry = (chunk.model_extra or {}).get("mnemosyne") or {}
                rec.request_id = entry.get("request_id", rec.request_id)
                rec.route = entry.get("route", rec.route)
                rec.server_ttft_s = entry.get("ttft_s", rec.server_ttft_s)
                rec.predicted_ttft_s = entry.get("predicted_ttft_s", rec.predicted_ttft_s)
                if chunk.usage is not None:
                    rec.prompt_tokens, counted = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
                for c in chunk.choices:
                    n = _chunk_tokens(c)
                    if n:
                        clock.tokens(n)
                    if c.finish_reason:
                        rec.finish_reason = c.finish_reason
            if stopping.is_set() and not rec.finish_reason:
                rec.outcome = "cancelled"
                return
            if counted is not None:
                rec.output_tokens = counted
            clock.done()
        except openai.APIStatusError as e:
            rec.status, rec.message = str(e.status_code), _message(e)
            if e.status_code == 429:
                rec.outcome, rec.reason = "rejected", e.code or "capacity"
                ms = e.response.headers.get("retry-after-ms") or ""
                rec.retry_after_s = int(ms) / 1000 if ms.isdigit() else None
            else:
                rec.outcome, rec.reason = "error", e.code or type(e).__name__
        except openai.OpenAIError as e:
            if stopping.is_set():
                rec.outcome = "cancelled"
            else:
                # A connection failure, a timeout, or an error event in the middle of the stream.
                rec.outcome, rec.reason, rec.message = "error", type(e).__name__, _message(e)
                rec.status = "stream" if isinstance(e, openai.APIError) and rec.ttft_s is not None else "connection"
        finally:
            self.inflight.remove(rec.index)

    def cancel_all(self) -> None:
        self.inflight.cancel_all()

    def close(self) -> None:
        self.client.close()


def _chunk_tokens(choice: Any) -> int:
    """Tokens one streamed choice carries: its logprobs entries, else 1 for non-empty text."""
    lp = getattr(choice, "logprobs", None)
    if lp is not None:
        entries = getattr(lp, "content", None) if hasattr(lp, "content") else getattr(lp, "tokens", None)
        if entries:
            return len(entries)
    text = choice.delta.content if hasattr(choice, "delta") else choice.text
    return 1 if text else 0


def _message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(e)
