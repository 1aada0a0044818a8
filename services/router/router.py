"""The router's request flow, without the public gRPC server: reserve, route, relay, clean up.

    short prompt:  kvstore.Reserve -> decode.Decode (it prefills itself) -> relay tokens
    long prompt:   kvstore.Reserve -> decode.PrepareReceive -> prefill.Prefill (progress, first
                   token; KV streams to the decode workers) -> decode.Decode(first_token) -> relay

Cache-aware routing (services/router/prefix.py): before admission the router asks the kvstore's prefix
index where the prompt's prefix is cached. A long prompt whose uncached rest is short (< short_prompt_tokens)
on a decode instance holding its prefix, with room, takes the short route there; else it goes to the
prefill instance with the longest cached prefix (admission predicts each instance's TTFT from the tokens
it has left to compute); else as without a cache. Started.cached_prompt_tokens says what was matched.

Every request ends (finish, error, client cancel, Abort) with the same cleanup: the calls still
open are cancelled, the instances are told to abort (unless the request finished normally), and
the placement is released; a dead router's placements expire with their leases instead.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

import grpc
from opentelemetry.trace import SpanKind

from common.client import KVStoreClient
from common.errors import (CapacityError, InvalidRequestError, KVCorruptedError, KVTransferError, MnemosyneError,
                           PermissionDeniedError, PlacementError, StalePlacementError, UnreachableError,
                           WorkerFailedError)
from common.metadata.types import Instance, Placement, client_request_id, instance_request_id
from common.model.tokenizer import IncrementalDecoder
from common.rpc import client as rpc_client
from common.rpc import convert
from common.rpc.protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from common.rpc.status import error_from_rpc
from common.rpc.tls import Credentials
from common.tracing import NOOP, context_of, end_span, grpc_metadata
from services.router.config import RouterConfig
from common.admission import RETRY_METADATA_KEY, AdmissionRequest
from common.config import SchedulerConfig
from common.metrics import DEFAULT_PROMPT_CLASSES, Metrics, RequestRecorder
from services.router.admission import AdmissionGate
from services.router.discovery import Discovery
from services.router.frontend import Frontend, Job
from services.router.prefix import match_prefix
from services.router.request_log import RequestLine
from services.router.auth import ANONYMOUS, KeyRing, Principal
from services.router.stops import StopMatcher

log = logging.getLogger(__name__)

#: Failures of an attempt that a new placement may hide (an instance died or stopped answering, a
#: transfer failed, the placement went with the instance); see Router._retryable.
RETRYABLE = (WorkerFailedError, KVTransferError, PlacementError)
RETRY_POLL_S = 0.25                 # a retry asks the kvstore for room this often while none is free
MAX_PLACEMENTS = 4                  # attempts of one request in all, counting those refused at once
REPLACE_WAIT_S = 0.5                # before placing again a request whose decode instance was not registered
                                    # (two of the pools' heartbeat intervals: it has registered again by then)

FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
          common_pb2.FINISH_REASON_ABORTED: "abort"}


class RetryLater(CapacityError):
    """RESOURCE_EXHAUSTED for a resource that frees up by itself (KV blocks), with gRPC pushback."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((RETRY_METADATA_KEY, str(max(1, round(self.retry_after_s * 1000)))),)


# ---- events of a Generate stream ------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    request_id: str
    prompt_tokens: int
    route: str                      # "decode_only" | "disaggregated"
    prefill_instance: str
    decode_instance: str
    predicted_ttft_s: float | None = None     # admission's prediction, from arrival (None: no admission)
    ttft_slo_s: float | None = None           # the deadlines the request is served under
    tbt_slo_s: float | None = None
    cached_prompt_tokens: int | None = None   # found cached where it prefills, at routing (None: none)


@dataclass(frozen=True)
class Progress:
    tokens_done: int
    tokens_total: int


@dataclass(frozen=True)
class Delta:
    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)   # per token, when asked


@dataclass(frozen=True)
class Timings:
    ttft_s: float
    tbt_s: list[float]
    e2e_s: float
    queue_s: float
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Finished:
    reason: str                     # "stop" | "length" | "abort"
    timings: Timings


# ---- per request ----------------------------------------------------------------------------------
@dataclass(eq=False)
class _Active:
    job: Job
    owner: Principal = ANONYMOUS                        # the API key that sent it
    placement: Placement | None = None
    deadline_s: float | None = None                     # first token due (router's monotonic clock)
    tbt_slo_s: float | None = None
    prefill: Instance | None = None
    calls: list = field(default_factory=list)          # open grpc.aio calls to instances
    decode_called: bool = False
    ttft_seen: bool = False
    aborted: bool = False                               # Router.Abort
    reason: str | None = None                           # the decode instance's finish reason
    failure: MnemosyneError | None = None               # the prefill failed while decode ran
    prefill_down: bool = False                          # the prefill instance died or stopped answering
    working: bool = False                               # an instance took the attempt on (see _run)
    trace: object | None = None                         # the request's span context (the calls' parent)


