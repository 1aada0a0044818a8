"""The prefill instance's logic, without gRPC: run a prompt through the (SPP) engine with a KV sink,
report progress and the first token, and confirm that every KV chunk reached the decode side.

Ownership: the prefill engine owns its own blocks and frees them right after the first token; the
staged KV copies belong to the transfers until the receivers confirm them. Leaving a prefill early
(cancel, Abort, failure) aborts the request in the engine.

Spans (common/tracing.py): "prefill" (child of the caller's span) from the call to its end, with a
"chunk" event per progress report and "first_token"; its child "kv_transfer" from the first chunk
(KV streams out chunk by chunk while the next is computed) to the receivers' confirmation.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Awaitable, Callable

from common.engine.async_engine import AsyncEngine
from common.kv_connector.types import KVSink
from common.client import KVStoreClient
from common.errors import (InvalidRequestError, KVTransferError, PermissionDeniedError, PlacementError,
                           RequestAbortedError, StalePlacementError, kv_transfer_error)
from common.rpc.server import address_host
from common.metrics import kv_transfer_bytes
from common.sampling_params import SamplingParams, TopLogprobs
from common.tracing import NOOP, context_of, end_span
from opentelemetry.trace import SpanKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillJob:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    sink: KVSink | None                       # None: cache_only (compute into the prefix cache, send nothing)
    receiver_layout: object | None            # common.kv_transfer.KVLayout of the decode side
    ttft_deadline_s: float | None = None      # absolute, this host's time.monotonic(); None = none
    tbt_slo_s: float | None = None            # None = the engine's default


@dataclass(frozen=True)
class Progress:
    tokens_done: int
    tokens_total: int


@dataclass(frozen=True)
class FirstToken:
    token_id: int
    logprob: float
    prefill_s: float
    top_logprobs: TopLogprobs = ()            # when the request asked (params.top_logprobs)


@dataclass(frozen=True)
class Done:
    kv_bytes: int
    transfer_tail_s: float


class PrefillInstance:
    def __init__(self, instance_id: str, engine: AsyncEngine, kv_timeout_s: float, tp: int = 1,
                 metrics: object | None = None, tracer=NOOP, kvstore: KVStoreClient | None = None,
                 prefix_caching: bool = True) -> None:
        """`metrics`: a common.metrics.Metrics (active requests, KV sent); None = none. `tracer`:
        where the spans go (default: none). `kvstore`: where a request's placement is checked before
        its KV is sent (check_destination; None = not checked). `prefix_caching`: the engine's (a
        cache_only prefill needs it)."""
        self.instance_id = instance_id
        self.prefix_caching = prefix_caching
        self.kvstore = kvstore
        self.tracer = tracer
        self.metrics = metrics
        self.engine = engine
        self.kv_timeout_s = kv_timeout_s
        self.tp = tp
        self.running: set[str] = set()
        self.active = 0                               # prefill() streams open
        # PoolService: a heartbeat (load, prefix index) before a finished request's stream ends
        self.on_request_end: Callable[[], Awaitable[None]] | None = None

    @property
    def busy(self) -> bool:
        """Requests in flight here (a draining instance waits for them)."""
        return self.active > 0

    def start(self) -> None:
        """Nothing runs in the background of a prefill instance."""

    async def stop(self) -> None:
        pass

    async def prefill(self, job: PrefillJob, parent=None) -> AsyncIterator[Progress | FirstToken | Done]:
        """The request's events; `parent`: the caller's span context (common.tracing.parent_from)."""
        self.active += 1
        span = self.tracer.start_span("prefill", context=parent, kind=SpanKind.SERVER, attributes={
            "mnemosyne.request_id": job.request_id, "mnemosyne.prompt_tokens": len(job.token_ids),
            "mnemosyne.instance": self.instance_id})
        error: BaseException | None = None
        try:
            with self.metrics.track_active() if self.metrics is not None else contextlib.nullcontext():
                async for ev in self._prefill(job, span):
                    yield ev
        except Exception as e:
            error = e
            raise
        finally:
            self.active -= 1
            end_span(span, error)
        if self.on_request_end is not None:         # done: its prompt's cached blocks, reported
            await self.on_request_end()

    async def check_destination(self, job: PrefillJob) -> None:
        """KV goes only to the decode instance the kvstore placed the request on: every receiver's host
        must be that instance's registered host (a registration bound to its certificate under mutual
        TLS, services/kvstore/identity.py), else a caller could make this instance connect anywhere."""
        if self.kvstore is None:
            return
        placement = await self.kvstore.get_placement(job.request_id)
        if placement is None:
            raise PlacementError(f"KV destination of {job.request_id}: the kvstore has no placement for it "
                                 "(expired, released, or never reserved)")
        if job.sink.epoch and placement.epoch and placement.epoch != job.sink.epoch:
            raise StalePlacementError(f"KV destination of {job.request_id}: prepared for placement epoch "
                                      f"{job.sink.epoch}, the kvstore's live placement has epoch {placement.epoch}")
        host = address_host(placement.address)
        for g in job.sink.groups:
            for a in g.addresses:
                if address_host(a) != host:
                    raise PermissionDeniedError(
                        f"KV destination of {job.request_id}: receiver {a!r} of group {g.group} is not on "
                        f"decode instance {placement.instance_id} ({placement.address}), where the kvstore "
                        "placed the request")

    async def _prefill(self, job: PrefillJob, span) -> AsyncIterator[Progress | FirstToken | Done]:
        rid = job.request_id
        # One call per id: checked and taken before any await, and held until the clean-up below
        # (its abort) is over. Otherwise a second call with the id ended the first's request with
        # that abort and waited for KV that never came, until its deadline (found by fuzzing).
        if rid in self.running:
            raise InvalidRequestError(f"request {rid!r} is already being prefilled here")
        self.running.add(rid)
        if job.sink is None:
            async for ev in self._cache_only(job, span):
                yield ev
            return
        try:
            own_backend, layout = await self.engine.kv_info()
            if job.receiver_layout is not None and job.receiver_layout != layout:
                raise InvalidRequestError(f"KV layout mismatch: this prefill instance has {layout}, the "
                                          f"decode side {job.receiver_layout}")
            # An unknown backend failed the whole engine (every request on it) building the sender.
            if job.sink.backend != own_backend:
                raise InvalidRequestError(f"this prefill instance sends KV over {own_backend!r}, not "
                                          f"{job.sink.backend[:64]!r}")
            await self.check_destination(job)      # what the request says is sound: is it placed there?
        except BaseException:
            self.running.discard(rid)
            raise
        t0 = time.monotonic()
        params = replace(job.params, max_tokens=1)      # the decode instance samples the rest
        confirmed = False
        kv_span = None
        try:
            stream = self.engine.generate(job.token_ids, params, rid, kv_sink=job.sink,
                                          ttft_deadline_s=job.ttft_deadline_s, tbt_slo_s=job.tbt_slo_s)
            t_first = None
            async with contextlib.aclosing(stream):
                async for out in stream:
                    if out.error is not None:            # the KV could not be sent: no first token
                        raise kv_transfer_error(f"request {rid}: {out.error}")
                    if out.token_id is None and out.finish_reason is not None:
                        break                            # aborted before the first token
                    if kv_span is None and out.num_computed:
                        kv_span = self.tracer.start_span("kv_transfer", context=context_of(span), attributes={
                            "mnemosyne.kv.backend": job.sink.backend, "mnemosyne.kv.groups": len(job.sink.groups)})
                    span.add_event("chunk", {"tokens_done": out.num_computed, "tokens_total": out.prompt_len})
                    yield Progress(out.num_computed, out.prompt_len)
                    if out.token_id is not None:
                        t_first = time.monotonic()
                        span.add_event("first_token", {"prefill_s": t_first - t0})
                        yield FirstToken(out.token_id, out.logprob, t_first - t0, out.top_logprobs)
            if t_first is None:
                raise RequestAbortedError(f"prefill of {rid} was aborted")
            kv_bytes = kv_transfer_bytes(layout, len(job.token_ids) - job.sink.cached_tokens, self.tp)
            try:
                await self.engine.wait_kv(rid, self.kv_timeout_s)
            except KVTransferError as e:
                if self.metrics is not None:
                    self.metrics.observe_kv_transfer(job.sink.backend, "send", 0, 0.0, ok=False)
                if kv_span is not None:
                    end_span(kv_span, e)
                raise
            confirmed = True
            if kv_span is not None:
                end_span(kv_span, **{"mnemosyne.kv.bytes": kv_bytes, "mnemosyne.kv.tail_s": time.monotonic() - t_first})
            if self.metrics is not None:     # the transfer streams chunk by chunk from the start
                self.metrics.observe_kv_transfer(job.sink.backend, "send", kv_bytes, time.monotonic() - t0)
            yield Done(kv_bytes, time.monotonic() - t_first)
        finally:
            if kv_span is not None and kv_span.is_recording():
                end_span(kv_span, RequestAbortedError("left before the KV was confirmed"))
            # Forget the transfer state (and stop any transfer still running when we left early).
            await self._release(rid)
            if not confirmed:
                log.info("prefill of %s ended before its KV was confirmed", rid)

    async def _cache_only(self, job: PrefillJob, span) -> AsyncIterator[Progress | Done]:
        """A prompt computed into the prefix cache (its full blocks stay there, reclaimable, once the
        request ends after its first token); nothing is sent. Progress events, then Done(0, 0)."""
        rid = job.request_id
        if not self.prefix_caching:
            self.running.discard(rid)
            raise InvalidRequestError(f"cache_only prefill of {rid}: this instance runs without prefix caching")
        try:
            stream = self.engine.generate(job.token_ids, replace(job.params, max_tokens=1), rid,
                                          ttft_deadline_s=job.ttft_deadline_s, tbt_slo_s=job.tbt_slo_s)
            computed = False
            async with contextlib.aclosing(stream):
                async for out in stream:
                    if out.token_id is None and out.finish_reason is not None:
                        break                            # aborted
                    span.add_event("chunk", {"tokens_done": out.num_computed, "tokens_total": out.prompt_len})
                    yield Progress(out.num_computed, out.prompt_len)
                    computed = out.token_id is not None
            if not computed:
                raise RequestAbortedError(f"cache_only prefill of {rid} was aborted")
            yield Done(0, 0.0)
        finally:
            await self._release(rid)

    async def _release(self, rid: str) -> None:
        """The end of a call: the request aborted in the engine (a no-op after its first token, but it
        stops what still runs when the call left early) and its id free for the next call."""
        try:
            if self.engine.failed is None:
                with contextlib.suppress(Exception):
                    await self.engine.abort(rid)
        finally:
            self.running.discard(rid)

    async def abort(self, request_id: str) -> bool:
        return await self.engine.abort(request_id)
