"""SLO-aware admission: admit, queue or reject a request from its predicted TTFT and KV need against
the live load of the candidate instances. Plain logic (no gRPC, no asyncio, injected clock values);
the router owns the waiting and the RPCs.

Models: every instance publishes the performance model its own scheduler predicts with, its
iteration budget, chunking, pipeline depth and TBT SLO (common.metadata.types.SchedulingInfo, in its
kvstore registration); PoolModel.published rebuilds from it the PrefillTable C the instance's
scheduler uses, so C[l] here is the instance's own prediction. Instances that published nothing
are judged by their pool's default model.

Prediction (seconds from now, on one candidate, with the candidate's own model):
  own      = C[prompt] + (pipeline_depth - 1) * budget     C: the instance's PrefillTable; prompt =
                                                           the tokens left to compute there (those the
                                                           router found in its prefix cache are not,
                                                           AdmissionRequest.cached_tokens)
  ahead    = C[queued prefill tokens]                      the instance's backlog, as one prompt: an
                                                           upper estimate (attention is superlinear);
             on a LARS pool only the tokens LARS runs before this prompt: this router's own admitted
             prompts there are ordered by the pool's LARS (their deadlines and tokens left are known
             here; one with progress has started, and LARS finishes started prompts first where
             that costs no deadline), tokens known only from the gauge count as ahead of everything (_lars_order); a
             prompt that LARS would run first is rejected when an admitted prompt it passes would
             then miss its deadline (_passes_past_deadline)
  model    = work * slowdown / (1 - decode share)
  work     = C[ahead] + own, on a decode instance with a budget and work ahead rounded up to a whole
             number of budgets: its prompts get their first tokens at the end of the iteration that
             finishes them, and behind others each iteration is filled to the budget
  ttft     = correction[pool](model) x load + in flight
  load     (common.perf_model.ttft_correction.LoadFactor) on a loaded candidate (work ahead, decodes
             running, an iteration in flight): the geometric mean of measured / predicted over the
             pool's recent requests admitted in that state, >= 1 (what later arrivals and the load's
             own CPU add, which no prediction at admission sees); 1 on an idle candidate
  in flight = half the instance's recent mean iteration time when it is busy and nothing is
             predicted ahead of the request (measured: a new request waits for the iteration under
             way; behind others, that iteration's chunk is in the work ahead)
  host contention (common.perf_model.ttft_correction.HostContention): when another instance on the
             candidate's host (the same address host) is predicted to keep prefilling a prompt this
             router admitted there for busy_s more seconds, the corrected model time runs `factor`
             times slower for those seconds (ttft = contention(correction(model) x load, busy_s)
             + in flight);
             factor is fitted per pool on the measured TTFTs of requests admitted while a neighbour
             was busy, which the pool's correction then does not learn from (1 before any).
  slowdown = recent mean iteration time / (iteration budget x correction ratio), clipped to
             [1, max_slowdown]: the model's error on this instance right now beyond what the pool's
             correction already knows (1 when idle or unknown, on instances with fixed chunks,
             whose iterations do not fill the budget, and on decode instances, whose iterations mix
             decode steps and short prompts' chunks: _slowdown)
  decode share (decode instances only, short prompts prefilled there): what the running decodes add
             to an iteration of one smallest chunk (their marginal time: the iteration's fixed cost is
             the chunk's anyway) over the budget, capped at max_decode_share: what is left for chunks.
  correction[pool] (pool = prefill | decode): overhead + ratio * model, fitted on the measured vs
             predicted TTFTs of the pool's recent admitted requests, those admitted to an idle
             instance once there are three (observe_ttft;
             common.perf_model.ttft_correction: what the model does not see, RPC hops, KV transfer
             set-up, a slower host; the identity before any measurement).
Deadlines (slo_for): a request's own TTFT SLO is taken as given; the default is
  max(the prompt class's SLO, slo_factor x its corrected prefill time alone on an idle instance),
so an idle deployment admits every prompt that fits max_model_len, and a loaded one rejects only
what it cannot serve in time. The default TBT SLO is the decode pool's published tbt_slo_s.
Long prompts (>= short_prompt_tokens) are prefilled by the best prefill instance and need a decode
instance with room now; short prompts are prefilled by the decode instance that holds them, and so is a
long prompt whose uncached rest is short on a decode instance with room that holds its prefix (cache-aware
routing: then only such instances are candidates).
A decode instance has room when every KVP group has the blocks the request needs (common.kv_cache.
kvp_blocks.kvp_split: prompt then generated tokens over groups of M = kvp_tokens, as the kvstore places them)
and one more decode keeps its predicted step within the TBT SLO (an instance running no decode
always has TBT room: waiting cannot make a lone decode faster). An instance that reports no KV
gauges gets no KV check here (the kvstore's reservation still makes it).

Decision, with waited = now - arrival and the request's deadlines (slo_for):
  ADMIT  (fits)                waited + ttft <= ttft SLO and a decode instance has room now
  QUEUE  (kv_full | tbt_full)  the TTFT fits but no decode instance has room now; the request waits in
                               a bounded queue ordered by LARS until room appears (poll), its TTFT no
                               longer fits, or max_queue_wait_s passes
  REJECT ttft_slo              the TTFT does not fit; retry_after = the excess (backlog must drain)
         ttft_unattainable     not even an idle instance would meet it from arrival (no retry hint);
                               one that would have, but waited too long for a decision, is ttft_slo
         kv_too_large          no live decode instance could ever hold it (INVALID_ARGUMENT)
         queue_full | queue_timeout | no_instance
  ADMIT  (fail_open)           no fresh load at all and config.fail_open (default off)

Staleness: an instance whose load is older than max_staleness_s (heartbeats stopped or lost, query
failed, sample not updated) is unknown and never a candidate: we cannot predict its TTFT, and a
silent instance is more likely dead than idle. With no fresh instance of a needed role the request is rejected
(no_instance, retry after max_staleness_s) unless fail_open.

Between load samples, admitted requests are added to their instances' load locally (queued prompt
tokens, KV blocks, one running decode) until a sample newer than the admission (plus visibility_lag_s) shows
them, so a burst does not pile onto one instance; requests that ended after an instance's sample was
taken are taken out of it (an instance that just finished its last request is idle, not busy).

Load sources (both give a LoadSnapshot): heartbeat_loads (the default) reads the load every instance
sends with its kvstore heartbeats (common/pool_load.py), from the kvstore's listing, aged on Redis's
clock; PrometheusSource reads a Prometheus server's HTTP API (the operator's configured URL, with
per-request timeouts). Admission never fetches a URL an instance registered.
"""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping

from common.config import SchedulerConfig, SLOConfig
from common.errors import CapacityError, ConfigError, InvalidRequestError
from common.kv_cache.kvp_blocks import kvp_split
from common.metadata.types import Instance, SchedulingInfo
from common.metrics import DEFAULT_PROMPT_CLASSES, PromptClasses
from common.perf_model.base import PerfModel
from common.perf_model.prefill_table import PrefillTable
from common.perf_model.ttft_correction import HostContention, LoadFactor, TTFTCorrection
from common.scheduler.chunking import ChunkingConfig
from common.scheduler.policy import LARS, replay
from common.scheduler.types import BatchShape, ReqView

log = logging.getLogger(__name__)

REPLAY_WORK = 2048      # steps x prompts a replay of a pool's LARS may take per decision (_lars_order)

RETRY_METADATA_KEY = "grpc-retry-pushback-ms"     # gRPC's server pushback for client retries


# ---- configuration ---------------------------------------------------------------------------

