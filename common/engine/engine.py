"""The engine: one step loop whatever the layout.

    step():  admit requests whose KV arrived (KV connector, decode role)
             while fewer than `depth` steps are in flight: schedule() -> executor.submit()
             executor.collect() the oldest -> scheduler.postprocess() -> perf-model correction

The executor is a `LocalExecutor` (model in this process, depth 1) or a `GridExecutor` (the control
plane of a TP x SPP x KVP grid of worker processes, depth spp); the scheduler, the block manager
(`KVPBlockManager`, one group for kvp = 1), the streams, the KV connector's scheduler side and the
performance model are the engine's, so a feature written here works offline, on a grid and served.
The single-process layout is the reference every grid must reproduce exactly.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from common.config import EngineConfig
from common.engine.executor import Executor, LocalExecutor
from common.engine.stream import RequestStream, StreamHub
from common.errors import CapacityError, ConfigError, InvalidRequestError, WorkerFailedError
from common.kv_cache.kvp_blocks import KVPBlockManager
from common.kv_connector.scheduler import KVConnectorScheduler
from common.kv_connector.types import GroupSink, KVSink, kv_layout
from common.model.loader import Checkpoint, load_checkpoint
from common.perf_model.base import PerfModel
from common.perf_model.online import OnlineCorrection
from common.sampling_params import SamplingParams, TopLogprobs
from common.scheduler.request import FinishReason, Request
from common.scheduler.scheduler import Scheduler, SchedulerOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutput:
    request_id: str
    token_id: int | None          # None for a step that only advanced a prefill
    logprob: float | None
    num_computed: int
    prompt_len: int
    finish_reason: FinishReason | None
    error: str | None = None      # set when the request failed (e.g. its KV never arrived)
    top_logprobs: TopLogprobs = ()  # the token's position: SamplingParams.top_logprobs most likely tokens
    num_cached_tokens: int = 0    # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load (taken by AsyncEngine after every iteration)."""
    running: int = 0
    waiting: int = 0                        # queued, or awaiting their KV
    total_blocks: tuple[int, ...] = ()      # per KVP group
    free_blocks: tuple[int, ...] = ()       # including the cached ones (reclaimable)
    cached_blocks: tuple[int, ...] = ()     # free blocks still holding a cached prefix
    quarantined_blocks: tuple[int, ...] = ()   # used blocks withheld for good (BlockPool.quarantine)
    queued_prefill_tokens: int = 0          # prompt tokens of unfinished requests not yet prefilled
    running_decodes: int = 0                # requests past their prefill
    model_scale: float | None = None        # the scheduler's performance model's online scale (None: none)
    worker_replacements: int = 0            # grid workers replaced in place since the engine started


@dataclass
class GenerationResult:
    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    ttft_s: float
    tbt_s: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)   # one per token, when asked
    num_cached_tokens: int = 0              # prompt tokens whose KV came from the prefix cache


def model_scale(model: PerfModel | None) -> float | None:
    """The scale an online-corrected model (common/perf_model/online.py) predicts at now; None for
    any other (it has no live level to publish)."""
    return float(model.scale) if isinstance(model, OnlineCorrection) else None


def validate_prompt(prompt_ids: list[int], vocab_size: int, max_model_len: int, max_tokens: int) -> None:
    if not prompt_ids:
        raise InvalidRequestError("prompt is empty")
    bad = [t for t in prompt_ids if not isinstance(t, int) or t < 0 or t >= vocab_size]
    if bad:
        raise InvalidRequestError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")
    if len(prompt_ids) >= max_model_len:
        raise InvalidRequestError(f"prompt has {len(prompt_ids)} tokens; the model allows at most "
                                  f"{max_model_len - 1} (max_model_len {max_model_len})")


def kv_salt(cfg: EngineConfig) -> str:
    """What an engine's K/V depend on besides the tokens: cached blocks are named under it."""
    return f"model={cfg.model or 'builtin'}|dtype={cfg.dtype}|tp={cfg.parallel.tp}|spp={cfg.parallel.spp}"


def needs_perf_model(cfg: EngineConfig) -> bool:
    """Adaptive chunking and LARS schedule with a performance model; any perf_model other than
    "saved" asks for one even without them (e.g. to publish it for admission)."""
    s = cfg.scheduler
    return s.chunking == "adaptive" or s.policy == "lars" or cfg.perf_model != "saved"


