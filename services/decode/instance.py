"""The decode instance's logic, without gRPC: KV intake, decoding streams, leases.

Ownership (decode.proto): from PrepareReceive on, the request's blocks belong to this instance. It
frees them when the request finishes, is aborted (Abort RPC or the Decode call cancelled), fails
(KV never arrived, a worker died), or when its placement's lease cannot be renewed any more (the
kvstore reclaimed it: somebody gave up on the request). While a request holds blocks here, this
instance renews its lease.

Epochs (Placement.epoch): PrepareReceive and a Decode call that brings its own placement are served
only for the live placement of that epoch (asked of the kvstore); a prefilled request's Decode must
bring the epoch it was prepared with; the receivers take only chunks stamped with that epoch; and
renewals carry it, so a placement released or expired and placed again under the same id is never
served, written or kept alive by the holder of the old one. A stale epoch is StalePlacementError
(FAILED_PRECONDITION).

Spans (common/tracing.py), children of the caller's: "decode.prepare_receive" (blocks reserved for a
prefilled request's KV) and "decode" (the Decode call: a "kv_received" event when a prefilled
request's KV is all here, "first_token" on the short path; the tokens and finish reason at the end).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from common.client import KVStoreClient
from common.engine.async_engine import AsyncEngine, EngineStats
from common.kv_connector.types import GroupSink
from common.errors import (InvalidRequestError, MnemosyneError, PlacementError, StalePlacementError,
                           kv_transfer_error)
from common.metadata.types import Placement
from common.metrics import kv_transfer_bytes
from common.sampling_params import SamplingParams
from common.tracing import NOOP, end_span
from opentelemetry.trace import SpanKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Destination:
    """Where a prefill instance writes a request's KV (proto: KVDestination)."""
    request_id: str
    backend: str
    layout: object                     # common.kv_transfer.KVLayout
    groups: list[GroupSink]
    token_ends: list[int]              # per group: end of its prompt token range
    epoch: int = 0                     # the placement's: every chunk must carry it


@dataclass(frozen=True)
class DecodeJob:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    placement: Placement | None
    first_token: int | None            # set: the KV comes from a prefill instance
    ttft_deadline_s: float | None = None   # absolute, this host's time.monotonic() (short prompts)
    tbt_slo_s: float | None = None         # None = the engine's default


