"""Decides, each iteration, which requests run and with how many tokens: {request: num_tokens}.

Decodes go first (one token each), then prefill chunks. KV blocks are allocated here, so a batch that
is scheduled always fits; when the cache is full the most recently arrived running request is
preempted (its blocks freed, its KV recomputed later, exactly, from its tokens).

Two ways to pick the prefill chunks, chosen by SchedulerConfig:
  policy="fcfs", chunking="fixed" (the core): running prefills first, then waiting ones, in arrival
      order, `chunk_size` tokens each until the batch's token budget is spent.
  anything else (planned): the shared planner (common/scheduler/planner.py) orders the prefills by the
      policy (LARS: slack / total predicted work, remaining work from the PrefillTable), gives each
      the largest chunk whose predicted batch time fits the iteration budget (or the fixed size), at
      most one long prefill per batch, and allocates KV through the same preempting path as the core.
A chunk never crosses a KVP group boundary (`kvp_tokens`) in either mode.

Prefix caching (when the block pool has it on): a request about to start (nothing computed) first
takes the blocks of its longest cached full-block prefix (`pool.acquire` over the hash chain of its
tokens, never all its known tokens: the last one is computed for its logits), and its chunks start
there (`num_computed` = the prefix), in both modes: the chunker, the policy and the planner see it as
progress already made. If it then gets no chunk this step, the blocks go back to the cache. After a
step, full blocks whose K/V are now computed are named (`pool.register`) for later requests, so a
request arriving mid-prefill reuses what is done.

A prefix shared by concurrent requests is computed once: a starting request whose next block (the
first after its cached prefix) a running request is about to compute (the same name in its chain, not
yet computed: in flight, or still ahead of it) is not scheduled this step (`awaits_prefix`); it waits,
and as the other request's blocks are named, its cached prefix grows, until its next block is nobody's
work. The wait is bounded by that work: the waiting set is recomputed every step from the running
requests, so if the computing request is aborted, preempted or finishes, the waiter computes the
block itself. A request admitted earlier in the same step counts as running.
Torch-free: tested without a model. The performance model is injected (any `predict(BatchShape)`).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from common.config import SchedulerConfig
from common.errors import CapacityError, ConfigError, InvalidRequestError
from common.kv_cache.block_pool import BlockPool
from common.kv_cache.prefix import extend_hashes
from common.perf_model.base import PerfModel
from common.perf_model.prefill_table import PrefillTable
from common.scheduler.chunking import AdaptiveChunker, Chunker, ChunkingConfig, FixedChunker
from common.scheduler.planner import PlannerConfig, plan_prefills
from common.scheduler.policy import make_policy
from common.scheduler.request import FinishReason, Request, Status
from common.scheduler.types import BatchShape, ReqView


@dataclass(frozen=True)
class ScheduledItem:
    request: Request
    start: int          # first token position processed this step (== request.num_computed)
    num_tokens: int
    sample: bool        # the step reaches the last known token and samples the next one

    @property
    def output_index(self) -> int:
        """Which output token of its request this item samples (0 = the first), when it samples."""
        return self.start + self.num_tokens - self.request.prompt_len


@dataclass
class SchedulerOutput:
    items: list[ScheduledItem] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    batch: BatchShape | None = None      # what the performance model saw (set when there is one)
    predicted_s: float | None = None     # the performance model's time for this batch
    budget_s: float | None = None        # the iteration budget the chunks were sized for (planned mode)
    forced: bool = False                 # a chunk ran over the budget so that the server never stalls

    def shape(self) -> BatchShape:
        """What the performance model sees of this batch (valid until postprocess advances it)."""
        return batch_shape(self.items)

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items)


def batch_shape(items: list[ScheduledItem]) -> BatchShape:
    """Decodes (one token after their cached context) and prefill chunks (n tokens after `start`)."""
    prefills, decodes = [], []
    for it in items:
        req = it.request
        if it.num_tokens == 1 and it.sample and req.output_ids and it.start == req.num_tokens - 1:
            decodes.append(it.start)
        else:
            prefills.append((it.num_tokens, it.start))
    return BatchShape(tuple(prefills), tuple(decodes))


class Scheduler:
    """`perf_model` (any object with `predict(BatchShape) -> seconds`) is required by adaptive
    chunking and LARS; `pipeline_depth` (spp) divides the prefill role's budget."""

    def __init__(self, cfg: SchedulerConfig, pool: BlockPool, kvp_tokens: int | None = None,
                 clock=time.monotonic, perf_model: PerfModel | None = None,
                 pipeline_depth: int = 1) -> None:
        self.cfg = cfg
        self.pool = pool
        self.kvp_tokens = kvp_tokens
        self.clock = clock
        self.perf_model = perf_model
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.planned = cfg.policy != "fcfs" or cfg.chunking != "fixed"
        self.caching = bool(getattr(pool, "prefix_caching", False))
        self.budget_s = cfg.iteration_budget(pipeline_depth)
        self.table: PrefillTable | None = None
        if self.planned:
            self._setup_planner()

    def _setup_planner(self) -> None:
        cfg, model = self.cfg, self.perf_model
        needs = [what for what, on in (("chunking='adaptive'", cfg.chunking == "adaptive"),
                                       ("policy='lars'", cfg.policy == "lars")) if on]
        if needs and model is None:
            raise ConfigError(f"scheduler: {' and '.join(needs)} need a performance model "
                              "(Scheduler(..., perf_model=...); the engine loads a profile or the "
                              "analytic model)")
        self.policy = make_policy(cfg.policy, rho_max=cfg.rho_max, steal_slack=cfg.slack_stealing)
        self.chunking = ChunkingConfig(min_chunk=cfg.min_chunk, max_chunk=cfg.max_chunk)
        self.chunker: Chunker = (AdaptiveChunker(model.predict, self.chunking)
                                 if cfg.chunking == "adaptive" else FixedChunker(cfg.chunk_size))
        if model is not None:
            self.table = PrefillTable(model, self.budget_s, 0, self.chunking, self.kvp_tokens)

    # ---- requests --------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        need = self.pool.blocks_for(req.prompt_len + 1)
        if need > self.pool.num_blocks:
            raise CapacityError(f"request {req.request_id}: {req.prompt_len} prompt tokens need "
                                f"{need} KV blocks, the cache has {self.pool.num_blocks}")
        self.requests[req.request_id] = req
        self.waiting.append(req)
        if self.caching and req.num_computed:             # its KV arrived from elsewhere: name it now
            self.pool.register(req.request_id, self._hashes(req, req.num_computed))

    def abort(self, request_id: str) -> Request | None:
        """Removes the request wherever it is and frees its blocks. Unknown ids return None."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.pool.free(request_id)
        req.status = Status.FINISHED
        req.finish_reason = req.finish_reason or FinishReason.ABORT
        return req

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one iteration ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = self._schedule_planned() if self.planned else self._schedule_core()
        if self.perf_model is not None and out.items:
            out.batch = out.shape()
            out.predicted_s = self.perf_model.predict(out.batch)
        return out

    def _schedule_core(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_batch_tokens
        scheduled: set[str] = set()

        def take(req: Request, n: int) -> bool:
            start = req.next_pos
            while not self.pool.can_allocate(req.request_id, start + n):
                if not self._preempt_one(exclude=scheduled | {req.request_id}, out=out):
                    return False
            self.pool.allocate(req.request_id, start + n)
            out.items.append(ScheduledItem(req, start, n, start + n == req.num_tokens))
            req.num_inflight += n
            scheduled.add(req.request_id)
            return True

        # 1. decodes
        for req in list(self.running):
            if len(out.items) >= self.cfg.max_num_seqs or budget <= 0:
                break
            if req.unscheduled == 1 and not req.num_inflight and req.output_ids \
                    and req.request_id not in scheduled:
                if req in self.running and take(req, 1):
                    budget -= 1
                elif req in self.running and not req.num_inflight and self._fits_alone(req):
                    self._preempt(req, out)
        # 2. prefills: running ones first (in arrival order), then waiting ones
        candidates = [r for r in self.running if r.request_id not in scheduled] + list(self.waiting)
        for req in candidates:
            if len(out.items) >= self.cfg.max_num_seqs or budget <= 0:
                break
            if req.request_id in scheduled or req.request_id not in self.requests \
                    or not self._fits_alone(req) or self.awaits_prefix(req):
                continue
            reused = self._reuse_prefix(req)
            n = self.chunk_for(req, budget)
            if n <= 0 or not take(req, n):
                if reused:
                    self._drop_prefix(req)
                if n <= 0:
                    continue
                break
            budget -= n
            req.last_chunk = n
            if req.status is Status.WAITING:
                self.waiting.remove(req)
                self.running.append(req)
                req.status = Status.RUNNING
        return out

    def _schedule_planned(self) -> SchedulerOutput:
        """Decodes first, then the planner's prefill chunks (policy order, budgeted chunk sizes)."""
        out = SchedulerOutput()
        cfg = self.cfg
        now = self.clock()
        scheduled: set[str] = set()
        batch = BatchShape()

        # 1. decodes: running ones, and waiting ones whose KV is complete (received from elsewhere)
        for req in list(self.running) + [r for r in self.waiting if is_decode(r)]:
            if len(out.items) >= cfg.max_num_seqs or batch.num_tokens >= cfg.max_batch_tokens:
                break
            if not is_decode(req) or req.request_id in scheduled:
                continue                                   # not decoding, or preempted meanwhile
            ctx = req.num_computed
            if self._take(req, 1, out, scheduled):
                batch = batch.with_decode(ctx)
            elif req in self.running and not req.num_inflight and self._fits_alone(req):
                self._preempt(req, out)

        # 2. prefill chunks, planned against the budget (a tighter TBT SLO of a decode here lowers it)
        budget = self.budget_s
        if cfg.role == "decode":
            slos = [cfg.tbt_budget(it.request.tbt_slo_s) for it in out.items if it.request.tbt_slo_s]
            budget = min([budget] + slos)
        out.budget_s = budget
        views = [self._view(r) for r in list(self.running) + list(self.waiting)
                 if r.request_id not in scheduled and r.unscheduled > 0 and not is_decode(r)
                 and not self.awaits_prefix(r)]

        def admit(view: ReqView, n: int) -> bool:
            req = self.requests.get(view.request_id)
            if req is None or req.request_id in out.preempted:
                return False                               # preempted while this batch was planned
            if req.next_pos == 0 and self.awaits_prefix(req):
                return False                               # a request admitted in this plan computes it
            reused = self._reuse_prefix(req) if req.next_pos == 0 and view.num_computed else 0
            if req.next_pos != view.num_computed or not self._take(req, n, out, scheduled):
                if reused:                                 # (part of its prefix was evicted meanwhile)
                    self._drop_prefix(req)
                return False
            return True

        anchors_before = {v.request_id: v.last_chunk for v in views}
        plan = plan_prefills(batch, views, now, policy=self.policy, chunker=self.chunker,
                             work=self.table.work if self.table is not None else _no_work,
                             config=PlannerConfig(budget, cfg.long_threshold, cfg.max_num_seqs,
                                                  cfg.max_batch_tokens),
                             admit=admit,
                             predict=self.perf_model.predict if self.perf_model is not None else None)
        out.forced = plan.forced
        for rid, _ in plan.chunks:                     # only anchors bound the next chunk (planner.py)
            req = self.requests.get(rid)
            if req is not None and rid not in plan.anchors:
                req.last_chunk = anchors_before[rid]
        return out

    def _take(self, req: Request, n: int, out: SchedulerOutput, scheduled: set[str]) -> bool:
        """Allocates KV for tokens [next_pos, next_pos + n) (preempting others if needed) and adds
        the item; a waiting request becomes running."""
        start = req.next_pos
        while not self.pool.can_allocate(req.request_id, start + n):
            if not self._preempt_one(exclude=scheduled | {req.request_id}, out=out):
                return False
        self.pool.allocate(req.request_id, start + n)
        out.items.append(ScheduledItem(req, start, n, start + n == req.num_tokens))
        req.num_inflight += n
        scheduled.add(req.request_id)
        if n > 1 or not req.output_ids:
            req.last_chunk = n
        if req.status is Status.WAITING:
            self.waiting.remove(req)
            self.running.append(req)
            req.status = Status.RUNNING
        return True

    def _view(self, req: Request) -> ReqView:
        """The request as the policy and chunker see it: its known tokens (prompt, plus generated ones
        when it recomputes after a preemption) are the prompt, `next_pos` of them are done."""
        return ReqView(req.request_id, req.arrival_s, req.num_tokens, req.next_pos or self.cached_prefix(req),
                       len(req.output_ids),
                       req.ttft_deadline_s, req.tbt_slo_s, req.last_chunk, self.kvp_tokens,
                       started=req.next_pos > req.num_cached_tokens)

    # ---- prefix caching ----------------------------------------------------------------------------
    def _hashes(self, req: Request, num_tokens: int) -> list[bytes]:
        """Names of the full blocks of the request's first `num_tokens` tokens (cached on it)."""
        bs = self.pool.block_size
        hashes = extend_hashes(req.block_hashes, self.pool.hash_root, bs, num_tokens, req.token_ids)
        return hashes if len(hashes) == num_tokens // bs else hashes[:num_tokens // bs]

    def _may_reuse(self, req: Request) -> bool:
        return self.caching and req.next_pos == 0 and req.status is Status.WAITING

    def cached_prefix(self, req: Request) -> int:
        """Tokens of the longest cached full-block prefix a starting request would reuse (0 if none)."""
        if not self._may_reuse(req):
            return 0
        return self.pool.lookup(self._hashes(req, req.num_tokens - 1)) * self.pool.block_size

    def awaits_prefix(self, req: Request) -> bool:
        """Whether a starting request should wait: the first block after its cached prefix is a
        full block that a running request has not computed yet but will (same chained name, so the
        same tokens at the same positions). Computing it here too would duplicate that work."""
        if not self._may_reuse(req) or not self.running:
            return False
        bs = self.pool.block_size
        hashes = self._hashes(req, req.num_tokens - 1)
        j = self.pool.lookup(hashes)
        if j >= len(hashes):
            return False                                   # its next block is not a full, shared one
        for other in self.running:
            if other.num_computed >= (j + 1) * bs or other.num_tokens < (j + 1) * bs:
                continue                                   # computed already (named or not), or not its
            theirs = extend_hashes(other.block_hashes, self.pool.hash_root, bs, other.num_tokens,
                                   other.token_ids)
            if theirs[j] == hashes[j]:
                return True
        return False

    def _reuse_prefix(self, req: Request) -> int:
        """A starting request takes its cached prefix's blocks and starts after it; returns its length."""
        if not self._may_reuse(req):
            return 0
        n = self.pool.acquire(req.request_id, self._hashes(req, req.num_tokens - 1)) * self.pool.block_size
        req.num_computed = n
        if req.num_preemptions == 0:
            req.num_cached_tokens = n
        return n

    def _drop_prefix(self, req: Request) -> None:
        """Undoes _reuse_prefix (that reused something) for a request that got no chunk this step:
        its blocks go back to the cache."""
        self.pool.free(req.request_id)
        req.num_computed = 0
        if req.num_preemptions == 0:
            req.num_cached_tokens = 0

    def chunk_for(self, req: Request, budget: int) -> int:
        n = min(req.unscheduled, self.cfg.chunk_size, budget)
        if self.kvp_tokens:                       # a chunk never crosses a KVP group boundary
            n = min(n, self.kvp_tokens - req.next_pos % self.kvp_tokens)
        return n

    def postprocess(self, out: SchedulerOutput, sampled: dict[str, tuple[int, float]]) -> list[Request]:
        """Advances the requests of a finished step; returns the requests that finished."""
        done = []
        for item in out.items:
            req = item.request
            if req.request_id not in self.requests:      # aborted while the step ran
                continue
            req.num_computed += item.num_tokens
            req.num_inflight -= item.num_tokens
            bs = self.pool.block_size
            crossed = req.num_computed // bs > (req.num_computed - item.num_tokens) // bs
            if self.caching and crossed:
                self.pool.register(req.request_id, self._hashes(req, req.num_computed))
            if item.sample:
                token, logprob = sampled[req.request_id]
                req.append(token, logprob)
                if req.finish_reason is not None:
                    if self.caching and not crossed:     # e.g. KV received from a prefill instance
                        self.pool.register(req.request_id, self._hashes(req, req.num_computed))
                    self.running.remove(req)
                    del self.requests[req.request_id]
                    self.pool.free(req.request_id)
                    req.status = Status.FINISHED
                    done.append(req)
        return done

    # ---- preemption ------------------------------------------------------------------------------
    def _fits_alone(self, req: Request) -> bool:
        """Whether the whole cache could hold its next step. If not, preempting it to recompute is
        pointless (it would stall at the same place, or loop when the recompute lands exactly on
        its last token): it stays, unscheduled, and the engine reports that it cannot progress."""
        return self.pool.blocks_for(req.num_tokens) <= self.pool.num_blocks

    def _preempt_one(self, exclude: set[str], out: SchedulerOutput) -> bool:
        for victim in reversed(self.running):             # latest arrival loses its place first
            if victim.request_id not in exclude and not victim.num_inflight:
                self._preempt(victim, out)
                return True
        return False

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.pool.free(req.request_id)
        req.num_computed = 0
        req.last_chunk = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        out.preempted.append(req.request_id)

    # ---- a lost worker -----------------------------------------------------------------------------
    def rewind(self, request_id: str, groups: set[int]) -> bool:
        """The KV the request held in KVP `groups` is gone (their worker was replaced with an empty
        cache): it is computed again from the first lost group's first token on, as a preempted
        request is from 0, while the request keeps its place, its output so far and its KV in the
        groups before (the later groups' blocks are written again as the recompute passes them).
        Once the recompute reaches its newest token the next one is sampled as before. Its steps in
        flight must be dropped by the caller (their tokens no longer count). Returns whether it had
        KV in `groups` (otherwise nothing changes)."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        pools = getattr(self.pool, "pools", None) or [self.pool]
        lost = [g for g in groups if g < len(pools) and pools[g].table(request_id)]
        if not lost:
            return False
        start = min(lost) * self.kvp_tokens if self.kvp_tokens else 0
        for g in (range(len(pools)) if start == 0 else lost):     # from 0: all of it, as a preemption
            pools[g].free(request_id)
        req.num_computed = min(req.num_computed, start)
        req.num_inflight = 0
        req.last_chunk = 0
        return True


def is_decode(req: Request) -> bool:
    """Its whole known sequence but the newest token is cached and nothing is in flight."""
    return bool(req.output_ids) and req.unscheduled == 1 and not req.num_inflight


def _no_work(view: ReqView) -> tuple[float, float]:
    return 0.0, 0.0