class _Relay:
    """Text deltas (incremental detokenization) and timings of one request."""

    def __init__(self, frontend: Frontend, t0: float, logprobs: bool,
                 recorder: RequestRecorder | None = None) -> None:
        self.decoder = IncrementalDecoder(frontend.tokenizer, skip_special_tokens=True)
        self.recorder = recorder
        self.queue_s = 0.0
        self.t0, self.logprobs = t0, logprobs
        self.last: float | None = None
        self.ttft = 0.0
        self.tbt: list[float] = []
        self.count = 0

    def tokens(self, ids: list[int], logprobs: list[float],
               top_logprobs: list[list[tuple[int, float]]] = ()) -> Delta:
        now = time.monotonic()
        if self.last is None:
            self.ttft = now - self.t0
        else:
            self.tbt.append(now - self.last)
        self.last = now
        self.count += len(ids)
        if self.recorder is not None and ids:
            self.recorder.token(len(ids))
        text = "".join(self.decoder.push(t) for t in ids)
        return Delta(list(ids), text, list(logprobs) if self.logprobs else [], list(top_logprobs))

    def flush(self) -> Delta | None:
        text = self.decoder.flush()
        return Delta([], text, []) if text else None

    def timings(self, prompt_tokens: int) -> Timings:
        return Timings(self.ttft, self.tbt, time.monotonic() - self.t0, self.queue_s, prompt_tokens, self.count)



def _rpc_error(who: str, e: grpc.aio.AioRpcError) -> MnemosyneError:
    err = error_from_rpc(e)
    return type(err)(f"{who}: {err}")