class LLMEngine:
    def __init__(self, cfg: EngineConfig, checkpoint: Checkpoint | None = None,
                 extra_eos_ids: Iterable[int] = (), perf_model: PerfModel | None = None,
                 executor: Callable[["LLMEngine"], Executor] | None = None) -> None:
        """`extra_eos_ids`: stop tokens besides the model config's, e.g. the tokenizer's (SmolLM2's
        chat turns end with <|im_end|>). Every request stops on their union unless ignore_eos.
        `perf_model`: predicts iteration times for adaptive chunking and LARS; when none is given
        and one is needed, cfg.perf_model says which (common/engine/profile.py: engine_perf_model).
        `executor`: builds the executor from the engine (its cfg, checkpoint, blocks, max_model_len);
        default a LocalExecutor (cfg.parallel must be 1x1x1). See make_engine for any layout."""
        self.cfg = cfg
        p = cfg.parallel
        if executor is None and p.world_size != 1:
            raise ConfigError(f"LLMEngine runs a {p.tp}x{p.spp}x{p.kvp} layout with a GridExecutor "
                              "(use make_engine)")
        self.checkpoint = checkpoint or load_checkpoint(cfg.model)
        mc = self.model_config = self.checkpoint.config
        self.eos_ids = frozenset(mc.eos_token_ids) | frozenset(int(i) for i in extra_eos_ids)
        self.max_model_len = cfg.max_model_len or mc.max_position
        m = p.kvp_tokens if p.kvp > 1 else self.max_model_len
        if p.kvp > 1 and p.kvp * m < self.max_model_len:
            self.max_model_len = p.kvp * m             # the grid cannot hold more than kvp * M tokens
        self.blocks = KVPBlockManager(p.kvp, m, cfg.cache.total_blocks(), cfg.cache.block_size,
                                      prefix_caching=cfg.cache.prefix_caching, salt=kv_salt(cfg))
        self.executor: Executor = (executor or (lambda e: LocalExecutor(
            e.cfg, e.checkpoint, e.blocks.pools[0], e.max_model_len)))(self)
        self.scheduler: Scheduler | None = None
        try:
            if perf_model is None and needs_perf_model(cfg):
                from common.engine.profile import engine_perf_model
                perf_model = engine_perf_model(self)
            self.perf_model = perf_model
            self.scheduler = Scheduler(cfg.scheduler, self.blocks, kvp_tokens=m if p.kvp > 1 else None,
                                       perf_model=perf_model, pipeline_depth=self.executor.depth)
        except BaseException:
            self.executor.shutdown()
            raise
        from common.parallel.tp import tp_shard
        self.kv_layout = kv_layout(mc, cfg.cache, cfg.dtype, tp_shard(mc, 0, p.tp).num_kv_heads)
        self.kv = KVConnectorScheduler(p, self.blocks, self.scheduler, self.executor, self.max_model_len,
                                       self._ended)
        self.streams = StreamHub()
        self.inflight: deque[SchedulerOutput] = deque()
        self._ids = itertools.count()
        self.repairs: list[float] = []               # seconds each in-place worker replacement took
        self.recovered: list[StepOutput] = []        # outputs of a replacement outside step(), not yet out
        self.closed = False

    # ---- the typed interface's attributes -------------------------------------------------------
    @property
    def pipeline_depth(self) -> int:
        """Steps in flight at once (spp for a grid's sequence pipeline, else 1)."""
        return self.executor.depth

    @property
    def iteration_budget_s(self) -> float:
        """The scheduler's time budget of one iteration for this layout and role."""
        return self.scheduler.budget_s

    @property
    def kv_backend(self) -> str:
        return self.cfg.kv_backend

    @property
    def pool(self):
        """The block pool of a one-group (kvp = 1) engine, e.g. for tests and benchmarks."""
        if len(self.blocks.pools) != 1:
            raise AttributeError("a KVP grid has one pool per group: use engine.blocks")
        return self.blocks.pools[0]

    def stats(self) -> EngineStats:
        sched, pools = self.scheduler, self.blocks.pools
        reqs = list(sched.running) + list(sched.waiting)
        return EngineStats(running=len(sched.running), waiting=len(sched.waiting) + len(self.kv.awaiting),
                           total_blocks=tuple(p.num_blocks for p in pools),
                           free_blocks=tuple(p.num_free for p in pools),
                           cached_blocks=tuple(p.num_cached for p in pools),
                           quarantined_blocks=tuple(p.num_quarantined for p in pools),
                           queued_prefill_tokens=sum(max(r.prompt_len - r.num_computed, 0) for r in reqs),
                           running_decodes=sum(1 for r in sched.running if r.num_computed >= r.prompt_len),
                           model_scale=model_scale(self.perf_model), worker_replacements=len(self.repairs))

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    arrival_s: float | None = None, ttft_deadline_s: float | None = None,
                    kv_sink: KVSink | None = None, tbt_slo_s: float | None = None) -> str:
        """kv_sink: stream this request's KV, chunk by chunk, to a decode instance (prefill role).
        ttft_deadline_s: absolute (time.monotonic clock) deadline of the first token; tbt_slo_s: the
        time between tokens promised (both steer LARS and the decode budget)."""
        self._check_open()
        validate_prompt(prompt_ids, self.model_config.vocab_size, self.max_model_len, params.max_tokens)
        rid = request_id or f"req-{next(self._ids)}"
        req = self.make_request(rid, prompt_ids, params, arrival_s, ttft_deadline_s, tbt_slo_s)
        if kv_sink is not None:
            self.kv.attach(rid, kv_sink)        # a reused prefix's KV streams from the cache
        try:
            self.scheduler.add(req)
        except BaseException:
            self.kv.abort(rid)
            raise
        return rid

    def make_request(self, rid: str, prompt_ids: list[int], params: SamplingParams, arrival_s: float | None = None,
                     ttft_deadline_s: float | None = None, tbt_slo_s: float | None = None) -> Request:
        req = Request(rid, list(prompt_ids), params, arrival_s if arrival_s is not None else time.monotonic(),
                      eos_ids=self.eos_ids, max_model_len=self.max_model_len, ttft_deadline_s=ttft_deadline_s)
        req.tbt_slo_s = tbt_slo_s
        return req

    def abort(self, request_id: str) -> bool:
        found = self.kv.abort(request_id)
        found = self.scheduler.abort(request_id) is not None or found
        self.executor.forget(request_id)
        if found:
            self.streams.aborted(request_id)
        return found

    def stream(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
               **kwargs) -> RequestStream:
        """Adds a request and returns an iterator of its TokenEvents (see common/engine/stream.py);
        kwargs as add_request. Iterating steps the engine, so other requests advance too."""
        rid = self.add_request(prompt_ids, params, request_id, **kwargs)
        return RequestStream(self, rid)

    def subscribe(self, request_id: str, callback) -> None:
        """Calls `callback(TokenEvent)` for each new token of the request, and once when it ends."""
        self.streams.subscribe(request_id, callback)

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_unfinished() or bool(self.inflight) or bool(self.kv.awaiting)
                or bool(self.recovered))

    # ---- disaggregation (common/kv_connector) ---------------------------------------------------------
    def prepare_receive(self, request_id: str, num_prompt_tokens: int, max_new_tokens: int,
                        epoch: int = 0, prompt_ids: list[int] | None = None) -> list[GroupSink]:
        """Decode role: reserves the request's blocks in every KVP group and registers the expected
        KV (of placement `epoch`) with the holders; returns where the prefill side must send it.
        With `prompt_ids` (the prompt) and prefix caching on, the blocks of its longest cached
        full-block prefix are reused: GroupSink.cached says which tokens are not to be sent, and
        add_prefilled must then bring the same prompt."""
        self._check_open()
        try:
            return self.kv.prepare_receive(request_id, num_prompt_tokens, max_new_tokens, epoch, prompt_ids)
        except WorkerFailedError as e:
            if not self.executor.repairable:
                raise
            # a worker died since the last step: replaced now, and the receive is prepared on the
            # repaired grid (the other requests' outputs go out with the next step's)
            self.recovered += self._recover(e)
        return self.kv.prepare_receive(request_id, num_prompt_tokens, max_new_tokens, epoch, prompt_ids)

    def add_prefilled(self, prompt_ids: list[int], params: SamplingParams, request_id: str, first_token: int,
                      first_logprob: float, kv_timeout_s: float = 60.0, tbt_slo_s: float | None = None) -> str:
        """Decode role: the request joins the scheduler once all its KV arrived (prepare_receive)."""
        req = self.make_request(request_id, prompt_ids, params, tbt_slo_s=tbt_slo_s)
        req.num_computed = len(prompt_ids)
        req.append(first_token, first_logprob)
        self.kv.add_prefilled(req, kv_timeout_s)
        return request_id

    def check_alive(self) -> list[StepOutput]:
        """Looks for a dead worker process of the executor (an idle engine steps no grid, so nothing
        else would notice until its next request): replaced in place where the executor can (the
        outputs of the requests that lost their KV are returned), else WorkerFailedError."""
        try:
            if self.kv.holder_lost is not None:          # a KV cancel found a worker gone
                raise self.kv.holder_lost
            self.executor.check_alive()
        except WorkerFailedError as e:
            self.recovered += self._recover(e)
        outs, self.recovered = self.recovered, []
        self.streams.publish(outs)
        return outs

    def kv_status(self, request_id: str) -> tuple[str, str | None]:
        """Prefill role: "pending" | "done" | "failed", reason."""
        return self.kv.kv_status(request_id)

    def kv_progress(self, request_id: str) -> float | None:
        """time.monotonic() of the last KV progress of the request (None: none reported)."""
        return self.kv.last_progress(request_id)

    def _ended(self, req: Request, reason: FinishReason | None, error: str | None) -> StepOutput:
        return StepOutput(req.request_id, None, None, req.num_computed, req.prompt_len, reason, error)

    # ---- one iteration ----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Fills the pipeline (at most `pipeline_depth` steps in flight), then completes the oldest."""
        self._check_open()
        outs, self.recovered = self.recovered, []
        try:
            outs += self.kv.admit_arrived()
            for rid, reason in self.kv.failed_streams().items():     # prefill role: the KV has nowhere to go
                req = self.scheduler.requests.get(rid)
                if req is not None and self.abort(rid):
                    outs.append(self._ended(req, FinishReason.ABORT, f"KV of request {rid} could not be sent: {reason}"))
            if self.kv.holder_lost is not None:          # a KV cancel found a worker gone
                raise self.kv.holder_lost
            while len(self.inflight) < self.executor.depth:
                sched = self.scheduler.schedule()
                if not sched.items:
                    break
                self.inflight.append(sched)              # (before submit: a failed one is submitted again)
                self.executor.submit(sched, self.kv.sinks_for(sched.items))
            if self.inflight:
                res = self.executor.collect()
                outs += self._completed(self.inflight.popleft(), res)
        except WorkerFailedError as e:
            outs += self._recover(e)
        self.streams.publish(outs)
        return outs

    def _completed(self, sched: SchedulerOutput, res) -> list[StepOutput]:
        outs = []
        self.scheduler.postprocess(sched, res.tokens)
        self.kv.sampled(sched.items)
        observe = getattr(self.perf_model, "observe", None)
        if observe is not None and sched.batch is not None and res.service_s is not None:
            observe(sched.batch, res.service_s)          # online correction of the model
        for it in sched.items:
            req = it.request
            tok = res.tokens.get(req.request_id) if it.sample else None
            if req.finished:
                self.executor.forget(req.request_id)
            outs.append(StepOutput(req.request_id, tok[0] if tok else None, tok[1] if tok else None,
                                   req.num_computed, req.prompt_len, req.finish_reason,
                                   top_logprobs=res.top_logprobs.get(req.request_id, ()),
                                   num_cached_tokens=req.num_cached_tokens))
        return outs

    # ---- a lost worker -------------------------------------------------------------------------------
    def _recover(self, err: WorkerFailedError) -> list[StepOutput]:
        """A worker died (`err`). Where the executor can replace it in place (a decode grid), the
        instance goes on, and so do its requests: one the scheduler holds resumes, computing again
        the KV it had in the dead worker's KVP group (Scheduler.rewind: from that group's first
        token, the groups before it kept theirs) before it samples its next token; one whose KV was
        still arriving from a prefill instance ends with an error that says so (KVTransferError to
        its caller: the router retries it, and a retry here brings only the lost group's share, the
        others' being cached: KVConnectorScheduler.lose). The steps in flight are submitted again
        without the rewound and ended requests (a step's KV writes are idempotent; its sampling
        had not happened). Otherwise `err` goes on up (the owner rebuilds the whole engine)."""
        if not self.executor.repairable:
            raise err
        t0 = time.monotonic()
        lost = self.executor.repair()
        took = time.monotonic() - t0
        self.repairs.append(took)
        why = (f"a worker of KVP group {', '.join(map(str, sorted(lost)))} died ({err}); the KV it held is "
               f"lost (the worker was replaced in {took:.1f} s)")
        self.kv.settle()
        outs, rewound = [], set()
        for rid in list(self.kv.prepared):               # KV still arriving: the caller retries
            if any(self.blocks.pools[g].table(rid) for g in lost):
                req = (self.kv.awaiting.get(rid) or (None,))[0]
                self.kv.lose(rid, lost, why)
                self.executor.forget(rid)
                if req is not None:
                    outs.append(self._ended(req, FinishReason.ABORT, why))
        for rid in list(self.scheduler.requests):
            if self.scheduler.rewind(rid, lost):
                rewound.add(rid)
        for g in lost:
            self.blocks.pools[g].drop_names()            # what its cache named is gone with the worker
        replay, self.inflight = list(self.inflight), deque()
        for sched in replay:
            items = [it for it in sched.items if it.request.request_id in self.scheduler.requests
                     and it.request.request_id not in rewound]
            if not items:
                continue
            if len(items) != len(sched.items):
                sched.items, sched.batch = items, None    # (not the batch the model predicted)
            self.inflight.append(sched)
            self.executor.submit(sched, self.kv.sinks_for(items))
        log.warning("%s; %d request(s) compute their lost KV again, %d whose KV was arriving ended, %d step(s) "
                    "submitted again", why, len(rewound), len(outs), len(self.inflight))
        return outs

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationResult]:
        """Runs the prompts together (continuous batching) until all finish."""
        return generate_all(self, prompts, params)

    def dump_kv(self, request_id: str, directory: str) -> list[str]:
        """Debug/test hook: every holder writes the K/V it holds for a running request to
        `directory` (kv-g{group}-s{stage}-t{tp}.safetensors); returns the paths."""
        req = self.scheduler.requests[request_id]
        return self.executor.dump_kv(self.blocks.table(request_id), req.num_computed, directory)

    # ---- lifecycle ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise WorkerFailedError("the engine is shut down")

    def shutdown(self) -> None:
        """Aborts every request (freeing its blocks, cancelling expected KV), then stops the
        executor. Idempotent; a failed executor is only stopped."""
        if self.closed:
            return
        self.closed = True
        try:
            for rid in list(self.scheduler.requests) + list(self.kv.awaiting) + list(self.kv.prepared):
                self.abort(rid)
        except Exception:  # noqa: BLE001 - a dead grid cannot be told; it is going away anyway
            log.debug("aborting requests at shutdown", exc_info=True)
        finally:
            self.executor.shutdown()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def make_engine(cfg: EngineConfig, checkpoint: Checkpoint | None = None, extra_eos_ids: Iterable[int] = (),
                threads_per_worker: int = 1, perf_model: PerfModel | None = None, **grid_kwargs) -> LLMEngine:
    """The engine for cfg.parallel: a LocalExecutor for 1x1x1, else a GridExecutor of worker
    processes (`grid_kwargs`: see common/parallel/driver.py GridExecutor)."""
    if cfg.parallel.world_size == 1:
        return LLMEngine(cfg, checkpoint, extra_eos_ids=extra_eos_ids, perf_model=perf_model)
    from common.parallel.driver import ParallelEngine
    return ParallelEngine(cfg, checkpoint=checkpoint, extra_eos_ids=tuple(extra_eos_ids), perf_model=perf_model,
                          threads_per_worker=threads_per_worker, **grid_kwargs)