class DecodeInstance:
    def __init__(self, instance_id: str, engine: AsyncEngine, kvstore: KVStoreClient,
                 kv_timeout_s: float, metrics: object | None = None, tracer=NOOP) -> None:
        """`metrics`: a common.metrics.Metrics (active requests, KV received); None = none. `tracer`:
        where the spans go (default: none)."""
        self.instance_id = instance_id
        self.tracer = tracer
        self.metrics = metrics
        self._receiving: dict[str, tuple[float, str, int]] = {}   # rid -> (since, backend, bytes)
        self.engine = engine
        self.kvstore = kvstore
        self.kv_timeout_s = kv_timeout_s
        self.leases: dict[str, Placement] = {}       # requests holding blocks here, with a placement
        # Prepared (blocks reserved, KV on its way) but Decode not called yet. The router keeps these
        # leases (it alone knows the request is alive until Decode); this instance only checks that
        # the placement still exists and frees the request when it is gone (its router died).
        self._awaiting_decode: set[str] = set()
        self._decoding: set[str] = set()              # ids with a Decode call open here
        self._undo: set[asyncio.Future] = set()      # aborts undoing reservations whose caller left
        self._renewer: asyncio.Task[None] | None = None
        self.active = 0                               # decode() streams open
        # PoolService: a heartbeat (load, prefix index) before a finished request's stream ends
        self.on_request_end: Callable[[], Awaitable[None]] | None = None

    @property
    def busy(self) -> bool:
        """Requests in flight here, including prefilled ones whose KV is on its way (they hold a
        lease from PrepareReceive on): a draining instance waits for them."""
        return self.active > 0 or bool(self.leases)

    def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew_forever(), name="decode-lease-renewal")

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None

    def stats(self) -> EngineStats:
        return self.engine.stats

    # ---- requests ----------------------------------------------------------------------------
    async def prepare_receive(self, placement: Placement, sender_layout: object | None,
                              backend: str, parent=None, prompt_ids: list[int] | None = None) -> Destination:
        """Reserves the blocks of a prefilled request; `parent`: the caller's span context;
        `prompt_ids`: its prompt, whose prefix cached here is reused (not sent)."""
        span = self.tracer.start_span("decode.prepare_receive", context=parent, kind=SpanKind.SERVER, attributes={
            "mnemosyne.request_id": placement.request_id, "mnemosyne.prompt_tokens": placement.num_tokens,
            "mnemosyne.instance": self.instance_id})
        error: BaseException | None = None
        try:
            return await self._prepare_receive(placement, sender_layout, backend, prompt_ids)
        except Exception as e:
            error = e
            raise
        finally:
            end_span(span, error)

    async def _prepare_receive(self, placement: Placement, sender_layout: object | None,
                               backend: str, prompt_ids: list[int] | None = None) -> Destination:
        rid = placement.request_id
        if placement.instance_id and placement.instance_id != self.instance_id:
            raise InvalidRequestError(f"placement of {rid} names decode instance {placement.instance_id}, "
                                      f"this is {self.instance_id}")
        await self._check_live(placement)
        own_backend, layout = await self.engine.kv_info()
        if backend and backend != own_backend:
            raise InvalidRequestError(f"this decode instance receives KV over {own_backend!r}, not {backend!r}")
        if sender_layout is not None and sender_layout != layout:
            raise InvalidRequestError(f"KV layout mismatch: sender {sender_layout}, receiver {layout}")
        try:
            groups = await self.engine.prepare_receive(rid, placement.num_tokens, placement.max_new_tokens,
                                                       epoch=placement.epoch, prompt_ids=prompt_ids)
        except asyncio.CancelledError:
            # The caller went away mid-reservation; the engine thread may reserve anyway. An abort
            # queued behind it on the same thread undoes it (no blocks left with nobody to free them).
            self._undo.add(asyncio.ensure_future(self.engine.abort(rid)))
            self._undo = {t for t in self._undo if not t.done()}
            raise
        self.leases[rid] = placement
        self._awaiting_decode.add(rid)
        tp = len(groups[0].addresses) if groups else 1
        incoming = placement.num_tokens - sum(g.cached for g in groups)     # the cached prefix is not sent
        self._receiving[rid] = (time.monotonic(), own_backend, kv_transfer_bytes(layout, incoming, tp))
        by_group = {g.group: g.token_end for g in placement.groups}
        m = _kvp_tokens(groups, placement.num_tokens)
        ends = [by_group.get(g.group, min(placement.num_tokens, g.token_start + m)) for g in groups]
        return Destination(rid, own_backend, layout, groups, ends, placement.epoch)

    async def _check_live(self, placement: Placement) -> None:
        """The placement is the kvstore's live one for its request: same epoch, this instance."""
        rid = placement.request_id
        if placement.epoch < 1:
            raise InvalidRequestError(f"placement of {rid} has no epoch: pass the placement the kvstore's "
                                      "Reserve returned")
        live = await self.kvstore.get_placement(rid)
        if live is None:
            raise PlacementError(f"request {rid}: the kvstore holds no placement for it (released, expired "
                                 "or never reserved)")
        if live.epoch != placement.epoch:
            raise StalePlacementError(f"request {rid}: placement epoch {placement.epoch} is stale (the live "
                                      f"placement's is {live.epoch})")
        if live.instance_id != self.instance_id:
            raise StalePlacementError(f"request {rid}: its live placement is on {live.instance_id}, not on "
                                      f"this instance ({self.instance_id})")

    async def decode(self, job: DecodeJob, parent=None) -> AsyncIterator:
        """Yields the request's StepOutputs (tokens; the last one has finish_reason). A failed KV
        intake raises KVTransferError; a failed engine WorkerFailedError. `parent`: the caller's
        span context (common.tracing.parent_from)."""
        self.active += 1
        prefilled = job.first_token is not None
        span = self.tracer.start_span("decode", context=parent, kind=SpanKind.SERVER, attributes={
            "mnemosyne.request_id": job.request_id, "mnemosyne.prompt_tokens": len(job.prompt_ids),
            "mnemosyne.prefilled": prefilled, "mnemosyne.instance": self.instance_id})
        error: BaseException | None = None
        tokens, reason = 0, None
        try:
            with self.metrics.track_active() if self.metrics is not None else contextlib.nullcontext():
                async for out in self._decode(job):
                    if not tokens and not reason:
                        span.add_event("kv_received" if prefilled else "first_token")
                    if out.token_id is not None:
                        tokens += 1
                    reason = out.finish_reason or reason
                    yield out
        except Exception as e:
            error = e
            raise
        finally:
            self.active -= 1
            end_span(span, error, **{"mnemosyne.completion_tokens": tokens,
                                     "mnemosyne.finish_reason": getattr(reason, "value", reason)})
        if self.on_request_end is not None:         # finished normally: its cached blocks, reported
            await self.on_request_end()

    def _received(self, rid: str, ok: bool) -> None:
        """A prefilled request's KV intake ended (its first output came, or it failed)."""
        recv = self._receiving.pop(rid, None)
        if recv is not None and self.metrics is not None:
            since, backend, nbytes = recv
            self.metrics.observe_kv_transfer(backend, "recv", nbytes if ok else 0,
                                             time.monotonic() - since, ok=ok)

    async def _check_decode(self, job: DecodeJob) -> None:
        """A prefilled request decodes under the placement epoch it was prepared with; a request
        prefilled here under its live placement (when it brings one)."""
        rid = job.request_id
        if job.first_token is None:
            if job.placement is not None:
                await self._check_live(job.placement)
            return
        prepared = self.leases.get(rid)
        if prepared is None:
            return                     # not prepared (or freed): the engine refuses it with the reason
        if job.placement is None:
            raise InvalidRequestError(f"Decode of prefilled request {rid} needs its placement (epoch "
                                      f"{prepared.epoch})")
        if job.placement.epoch != prepared.epoch:
            raise StalePlacementError(f"request {rid}: Decode with placement epoch {job.placement.epoch}, "
                                      f"but its KV was prepared for epoch {prepared.epoch}")

    async def _decode(self, job: DecodeJob) -> AsyncIterator:
        rid = job.request_id
        # One call per id, checked and taken before any await: a second call with a running id must
        # be refused without touching the first one's lease, which its clean-up below would drop (the
        # first request would then go on without renewals; found by fuzzing).
        if rid in self._decoding:
            raise InvalidRequestError(f"request id {rid!r} is already running")
        self._decoding.add(rid)
        try:
            await self._check_decode(job)
        except BaseException:
            self._decoding.discard(rid)
            raise
        self._awaiting_decode.discard(rid)
        if job.placement is not None:
            self.leases[rid] = job.placement
        try:
            if job.first_token is not None:
                stream = self.engine.add_prefilled(job.prompt_ids, job.params, rid, job.first_token, 0.0,
                                                   self.kv_timeout_s, tbt_slo_s=job.tbt_slo_s)
            else:
                stream = self.engine.generate(job.prompt_ids, job.params, rid, ttft_deadline_s=job.ttft_deadline_s,
                                              tbt_slo_s=job.tbt_slo_s)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    if out.error is not None:
                        self._received(rid, ok=False)
                        raise kv_transfer_error(f"request {rid}: {out.error}")
                    self._received(rid, ok=True)
                    yield out
        finally:
            self.leases.pop(rid, None)
            self._receiving.pop(rid, None)
            self._decoding.discard(rid)

    async def abort(self, request_id: str) -> bool:
        self.leases.pop(request_id, None)
        self._receiving.pop(request_id, None)
        self._awaiting_decode.discard(request_id)
        return await self.engine.abort(request_id)

    async def _drop_orphans(self) -> None:
        """Frees prepared requests whose placement is gone (their router died before calling Decode,
        so nobody renewed the lease): the engine's blocks and the local lease."""
        for rid in list(self._awaiting_decode):
            held = self.leases.get(rid)
            try:
                live = await self.kvstore.get_placement(rid)
                alive = live is not None and held is not None and live.epoch == held.epoch
            except MnemosyneError as e:                # kvstore away: ask again next round
                log.warning("placement of %s: %s", rid, e)
                continue
            if alive or rid not in self._awaiting_decode:   # (Decode may have begun meanwhile)
                continue
            self._awaiting_decode.discard(rid)
            log.warning("request %s: its placement expired before any Decode call; freeing its blocks", rid)
            self._received(rid, ok=False)
            self.leases.pop(rid, None)
            try:
                await self.engine.abort(rid)
            except MnemosyneError as e:
                log.warning("abort %s: %s", rid, e)

    # ---- leases ------------------------------------------------------------------------------
    async def _renew_forever(self) -> None:
        while True:
            # idle: look again soon, so that a short lease taken meanwhile is renewed in time
            lease_s = min((p.lease_s for p in self.leases.values()), default=0.3)
            await asyncio.sleep(max(0.05, lease_s / 3))
            await self._drop_orphans()
            for rid, held in [(r, p) for r, p in self.leases.items() if r not in self._awaiting_decode]:
                try:
                    await self.kvstore.renew(rid, held.epoch)
                except PlacementError:
                    if self.leases.pop(rid, None) is not None:
                        log.warning("lease of %s is gone: aborting it here", rid)
                        try:
                            await self.engine.abort(rid)
                        except MnemosyneError as e:
                            log.warning("abort %s: %s", rid, e)
                except MnemosyneError as e:          # kvstore unreachable: try again next round
                    log.warning("renew %s: %s", rid, e)


def _kvp_tokens(groups: list[GroupSink], num_tokens: int) -> int:
    """M of this instance as seen in a request's groups (group k starts at k*M)."""
    for g in groups:
        if g.group > 0:
            return g.token_start // g.group
    return max(num_tokens, 1)