class Router:
    """`metrics`: where requests are recorded (TTFT, TBT, latency, SLOs); `gate`: the admission
    gate (None = admission off: every valid request goes to the kvstore's placement); `tracer`:
    where the request's spans go (common/tracing.py; default: the no-op tracer)."""

    def __init__(self, config: RouterConfig, frontend: Frontend, kvstore: KVStoreClient,
                 metrics: Metrics | None = None, discovery: Discovery | None = None,
                 gate: "AdmissionGate | None" = None, tracer=NOOP, keys: KeyRing | None = None,
                 tls: Credentials | None = None) -> None:
        """`tls`: our certificate towards the instances (mutual TLS; None = plaintext)."""
        self.config = config
        self.tls = tls
        self.keys = keys if keys is not None else KeyRing(None)      # None: no authentication
        self.tracer = tracer
        self.frontend = frontend
        self.kvstore = kvstore
        self.metrics = metrics
        self.gate = gate
        self.discovery = discovery or Discovery(kvstore, config.discovery_ttl_s)
        self.active: dict[str, _Active] = {}
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._cleanups: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        if self._cleanups:
            await asyncio.wait(self._cleanups, timeout=self.config.rpc_timeout_s * 2)
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    def _channel(self, address: str, role: str) -> grpc.aio.Channel:
        """The channel to the `role` instance at `address`; over TLS its certificate must be of `role`."""
        ch = self._channels.get((address, role))
        if ch is None:
            ch = self._channels[(address, role)] = rpc_client.aio_channel(
                address, default_deadline_s=self.config.rpc_timeout_s, tls=self.tls, peer=role)
        return ch

    # ---- Generate --------------------------------------------------------------------------------
    async def generate(self, job: Job, t0: float,
                       owner: Principal = ANONYMOUS) -> AsyncIterator[Started | Progress | Delta | Finished]:
        """The events of one request, which belongs to `owner` (its API key: only it may abort the
        request; its limits apply); errors are typed (InvalidRequestError, CapacityError,
        WorkerFailedError / KVTransferError when an instance failed)."""
        rid, n = job.request_id, len(job.prompt_ids)
        if rid in self.active:
            raise InvalidRequestError(f"request id {rid!r} is already running")
        self.keys.limits.acquire(owner, n + job.params.max_tokens)      # RetryLater over the key's limits
        job = replace(job, request_id=instance_request_id(rid))   # its id everywhere but to the client
        iid = job.request_id
        st = _Active(job, owner=owner)
        self.active[rid] = st
        span = self.tracer.start_span("router.generate", kind=SpanKind.SERVER, attributes={
            "mnemosyne.request_id": rid, "mnemosyne.instance_request_id": iid, "mnemosyne.prompt_tokens": n,
            "mnemosyne.max_tokens": job.params.max_tokens})
        st.trace = context_of(span)
        finished = False
        rec: RequestRecorder | None = None
        outcome = "error"
        line = RequestLine(rid, n, job.params.max_tokens, api_key=owner.id,   # its log line, written at the end
                           instance_request_id=iid)
        relay: _Relay | None = None
        error: BaseException | None = None
        try:
            max_new = max(0, min(job.params.max_tokens, self.frontend.max_model_len - n))
            matches = await self._prefix_matches(job.prompt_ids)
            decision = None
            if self.gate is not None:
                line.admission = "waiting"
                admission = self.tracer.start_span("router.admission", context=st.trace)
                try:
                    decision = await self.gate.admit(AdmissionRequest(iid, n, max_new, t0, job.ttft_slo_s,
                                                                      job.tbt_slo_s, cached_tokens=matches))
                    line.admitted(decision, time.monotonic() - t0)
                except Exception as e:
                    line.rejected(e, time.monotonic() - t0)
                    raise
                finally:
                    end_span(admission, **{"mnemosyne.admission": line.admission,
                                           "mnemosyne.admission_reason": line.admission_reason,
                                           "mnemosyne.predicted_ttft_s": line.predicted_ttft_s})
            queue_s = time.monotonic() - t0
            ttft_slo, st.tbt_slo_s = self._slo(job, decision)
            st.deadline_s = t0 + ttft_slo
            if self.metrics is not None:
                rec = self.metrics.request(n, ttft_slo_s=ttft_slo, tbt_slo_s=st.tbt_slo_s, arrival_s=t0)
                rec.admitted()
            try:
                try:
                    st.prefill, st.placement, target = await self._place(iid, n, max_new, decision, matches)
                except PlacementError as e:
                    # The decode instance admission chose is not registered this moment: its
                    # registration lapsed (a stalled heartbeat, a clock step on Redis's host) and it
                    # registers again on its next heartbeat, or it left. Placed once more, after a
                    # heartbeat interval, on whichever decode instance the kvstore has then.
                    log.info("request %s: %s; placing it again in %.2f s", iid, e, REPLACE_WAIT_S)
                    await asyncio.sleep(REPLACE_WAIT_S)
                    try:
                        st.prefill, st.placement, target = await self._place(iid, n, max_new, None, matches)
                    except PlacementError as again:      # no decode instance registered: the deployment's
                        raise WorkerFailedError(f"request {rid}: no decode instance could take it now "
                                                f"({again}); retry") from again    # UNAVAILABLE, not NOT_FOUND
            except CapacityError as e:
                # The kvstore's view is newer than admission's (KV filled since the last sample):
                # the same RESOURCE_EXHAUSTED, with the retry hint clients back off by.
                hint = self.gate.controller.config.min_retry_after_s if self.gate is not None else 0.5
                raise RetryLater(f"{e}; retry after {hint:.1f}s", hint) from e
            if st.prefill is not None:
                self.discovery.inflight[st.prefill.instance_id] += 1
            cached = matches.get(st.prefill.instance_id if st.prefill else st.placement.instance_id, 0)
            if self.metrics is not None:
                self.metrics.observe_prefix_route(target, cached)
            attempts_left = self.config.retries        # attempts an instance took on, then failed
            placements_left = MAX_PLACEMENTS            # all attempts (one refused at once is cheap)
            retry_until: float | None = None            # the retries' deadline (from the first failure)
            line.route = "disaggregated" if st.prefill else "decode_only"
            yield Started(rid, n, "disaggregated" if st.prefill else "decode_only",
                          st.prefill.instance_id if st.prefill else "", st.placement.instance_id,
                          decision.predicted_ttft_s if decision is not None else None, ttft_slo, st.tbt_slo_s,
                          cached or None)
            relay = _Relay(self.frontend, t0, job.return_logprobs, rec)
            relay.queue_s = queue_s
            stops = StopMatcher(job.stop)
            failure: MnemosyneError | None = None       # the last attempt's, when a retry is due
            while True:
                run = None
                try:
                    if failure is not None:
                        st = await self._retry(rid, st, failure, n, max_new, retry_until)
                        line.route = "disaggregated" if st.prefill else "decode_only"
                    run = self._run(st, relay)
                    async for ev in run:
                        if isinstance(ev, Progress) and self.gate is not None:
                            self.gate.progress(iid, ev.tokens_done)
                        if relay.count and not st.ttft_seen:
                            st.ttft_seen = True
                            if self.gate is not None:
                                self.gate.first_token(iid)
                                self.gate.observe_ttft(decision, relay.ttft)
                        if isinstance(ev, Delta) and stops.stops:
                            ev = replace(ev, text=stops.push(ev.text))
                        yield ev
                        if stops.hit is not None:
                            break            # a stop string: the instances are told to abort below
                    reason = "stop" if stops.hit is not None else st.reason
                except (asyncio.CancelledError, *RETRYABLE) as e:
                    if isinstance(e, asyncio.CancelledError):
                        if st.aborted or st.failure is None:
                            if not st.aborted:
                                outcome = "abort"
                                raise
                            reason = "abort"
                            break
                        e = st.failure
                    # Each attempt an instance took on and failed uses a retry; one refused at once
                    # (an instance that died but is still listed) only a placement.
                    placements_left -= 1
                    if st.working:
                        attempts_left -= 1
                    if not self._retryable(st, e, relay) or attempts_left < 0 or placements_left <= 0 \
                            or (retry_until is not None and time.monotonic() >= retry_until):
                        raise self._after_tokens(e, relay) from None
                    failure = e
                    if retry_until is None:
                        retry_until = time.monotonic() + self.config.retry_wait_s
                    continue
                finally:
                    if run is not None:
                        await run.aclose()
                break
            tail = relay.flush()
            text = stops.push(tail.text if tail is not None else "") + stops.flush()
            if text:
                yield Delta([], text, [])
            finished = reason != "abort" and stops.hit is None     # the instances ended the request
            outcome = reason
            yield Finished(reason, relay.timings(n))
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "abort"            # the client went away
            raise
        except Exception as e:
            error = e
            raise
        finally:
            if relay is not None:
                line.timings(relay.ttft if relay.count else None, relay.tbt, relay.count)
            line.end(outcome, error, time.monotonic() - t0)
            line.emit(log)
            end_span(span, error, **{"mnemosyne.route": line.route, "mnemosyne.outcome": line.outcome,
                                     "mnemosyne.completion_tokens": line.completion_tokens,
                                     "mnemosyne.ttft_s": line.ttft_s})
            if rec is not None:
                rec.done(outcome)
            if self.gate is not None:
                self.gate.ended(iid)
                self.gate.poll()         # room may have appeared for a queued request
            self.active.pop(rid, None)
            self.keys.limits.release(owner)
            for call in st.calls:
                call.cancel()
            task = asyncio.create_task(self._cleanup(st, finished), name=f"cleanup-{rid}")
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                pass            # the client is gone; the cleanup goes on, tracked in _cleanups

    # ---- retry ---------------------------------------------------------------------------------
    @staticmethod
    def _retryable(st: _Active, e: BaseException, relay: _Relay) -> bool:
        """A failure a new attempt elsewhere can hide: an instance or a transfer failed (not the
        KV's checksum: the same sender would corrupt it again), or the placement was lost with it,
        and no token has reached the client yet (after one, the client would see a seam)."""
        return (isinstance(e, RETRYABLE) and not isinstance(e, (KVCorruptedError, StalePlacementError))
                and relay.count == 0 and not st.aborted)

    @staticmethod
    def _after_tokens(e: MnemosyneError, relay: _Relay) -> MnemosyneError:
        """The error the client gets; after streamed tokens it says so (the request was not retried,
        so the tokens already sent are all there is)."""
        if relay.count == 0:
            return e
        return type(e)(f"{e} (after {relay.count} token(s) were streamed: not retried; the text so far is "
                       "incomplete)")

    async def _retry(self, rid: str, old: _Active, failure: MnemosyneError, n: int, max_new: int,
                     deadline: float) -> _Active:
        """Ends the failed attempt `old` (its calls cancelled, the instances told to abort, its placement
        released) and places the request again under a new instance-side id: on another live prefill
        instance if there is one, on whichever decode instance the kvstore picks (the failed one left
        the pool; it may come back). Waits until `deadline` for room; then fails with `failure`."""
        reason = type(failure).__name__
        log.warning("request %s: %s; retrying (a new placement)", rid, failure)
        if self.metrics is not None:
            self.metrics.observe_retry(reason)
        # A prefill instance that failed is not asked again before it rebuilt its engine; another one,
        # else one that comes within prefill_wait_s, else the decode instance prefills the request
        # itself (see below).
        failed_prefill = old.prefill if old.prefill is not None and old.prefill_down else None
        # The decode side failed under a live prefill instance: that instance computes the prompt into
        # its prefix cache while the decode instance recovers (cache_only), so the new attempt streams
        # the prompt's KV from the cache instead of computing it only once the decode is back.
        warm_on = old.prefill if old.prefill is not None and not old.prefill_down and old.working else None
        for call in old.calls:
            call.cancel()
        await self._cleanup(old, finished=False)
        old.prefill, old.placement, old.decode_called, old.calls = None, None, False, []   # cleaned up once
        st = _Active(replace(old.job, request_id=instance_request_id(rid)), owner=old.owner,
                     deadline_s=old.deadline_s, tbt_slo_s=old.tbt_slo_s, trace=old.trace)
        self.active[rid] = st                        # Router.abort reaches the new attempt
        if warm_on is not None:
            deadline += await self._warm_prefill(st, warm_on)   # the placement's wait starts after it
        if not old.working:
            await asyncio.sleep(RETRY_POLL_S)        # refused at once: give a dead instance time to leave
        last: BaseException = failure
        prefill: Instance | None = None
        # The failed prefill instance is taken again once it registered a newer engine (its grid rebuilt:
        # 0.1-0.5 s here); a restarted process registers under a new id. Until one is there, or until
        # prefill_wait_s, the retry waits rather than have the decode instance prefill a long prompt
        # itself (seconds more on the built-in model for 600 tokens: bench/results/faults.md).
        prefill_wait_until = time.monotonic() + self.config.prefill_wait_s if failed_prefill else 0.0
        while not st.aborted:
            try:
                waiting = False
                if n >= self.config.short_prompt_tokens:
                    live = await self.discovery.instances("prefill", fresh=True)
                    live = [i for i in live if failed_prefill is None or i.instance_id != failed_prefill.instance_id
                            or i.engine_epoch > failed_prefill.engine_epoch]
                    # the warmed instance first: it holds the prompt's KV
                    prefill = min(live, key=lambda i: (warm_on is None or i.instance_id != warm_on.instance_id,
                                                       self.discovery.inflight[i.instance_id], i.instance_id),
                                  default=None)
                    waiting = prefill is None and time.monotonic() < prefill_wait_until
                if not waiting:
                    st.placement = await self.kvstore.reserve(st.job.request_id, n, max_new)
                    break
            except MnemosyneError as e:               # no room (the instance restarting) or kvstore away
                last = e
            if time.monotonic() >= deadline:
                raise type(failure)(f"{failure}; retried, but no instance could take the request within "
                                    f"{self.config.retry_wait_s:g} s (last: {last})")
            await asyncio.sleep(RETRY_POLL_S)
        if prefill is not None and st.placement is not None:
            st.prefill = prefill
            self.discovery.inflight[prefill.instance_id] += 1
        if st.aborted:
            old.aborted = True                       # generate() ends it as an abort, not a failure
            raise asyncio.CancelledError()
        log.info("request %s: a new attempt as %s on decode %s%s", rid, st.job.request_id, st.placement.instance_id,
                 f", prefill {st.prefill.instance_id}" if st.prefill else "")
        return st

    async def _warm_prefill(self, st: _Active, prefill: Instance) -> float:
        """Computes `st`'s prompt into `prefill`'s prefix cache (a cache_only Prefill under an id of
        its own) and waits for it; returns the seconds it took. A failure only costs the retry the
        cache hits: it is logged, not raised. A warm-up that reports no progress for the router's
        --progress-timeout-s is given up, as a prefill would be. Router.abort cancels it with the
        attempt's calls."""
        t0 = time.monotonic()
        job, wid = st.job, instance_request_id(client_request_id(st.job.request_id))
        req = prefill_pb2.PrefillRequest(request_id=wid, token_ids=job.prompt_ids,
                                         sampling=convert.sampling_to_proto(job.params), cache_only=True)
        self._slo_fields(st, req)
        self.discovery.inflight[prefill.instance_id] += 1
        call = prefill_pb2_grpc.PrefillStub(self._channel(prefill.address, "prefill")).Prefill(
            req, timeout=self.config.request_timeout_s, metadata=grpc_metadata(st.trace))
        st.calls.append(call)
        done = 0
        try:
            while (ev := await self._read_progress(call, f"prefill instance {prefill.instance_id}")) \
                    is not grpc.aio.EOF:
                if ev.HasField("progress"):
                    done = ev.progress.tokens_done
        except (grpc.aio.AioRpcError, WorkerFailedError) as e:
            if not st.aborted:
                why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e)
                log.warning("request %s: computing its prompt into %s's cache while the decode side recovers "
                            "failed (%s); the retry computes what is missing", job.request_id,
                            prefill.instance_id, why)
        finally:
            self.discovery.inflight[prefill.instance_id] -= 1
            st.calls.remove(call)
            call.cancel()
        log.info("request %s: %d prompt tokens computed into %s's cache in %.2f s while the decode side "
                 "recovered", job.request_id, done, prefill.instance_id, time.monotonic() - t0)
        return time.monotonic() - t0

    def _slo(self, job: Job, decision=None) -> tuple[float, float]:
        """(ttft, tbt) SLO seconds the request is judged by: admission's (its own, else the
        deadline scaled with its work and the decode pool's TBT SLO); without admission its own,
        else the configured class default and the scheduler's default TBT SLO."""
        if decision is not None and decision.ttft_slo_s is not None:
            return decision.ttft_slo_s, decision.tbt_slo_s
        if self.gate is not None:
            return self.gate.controller.slo_for(AdmissionRequest(job.request_id, max(len(job.prompt_ids), 1), 0,
                                                                 0.0, job.ttft_slo_s, job.tbt_slo_s))
        slo = self.config.slo
        return (job.ttft_slo_s or slo.ttft_for(DEFAULT_PROMPT_CLASSES.of(len(job.prompt_ids))),
                job.tbt_slo_s or SchedulerConfig().tbt_slo_s)

    def _slo_fields(self, st: _Active, msg) -> None:
        """The request's TTFT deadline (seconds remaining now) and TBT SLO on a call to a pool."""
        remaining = None if st.deadline_s is None else st.deadline_s - time.monotonic()
        convert.slo_to_proto(msg, remaining, st.tbt_slo_s)

    async def _prefix_matches(self, prompt_ids: list[int]) -> dict[str, int]:
        """Instance id -> prompt tokens cached there (services/router/prefix.py); {} when the kvstore
        cannot say (routing then goes on without the cache), and without asking when there is no
        choice to make: a short prompt (always prefilled where it decodes) with one live decode
        instance (its engine looks its own cache up anyway). That skip keeps a burst of short
        requests from queueing a kvstore round trip each ahead of their reservations."""
        try:
            instances = await self.discovery.instances()
        except MnemosyneError as e:
            log.warning("no instance list for prefix matching (%s): routing without the cache", e)
            return {}
        if len(prompt_ids) < self.config.short_prompt_tokens:
            instances = [i for i in instances if i.role == "decode"]
            if len(instances) <= 1:
                return {}
        return await match_prefix(self.kvstore, instances, prompt_ids)

    async def _place(self, iid: str, n: int, max_new: int, decision,
                     matches: dict[str, int]) -> tuple[Instance | None, Placement, str]:
        """(prefill instance or None for the decode-only route, the reserved placement, the
        cache-aware route: "decode" | "prefill" | "miss", mnemosyne_router_prefix_routed_total's target).

        With admission's choice (it predicted each instance from the tokens left there) its instances;
        a long prompt it sent to a decode instance without a prefill instance, whose rest is short
        there, takes the decode-only route. Without one (admission off or fail_open) the router's own:
        a long prompt whose rest is short on a decode instance holding its prefix is reserved there
        when that instance has room; else the prefill instance with the longest cached prefix, else
        the least loaded one; a short prompt goes to the decode instance holding most of it when that
        has room. CapacityError when no decode instance has room."""
        short = self.config.short_prompt_tokens
        prefill: Instance | None = None
        placement: Placement | None = None
        warm = False            # a long prompt takes the decode-only route to the decode instance holding it
        chosen = decision is not None and bool(decision.decode_instance)      # admission chose the instances
        if chosen:
            decode_id = decision.decode_instance
            warm = n >= short and not decision.prefill_instance and n - matches.get(decode_id, 0) < short
        else:
            decode_id = ""
            decodes = {i.instance_id for i in await self.discovery.instances("decode")}
            holder = max(((m, i) for i, m in matches.items() if i in decodes), default=None)
            if holder is not None and n - holder[0] < short:
                try:
                    placement = await self.kvstore.reserve(iid, n, max_new, holder[1])
                    warm = n >= short
                except (CapacityError, PlacementError) as e:      # no room there now (or it left)
                    log.info("request %s: decode instance %s holds %d cached tokens but: %s", iid, holder[1],
                             holder[0], e)
        if n >= short and not warm:
            if not chosen:
                live = await self.discovery.instances("prefill")
                best = max(((matches.get(i.instance_id, 0), -self.discovery.inflight[i.instance_id], i.instance_id)
                            for i in live if matches.get(i.instance_id, 0) > 0), default=None)
                prefill = next((i for i in live if best is not None and i.instance_id == best[2]), None)
            if prefill is None:
                prefill = await self._prefill_instance(decision)
            if prefill is None:
                log.warning("no live prefill instance: %s (%d tokens) takes the decode-only route", iid, n)
        if placement is None:
            placement = await self.kvstore.reserve(iid, n, max_new, decode_id)
        where = prefill.instance_id if prefill is not None else placement.instance_id
        target = "miss" if matches.get(where, 0) <= 0 else ("prefill" if prefill is not None else "decode")
        return prefill, placement, target

    async def _prefill_instance(self, decision) -> Instance | None:
        """The prefill instance admission chose, else the least loaded live one."""
        if decision is not None and decision.prefill_instance:
            for inst in await self.discovery.instances("prefill"):
                if inst.instance_id == decision.prefill_instance:
                    return inst
        return await self.discovery.pick_prefill()

    async def _run(self, st: _Active, relay: _Relay) -> AsyncIterator[Progress | Delta]:
        job, placement = st.job, st.placement
        decode = decode_pb2_grpc.DecodeStub(self._channel(placement.address, "decode"))
        who_decode = f"decode instance {placement.instance_id} ({placement.address})"
        placement_pb = convert.placement_to_proto(placement)
        sampling = convert.sampling_to_proto(job.params)
        first = None
        tail: asyncio.Task[None] | None = None
        keeper: asyncio.Task[None] | None = None
        spans = []                          # the calls' client spans (ended by the end of the request)
        failed: BaseException | None = None
        try:
            if st.aborted:
                raise asyncio.CancelledError()
            if st.prefill is not None:
                who_prefill = f"prefill instance {st.prefill.instance_id} ({st.prefill.address})"
                # Until its Decode call runs, only this router knows the request is alive: it keeps
                # the lease from here to the end of the request (the decode instance, which frees a
                # prepared request whose placement expired, renews too once it decodes). The lease
                # runs from Reserve on, so the keeper starts before PrepareReceive, however long that takes.
                keeper = asyncio.create_task(self._keep_lease(st, placement.lease_s),
                                             name=f"lease-{job.request_id}")
                # Counted as called before the answer: a client that cancels while PrepareReceive is in
                # flight must still abort there (the blocks may be reserved already; an Abort of a
                # request the instance does not know is harmless).
                st.decode_called = True
                try:
                    # The prompt goes too: the decode instance takes the prefix it holds in its own
                    # cache and expects only the rest from the prefill instance.
                    dest = await decode.PrepareReceive(decode_pb2.PrepareReceiveRequest(
                        request_id=job.request_id, placement=placement_pb, backend=self.config.kv_backend,
                        prompt_token_ids=job.prompt_ids),
                        timeout=self.config.rpc_timeout_s, metadata=grpc_metadata(st.trace))
                except grpc.aio.AioRpcError as e:
                    raise _rpc_error(who_decode, e) from None
                st.working = True                   # blocks reserved on a live decode grid
                if st.failure is not None:
                    raise st.failure
                preq = prefill_pb2.PrefillRequest(request_id=job.request_id, token_ids=job.prompt_ids,
                                                  sampling=sampling, placement=placement_pb,
                                                  destination=dest.destination, top_logprobs=job.top_logprobs)
                self._slo_fields(st, preq)
                pspan = self.tracer.start_span("router.prefill", context=st.trace, kind=SpanKind.CLIENT,
                                               attributes={"mnemosyne.instance": st.prefill.instance_id})
                spans.append(pspan)
                pcall = prefill_pb2_grpc.PrefillStub(self._channel(st.prefill.address, "prefill")).Prefill(
                    preq, timeout=self.config.request_timeout_s, metadata=grpc_metadata(context_of(pspan)))
                st.calls.append(pcall)
                try:
                    while first is None:
                        ev = await self._read_progress(pcall, who_prefill)
                        if ev is grpc.aio.EOF:
                            raise WorkerFailedError(f"{who_prefill} ended the stream without a first token")
                        if ev.HasField("progress"):
                            yield Progress(ev.progress.tokens_done, ev.progress.tokens_total)
                        elif ev.HasField("first_token"):
                            first = ev.first_token
                except grpc.aio.AioRpcError as e:
                    if st.failure is not None:
                        raise st.failure from None
                    err = _rpc_error(who_prefill, e)
                    st.prefill_down = type(err) in (WorkerFailedError, UnreachableError)
                    raise err from None
                except WorkerFailedError:
                    st.prefill_down = True
                    raise
                end_span(pspan)                 # the call up to the first token (the KV's tail follows)
                tail = asyncio.create_task(self._prefill_tail(st, pcall, who_prefill))
                yield relay.tokens([first.token_id], [first.logprob],
                                   [convert.top_logprobs_from_proto(first.top_logprobs)] if job.top_logprobs else [])
            request = decode_pb2.DecodeRequest(request_id=job.request_id, prompt_token_ids=job.prompt_ids,
                                               sampling=sampling, placement=placement_pb,
                                               return_logprobs=job.return_logprobs, top_logprobs=job.top_logprobs)
            if first is not None:
                request.first_token_id = first.token_id
                convert.slo_to_proto(request, None, st.tbt_slo_s)
            else:
                self._slo_fields(st, request)
            if st.aborted:
                raise asyncio.CancelledError()
            dspan = self.tracer.start_span("router.decode", context=st.trace, kind=SpanKind.CLIENT,
                                           attributes={"mnemosyne.instance": placement.instance_id})
            spans.append(dspan)
            dcall = decode.Decode(request, timeout=self.config.request_timeout_s,
                                  metadata=grpc_metadata(context_of(dspan)))
            st.calls.append(dcall)
            st.decode_called = True
            try:
                while True:
                    ev = await dcall.read()
                    st.working = True
                    if ev is grpc.aio.EOF:
                        break
                    if ev.HasField("delta"):
                        if ev.delta.token_ids:
                            yield relay.tokens(list(ev.delta.token_ids), list(ev.delta.logprobs),
                                               [convert.top_logprobs_from_proto(t) for t in ev.delta.top_logprobs])
                    elif ev.HasField("finished"):
                        st.reason = FINISH.get(ev.finished.finish_reason, "stop")
                    elif ev.HasField("progress") and first is None:
                        # a short prompt's prefill there: admission counts what it has left
                        yield Progress(ev.progress.tokens_done, ev.progress.tokens_total)
            except grpc.aio.AioRpcError as e:
                if st.failure is not None:
                    raise st.failure from None
                raise _rpc_error(who_decode, e) from None
            if st.reason is None:
                raise WorkerFailedError(f"{who_decode} ended the stream without a finish")
            if st.reason == "abort" and not st.aborted:
                # Nobody here aborted it: the instance did (its placement's lease was lost, it shut
                # down). That is a failure, never a normal end with status OK.
                raise WorkerFailedError(f"{who_decode} aborted the request (its placement was lost or the "
                                        "instance is stopping)")
            if tail is not None:
                # The decode started only once all KV arrived, so PrefillDone is due now.
                await asyncio.wait({tail}, timeout=self.config.rpc_timeout_s)
                if st.failure is not None:
                    raise st.failure
        except Exception as e:
            failed = e
            raise
        finally:
            for s in spans:
                if s.is_recording():
                    end_span(s, failed)
            for task in (tail, keeper):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    async def _read_progress(self, call, who: str):
        """The next event of a Prefill stream before its first token. A long prefill reports progress
        every step (a chunk), however long the whole takes, so silence for progress_timeout_s means
        it stalled: the call is cancelled and the request fails, long before request_timeout_s."""
        timeout_s = self.config.progress_timeout_s
        if not timeout_s:
            return await call.read()
        read = asyncio.ensure_future(call.read())
        try:
            done, _ = await asyncio.wait({read}, timeout=timeout_s)
        except asyncio.CancelledError:
            read.cancel()
            raise
        if not done:
            call.cancel()
            read.cancel()
            await asyncio.gather(read, return_exceptions=True)
            raise WorkerFailedError(f"{who} reported no progress for {timeout_s:g} s (the router's "
                                    "--progress-timeout-s)")
        return read.result()

    async def _keep_lease(self, st: _Active, lease_s: float) -> None:
        """Renews a placement every lease_s / 3 while the request runs here (until cancelled). A
        placement gone (a renewal came too late: the decode instance frees the prepared request)
        fails the request now, with that reason, rather than at its Decode call after the prefill."""
        rid = st.job.request_id
        while True:
            await asyncio.sleep(max(0.05, lease_s / 3))
            try:
                await self.kvstore.renew(rid, st.placement.epoch)
            except PlacementError as e:
                if st.reason is not None:                 # decoded to the end: nothing is lost
                    return
                if st.failure is None:
                    st.failure = PlacementError(f"request {rid}: its lease ({lease_s:g} s) was lost: {e}")
                for call in st.calls:
                    call.cancel()
                return
            except MnemosyneError as e:                   # kvstore away: try again next round
                log.warning("renew %s: %s", rid, e)

    async def _prefill_tail(self, st: _Active, pcall, who: str) -> None:
        """Reads the prefill stream to its end (PrefillDone). A failure (the KV never fully
        arrived) fails the request: it cancels the decode call, whose reader raises st.failure."""
        try:
            while (ev := await pcall.read()) is not grpc.aio.EOF:
                if ev.HasField("done"):
                    log.debug("%s: KV of %s sent (%d bytes, tail %.3f s)", who, st.job.request_id,
                              ev.done.kv_bytes, ev.done.transfer_tail_s)
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.CANCELLED and (st.aborted or st.failure):
                return
            st.failure = _rpc_error(who, e)
            st.prefill_down = type(st.failure) in (WorkerFailedError, UnreachableError)
            for call in st.calls:
                if call is not pcall:
                    call.cancel()

    async def _cleanup(self, st: _Active, finished: bool) -> None:
        rid, t = st.job.request_id, self.config.rpc_timeout_s
        if st.prefill is not None:
            self.discovery.inflight[st.prefill.instance_id] -= 1
        if not finished:
            aborts = []
            if st.decode_called and st.placement is not None:
                aborts.append((f"decode instance {st.placement.instance_id}", decode_pb2_grpc.DecodeStub(
                    self._channel(st.placement.address, "decode")).Abort(common_pb2.AbortRequest(request_id=rid), timeout=t)))
            if st.prefill is not None and st.calls:
                aborts.append((f"prefill instance {st.prefill.instance_id}", prefill_pb2_grpc.PrefillStub(
                    self._channel(st.prefill.address, "prefill")).Abort(common_pb2.AbortRequest(request_id=rid), timeout=t)))
            for who, call in aborts:
                try:
                    await call
                except grpc.aio.AioRpcError as e:
                    log.info("abort %s on %s: %s", rid, who, e.code().name)
        if st.placement is not None:
            try:
                await self.kvstore.release(rid, st.placement.epoch)
            except MnemosyneError as e:
                log.warning("release of %s: %s (its lease will expire)", rid, e)

    # ---- Abort -----------------------------------------------------------------------------------
    def abort(self, request_id: str, owner: Principal = ANONYMOUS) -> bool:
        """Ends a running request of `owner`: its stream finishes with reason "abort". Another key's
        request is PermissionDeniedError."""
        st = self.active.get(request_id)
        if st is None:
            return False
        if st.owner.id != owner.id:
            raise PermissionDeniedError(f"request {request_id} belongs to another API key")
        st.aborted = True
        for call in st.calls:
            call.cancel()
        return True
