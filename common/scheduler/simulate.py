"""A discrete-event simulator of one server: the scheduling logic of the engine, with a performance
model standing in for the forward pass (each iteration lasts exactly its predicted time).

Each iteration packs the running decodes first, then prefill chunks via `plan_prefills` (policy
order, adaptive or fixed chunks, at most one long prefill, LARS budget share, preemption at chunk
boundaries). A request's first token appears when its last prompt chunk's iteration ends; each later
iteration adds one token. KV capacity is not modelled. Used by unit tests and benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from common.errors import ConfigError
from common.perf_model.base import PerfModel
from common.perf_model.prefill_table import PrefillTable
from common.scheduler.chunking import AdaptiveChunker, ChunkingConfig, FixedChunker
from common.scheduler.planner import PlannerConfig, plan_prefills
from common.scheduler.policy import (DEFAULT_LONG_THRESHOLD, DEFAULT_RHO_MAX, is_long_prefill,
                                     make_policy)
from common.scheduler.types import BatchShape, ReqView


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival_s: float
    prompt_len: int
    max_new_tokens: int = 1
    ttft_slo_s: float | None = None      # relative to arrival
    tbt_slo_s: float | None = None


@dataclass(frozen=True)
class SimConfig:
    t_target_s: float = 0.05
    policy: str = "lars"
    adaptive: bool = True                # False: FixedChunker(chunk_size)
    chunk_size: int = 512
    chunking: ChunkingConfig = ChunkingConfig()
    long_threshold: int = DEFAULT_LONG_THRESHOLD
    rho_max: float = DEFAULT_RHO_MAX
    slack_stealing: bool = True
    max_num_seqs: int = 256
    max_batch_tokens: int | None = None
    kvp_tokens: int | None = None
    max_iterations: int = 1_000_000


@dataclass(frozen=True)
class SimBatch:
    start_s: float
    predicted_s: float
    shape: BatchShape
    chunks: tuple[tuple[str, int, int], ...]     # (request_id, num_tokens, context before the chunk)
    decodes: tuple[str, ...]
    long_ids: tuple[str, ...]                    # requests whose chunk here is a long prefill
    waiting: tuple[str, ...]                     # prefills that got 0 tokens this iteration
    forced: bool


@dataclass
class RequestTrace:
    request: SimRequest
    chunks: list[tuple[float, int, int]] = field(default_factory=list)  # (start, tokens, context)
    token_times: list[float] = field(default_factory=list)

    @property
    def deadline_s(self) -> float | None:
        slo = self.request.ttft_slo_s
        return None if slo is None else self.request.arrival_s + slo

    @property
    def first_token_s(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def ttft(self) -> float | None:
        t = self.first_token_s
        return None if t is None else t - self.request.arrival_s

    @property
    def met_ttft(self) -> bool:
        """First token by the deadline (1 ns of slack absorbs float rounding)."""
        if self.first_token_s is None:
            return False
        return self.deadline_s is None or self.first_token_s <= self.deadline_s + 1e-9

    @property
    def tbts(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass
class SimResult:
    traces: dict[str, RequestTrace]
    batches: list[SimBatch]
    end_s: float

    def ttft(self, request_id: str) -> float | None:
        return self.traces[request_id].ttft

    def met(self, request_id: str) -> bool:
        return self.traces[request_id].met_ttft


@dataclass
class _State:
    request: SimRequest
    num_computed: int = 0
    num_generated: int = 0
    last_chunk: int = 0

    def view(self, kvp_tokens: int | None) -> ReqView:
        r = self.request
        return ReqView(r.request_id, r.arrival_s, r.prompt_len, self.num_computed, self.num_generated,
                       None if r.ttft_slo_s is None else r.arrival_s + r.ttft_slo_s, r.tbt_slo_s,
                       self.last_chunk, kvp_tokens, started=self.num_computed > 0)


def simulate(requests: Iterable[SimRequest], model: PerfModel, config: SimConfig = SimConfig(),
             table: PrefillTable | None = None) -> SimResult:
    """Runs until every request finished; returns per-request traces and every batch."""
    reqs = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    if len({r.request_id for r in reqs}) != len(reqs):
        raise ConfigError("simulate: request ids must be unique")
    if any(r.prompt_len <= 0 or r.max_new_tokens <= 0 for r in reqs):
        raise ConfigError("simulate: prompt_len and max_new_tokens must be positive")
    policy = make_policy(config.policy, rho_max=config.rho_max, steal_slack=config.slack_stealing)
    chunker = (AdaptiveChunker(model.predict, config.chunking) if config.adaptive
               else FixedChunker(config.chunk_size))
    if table is None:
        table = PrefillTable(model, config.t_target_s, max((r.prompt_len for r in reqs), default=0),
                             config.chunking, config.kvp_tokens)
    planner = PlannerConfig(config.t_target_s, config.long_threshold, config.max_num_seqs,
                            config.max_batch_tokens)
    traces = {r.request_id: RequestTrace(r) for r in reqs}
    active: dict[str, _State] = {}
    batches: list[SimBatch] = []
    now, nxt = (reqs[0].arrival_s if reqs else 0.0), 0

    for _ in range(config.max_iterations):
        while nxt < len(reqs) and reqs[nxt].arrival_s <= now:
            active[reqs[nxt].request_id] = _State(reqs[nxt])
            nxt += 1
        if not active:
            if nxt == len(reqs):
                break
            now = reqs[nxt].arrival_s
            continue

        batch, decodes = BatchShape(), []
        for rid, st in active.items():           # decodes first, in arrival order
            if st.num_computed == st.request.prompt_len and len(decodes) < config.max_num_seqs:
                batch = batch.with_decode(st.view(None).decode_context_len)
                decodes.append(rid)
        views = {rid: st.view(config.kvp_tokens) for rid, st in active.items()
                 if st.num_computed < st.request.prompt_len}
        plan = plan_prefills(batch, list(views.values()), now, policy=policy, chunker=chunker,
                             work=table.work, config=planner, predict=model.predict)
        dt = model.predict(plan.batch)
        chunks = tuple((rid, n, views[rid].num_computed) for rid, n in plan.chunks)
        longs = tuple(rid for rid, _ in plan.chunks
                      if is_long_prefill(views[rid], config.long_threshold))
        batches.append(SimBatch(now, dt, plan.batch, chunks, tuple(decodes), longs, plan.waiting,
                                plan.forced))
        for rid, n, ctx in chunks:
            traces[rid].chunks.append((now, n, ctx))
        now += dt

        for rid, n, _ in chunks:
            st = active[rid]
            st.num_computed += n
            if rid in plan.anchors:
                st.last_chunk = n
            if st.num_computed == st.request.prompt_len:
                st.num_generated = 1
                traces[rid].token_times.append(now)
        for rid in decodes:
            active[rid].num_generated += 1
            traces[rid].token_times.append(now)
        for rid in [rid for rid, st in active.items() if st.num_generated >= st.request.max_new_tokens]:
            del active[rid]
    else:
        raise RuntimeError(f"simulate: not done after {config.max_iterations} iterations")
    return SimResult(traces, batches, now)