def generate_all(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[GenerationResult]:
    """Runs the prompts together until all finish."""
    t0 = time.monotonic()
    rids = [engine.add_request(p, params) for p in prompts]
    results = {r: GenerationResult(r, [], [], "", 0.0) for r in rids}
    last = {r: t0 for r in rids}
    while engine.has_unfinished():
        outs = engine.step()
        if not outs:
            # Nothing could be scheduled and nothing is in flight: no later step will differ.
            stuck = [r for r in rids if r in engine.scheduler.requests]
            for r in stuck:
                engine.abort(r)
            raise CapacityError(f"requests {stuck} cannot make progress: the KV cache "
                                f"({engine.blocks.num_blocks} blocks of {engine.blocks.block_size}) is too small")
        for o in outs:
            if o.token_id is None:
                continue
            now = time.monotonic()
            res = results[o.request_id]
            if not res.token_ids:
                res.ttft_s = now - t0
                res.num_cached_tokens = o.num_cached_tokens
            else:
                res.tbt_s.append(now - last[o.request_id])
            last[o.request_id] = now
            res.token_ids.append(o.token_id)
            res.logprobs.append(o.logprob)
            if o.top_logprobs:
                res.top_logprobs.append(o.top_logprobs)
            if o.finish_reason is not None:
                res.finish_reason = o.finish_reason.value
    return [results[r] for r in rids]
