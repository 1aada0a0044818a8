"""Packing an iteration's prefill chunks: the one batch-formation routine shared by the engine
scheduler and the simulator, so what the simulator shows is what the engine does.

The caller first puts the iteration's decodes in `batch` (decodes go first), then calls
`plan_prefills` with the requests still in prefill. They are taken in policy order; each gets the
chunk its chunker picks under the budget (the whole iteration's predicted time), at most one *long*
prefill goes in (the others wait), and a long prefill fills only its policy's budget share. A request
that gets 0 tokens stays where it is (preempted at its chunk boundary) and is tried again next time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from common.errors import ConfigError
from common.scheduler.chunking import Chunker, Predictor, tokens_to_boundary
from common.scheduler.policy import (DEADLINE_EPS_S, DEFAULT_LONG_THRESHOLD, Policy, WorkFn,
                                     is_long_prefill)
from common.scheduler.types import BatchShape, ReqView

# admit(req, num_tokens) -> False when the KV cache cannot take the chunk (the request waits)
AdmitFn = Callable[[ReqView, int], bool]


@dataclass(frozen=True)
class PlannerConfig:
    t_target_s: float                          # iteration budget (decode pool: from the TBT SLO)
    long_threshold: int = DEFAULT_LONG_THRESHOLD
    max_num_seqs: int = 64
    max_batch_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.t_target_s > 0:
            raise ConfigError(f"planner: t_target_s must be positive, got {self.t_target_s}")
        if self.long_threshold <= 0 or self.max_num_seqs <= 0:
            raise ConfigError(f"planner: long_threshold={self.long_threshold} and "
                              f"max_num_seqs={self.max_num_seqs} must be positive")
        if self.max_batch_tokens is not None and self.max_batch_tokens <= 0:
            raise ConfigError(f"planner: max_batch_tokens must be positive, "
                              f"got {self.max_batch_tokens}")


@dataclass(frozen=True)
class PrefillPlan:
    batch: BatchShape                          # the input batch plus the chosen chunks
    chunks: tuple[tuple[str, int], ...]        # (request_id, num_tokens), in scheduling order
    waiting: tuple[str, ...]                   # candidates that got 0 tokens (requeued)
    forced: bool = False                       # starvation guard fired (see plan_prefills)
    anchors: tuple[str, ...] = ()              # requests whose chunk bounds their next one (see below)


def plan_prefills(batch: BatchShape, candidates: Sequence[ReqView], now: float, *, policy: Policy,
                  chunker: Chunker, work: WorkFn, config: PlannerConfig,
                  admit: AdmitFn | None = None, long_in_batch: bool = False,
                  predict: Predictor | None = None) -> PrefillPlan:
    """Adds prefill chunks to `batch` (which already holds the decodes).

    `work(req)` gives (remaining, total) predicted prefill seconds; `admit` is asked before a chunk
    is accepted (the engine allocates its KV blocks there). Starvation guard: if the batch would be
    empty although prefills wait (the budget is smaller than even the smallest chunk alone), the first
    request in order runs its smallest chunk anyway, so the server never stalls.

    Deadline protection (policies with `protects_deadlines`, i.e. LARS with slack stealing, given
    `predict`): a later chunk that lengthens the batch delays every request already in it, so it may
    add at most the smallest slack among them (slack = deadline - now - the remaining work of that
    request and of those ahead of it). A request that needs the whole machine to make its deadline
    then gets it, instead of sharing its last iterations with filler from requests that can wait. One
    late by less than an iteration budget (it arrived while a batch ran) counts as slack 0; one later
    than that is past saving and not protected (a late long prefill still yields its budget share).

    Growth anchors: the adaptive chunker caps a request's chunk at `growth` x its previous one (the
    paper's 2x, which keeps consecutive chunks, and so pipeline stages, balanced). Only the first
    prefill chunk of a batch, sized against the whole budget left by the decodes, is such a bound
    (`anchors`); a chunk that filled what earlier chunks left is not, else a short prompt that first
    got a 32-token remnant would need log2(prompt / 32) iterations to reach a full chunk.
    """
    ordered = policy.arrange(((req, *work(req)) for req in candidates if req.in_prefill), now)
    protect = predict is not None and getattr(policy, "protects_deadlines", False)
    tolerance = getattr(getattr(chunker, "config", None), "tolerance", 0.0)
    ahead_s, min_slack = 0.0, math.inf        # over the requests with a chunk in this batch

    chunks: list[tuple[str, int]] = []
    waiting: list[str] = []
    anchors: list[str] = []
    for req, remaining, total in ordered:
        max_tokens = None
        if config.max_batch_tokens is not None:
            max_tokens = config.max_batch_tokens - batch.num_tokens
        long = is_long_prefill(req, config.long_threshold)
        n = 0
        if batch.num_seqs < config.max_num_seqs and (max_tokens is None or max_tokens > 0) \
                and not (long and long_in_batch):
            budget = config.t_target_s
            if long:
                budget = policy.prefill_budget(config.t_target_s, req, now, remaining, total)
            cap = math.inf
            if protect and min_slack < math.inf:
                cap = predict(batch) + min_slack + DEADLINE_EPS_S
                budget = min(budget, cap / (1.0 + tolerance))
            n = chunker.chunk(batch, budget, req, max_tokens)
            if n > 0 and cap < math.inf and predict(batch.with_prefill(n, req.num_computed)) > cap:
                n = 0                              # a fixed-size chunk that would cost a deadline
            if n > 0 and admit is not None and not admit(req, n):
                n = 0
        if n == 0:
            waiting.append(req.request_id)
            continue
        if not batch.prefills:
            anchors.append(req.request_id)
        batch = batch.with_prefill(n, req.num_computed)
        chunks.append((req.request_id, n))
        long_in_batch = long_in_batch or long
        ahead_s += remaining
        if req.ttft_deadline_s is not None:
            slack = req.ttft_deadline_s - now - ahead_s
            if slack >= -config.t_target_s:       # late by less than an iteration: still protected
                min_slack = min(min_slack, max(slack, 0.0))

    if batch.is_empty and ordered:
        req = ordered[0][0]
        n = min(smallest_chunk(chunker), tokens_to_boundary(req))
        if config.max_batch_tokens is not None:
            n = min(n, config.max_batch_tokens)
        if admit is None or admit(req, n):
            waiting.remove(req.request_id)
            return PrefillPlan(batch.with_prefill(n, req.num_computed), ((req.request_id, n),),
                               tuple(waiting), forced=True, anchors=(req.request_id,))
    return PrefillPlan(batch, tuple(chunks), tuple(waiting), anchors=tuple(anchors))


def smallest_chunk(chunker: Chunker) -> int:
    """The smallest regular chunk a chunker hands out (min_chunk, or the fixed size)."""
    config = getattr(chunker, "config", None)
    if config is not None:
        return config.min_chunk
    return getattr(chunker, "chunk_size")
