"""OpenAI-compatible HTTP API of the router: what the `openai` SDK, LangChain and curl scripts speak.

    GET  /v1/models, /v1/models/{model}
    POST /v1/completions           prompt: text | [text] | [ids] | [[ids]]; n choices per prompt
    POST /v1/chat/completions      messages with roles (system, user, assistant; multi-turn)
    GET  /health                   200 while the router serves
    GET  /ready                    200 when a decode instance is live, else 503

It runs in the router process on the same Frontend and Router as the gRPC API (same validation,
admission, routing and metrics), so an HTTP request is a gRPC request without the gRPC hop.

Parameters: max_tokens (chat: also max_completion_tokens), temperature, top_p, seed, n, stop
(strings), stream (+ stream_options.include_usage), logprobs (completions: the number of top
alternatives; chat: a bool with top_logprobs), user (ignored). Unset sampling values take the
deployment's defaults (greedy, max_tokens --default-max-tokens), not OpenAI's. Choice i of a
seeded request uses seed + i. Parameters Mnemosyne does not implement (penalties, logit_bias,
echo, suffix, tools, response formats other than text) are refused with 400, never ignored.

Mnemosyne's extensions, documented fields beside OpenAI's:
- request: `ttft_slo_s`, `tbt_slo_s` (the request's own SLOs), `top_k`, `ignore_eos`, and
  `stream_options.include_progress` (prefill progress chunks while a prompt is prefilled);
- response: `mnemosyne` = {"requests": [{index, request_id, route, prefill_instance, decode_instance,
  predicted_ttft_s, ttft_slo_s, tbt_slo_s, ttft_s, tbt_mean_s, e2e_s, queue_s}]}; when streaming, the
  first chunk of each choice carries its `mnemosyne` entry (without timings) and progress chunks have
  no choices and `mnemosyne` = {"index", "prefill_progress": {"tokens_done", "tokens_total"}};
- finish_reason "abort" when the request was aborted through the gRPC Abort RPC.

Authentication: the router's API keys (services/router/auth.py), sent as `Authorization: Bearer
<key>` (the openai SDK's api_key); /health and /ready are open.

Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad input, 401 a
missing or unknown API key, 404 an unknown model, 429 an admission or capacity rejection (with Retry-After / retry-after-ms when retrying
can help, else x-should-retry: false), 503 no live decode instance or an instance failed, 500 a bug.
A client that disconnects (streaming or not) aborts its requests everywhere, like a cancelled gRPC call.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from common.auth import presented_key
from common.errors import (CapacityError, ConfigError, InvalidRequestError, KVTransferError, MnemosyneError,
                           PermissionDeniedError, PlacementError, UnauthenticatedError, WorkerFailedError)
from services.router.auth import Principal
from services.router.discovery import Discovery
from services.router.frontend import Frontend, Job, PromptInput, _short
from services.router.request_log import RequestLine
from services.router.router import Delta, Finished, Progress, Router, Started

log = logging.getLogger(__name__)
request_log = logging.getLogger("services.router.router")     # the one logger of the request lines

MAX_N = 16                    # choices per prompt
MAX_PROMPTS = 64              # prompts per /v1/completions request
MAX_LOGPROBS = 20
MAX_SEED = 2 ** 63 - 1
DISCONNECT_POLL_S = 0.25      # how often a non-streaming request checks that its client is still there


# ---- request bodies --------------------------------------------------------------------------------
class _Body(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored (clients send e.g. `user`, `metadata`)."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Mnemosyne's extensions
    top_k: int | None = None
    ignore_eos: bool = False
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None

    def unsupported(self) -> list[str]:
        """Parameters set to something this server does not implement."""
        bad = [name for name in ("presence_penalty", "frequency_penalty") if getattr(self, name)]
        if self.logit_bias:
            bad.append("logit_bias")
        return bad


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.echo:
            bad.append("echo")
        if self.suffix:
            bad.append("suffix")
        if self.best_of is not None and self.best_of != self.n:
            bad.append("best_of")
        return bad


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.tools:
            bad.append("tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            bad.append("response_format")
        return bad


# ---- errors -----------------------------------------------------------------------------------------
class HttpError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def http_error(e: BaseException) -> HttpError:
    """The HTTP status and OpenAI error of a typed error (the one mapping, like rpc/status.py's)."""
    if isinstance(e, HttpError):
        return e
    if isinstance(e, UnauthenticatedError):
        return HttpError(401, str(e), "invalid_request_error", "invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})
    if isinstance(e, PermissionDeniedError):
        return HttpError(403, str(e), "permission_error", "forbidden")
    if isinstance(e, InvalidRequestError | ConfigError):
        return HttpError(400, str(e), "invalid_request_error")
    if isinstance(e, CapacityError):
        hint = getattr(e, "retry_after_s", None)
        decision = getattr(e, "decision", None)
        code = getattr(decision, "reason", None) or "capacity"
        if hint is not None:
            headers = {"Retry-After": str(max(1, math.ceil(hint))), "retry-after-ms": str(math.ceil(hint * 1000))}
        else:
            headers = {"x-should-retry": "false"}
        return HttpError(429, str(e), "rate_limit_error", code, headers=headers)
    if isinstance(e, WorkerFailedError | KVTransferError | PlacementError):
        return HttpError(503, str(e), "service_unavailable", "instance_failed")
    if isinstance(e, MnemosyneError):
        return HttpError(500, str(e), "server_error")
    log.exception("internal error", exc_info=e)
    return HttpError(500, f"internal error: {type(e).__name__}", "server_error")


# ---- one choice's result ----------------------------------------------------------------------------
@dataclass
class _Choice:
    index: int
    started: Started | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finished: Finished | None = None

    def info(self, timings: bool = True) -> dict:
        s = self.started
        d: dict[str, Any] = {"index": self.index}
        if s is not None:
            d.update(request_id=s.request_id, route=s.route, prefill_instance=s.prefill_instance,
                     decode_instance=s.decode_instance, predicted_ttft_s=s.predicted_ttft_s,
                     ttft_slo_s=s.ttft_slo_s, tbt_slo_s=s.tbt_slo_s)
        if timings and self.finished is not None:
            t = self.finished.timings
            d.update(ttft_s=t.ttft_s, tbt_mean_s=sum(t.tbt_s) / len(t.tbt_s) if t.tbt_s else 0.0,
                     e2e_s=t.e2e_s, queue_s=t.queue_s)
        return d


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Events of several request streams as they come, tagged with the stream's index. The first
    error ends all of them; closing this generator cancels them (the router aborts each request)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for ev in stream:
                await queue.put((i, ev))
            await queue.put((i, done))
        except Exception as e:                       # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s), name=f"http-choice-{i}") for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, ev = await queue.get()
            if ev is done:
                left -= 1
            elif isinstance(ev, Exception):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIApi:
    """The endpoints, on a Frontend (validation) and a Router (serving)."""

    def __init__(self, frontend: Frontend, router: Router, discovery: Discovery) -> None:
        self.frontend = frontend
        self.router = router
        self.discovery = discovery
        self.created = int(time.time())
        self.app = self._build()

    # ---- app -----------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="Mnemosyne", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(RequestValidationError)
        async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
            errs = e.errors()
            first = errs[0] if errs else {}
            loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            msg = f"{loc}: {first.get('msg', 'invalid')}" if loc else first.get("msg", "invalid request body")
            return HttpError(400, msg, "invalid_request_error", param=loc or None).response()

        @app.exception_handler(HttpError)
        async def _http(request: Request, e: HttpError) -> JSONResponse:
            return e.response()

        @app.exception_handler(MnemosyneError)
        async def _typed(request: Request, e: MnemosyneError) -> JSONResponse:
            return http_error(e).response()

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok"}

        @app.get("/ready")
        async def ready() -> JSONResponse:
            decode = await self._live_decode()
            return JSONResponse({"ready": bool(decode), "decode_instances": len(decode)},
                                status_code=200 if decode else 503)

        @app.get("/v1/models")
        async def models(request: Request) -> dict:
            self._caller(request)
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model:path}")
        async def model(model: str, request: Request) -> dict:
            self._caller(request)
            self._check_model(model)
            return self._model_card()

        @app.post("/v1/completions")
        async def completions(body: CompletionBody, request: Request):
            return await self._serve(request, body, "completion")

        @app.post("/v1/chat/completions")
        async def chat(body: ChatBody, request: Request):
            return await self._serve(request, body, "chat")

        return app

    def _caller(self, request: Request) -> Principal:
        """The request's API key (`Authorization: Bearer <key>`, as the openai SDK sends its api_key)."""
        return self.router.keys.authenticate(presented_key(request.headers.items()))

    def _model_card(self) -> dict:
        return {"id": self.frontend.name, "object": "model", "created": self.created, "owned_by": "mnemosyne",
                "max_model_len": self.frontend.max_model_len}

    def _check_model(self, model: str | None) -> None:
        if model and model != self.frontend.name:
            raise HttpError(404, f"the model {_short(model)} does not exist; this deployment serves "
                                 f"{self.frontend.name!r}", "invalid_request_error", "model_not_found", "model")

    async def _live_decode(self) -> list:
        try:
            return await self.discovery.instances("decode")
        except MnemosyneError as e:
            log.warning("ready: %s", e)
            return []

    # ---- requests --------------------------------------------------------------------------------
    def _inputs(self, body: CompletionBody | ChatBody, kind: str, cid: str) -> list[PromptInput]:
        """One PromptInput per choice: prompts x n, request ids <cid>-<k>."""
        bad = body.unsupported()
        if bad:
            raise HttpError(400, f"not supported by this server: {', '.join(bad)}", "invalid_request_error",
                            param=bad[0])
        self._check_model(body.model)
        sampling: dict[str, Any] = {}
        max_tokens = body.max_tokens
        if kind == "chat" and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        for name, value in (("max_tokens", max_tokens), ("temperature", body.temperature),
                            ("top_p", body.top_p), ("top_k", body.top_k)):
            if value is not None:
                sampling[name] = value
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if kind == "chat":
            prompts: list[dict] = [{"messages": [{"role": m.role, "content": _content(m.content, i)}
                                                 for i, m in enumerate(body.messages)]}]
            logprobs, top = body.logprobs or bool(body.top_logprobs), body.top_logprobs or 0
        else:
            prompts = [{"text": p} if isinstance(p, str) else {"token_ids": p} for p in _prompts(body.prompt)]
            logprobs, top = body.logprobs is not None, body.logprobs or 0
        out = []
        for p, prompt in enumerate(prompts):
            for j in range(body.n):
                k = p * body.n + j
                s = dict(sampling)
                if body.seed is not None:
                    s["seed"] = (body.seed + j) % (MAX_SEED + 1)
                out.append(PromptInput(request_id=f"{cid}-{k}", model="", sampling=s, return_logprobs=logprobs,
                                       top_logprobs=top, ttft_slo_s=body.ttft_slo_s, tbt_slo_s=body.tbt_slo_s,
                                       stop=stop, ignore_eos=body.ignore_eos, **prompt))
        return out

    async def _serve(self, request: Request, body: CompletionBody | ChatBody, kind: str):
        t0 = time.monotonic()
        cid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        who = None
        try:
            who = self._caller(request)
            inputs = self._inputs(body, kind, cid)
            jobs: list[Job] = await asyncio.to_thread(lambda: [self.frontend.prepare(i) for i in inputs])
            if not await self._live_decode():
                raise HttpError(503, "no decode instance is serving; retry when the deployment is ready",
                                "service_unavailable", "no_instance", headers={"Retry-After": "1"})
        except (HttpError, MnemosyneError) as e:
            err = http_error(e)
            request_log.info("request", extra={**RequestLine.refused(cid, e, who.id if who else "").fields(),
                                               "error_status": f"HTTP {err.status}"})
            return err.response()
        choices = [_Choice(i) for i in range(len(jobs))]
        events = _merged([self.router.generate(job, t0, who) for job in jobs])
        if body.stream:
            return await self._stream(request, body, kind, cid, choices, events)
        return await self._collect(request, body, kind, cid, choices, events)

    async def _collect(self, request: Request, body, kind: str, cid: str, choices: list[_Choice], events):
        async def run() -> None:
            async for i, ev in events:
                _record(choices[i], ev)

        task = asyncio.create_task(run(), name=f"http-{cid}")
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    task.cancel()          # the client left: every choice is aborted
                    log.info("%s: client disconnected; aborted", cid)
                    break
            await asyncio.gather(task, return_exceptions=True)
            if task.cancelled():
                return JSONResponse({}, status_code=499)
            if task.exception() is not None:
                return http_error(task.exception()).response()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await events.aclose()
        return JSONResponse(self._final(body, kind, cid, choices))

    async def _stream(self, request: Request, body, kind: str, cid: str, choices: list[_Choice], events):
        """Waits until every choice is admitted (a rejection is a plain HTTP error), then streams."""
        early: list[tuple[int, Any]] = []
        try:
            while any(c.started is None for c in choices):
                i, ev = await anext(events)
                _record(choices[i], ev)
                early.append((i, ev))
        except BaseException as e:
            await events.aclose()
            if isinstance(e, Exception):
                return http_error(e).response()
            raise
        opts = body.stream_options or {}
        created = int(time.time())

        async def sse() -> AsyncIterator[str]:
            try:
                async def all_events():
                    for item in early:
                        yield item
                    async for i, ev in events:
                        _record(choices[i], ev)
                        yield i, ev

                async for i, ev in all_events():
                    for chunk in self._chunks(body, kind, cid, created, choices[i], ev, opts):
                        yield _sse(chunk)
                if opts.get("include_usage"):
                    yield _sse({**_head(kind, cid, created, self.frontend.name, chunk=True), "choices": [],
                                "usage": _usage(choices, body.n)})
            except Exception as e:                   # noqa: BLE001 - after the headers: an error event
                yield _sse(http_error(e).body())
            finally:
                await events.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- response shapes -------------------------------------------------------------------------
    def _chunks(self, body, kind: str, cid: str, created: int, c: _Choice, ev, opts: dict) -> list[dict]:
        head = _head(kind, cid, created, self.frontend.name, chunk=True)
        if isinstance(ev, Started):
            first = {"delta": {"role": "assistant", "content": ""}} if kind == "chat" else {"text": ""}
            return [{**head, "choices": [{"index": c.index, **first, "logprobs": None, "finish_reason": None}],
                     "mnemosyne": c.info(timings=False)}]
        if isinstance(ev, Progress):
            if not opts.get("include_progress"):
                return []
            return [{**head, "choices": [], "mnemosyne": {"index": c.index, "prefill_progress": {
                "tokens_done": ev.tokens_done, "tokens_total": ev.tokens_total}}}]
        if isinstance(ev, Delta):
            if not ev.text and not ev.logprobs:
                return []
            lp = self._logprobs(kind, body, ev.token_ids, ev.logprobs, ev.top_logprobs) if ev.logprobs else None
            if kind == "chat":
                choice = {"index": c.index, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}
            else:
                choice = {"index": c.index, "text": ev.text, "logprobs": lp, "finish_reason": None}
            return [{**head, "choices": [choice]}]
        if isinstance(ev, Finished):
            end = {"index": c.index, "finish_reason": ev.reason, "logprobs": None}
            end.update({"delta": {}} if kind == "chat" else {"text": ""})
            return [{**head, "choices": [end], "mnemosyne": c.info()}]
        return []

    def _final(self, body, kind: str, cid: str, choices: list[_Choice]) -> dict:
        out = []
        for c in choices:
            reason = c.finished.reason if c.finished is not None else "abort"
            lp = (self._logprobs(kind, body, c.token_ids, c.logprobs, c.top)
                  if c.logprobs or (c.token_ids and _wants_logprobs(kind, body)) else None)
            text = "".join(c.text)
            if kind == "chat":
                out.append({"index": c.index, "message": {"role": "assistant", "content": text},
                            "logprobs": lp, "finish_reason": reason})
            else:
                out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": reason})
        return {**_head(kind, cid, int(time.time()), self.frontend.name, chunk=False), "choices": out,
                "usage": _usage(choices, body.n), "mnemosyne": {"requests": [c.info() for c in choices]}}

    def _logprobs(self, kind: str, body, ids: list[int], lps: list[float],
                  top: list[list[tuple[int, float]]]) -> dict:
        tok = self._token_text
        if kind == "chat":
            k = body.top_logprobs or 0
            return {"content": [
                {"token": tok(t), "logprob": lp, "bytes": list(tok(t).encode()),
                 "top_logprobs": [{"token": tok(a), "logprob": b, "bytes": list(tok(a).encode())}
                                  for a, b in (top[n] if n < len(top) else [])[:k]]}
                for n, (t, lp) in enumerate(zip(ids, lps))]}
        k = body.logprobs or 0
        tokens = [tok(t) for t in ids]
        offsets, at = [], 0
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {"tokens": tokens, "token_logprobs": list(lps),
                "top_logprobs": [{tok(a): b for a, b in (top[n] if n < len(top) else [])[:k]}
                                 for n in range(len(ids))] if k else None,
                "text_offset": offsets}

    def _token_text(self, token_id: int) -> str:
        return self.frontend.tokenizer.decode([token_id])


def _wants_logprobs(kind: str, body) -> bool:
    return bool(body.logprobs or body.top_logprobs) if kind == "chat" else body.logprobs is not None


def _record(c: _Choice, ev) -> None:
    if isinstance(ev, Started):
        c.started = ev
    elif isinstance(ev, Delta):
        c.text.append(ev.text)
        c.token_ids.extend(ev.token_ids)
        c.logprobs.extend(ev.logprobs)
        c.top.extend(ev.top_logprobs)
    elif isinstance(ev, Finished):
        c.finished = ev


def _usage(choices: list[_Choice], n: int) -> dict:
    """Prompt tokens count once per prompt (choices p*n .. p*n+n-1 share prompt p); cached ones (the
    router's prefix match) in prompt_tokens_details when there are any."""
    prompt_tokens = sum(c.started.prompt_tokens for c in choices if c.started is not None and c.index % n == 0)
    completion = sum(c.finished.timings.completion_tokens for c in choices if c.finished is not None)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}
    cached = sum(c.started.cached_prompt_tokens or 0 for c in choices if c.started is not None and c.index % n == 0)
    if cached:           # OpenAI's field: the router's prefix match (Started.cached_prompt_tokens)
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _head(kind: str, cid: str, created: int, model: str, chunk: bool) -> dict:
    obj = ("chat.completion.chunk" if chunk else "chat.completion") if kind == "chat" else "text_completion"
    return {"id": cid, "object": obj, "created": created, "model": model}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _prompts(prompt) -> list[str | list[int]]:
    """/v1/completions' prompt forms as a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("prompt is empty")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if len(prompt) > MAX_PROMPTS:
        raise InvalidRequestError(f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompt)}")
    return list(prompt)


def _content(content, i: int) -> str:
    """A chat message's content: a string, or text parts ([{"type": "text", "text": ...}])."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"messages[{i}].content: only text parts are supported, got "
                                      f"{str(part.get('type'))[:40]!r}")
        texts.append(part["text"])
    return "".join(texts)


# ---- the server ---------------------------------------------------------------------------------------
class HttpServer:
    """uvicorn serving the API on the router's event loop. The socket is bound here, before anything
    else, so a port in use is a ConfigError at startup rather than an exit inside uvicorn."""

    def __init__(self, api: OpenAIApi, host: str, port: int, grace_s: float) -> None:
        import uvicorn
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise ConfigError(f"router: HTTP port {port} on {host} is not available ({e.strerror}); choose "
                              "another with --http-port") from None
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(api.app, log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=grace_s, access_log=False))
        self.task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def start(self, timeout_s: float = 10.0) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="http-api")
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise ConfigError("router: the HTTP server stopped while starting")
            if time.monotonic() > deadline:
                raise ConfigError(f"router: the HTTP server did not start within {timeout_s:g}s")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.task is None:
            self.sock.close()
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.task, timeout=self.server.config.timeout_graceful_shutdown + 5)
        except (asyncio.TimeoutError, Exception) as e:       # noqa: BLE001 - shutting down anyway
            log.warning("http server stop: %s", e)
        self.task = None
        self.sock.close()

