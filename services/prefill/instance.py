"""The prefill instance's logic, without gRPC: run a prompt through the (SPP) engine with a KV sink,
report progress and the first token, and confirm that every KV chunk reached the decode side.

Ownership: the prefill engine owns its own blocks and frees them right after the first token; the
staged KV copies belong to the transfers until the receivers confirm them. Leaving a prefill early
(cancel, Abort, failure) aborts the request in the engine.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator

from common.engine.async_engine import AsyncEngine
from common.kv_connector.types import KVSink
from common.errors import InvalidRequestError, KVTransferError, RequestAbortedError
from common.metrics import kv_transfer_bytes
from common.sampling_params import SamplingParams, TopLogprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillJob:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    sink: KVSink
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
                 metrics: object | None = None) -> None:
        """`metrics`: a common.metrics.Metrics (active requests, KV sent); None = none."""
        self.instance_id = instance_id
        self.metrics = metrics
        self.engine = engine
        self.kv_timeout_s = kv_timeout_s
        self.tp = tp
        self.running: set[str] = set()
        self.active = 0                               # prefill() streams open

    @property
    def busy(self) -> bool:
        """Requests in flight here (a draining instance waits for them)."""
        return self.active > 0

    def start(self) -> None:
        """Nothing runs in the background of a prefill instance."""

    async def stop(self) -> None:
        pass

    async def prefill(self, job: PrefillJob) -> AsyncIterator[Progress | FirstToken | Done]:
        self.active += 1
        try:
            with self.metrics.track_active() if self.metrics is not None else contextlib.nullcontext():
                async for ev in self._prefill(job):
                    yield ev
        finally:
            self.active -= 1

    async def _prefill(self, job: PrefillJob) -> AsyncIterator[Progress | FirstToken | Done]:
        rid = job.request_id
        _, layout = await self.engine.kv_info()
        if job.receiver_layout is not None and job.receiver_layout != layout:
            raise InvalidRequestError(f"KV layout mismatch: this prefill instance has {layout}, the "
                                      f"decode side {job.receiver_layout}")
        t0 = time.monotonic()
        params = replace(job.params, max_tokens=1)      # the decode instance samples the rest
        self.running.add(rid)
        confirmed = False
        try:
            stream = self.engine.generate(job.token_ids, params, rid, kv_sink=job.sink,
                                          ttft_deadline_s=job.ttft_deadline_s, tbt_slo_s=job.tbt_slo_s)
            t_first = None
            async with contextlib.aclosing(stream):
                async for out in stream:
                    if out.token_id is None and out.finish_reason is not None:
                        break                            # aborted before the first token
                    yield Progress(out.num_computed, out.prompt_len)
                    if out.token_id is not None:
                        t_first = time.monotonic()
                        yield FirstToken(out.token_id, out.logprob, t_first - t0, out.top_logprobs)
            if t_first is None:
                raise RequestAbortedError(f"prefill of {rid} was aborted")
            kv_bytes = kv_transfer_bytes(layout, len(job.token_ids), self.tp)
            try:
                await self.engine.wait_kv(rid, self.kv_timeout_s)
            except KVTransferError:
                if self.metrics is not None:
                    self.metrics.observe_kv_transfer(job.sink.backend, "send", 0, 0.0, ok=False)
                raise
            confirmed = True
            if self.metrics is not None:     # the transfer streams chunk by chunk from the start
                self.metrics.observe_kv_transfer(job.sink.backend, "send", kv_bytes, time.monotonic() - t0)
            yield Done(kv_bytes, time.monotonic() - t_first)
        finally:
            self.running.discard(rid)
            # Forget the transfer state (and stop any transfer still running when we left early).
            if self.engine.failed is None:
                with contextlib.suppress(Exception):
                    await self.engine.abort(rid)
            if not confirmed:
                log.info("prefill of %s ended before its KV was confirmed", rid)

    async def abort(self, request_id: str) -> bool:
        return await self.engine.abort(request_id)