@dataclass(frozen=True)
class AdmissionConfig:
    slo: SLOConfig = field(default_factory=SLOConfig)
    prompt_classes: PromptClasses = DEFAULT_PROMPT_CLASSES
    short_prompt_tokens: int = 256     # shorter prompts are prefilled by the decode instance
    max_queue: int = 256               # bounded admission queue
    max_queue_wait_s: float = 30.0     # a queued request is rejected after this long at most
    max_staleness_s: float = 5.0       # older load = instance unknown (not a candidate)
    max_slowdown: float = 4.0
    max_decode_share: float = 0.9
    visibility_lag_s: float = 0.2      # an admission shows in an instance's reported load within this
    min_retry_after_s: float = 0.5
    fail_open: bool = False            # admit blindly when no load is known at all
    tbt_slo_s: float = SchedulerConfig().tbt_slo_s   # default TBT SLO until a decode pool publishes its own
    correction_window: int = 64        # measured TTFTs the online correction fits on, per pool
    min_correction: float = 0.25       # clip of the correction's ratio (measured / predicted)
    max_correction: float = 50.0
    max_overhead_s: float = 5.0        # clip of the correction's fixed overhead

    def __post_init__(self) -> None:
        missing = set(self.prompt_classes.names) - {c for c, _ in self.slo.ttft_s}
        if missing:
            raise ConfigError(f"admission: no TTFT SLO for prompt classes {sorted(missing)}")
        if self.short_prompt_tokens < 1 or self.max_queue < 0:
            raise ConfigError(f"admission: short_prompt_tokens={self.short_prompt_tokens} must be "
                              f">= 1 and max_queue={self.max_queue} >= 0")
        for name in ("max_queue_wait_s", "max_staleness_s", "min_retry_after_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"admission: {name} must be positive, got {getattr(self, name)}")
        if self.correction_window < 1 or not 0 < self.min_correction <= 1 <= self.max_correction \
                or not self.tbt_slo_s > 0 or self.max_overhead_s < 0:
            raise ConfigError(f"admission: need correction_window={self.correction_window} >= 1, "
                              f"0 < min_correction={self.min_correction} <= 1 <= "
                              f"max_correction={self.max_correction}, tbt_slo_s={self.tbt_slo_s} > 0, "
                              f"max_overhead_s={self.max_overhead_s} >= 0")
        if self.max_slowdown < 1 or not 0 <= self.max_decode_share < 1 or self.visibility_lag_s < 0:
            raise ConfigError(f"admission: max_slowdown={self.max_slowdown} must be >= 1, "
                              f"max_decode_share={self.max_decode_share} in [0, 1), "
                              f"visibility_lag_s={self.visibility_lag_s} >= 0")


@dataclass(frozen=True)
class PoolModel:
    """How long work takes on an instance of one pool: its performance model (its parallel layout),
    the PrefillTable under its iteration budget and chunking, its pipeline depth (SPP stages), and
    the TBT SLO it was configured with (None = unknown)."""
    model: PerfModel
    table: PrefillTable
    pipeline_depth: int = 1
    tbt_slo_s: float | None = None
    shared: bool = False        # FCFS with fixed chunks: every queued prompt gets a chunk in each
                                # iteration, so a new prompt delays the ones already there
    budgeted: bool = True       # adaptive chunks fill the budget: iteration time / budget is the
                                # model's error now (the slowdown); with fixed chunks it is not
    ordered: bool = False       # LARS: queued prompts run in least-slack order, not arrival order

    @classmethod
    def build(cls, model: PerfModel, budget_s: float, *, pipeline_depth: int = 1,
              kvp_tokens: int | None = None, chunking: ChunkingConfig = ChunkingConfig(),
              fixed_chunk: int | None = None, tbt_slo_s: float | None = None) -> "PoolModel":
        return cls(model, PrefillTable(model, budget_s, 0, chunking, kvp_tokens, fixed_chunk),
                   pipeline_depth, tbt_slo_s)

    @classmethod
    def published(cls, info: "SchedulingInfo", kvp_tokens: int = 0) -> "PoolModel | None":
        """The model an instance published with its registration (common.metadata.types.SchedulingInfo):
        the same performance model, budget, chunking and pipeline depth as its own scheduler, so
        table.time(l) is what the instance's scheduler predicts. None when it published no model."""
        if info.perf_model is None:
            return None
        chunking = ChunkingConfig(min_chunk=info.min_chunk, max_chunk=info.max_chunk)
        fixed = info.chunking == "fixed"
        built = cls.build(info.perf_model.build(), info.iteration_budget_s, pipeline_depth=info.pipeline_depth,
                          kvp_tokens=kvp_tokens or None, chunking=chunking,
                          fixed_chunk=info.chunk_size if fixed else None, tbt_slo_s=info.tbt_slo_s)
        return replace(built, shared=fixed and info.policy == "fcfs", budgeted=not fixed,
                       ordered=info.policy == "lars")

    @property
    def budget_s(self) -> float:
        return self.table.budget_s

    def prefill_alone_s(self, prompt_tokens: int) -> float:
        return self.table.time(prompt_tokens) + (self.pipeline_depth - 1) * self.budget_s


# ---- inputs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdmissionRequest:
    """A request as admission sees it. Times on the caller's monotonic clock; SLOs are relative to
    arrival, None = the configured default for its prompt class. `cached_tokens`: instance id -> prompt
    tokens the router found in that instance's prefix cache (the kvstore's index): what an instance
    prefills is the rest (tokens_left)."""
    request_id: str
    prompt_tokens: int
    max_new_tokens: int
    arrival_s: float
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    cached_tokens: Mapping[str, int] = field(default_factory=dict, hash=False)

    def tokens_left(self, instance_id: str) -> int:
        """Prompt tokens instance `instance_id` has to compute (the last one always is)."""
        return self.prompt_tokens - max(0, min(self.cached_tokens.get(instance_id, 0), self.prompt_tokens - 1))

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.max_new_tokens < 0:
            raise InvalidRequestError(f"request {self.request_id}: prompt_tokens={self.prompt_tokens} "
                                      f"must be >= 1, max_new_tokens={self.max_new_tokens} >= 0")
        for name in ("ttft_slo_s", "tbt_slo_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise InvalidRequestError(f"request {self.request_id}: {name} must be positive, got {v}")


@dataclass(frozen=True)
class InstanceLoad:
    """One instance's live load. `observed_at`: when the sample was taken (monotonic clock).
    KV lists are per KVP group (the smallest free / largest used over its TP ranks)."""
    instance_id: str
    role: str
    pool: str = "default"
    observed_at: float = -math.inf
    active_requests: int = 0
    queued_prefill_tokens: int = 0
    running_decodes: int = 0
    kv_free_blocks: tuple[int, ...] = ()
    kv_used_blocks: tuple[int, ...] = ()
    kv_block_size: int = 0
    kvp_tokens: int = 0
    iteration_s: float | None = None      # recent mean iteration time; None = idle or unknown
    model_scale: float | None = None      # its performance model's online scale now (None = unknown)
    host: str = ""                        # the host part of its address ("" = unknown: shares with no one)

    @property
    def kv_capacity(self) -> tuple[int, ...]:
        used = self.kv_used_blocks or (0,) * len(self.kv_free_blocks)
        return tuple(f + u for f, u in zip(self.kv_free_blocks, used))

    @property
    def busy(self) -> bool:
        """Mid-iteration or about to be: running decodes, queued prefill work or active requests."""
        return bool(self.running_decodes or self.queued_prefill_tokens or self.active_requests)

    def slowdown(self, budget_s: float, cap: float) -> float:
        if self.iteration_s is None:
            return 1.0
        return min(max(self.iteration_s / budget_s, 1.0), cap)


@dataclass(frozen=True)
class LoadSnapshot:
    loads: Mapping[str, InstanceLoad]     # by instance id
    taken_at: float
    errors: Mapping[str, str] = field(default_factory=dict)   # target or query -> why it failed

    def fresh(self, now: float, max_staleness_s: float, role: str | None = None) -> list[InstanceLoad]:
        return [l for l in self.loads.values() if now - l.observed_at <= max_staleness_s
                and (role is None or l.role == role)]


def kv_need_blocks(prompt_tokens: int, max_new_tokens: int, block_size: int,
                   kvp_tokens: int) -> tuple[int, ...]:
    """Blocks per KVP group (common.kv_cache.kvp_blocks.kvp_split, the kvstore's rule too)."""
    return tuple(blocks for _, _, blocks in kvp_split(prompt_tokens, max_new_tokens, kvp_tokens, block_size))


# ---- decisions -------------------------------------------------------------------------------

class Outcome(str, enum.Enum):
    ADMIT = "admitted"
    QUEUE = "queued"
    REJECT = "rejected"


@dataclass(frozen=True)
class Decision:
    """outcome + reason (metric labels); the instances chosen (ADMIT; prefill None on the short
    path or fail_open); predicted TTFT from arrival; retry_after_s (REJECT; None = retrying will
    not help); detail (human-readable); latest_start_s (QUEUE: rejected if not admitted by then);
    kv_blocks (ADMIT: what the request needs per KVP group of the chosen decode instance);
    ttft_slo_s / tbt_slo_s: the SLOs it was judged by; model_ttft_s, waited_s, pool: what
    AdmissionController.observe_ttft needs to learn from the measured TTFT."""
    outcome: Outcome
    reason: str
    prefill_instance: str | None = None
    decode_instance: str | None = None
    predicted_ttft_s: float | None = None
    retry_after_s: float | None = None
    detail: str = ""
    latest_start_s: float | None = None
    kv_blocks: tuple[int, ...] = ()       # ADMIT: blocks per KVP group on the decode instance
    ttft_slo_s: float | None = None       # the deadline the request was judged by (from arrival)
    tbt_slo_s: float | None = None
    model_ttft_s: float | None = None     # ADMIT: the uncorrected prediction, from the decision on
    waited_s: float = 0.0                 # arrival -> decision
    inflight_s: float = 0.0               # ADMIT: the measured rest of the iteration in flight
    pool: str = ""                        # ADMIT: the pool whose correction applies (prefill | decode)
    corrected_s: float | None = None      # ADMIT: the corrected model time x load_factor, before host contention
    load_factor: float = 1.0              # ADMIT: the pool's load factor applied (1 on an idle instance)
    host_busy_s: float = 0.0              # ADMIT: seconds a neighbour on its host was predicted busy
    parts: Mapping[str, float] = field(default_factory=dict)   # ADMIT: the prediction's terms (the log)

    def error(self, request_id: str) -> CapacityError | InvalidRequestError:
        """The error to end a rejected request with: AdmissionRejected (RESOURCE_EXHAUSTED), or
        InvalidRequestError (INVALID_ARGUMENT) when the request can never fit (kv_too_large)."""
        if self.outcome is not Outcome.REJECT:
            raise ValueError(f"decision {self.outcome.value} is not a rejection")
        if self.reason == "kv_too_large":
            return InvalidRequestError(f"request {request_id}: {self.detail}")
        return AdmissionRejected(request_id, self)


class AdmissionRejected(CapacityError):
    """RESOURCE_EXHAUSTED with the reason and the retry hint (also as gRPC pushback metadata)."""

    def __init__(self, request_id: str, decision: Decision) -> None:
        hint = (f"; retry after {decision.retry_after_s:.1f}s" if decision.retry_after_s is not None
                else "; retrying will not help without a longer deadline")
        super().__init__(f"request {request_id} rejected by admission ({decision.reason}): "
                         f"{decision.detail}{hint}")
        self.decision = decision
        self.retry_after_s = decision.retry_after_s

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC pushback: the hint in ms, or -1 (retrying cannot help: a client's retry policy stops)."""
        if self.retry_after_s is None:
            return ((RETRY_METADATA_KEY, "-1"),)
        return ((RETRY_METADATA_KEY, str(math.ceil(round(self.retry_after_s * 1000, 6)))),)


@dataclass
class _Pending:
    at: float
    prefill_id: str | None
    decode_id: str | None
    prompt_tokens: int
    kv_blocks: tuple[int, ...]
    request_id: str = ""


@dataclass(frozen=True)
class _Ended:
    at: float
    prefill_id: str | None
    decode_id: str
    prompt_tokens: int
    first_at: float               # its first token (inf: none; its prefill was cut short)


@dataclass
class _Queued:
    request: AdmissionRequest
    expires_at: float
    work_s: float


class AdmissionController:
    """decide() each new request; poll() after every new snapshot (and when requests finish) to
    admit or expire queued ones, in LARS order; cancel() a queued request the client gave up on.

        d = ctl.decide(req, snapshot, now)        # ADMIT: route to d.prefill_instance / d.decode_instance
        if d.outcome is Outcome.QUEUE: wait for a poll() result naming req.request_id
        if d.outcome is Outcome.REJECT: raise d.error(req.request_id)
        ctl.progress(rid, tokens_done, now)       # an admitted request's prefill progress, and
        ctl.first_token(rid, now)                 # its first token: it no longer waits for a prefill
        ctl.ended(rid, now)                       # its end (finished, failed, cancelled): gone
        ctl.observe_ttft(d, ttft_s)               # its measured TTFT: the online correction learns
    """

    def __init__(self, config: AdmissionConfig, decode: PoolModel,
                 prefill: PoolModel | None = None) -> None:
        """`decode` / `prefill`: each pool's default model (for instances that published none, and
        for the default deadlines); `models` (set by the owner from the registrations): the model
        each instance published, by instance id; `tbt_slo_s`: the default TBT SLO (the decode
        pool's published one)."""
        self.config = config
        self.decode = decode
        self.prefill = prefill
        self.models: dict[str, PoolModel] = {}
        self.tbt_slo_s = config.tbt_slo_s
        self.corrections = {pool: TTFTCorrection(config.correction_window, config.min_correction,
                                                 config.max_correction, config.max_overhead_s)
                            for pool in ("prefill", "decode")}
        self.contention = {pool: HostContention(config.correction_window, config.max_slowdown)
                           for pool in ("prefill", "decode")}
        self.load = {pool: LoadFactor(config.correction_window, config.max_slowdown)
                     for pool in ("prefill", "decode")}
        self._hosts: dict[str, str] = {}        # instance id -> host, from the latest snapshot
        self._lars = LARS()
        self._orders: dict[tuple, tuple[int, list[tuple[float, int]]]] = {}   # _lars_order's, this decision's
        self._unknown: dict[str, int] = {}     # instance -> queued tokens its sample had beyond this router's
        self._queue: dict[str, _Queued] = {}
        self._pending: list[_Pending] = []
        # admitted, no first token yet: rid -> [instance that prefills it, due, prompt tokens left,
        # prompt tokens, arrival, predicted first token, predicted seconds of its own prefill (0 on a
        # prefill instance: its reports are the count), admitted with nothing ahead of it, progress
        # reports of a decode instance's prompt [(when, tokens left)]]
        self._awaiting: dict[str, list] = {}
        self._iterations: dict[str, float] = {}  # instance id -> its recent mean iteration, latest snapshot
        # admitted, not ended: rid -> [prefill instance, decode instance, prompt tokens, first token at]
        self._routes: dict[str, list] = {}
        self._ended: list[_Ended] = []          # recently ended: older load samples may still count them

    # ---- public --------------------------------------------------------------------------

    def slo_for(self, req: AdmissionRequest) -> tuple[float, float]:
        """(ttft, tbt) SLO seconds the request is judged by: its own when set; else TTFT =
        max(its class SLO, slo_factor x its predicted prefill time alone on an idle instance), TBT =
        the decode pool's published TBT SLO."""
        slo = self.config.slo
        ttft = req.ttft_slo_s or max(slo.ttft_for(self.config.prompt_classes.of(req.prompt_tokens)),
                                     slo.slo_factor * self._work(req))
        return ttft, req.tbt_slo_s or self.tbt_slo_s

    def correction(self, pool: str) -> TTFTCorrection:
        """`pool`'s correction: corrected seconds = correction(model seconds); .ratio, .overhead_s."""
        return self.corrections[pool]

    def first_token(self, request_id: str, now: float) -> None:
        """An admitted request got its first token at `now` (it no longer waits for a prefill)."""
        self._awaiting.pop(request_id, None)
        route = self._routes.get(request_id)
        if route is not None:
            route[3] = min(route[3], now)
        for p in self._pending:
            if p.request_id == request_id:
                p.prompt_tokens = 0        # its prefill is done; its decode and KV still count

    def ended(self, request_id: str, now: float) -> None:
        """An admitted request ended (finished, failed or cancelled) at `now`: nothing of it counts
        against its instances any more, even before their next load sample shows it gone (a
        sample taken before `now` may still count it: _effective takes it out)."""
        self._awaiting.pop(request_id, None)
        self._pending = [p for p in self._pending if p.request_id != request_id]
        route = self._routes.pop(request_id, None)
        if route is not None:
            self._ended.append(_Ended(now, *route))

    def progress(self, request_id: str, tokens_done: int, now: float) -> None:
        """An admitted request's prefill progressed, at `now` (the router sees each chunk's
        progress: a prefill instance's Prefill stream, or the Decode stream of a decode instance
        that prefills a short prompt itself)."""
        a = self._awaiting.get(request_id)
        if a is not None:
            left = max(a[3] - tokens_done, 0)
            a[2] = min(a[2], left)
            if a[6] > 0:
                a[8].append((now, left))

    def observe_ttft(self, decision: Decision, ttft_s: float) -> None:
        """Learns from an admitted request's measured TTFT (seconds from arrival)."""
        pred, pool = decision.model_ttft_s, decision.pool
        if pool not in self.corrections or pred is None:
            return
        measured = ttft_s - decision.waited_s - decision.inflight_s
        if decision.host_busy_s > 0 and decision.corrected_s is not None:
            self.contention[pool].observe(decision.corrected_s, decision.host_busy_s, measured)
        else:
            loaded = self._loaded(decision.parts, decision.inflight_s)
            self.corrections[pool].observe(pred, measured, clean=not loaded)
            if loaded and decision.corrected_s is not None:
                self.load[pool].observe(decision.corrected_s / decision.load_factor, measured)

    @staticmethod
    def _loaded(parts: Mapping[str, float], inflight_s: float) -> bool:
        """Whether a prediction (its terms) was made on a loaded instance: work queued ahead,
        decodes running, a slowdown seen or an iteration in flight (else it was idle)."""
        return bool(parts.get("ahead_tokens") or parts.get("running_decodes")
                    or parts.get("slowdown", 1.0) != 1.0 or inflight_s)

    def model_of(self, l: InstanceLoad) -> PoolModel:
        """The model instance `l` published, else its pool's default."""
        m = self.models.get(l.instance_id)
        if m is not None:
            return m
        return self.prefill if l.role == "prefill" and self.prefill is not None else self.decode

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def next_expiry(self) -> float | None:
        """The earliest time a queued request is rejected at if still queued (None: none queued)."""
        return min((q.expires_at for q in self._queue.values()), default=None)

    def queued_ids(self, now: float) -> list[str]:
        """Queued request ids in LARS order at `now` (first = admitted first when room appears)."""
        return [q.request.request_id for q in self._ordered(now)]

    def decide(self, req: AdmissionRequest, snapshot: LoadSnapshot, now: float) -> Decision:
        if req.request_id in self._queue:
            raise InvalidRequestError(f"request {req.request_id} is already queued")
        d = self._evaluate(req, snapshot, now)
        if d.outcome is Outcome.QUEUE:
            if len(self._queue) >= self.config.max_queue:
                soonest = min((q.expires_at for q in self._queue.values()), default=now)
                return Decision(Outcome.REJECT, "queue_full", retry_after_s=self._retry(soonest - now),
                                detail=f"admission queue is full ({self.config.max_queue} requests); "
                                       f"{d.detail}")
            expires = min(now + self.config.max_queue_wait_s, d.latest_start_s)
            self._queue[req.request_id] = _Queued(req, expires, self._work(req))
            d = replace(d, latest_start_s=expires)
        elif d.outcome is Outcome.ADMIT:
            self._admitted(req, d, now)
        return d

    def poll(self, snapshot: LoadSnapshot, now: float) -> list[tuple[AdmissionRequest, Decision]]:
        """Queued requests that are now admitted or rejected (removed from the queue), LARS order."""
        out = []
        for q in self._ordered(now):
            req = q.request
            if now >= q.expires_at:
                d = Decision(Outcome.REJECT, "queue_timeout", retry_after_s=self.config.min_retry_after_s,
                             detail=f"no decode instance had room within {now - req.arrival_s:.1f}s")
            else:
                d = self._evaluate(req, snapshot, now)
                if d.outcome is Outcome.QUEUE:
                    continue
                if d.outcome is Outcome.REJECT and d.reason == "ttft_slo":
                    d = replace(d, reason="queue_timeout")
            del self._queue[req.request_id]
            if d.outcome is Outcome.ADMIT:
                self._admitted(req, d, now)
            out.append((req, d))
        return out

    def cancel(self, request_id: str) -> bool:
        return self._queue.pop(request_id, None) is not None

    # ---- evaluation ----------------------------------------------------------------------

    def _evaluate(self, req: AdmissionRequest, snapshot: LoadSnapshot, now: float) -> Decision:
        cfg = self.config
        self._orders = {}
        self._unknown = {}
        ttft_slo, tbt_slo = self.slo_for(req)
        waited = now - req.arrival_s
        self._pending = [p for p in self._pending if now - p.at <= cfg.max_staleness_s + cfg.visibility_lag_s]
        self._ended = [e for e in self._ended if now - e.at <= cfg.max_staleness_s + cfg.visibility_lag_s]
        for rid in [r for r, a in self._awaiting.items() if now > a[1] + cfg.max_queue_wait_s]:
            del self._awaiting[rid]          # long overdue: its first token must have been missed
        self._hosts = {l.instance_id: l.host for l in snapshot.loads.values()}
        self._iterations = {l.instance_id: l.iteration_s for l in snapshot.loads.values() if l.iteration_s}
        for a in self._awaiting.values():
            # a prefill instance's reported progress only falls; a decode instance's prompts are
            # re-estimated each time, from their last report (or their prediction before any)
            a[2] = self._predicted_left(a, now)
        short = self.prefill is None or req.prompt_tokens < cfg.short_prompt_tokens
        decodes = [self._effective(l) for l in snapshot.fresh(now, cfg.max_staleness_s, "decode")]
        prefills = [] if short else [self._effective(l) for l in
                                     snapshot.fresh(now, cfg.max_staleness_s, "prefill")]
        if not decodes or not (short or prefills):
            if cfg.fail_open and not snapshot.fresh(now, cfg.max_staleness_s):
                return Decision(Outcome.ADMIT, "fail_open", detail="no fresh load data")
            role = "decode" if not decodes else "prefill"
            return Decision(Outcome.REJECT, "no_instance", retry_after_s=self._retry(cfg.max_staleness_s),
                            detail=f"no {role} instance with fresh load (within {cfg.max_staleness_s}s)")

        states = {l.instance_id: self._kv_state(req, l, tbt_slo) for l in decodes}
        fits_ever = [l for l in decodes if states[l.instance_id] != "kv_too_large"]
        room = [l for l in fits_ever if states[l.instance_id] == "room"]
        # Cache-aware: a long prompt whose uncached rest is short on a decode instance with room is
        # prefilled there, as a short prompt would be (only those instances are candidates).
        hits = [] if short else [l for l in room if req.tokens_left(l.instance_id) < cfg.short_prompt_tokens]
        short = short or bool(hits)
        if not fits_ever:
            return Decision(Outcome.REJECT, "kv_too_large",
                            detail=f"{req.prompt_tokens}+{req.max_new_tokens} tokens fit on no live "
                                   f"decode instance even when empty")
        role = "decode" if short else "prefill"
        corr = self.correction(role)
        deadline = req.arrival_s + ttft_slo
        parts: dict[str, dict] = {}          # instance -> its prediction's terms (the request log)
        cands = [(self._predict(self.model_of(l), l, req, now, deadline, parts.setdefault(l.instance_id, {})), l)
                 for l in ((hits or room or fits_ever) if short else prefills)]
        alone = corr(min(self.model_of(l).prefill_alone_s(req.tokens_left(l.instance_id)) for _, l in cands))
        slos = dict(ttft_slo_s=ttft_slo, tbt_slo_s=tbt_slo, waited_s=waited)
        if alone > ttft_slo:
            return Decision(Outcome.REJECT, "ttft_unattainable", predicted_ttft_s=waited + alone,
                            detail=f"prefilling {req.prompt_tokens} tokens alone takes ~{alone:.2f}s; "
                                   f"TTFT SLO {ttft_slo:.2f}s", **slos)
        if waited + alone > ttft_slo:
            # attainable on arrival, lost to the time it waited (a queue for room): a retry is a new
            # arrival with a new deadline, so this one gets a hint (a queued one ends as queue_timeout)
            return Decision(Outcome.REJECT, "ttft_slo", predicted_ttft_s=waited + alone,
                            retry_after_s=self._retry(0.0),
                            detail=f"waited {waited:.2f}s for a decision; prefilling {req.prompt_tokens} "
                                   f"tokens alone takes ~{alone:.2f}s; TTFT SLO {ttft_slo:.2f}s", **slos)
        contention, load = self.contention[role], self.load[role]
        scored = []
        for model_s, l in cands:
            busy = self._host_busy_s(l, now)
            lf = load.factor if self._loaded(parts[l.instance_id], self._inflight_s(l)) else 1.0
            scored.append((contention(corr(model_s) * lf, busy), model_s, busy, lf, l))
        timed, model_s, busy, lf, best = min(scored, key=lambda c: (c[0], c[4].instance_id))
        # a new request waits for the iteration under way only when nothing is predicted ahead of it:
        # the work ahead holds that iteration's chunk (counted twice, a prompt behind another's last
        # 100 tokens was predicted 0.11 s late each time)
        inflight = 0.0 if parts[best.instance_id].get("ahead_tokens") else self._inflight_s(best)
        pred = timed + inflight
        if waited + pred > ttft_slo:
            return Decision(Outcome.REJECT, "ttft_slo", predicted_ttft_s=waited + pred,
                            retry_after_s=self._retry(waited + pred - ttft_slo),
                            detail=f"predicted TTFT {waited + pred:.2f}s > SLO {ttft_slo:.2f}s "
                                   f"(best instance {best.instance_id})", **slos)
        late = self._passes_past_deadline(self.model_of(best), best, req, now, deadline)
        if late > 0:
            return Decision(Outcome.REJECT, "ttft_slo", predicted_ttft_s=waited + pred,
                            retry_after_s=self._retry(late),
                            detail=f"instance {best.instance_id} would run this prompt first (least slack) "
                                   f"and make a request admitted there miss its deadline by {late:.2f}s",
                            **slos)
        due = self._earliest_due(best, now) if self.model_of(best).shared else math.inf
        if now + pred > due:
            return Decision(Outcome.REJECT, "ttft_slo", predicted_ttft_s=waited + pred,
                            retry_after_s=self._retry(now + pred - due),
                            detail=f"instance {best.instance_id} shares each iteration among its prompts: "
                                   f"this one would delay requests admitted there past their deadline "
                                   f"(in {due - now:.2f}s)", **slos)
        if not room:
            why = "kv_full" if "kv_full" in states.values() else "tbt_full"
            return Decision(Outcome.QUEUE, why, predicted_ttft_s=waited + pred,
                            latest_start_s=req.arrival_s + ttft_slo - pred,
                            detail=f"no decode instance has room now ({why})", **slos)
        learn = dict(model_ttft_s=model_s, inflight_s=inflight, pool=role, corrected_s=corr(model_s) * lf,
                     load_factor=lf, host_busy_s=busy, parts=parts[best.instance_id], **slos)
        if short:
            return Decision(Outcome.ADMIT, "fits", None, best.instance_id, waited + pred,
                            kv_blocks=self._need(req, best), **learn)
        dec = max(room, key=lambda l: (self._headroom(req, l), l.instance_id))
        return Decision(Outcome.ADMIT, "fits", best.instance_id, dec.instance_id, waited + pred,
                        kv_blocks=self._need(req, dec), **learn)

    def _predict(self, pool: PoolModel, l: InstanceLoad, req: AdmissionRequest, now: float,
                 deadline: float, parts: dict | None = None) -> float:
        """Predicted seconds from now to the first token on instance `l` (before the correction);
        `parts` (optional) receives its terms."""
        ahead = self._lars_order(pool, l, req, now, deadline)[0] if pool.ordered else l.queued_prefill_tokens
        own = pool.prefill_alone_s(req.tokens_left(l.instance_id))
        t = pool.table.time(ahead) + own
        if ahead and pool.budgeted and l.role == "decode":
            # Prompts prefilled on a decode instance get their first token at the end of the
            # iteration that finishes them, and behind others that iteration is filled to the budget
            # (with the prompts still queued then, or arriving): the prompts of one iteration all
            # finish at its end, not one after another within it.
            t = math.ceil(t / pool.budget_s - 1e-9) * pool.budget_s
        share = 0.0
        if l.role == "decode" and l.running_decodes:
            share = min(self._decode_share(pool, l), self.config.max_decode_share)
            t /= 1.0 - share
        slow = self._slowdown(pool, l, self.correction(l.role).ratio)
        if parts is not None:
            parts.update(ahead_tokens=ahead, ahead_s=pool.table.time(ahead), own_s=own, decode_share=share,
                         running_decodes=l.running_decodes, slowdown=slow)
            if pool.ordered:        # what of `ahead` the load sample had beyond this router's prompts
                parts.update(gauge_tokens=l.queued_prefill_tokens, unknown_tokens=self._unknown.get(l.instance_id, 0),
                             sample_age_s=round(now - l.observed_at, 3))
        return t * slow

    def _lars_order(self, pool: PoolModel, l: InstanceLoad, req: AdmissionRequest, now: float,
                    deadline: float) -> tuple[int, list[tuple[float, int]]]:
        """Where `req` would run on LARS instance `l` among the prompts this router admitted there
        and has not seen a first token of (their deadlines and the tokens they have left are known
        here): (queued prompt tokens ahead of it, [(deadline, prompt tokens up to and including that
        request's own) for each of them it would pass]). Queued tokens this router knows nothing
        of (another router's, or a gauge that lags) are taken as ahead of everything. The work is
        weighed against the deadlines at the level the pool's own LARS weighs it (`_lars_level`): with
        a model 17% fast a long prompt admitted with 1 s of slack looked 6 s slack here, so a short
        prompt was predicted to pass it and admitted, while the pool kept the long one first. The
        order is the one they finish in when the pool arranges them again every iteration
        (policy.replay, one budget of work per step), not one arrangement now: a prompt ranked behind
        a started one by rho can lead it an iteration later (its slack falls as it waits, the running
        one's does not); `ahead` then counts the tokens the others computed before `req` finishes.
        Computed once per decision (`_evaluate` and `_passes_past_deadline` both ask)."""
        key = (l.instance_id, req.request_id, now, deadline)       # (_evaluate empties it first)
        if key not in self._orders:
            self._orders[key] = self._replay_order(pool, l, req, now, deadline)
        return self._orders[key]

    def _replay_order(self, pool: PoolModel, l: InstanceLoad, req: AdmissionRequest, now: float,
                      deadline: float) -> tuple[int, list[tuple[float, int]]]:
        ratio = self._lars_level(pool, l)
        mine = [(rid, a) for rid, a in self._awaiting.items() if a[0] == l.instance_id and a[2] > 0]
        # the sample counted this router's prompts as they were when it was taken, not as they are
        # now: what they had left then is theirs, not unknown (a sample 0.3 s old counted 101 tokens
        # of a prompt predicted to have 30 left, as 71 unknown ones ahead of the next prompt)
        then = sum(self._left_at(a, l.observed_at, self.config.visibility_lag_s)
                   for a in self._awaiting.values() if a[0] == l.instance_id)
        unknown = max(l.queued_prefill_tokens - then, 0)          # (each term of `then` >= its a[2])
        self._unknown[l.instance_id] = unknown                    # (the request log shows it)
        # a prompt with progress (reported, or predicted on a decode instance), or admitted first in
        # line, has started there: the pool's LARS finishes it before others when no deadline is lost
        # (policy.finish_started; admitted 0.07 s after a 79-token prompt on an idle instance, a
        # 98-token one was predicted to pass it by rho, 0.44 s, and took 0.83 s behind it)
        entries = [(ReqView(rid, a[4], a[3], a[3] - min(a[2], a[3]), started=a[2] < a[3] or a[7],
                            ttft_deadline_s=None if math.isinf(a[1]) else a[1]),
                    ratio * pool.table.time(a[2]), ratio * pool.table.time(a[3])) for rid, a in mine]
        mine_left = req.tokens_left(l.instance_id)
        own = ratio * pool.table.time(mine_left)
        entries.append((ReqView(req.request_id, req.arrival_s, mine_left,
                                ttft_deadline_s=None if math.isinf(deadline) else deadline), own, own))
        # the order they finish in, as the pool re-ranks them every iteration (policy.replay), and
        # the prompt tokens computed by each one's finish (work done converted at each one's rate);
        # fewer, longer steps behind a deep queue bound each decision's cost (each step arranges them
        # all: 128 steps over 256 prompts took 28 ms here, 16 take ~3.5 ms)
        finished = replay(self._lars, entries, now, pool.budget_s,
                          max_steps=max(16, min(128, REPLAY_WORK // len(entries))))
        left = {rid: a[2] for rid, a in mine}
        left[req.request_id] = mine_left
        work = {view.request_id: rem for view, rem, _ in entries}

        def tokens_by(done: dict[str, float]) -> int:
            return unknown + round(sum(left[r] * min(w / work[r], 1.0) for r, w in done.items() if work[r] > 0))
        order = [rid for rid, _ in finished]
        at = order.index(req.request_id)
        ahead = tokens_by(finished[at][1]) - mine_left
        passed = [(self._awaiting[rid][1], tokens_by(done)) for rid, done in finished[at + 1:]]
        return ahead, passed

    def _lars_level(self, pool: PoolModel, l: InstanceLoad) -> float:
        """The factor from the published table's seconds to those instance `l`'s LARS weighs work in
        now: its model's live online scale (the load's model_scale) over the scale it published, which
        gives its scheduler's own numbers; without a live scale, this pool's TTFT correction ratio
        (measured seconds, which that online scale tracks). (With the ratio alone, a pool slowed by a
        neighbour's prefill ran a 117-token prompt ahead of a started 192-token one, its slack
        stealing seeing the short one miss, while admission, on a ratio learned over minutes, had
        predicted the long one first: 0.9 and 0.6 relative errors, the two worst of a run.)"""
        if l.model_scale is not None:
            return l.model_scale / pool.table.scale
        return self.correction(l.role).ratio

    def _passes_past_deadline(self, pool: PoolModel, l: InstanceLoad, req: AdmissionRequest, now: float,
                              deadline: float) -> float:
        """How far past its deadline (seconds, 0 = none) the worst of the prompts `req` would pass
        on LARS instance `l` would then finish, counting only those that would have met it without
        `req`: admitting it must not make an admitted request miss (the pool's slack stealing only
        moves a request forward when nobody it passes loses a deadline; admission keeps to that)."""
        if not pool.ordered:
            return 0.0
        corr = self.correction(l.role)
        slow = self._slowdown(pool, l, corr.ratio)
        inflight = self._inflight_s(l)
        worst = 0.0
        for due, tokens in self._lars_order(pool, l, req, now, deadline)[1]:
            with_req = now + corr(pool.table.time(tokens) * slow) + inflight
            without = now + corr(pool.table.time(tokens - req.tokens_left(l.instance_id)) * slow) + inflight
            if without <= due < with_req:
                worst = max(worst, with_req - due)
        return worst

    def _decode_share(self, pool: PoolModel, l: InstanceLoad) -> float:
        """The share of each iteration's budget the running decodes take from the prompt's chunks:
        what they add to an iteration of one smallest chunk (the iteration's fixed cost is paid
        once, by the chunk, whether decodes ride along or not), over the budget. Their step alone
        counted that fixed cost again: one running decode took 67% of each iteration by it, and a
        prompt predicted 2.8 s took 0.97 s, as long as alone."""
        chunk = ((pool.table.min_chunk, 0),)
        extra = (pool.model.predict(BatchShape(prefills=chunk, decodes=self._decode_contexts(l)))
                 - pool.model.predict(BatchShape(prefills=chunk)))
        return max(extra, 0.0) / pool.budget_s

    @staticmethod
    def _decode_contexts(l: InstanceLoad) -> tuple[int, ...]:
        """The running decodes' contexts, each the mean of the KV in use."""
        used_tokens = sum(l.kv_used_blocks) * max(l.kv_block_size, 1)
        return (used_tokens // max(l.running_decodes, 1),) * l.running_decodes

    def _decode_step_s(self, pool: PoolModel, l: InstanceLoad, extra: int | None) -> float:
        """Predicted step of the running decodes (mean context from the KV in use), plus one new
        decode of context `extra`."""
        batch = BatchShape(decodes=self._decode_contexts(l) + (() if extra is None else (extra,)))
        return pool.model.predict(batch)

    @staticmethod
    def _need(req: AdmissionRequest, l: InstanceLoad) -> tuple[int, ...]:
        """Blocks per KVP group on `l`; () when `l` does not report its KV (then the kvstore's
        reservation is the only KV check)."""
        if not l.kv_free_blocks or l.kv_block_size <= 0:
            return ()
        return kv_need_blocks(req.prompt_tokens, req.max_new_tokens, l.kv_block_size, l.kvp_tokens)

    def _kv_state(self, req: AdmissionRequest, l: InstanceLoad, tbt_slo: float) -> str:
        """room | kv_full | tbt_full | kv_too_large on decode instance `l`."""
        need = self._need(req, l)
        if len(need) > len(l.kv_free_blocks) or any(n > c for n, c in zip(need, l.kv_capacity)):
            return "kv_too_large"
        if any(n > f for n, f in zip(need, l.kv_free_blocks)):
            return "kv_full"
        if not l.running_decodes:
            return "room"          # alone it decodes as fast as this instance can: waiting cannot help
        pool = self.model_of(l)
        step = self._decode_step_s(pool, l, extra=req.prompt_tokens)
        if step * self._slowdown(pool, l) > tbt_slo:
            return "tbt_full"
        return "room"

    def _headroom(self, req: AdmissionRequest, l: InstanceLoad) -> int:
        return min((f - n for n, f in zip(self._need(req, l), l.kv_free_blocks)), default=0)

    def _effective(self, l: InstanceLoad) -> InstanceLoad:
        """`l` plus the admissions its sample cannot show yet (not those a decode instance reported
        a chunk of before the sample: it shows them). The queued prefill tokens are at least what
        this router's admitted requests still have to prefill there (an engine's gauge is only
        updated after a step, which may take seconds with a long chunk)."""
        l = self._without_ended(l)
        mine = [p for p in self._pending if p.at > l.observed_at - self.config.visibility_lag_s
                and l.instance_id in (p.prefill_id, p.decode_id)]
        left = sum(a[2] for a in self._awaiting.values() if a[0] == l.instance_id)
        if not mine:
            return l if left <= l.queued_prefill_tokens else replace(l, queued_prefill_tokens=left)
        queued, running = l.queued_prefill_tokens, l.running_decodes
        free, used = list(l.kv_free_blocks), list(l.kv_capacity)
        for k, f in enumerate(free):
            used[k] -= f
        for p in mine:
            a = self._awaiting.get(p.request_id)
            shown = a is not None and self._reported(a, l.observed_at) is not None   # it reported a chunk by then
            if (p.prefill_id == l.instance_id or (p.prefill_id is None and p.decode_id == l.instance_id)) \
                    and not shown:
                queued += p.prompt_tokens
            if p.decode_id == l.instance_id:
                if p.request_id not in self._awaiting:
                    running += 1        # decoding: its first token came (before that it is a prompt)
                for k, n in enumerate(p.kv_blocks[:len(free)]):
                    free[k] -= n
                    used[k] += n
        return replace(l, queued_prefill_tokens=max(queued, left), running_decodes=running,
                       kv_free_blocks=tuple(free), kv_used_blocks=tuple(used))

    def _without_ended(self, l: InstanceLoad) -> InstanceLoad:
        """`l` less the requests this router saw end (or finish their prefill there: their queued
        tokens) after the sample was taken: the sample may
        still count them (an active request, a running decode, a cancelled prompt's queued tokens),
        and an instance that just finished its last request is idle, not busy. Its KV blocks stay
        counted as the sample has them: the decode instance may have freed them before the sample,
        and under-counting free blocks only queues a request until the next sample."""
        gone = [e for e in self._ended if e.at > l.observed_at and l.instance_id in (e.prefill_id, e.decode_id)]
        # and the prompts whose first token came after the sample (still decoding): their prefill is
        # over, though the sample may still count their queued tokens (one sampled mid-prefill counted
        # 79 tokens ahead of the next prompt, which then waited for nothing: predicted 1.59 s, took 0.57)
        prefilled = sum(r[2] for r in self._routes.values()
                        if (r[0] or r[1]) == l.instance_id and l.observed_at < r[3] < math.inf)
        if not gone and not prefilled:
            return l
        # a prompt whose first token came after the sample may have been queued there, whole at
        # most: taking out too much is safe, _effective counts this router's own live prompts anyway
        queued = sum(e.prompt_tokens for e in gone
                     if (e.prefill_id or e.decode_id) == l.instance_id and e.first_at > l.observed_at)
        decoded = sum(1 for e in gone if e.decode_id == l.instance_id)
        return replace(l, active_requests=max(l.active_requests - len(gone), 0),
                       running_decodes=max(l.running_decodes - decoded, 0),
                       queued_prefill_tokens=max(l.queued_prefill_tokens - queued - prefilled, 0))

    def _admitted(self, req: AdmissionRequest, d: Decision, now: float) -> None:
        if d.decode_instance is not None:
            left = req.tokens_left(d.prefill_instance or d.decode_instance)     # what it prefills there
            self._routes[req.request_id] = [d.prefill_instance, d.decode_instance, left, math.inf]
            self._pending.append(_Pending(now, d.prefill_instance, d.decode_instance,
                                          left, d.kv_blocks, req.request_id))
            self._awaiting[req.request_id] = [d.prefill_instance or d.decode_instance,
                                              req.arrival_s + (d.ttft_slo_s or math.inf),
                                              left, req.prompt_tokens, req.arrival_s,
                                              req.arrival_s + (d.predicted_ttft_s or 0.0),
                                              # prefilled where it decodes: its predicted rate
                                              self.correction(d.pool)(d.parts["own_s"])
                                              if d.prefill_instance is None and "own_s" in d.parts else 0.0,
                                              # first in line there: the instance starts it at its next
                                              # iteration, before a later arrival can be ordered first
                                              not d.parts.get("ahead_tokens"), []]

    @staticmethod
    def _inflight_s(l: InstanceLoad) -> float:
        """A busy instance is in the middle of an iteration: a new request waits, on average, for
        half of one (its recent mean iteration time, measured)."""
        return 0.5 * l.iteration_s if l.busy and l.iteration_s else 0.0

    def _slowdown(self, pool: PoolModel, l: InstanceLoad, known: float = 1.0) -> float:
        """The model's error on `l` right now, from its recent iterations, beyond the `known` ratio
        (the pool's TTFT correction, applied after: with a model r times too fast, adaptive chunks
        take r budgets each on every instance, which the correction already learned, and counting
        it twice would predict r^2). 1 on an idle instance: its mean iteration time still
        remembers the last request's iterations, and an idle instance must be judged by its model
        (and the pool's TTFT correction) alone, or a prompt would be predicted slower than the
        deadline its own prediction alone sets. 1 on a decode instance: its iterations mix decode
        steps with short prompts' chunks, and one heartbeat's mean of them said nothing of the next
        prompt (in 9 of 9 cases over four runs of bench/admission.py a slowdown of 1.5-2.7 seen
        there over-predicted the prompt by 75-140%); the load factor learns what load adds there."""
        if not (pool.budgeted and l.busy) or l.role == "decode":
            return 1.0
        return l.slowdown(pool.budget_s * known, self.config.max_slowdown)

    def _left_at(self, a: list, at: float, lag: float) -> int:
        """Prompt tokens an admitted prompt counts for in a load sample taken at `at`: all of them when
        the sample may not show it yet (admitted within `lag` before it: _effective adds them whole),
        else, on a decode instance, what its last progress report by then left (the sample and the
        report both count the steps that instance had ended; a prompt that reported a chunk before the
        sample is in it, however recently admitted: counted whole besides, a 165-token prompt with 133
        left was taken as 298 tokens ahead of the next one) or, before any, what it had left by its
        prediction; or (a prefill instance's prompt) what it has left now."""
        seen = self._reported(a, at)
        if seen is not None:
            return seen[1]
        if a[4] > at - lag:
            return a[3]
        # (at least what it has left now: an overdue prompt is whole now, and the sample taken
        # before it was overdue also holds the tokens its prediction took as done by then)
        return max(a[2], self._predicted_left(a, at))

    @staticmethod
    def _reported(a: list, at: float) -> tuple[float, int] | None:
        """A decode instance's prompt: its last progress report by `at`, (when, tokens left)."""
        return next((r for r in reversed(a[8]) if r[0] <= at), None)

    def _predicted_left(self, a: list, now: float) -> int:
        """Prompt tokens a prompt admitted to a decode instance has left (a prefill instance's
        prompts keep the count their reports left: a[6] is 0).

        Once that instance has reported its progress (after each of its chunks), what its last
        report left, less what the iteration under way computes of it since: at its own predicted
        rate, for one iteration at most (the instance's recent mean iteration; the next report comes
        when it ends). Before any report, by its prediction: all of it until its own prefill was
        predicted to start (its first token less its own prefill time), then in proportion to the
        time left (without this, one about to produce its first token still counted whole ahead of
        a new prompt: predicted 1.45 s for one that took 0.92); once past its predicted first token
        with no report (overdue), whole again: the instance runs slower than predicted, and taking
        it as done let a burst on a slowed machine see an idle instance behind 24 prompts predicted
        to finish in 0.2 s (two new prompts predicted 0.013 s took 0.67 s, in CI). Predicted progress
        alone erred on overlapping short prompts: a 165-token prompt 0.01 s overdue counted whole
        ahead of the next one (predicted 1.17 s, took 0.83)."""
        own = a[6]
        if not own > 0:
            return a[2]
        seen = self._reported(a, now)
        if seen is not None:
            at, left = seen
            step = self._iterations.get(a[0]) or own
            return max(left - round(a[3] / own * min(now - at, step)), 0)
        if now > a[5]:
            return a[3]
        return round(a[3] * min(max((a[5] - now) / own, 0.0), 1.0))

    def _host_busy_s(self, l: InstanceLoad, now: float) -> float:
        """Seconds from now another instance on `l`'s host is predicted to keep prefilling the
        prompts this router admitted there (their predicted first tokens); 0 when none, when those
        are overdue, or when `l`'s host is unknown."""
        if not l.host:
            return 0.0
        return max([0.0] + [a[5] - now for a in self._awaiting.values()      # 0 once overdue
                            if a[0] != l.instance_id and self._hosts.get(a[0]) == l.host])

    def _earliest_due(self, l: InstanceLoad, now: float) -> float:
        """The earliest first-token deadline still ahead among the admitted requests that prefill
        on `l` and have no first token yet."""
        return min((a[1] for a in self._awaiting.values() if a[0] == l.instance_id and a[1] >= now),
                   default=math.inf)

    def _work(self, req: AdmissionRequest) -> float:
        """Predicted prefill time alone on an idle instance of the pool that would prefill it
        (its pool default model, corrected)."""
        short = self.prefill is None or req.prompt_tokens < self.config.short_prompt_tokens
        role = "decode" if short else "prefill"
        return self.correction(role)((self.decode if short else self.prefill).prefill_alone_s(req.prompt_tokens))

    def _ordered(self, now: float) -> list[_Queued]:
        """LARS order, slack stealing included (common/scheduler/policy.py)."""
        entries = []
        for q in self._queue.values():
            r = q.request
            view = ReqView(r.request_id, r.arrival_s, r.prompt_tokens,
                           ttft_deadline_s=r.arrival_s + self.slo_for(r)[0])
            entries.append((view, q.work_s, q.work_s))
        return [self._queue[view.request_id] for view, _, _ in self._lars.arrange(entries, now)]

    def _retry(self, seconds: float) -> float:
        return max(seconds, self.config.min_retry_after_s)


# ---- load sources ----------------------------------------------------------------------------

_GAUGES = {
    "mnemosyne_active_requests": "active_requests",
    "mnemosyne_scheduler_queued_prefill_tokens": "queued_prefill_tokens",
    "mnemosyne_scheduler_running_decodes": "running_decodes",
    "mnemosyne_kv_block_size_tokens": "kv_block_size",
    "mnemosyne_kvp_group_tokens": "kvp_tokens",
}
_KV = {"mnemosyne_kv_blocks_free": "free", "mnemosyne_kv_blocks_used": "used"}
_FLOATS = {"mnemosyne_perf_model_scale": "model_scale"}


class _Acc:
    """One instance's samples while a Prometheus query result is read."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        self.instance_id, self.role, self.pool = labels["instance"], labels["role"], labels["pool"]
        self.values: dict[str, int | float] = {}
        self.kv: dict[str, dict[int, list[float]]] = {"free": {}, "used": {}}
        self.iter_sum = self.iter_count = 0.0

    def add(self, name: str, labels: Mapping[str, str], value: float) -> None:
        if math.isnan(value):
            return
        if name in _GAUGES:
            self.values[_GAUGES[name]] = int(value)
        elif name in _FLOATS:
            if value > 0 and math.isfinite(value):
                self.values[_FLOATS[name]] = value
        elif name in _KV:
            self.kv[_KV[name]].setdefault(int(labels.get("group", 0)), []).append(value)
        elif name == "mnemosyne_iteration_seconds_sum":
            self.iter_sum = value
        elif name == "mnemosyne_iteration_seconds_count":
            self.iter_count = value

    def load(self, observed_at: float, iteration_s: float | None) -> InstanceLoad:
        free, used = self.kv["free"], self.kv["used"]
        groups = sorted(set(free) | set(used))
        return InstanceLoad(
            self.instance_id, self.role, self.pool, observed_at, iteration_s=iteration_s,
            kv_free_blocks=tuple(int(min(free.get(g, [0]))) for g in groups),
            kv_used_blocks=tuple(int(max(used.get(g, [0]))) for g in groups), **self.values)


def _identity(labels: Mapping[str, str], pool: str | None) -> bool:
    return all(k in labels for k in ("instance", "role", "pool")) and (pool is None or labels["pool"] == pool)


def heartbeat_loads(instances: Iterable[Instance], now: float, pool: str = "default") -> LoadSnapshot:
    """The load source by default: the load each instance sent with its last kvstore heartbeat
    (Instance.load, in the kvstore's listing), aged as Redis saw it. `now`: the caller's monotonic
    clock when the listing arrived; observed_at = now - load_age_s, so the age never compares two
    hosts' clocks (Redis timed both the heartbeat and the listing). An instance that sent no load
    since it registered is absent (unknown: never a candidate). No URL is fetched: an instance's
    registration holds no address admission would read."""
    loads = {}
    for inst in instances:
        r = inst.load
        if r is None:
            continue
        loads[inst.instance_id] = InstanceLoad(
            inst.instance_id, inst.role, pool, now - inst.load_age_s, active_requests=r.active_requests,
            queued_prefill_tokens=r.queued_prefill_tokens, running_decodes=r.running_decodes,
            kv_free_blocks=r.kv_free_blocks, kv_used_blocks=r.kv_used_blocks, kv_block_size=r.kv_block_size,
            kvp_tokens=r.kvp_tokens, iteration_s=r.iteration_s, model_scale=r.model_scale,
            host=address_host(inst.address))
    return LoadSnapshot(loads, now)


def address_host(address: str) -> str:
    """'10.0.0.7:50061' -> '10.0.0.7', '[::1]:50061' -> '::1'; '' when there is none."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


class PrometheusSource:
    """Reads the same load through a Prometheus server's HTTP API (/api/v1/query).

    A sample's age is its own timestamp (timestamp()), so a target Prometheus stopped scraping goes
    stale here too (and vanishes once Prometheus marks its series stale). The recent iteration time
    is rate(sum)/rate(count) over `window`.
    """

    def __init__(self, url: str, *, timeout_s: float = 2.0, pool: str | None = None,
                 window: str = "1m", clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"prometheus source: url must be http(s)://..., got {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s, self.pool, self.window = timeout_s, pool, window
        self.clock, self.wall = clock, wall

    def queries(self) -> dict[str, str]:
        sel = f',pool="{self.pool}"' if self.pool else ""
        names = "|".join(n.removeprefix("mnemosyne_") for n in (*_GAUGES, *_KV, *_FLOATS))
        by = "sum by (pool, role, instance)"
        return {
            "gauges": f'{{__name__=~"mnemosyne_({names})"{sel}}}',
            "timestamps": f"max by (pool, role, instance) (timestamp(mnemosyne_active_requests{{{sel[1:]}}}))",
            "iteration": (f"{by} (rate(mnemosyne_iteration_seconds_sum{{{sel[1:]}}}[{self.window}])) / "
                          f"{by} (rate(mnemosyne_iteration_seconds_count{{{sel[1:]}}}[{self.window}]))"),
        }

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr,
                                                                      "timeout": str(float(self.timeout_s))})
        with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
            body = json.loads(resp.read().decode())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query failed: {body.get('error', body)}")
        return body["data"]["result"]

    def scrape(self) -> LoadSnapshot:
        """Blocking; run it in a thread from asyncio code (watch_load does)."""
        now, wall = self.clock(), self.wall()
        results: dict[str, list[dict]] = {}
        errors: dict[str, str] = {}
        for key, expr in self.queries().items():
            try:
                results[key] = self.query(expr)
            except Exception as e:  # noqa: BLE001 - the load is then unknown, logged
                errors[key] = f"{type(e).__name__}: {e}"
        if "gauges" in errors or "timestamps" in errors:
            return LoadSnapshot({}, now, errors)
        accs: dict[str, _Acc] = {}
        for r in results["gauges"]:
            labels = r["metric"]
            if _identity(labels, self.pool):
                acc = accs.setdefault(labels["instance"], _Acc(labels))
                acc.add(labels["__name__"], labels, float(r["value"][1]))
        ages = {r["metric"].get("instance"): wall - float(r["value"][1]) for r in results["timestamps"]}
        iters = {r["metric"].get("instance"): float(r["value"][1]) for r in results.get("iteration", ())}
        loads = {}
        for iid, acc in accs.items():
            it = iters.get(iid)
            observed = now - ages[iid] if iid in ages else -math.inf
            loads[iid] = acc.load(observed, None if it is None or math.isnan(it) else it)
        return LoadSnapshot(loads, now, errors)


async def watch_load(source: PrometheusSource, interval_s: float,
                     on_snapshot: Callable[[LoadSnapshot], None]) -> None:
    """Scrapes every `interval_s` (in a worker thread) and hands each snapshot to `on_snapshot`
    (e.g. store it and call AdmissionController.poll). Runs until cancelled."""
    while True:
        snap = await asyncio.to_thread(source.scrape)
        for where, err in snap.errors.items():
            log.warning("load source %s: %s", where, err)
        on_snapshot(snap)
        await asyncio.sleep(interval_s)
