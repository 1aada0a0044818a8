"""Decides, each iteration, which requests run and with how many tokens: {request: num_tokens}.

Decodes go first (one token each), then prefill chunks. KV blocks are allocated here, so a batch that
is scheduled always fits; when the cache is full the most recently arrived running request is
preempted (its blocks freed, its KV recomputed later, exactly, from its tokens).
Torch-free: tested without a model.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from common.config import SchedulerConfig
from common.errors import CapacityError, InvalidRequestError
from common.kv_cache.block_pool import BlockPool
from common.scheduler.request import FinishReason, Request, Status


@dataclass(frozen=True)
class ScheduledItem:
    request: Request
    start: int          # first token position processed this step (== request.num_computed)
    num_tokens: int
    sample: bool        # the step reaches the last known token and samples the next one


@dataclass
class SchedulerOutput:
    items: list[ScheduledItem] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, pool: BlockPool, kvp_tokens: int | None = None,
                 clock=time.monotonic) -> None:
        self.cfg = cfg
        self.pool = pool
        self.kvp_tokens = kvp_tokens
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

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
                elif req in self.running and not req.num_inflight:
                    self._preempt(req, out)
        # 2. prefills: running ones first (in arrival order), then waiting ones
        candidates = [r for r in self.running if r.request_id not in scheduled] + list(self.waiting)
        for req in candidates:
            if len(out.items) >= self.cfg.max_num_seqs or budget <= 0:
                break
            if req.request_id in scheduled or req.request_id not in self.requests:
                continue
            n = self.chunk_for(req, budget)
            if n <= 0:
                continue
            if not take(req, n):
                break
            budget -= n
            req.last_chunk = n
            if req.status is Status.WAITING:
                self.waiting.remove(req)
                self.running.append(req)
                req.status = Status.RUNNING
        return out

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
            if item.sample:
                token, logprob = sampled[req.request_id]
                req.append(token, logprob)
                if req.finish_reason is not None:
                    self.running.remove(req)
                    del self.requests[req.request_id]
                    self.pool.free(req.request_id)
                    req.status = Status.FINISHED
                    done.append(req)
        return done

    # ---- preemption ------------------------------------------------------------------------------
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
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        out.preempted.append(req.request_id)
