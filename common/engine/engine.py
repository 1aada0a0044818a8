"""The single-process engine: one step = schedule -> run -> postprocess.

This is also the reference every parallel layout (TP x SPP x KVP) must reproduce exactly.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from common.attention.registry import get_backend
from common.config import EngineConfig, ModelConfig
from common.engine.disagg import Disaggregation
from common.engine.kv_sink import GroupSink, KVSink
from common.engine.model_runner import ModelRunner
from common.engine.sampler import Sampler
from common.engine.stream import RequestStream, StreamHub
from common.errors import CapacityError, InvalidRequestError
from common.kv_cache.block_pool import BlockPool
from common.kv_cache.paged import PagedKVCache
from common.model.llama import LlamaModel
from common.model.loader import Checkpoint, load_checkpoint
from common.perf_model.base import PerfModel
from common.sampling_params import SamplingParams
from common.scheduler.request import FinishReason, Request
from common.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StepOutput:
    request_id: str
    token_id: int | None          # None for a step that only advanced a prefill
    logprob: float | None
    num_computed: int
    prompt_len: int
    finish_reason: FinishReason | None
    error: str | None = None      # set when the request failed (e.g. its KV never arrived)


@dataclass
class GenerationResult:
    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    ttft_s: float
    tbt_s: list[float] = field(default_factory=list)


def build_model(cfg: ModelConfig, checkpoint: Checkpoint, dtype: torch.dtype, device: str,
                first_layer: int = 0, last_layer: int | None = None) -> LlamaModel:
    """Builds a stage of the model without initialising weights, then loads its tensors."""
    with torch.device("meta"):
        model = LlamaModel(cfg, first_layer, last_layer)
    model = model.to_empty(device=device)
    model.load_weights(checkpoint.weights(model.wanted))
    return model.to(dtype).eval()


def validate_prompt(prompt_ids: list[int], vocab_size: int, max_model_len: int, max_tokens: int) -> None:
    if not prompt_ids:
        raise InvalidRequestError("prompt is empty")
    bad = [t for t in prompt_ids if not isinstance(t, int) or t < 0 or t >= vocab_size]
    if bad:
        raise InvalidRequestError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")
    if len(prompt_ids) >= max_model_len:
        raise InvalidRequestError(f"prompt has {len(prompt_ids)} tokens; the model allows at most "
                                  f"{max_model_len - 1} (max_model_len {max_model_len})")


GRAPH_SCRATCH_ID = "__cuda-graph-scratch__"     # owns the block CUDA-graph padding rows write into


class LLMEngine:
    def __init__(self, cfg: EngineConfig, checkpoint: Checkpoint | None = None,
                 extra_eos_ids: Iterable[int] = (), perf_model: PerfModel | None = None) -> None:
        """`extra_eos_ids`: stop tokens besides the model config's, e.g. the tokenizer's (SmolLM2's
        chat turns end with <|im_end|>). Every request stops on their union unless ignore_eos.
        `perf_model`: predicts iteration times for adaptive chunking and LARS; when they are
        configured and none is given, the saved profile for this machine (common/engine/profile.py)
        or else the analytic roofline is used."""
        self.cfg = cfg
        self.checkpoint = checkpoint or load_checkpoint(cfg.model)
        self.model_config = self.checkpoint.config
        self.eos_ids = frozenset(self.model_config.eos_token_ids) | frozenset(int(i) for i in extra_eos_ids)
        self.max_model_len = cfg.max_model_len or self.model_config.max_position
        self.dtype = TORCH_DTYPES[cfg.dtype]
        mc = self.model_config
        self.model = build_model(mc, self.checkpoint, self.dtype, cfg.device)
        num_blocks = cfg.cache.total_blocks()
        self.pool = BlockPool(num_blocks, cfg.cache.block_size)
        self.cache = PagedKVCache(range(mc.num_layers), num_blocks, cfg.cache.block_size, mc.num_kv_heads,
                                  mc.head_dim, self.dtype, cfg.device)
        self.backend = get_backend(cfg.attention_backend, cfg.device)
        if perf_model is None and (cfg.scheduler.chunking == "adaptive" or cfg.scheduler.policy == "lars"):
            from common.engine.profile import load_perf_model
            perf_model = load_perf_model(self)
        self.perf_model = perf_model
        self.scheduler = Scheduler(cfg.scheduler, self.pool, perf_model=perf_model)
        self.runner = ModelRunner(self.model, self.cache, self.pool, self.backend, cfg.device)
        self.graph_steps = 0                                     # decode steps replayed from CUDA graphs
        self.graphs = self._graph_runner()
        self.sampler = Sampler()
        self.streams = StreamHub()
        self._ids = itertools.count()
        self.disagg = Disaggregation(self)

    # ---- the forward pass ---------------------------------------------------------------------------
    def _graph_runner(self):
        """CUDA graphs for decode-only steps (common/engine/cuda_graphs.py), where they apply: a CUDA
        device, the CUDA attention backend (its Triton paged decode kernel is graph-safe) and
        cfg.cuda_graphs. One cache block is reserved for the padded rows; graphs are captured at the
        first decode step."""
        if not (self.cfg.cuda_graphs and torch.device(self.cfg.device).type == "cuda"
                and type(self.backend).__name__ == "CudaAttentionBackend"):
            return None
        from common.engine.cuda_graphs import DEFAULT_BATCH_SIZES, DecodeGraphRunner
        scratch = self.pool.allocate(GRAPH_SCRATCH_ID, 1)[0]
        sizes = tuple(b for b in DEFAULT_BATCH_SIZES if b <= self.cfg.scheduler.max_num_seqs) or (1,)
        return DecodeGraphRunner(self.model, self.cache, self.backend, scratch_block=scratch, batch_sizes=sizes,
                                 max_blocks_per_seq=-(-self.max_model_len // self.cfg.cache.block_size),
                                 device=self.cfg.device)

    def _forward(self, items) -> torch.Tensor:
        """Float32 logits of the sampling items: a graph replay for a decode step the graphs cover,
        else the eager ModelRunner."""
        g = self.graphs
        if g is not None and all(it.num_tokens == 1 and it.sample for it in items):
            if not g.graphs:
                g.capture()
            if g.can_run(items):
                self.graph_steps += 1
                return g.run(items, self.pool)
        return self.runner.run(items)

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    arrival_s: float | None = None, ttft_deadline_s: float | None = None,
                    kv_sink: KVSink | None = None, tbt_slo_s: float | None = None) -> str:
        """kv_sink: stream this request's KV, chunk by chunk, to a decode instance (prefill role).
        ttft_deadline_s: absolute (time.monotonic clock) deadline of the first token; tbt_slo_s: the
        time between tokens promised (both steer LARS and the decode budget)."""
        validate_prompt(prompt_ids, self.model_config.vocab_size, self.max_model_len, params.max_tokens)
        rid = request_id or f"req-{next(self._ids)}"
        req = self.make_request(rid, prompt_ids, params, arrival_s, ttft_deadline_s)
        req.tbt_slo_s = tbt_slo_s
        self.scheduler.add(req)
        if kv_sink is not None:
            self.disagg.sinks[rid] = kv_sink
            self.disagg.streaming.add(rid)
        return rid

    def make_request(self, rid: str, prompt_ids: list[int], params: SamplingParams, arrival_s: float | None = None,
                     ttft_deadline_s: float | None = None) -> Request:
        return Request(rid, list(prompt_ids), params, arrival_s if arrival_s is not None else time.monotonic(),
                       eos_ids=self.eos_ids, max_model_len=self.max_model_len, ttft_deadline_s=ttft_deadline_s)

    def abort(self, request_id: str) -> bool:
        self.sampler.forget(request_id)
        found = self.disagg.abort(request_id)
        found = self.scheduler.abort(request_id) is not None or found
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
        return self.scheduler.has_unfinished() or bool(self.disagg.awaiting)

    # ---- disaggregation (see common/engine/disagg.py) ------------------------------------------------
    def prepare_receive(self, request_id: str, num_prompt_tokens: int, max_new_tokens: int) -> list[GroupSink]:
        return self.disagg.prepare_receive(request_id, num_prompt_tokens, max_new_tokens)

    def add_prefilled(self, prompt_ids: list[int], params: SamplingParams, request_id: str, first_token: int,
                      first_logprob: float, kv_timeout_s: float = 60.0) -> str:
        return self.disagg.add_prefilled(prompt_ids, params, request_id, first_token, first_logprob, kv_timeout_s)

    def kv_status(self, request_id: str) -> tuple[str, str | None]:
        return self.disagg.kv_status(request_id)

    @property
    def kv_backend(self) -> str:
        return self.cfg.kv_backend

    @property
    def kv_layout(self):
        return self.disagg.layout

    # ---- one iteration ----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        t0 = time.perf_counter()
        early = self.disagg.admit_arrived()
        sched = self.scheduler.schedule()
        if not sched.items:
            self.streams.publish(early)
            return early
        logits = self._forward(sched.items)
        self.disagg.stream(sched.items)
        samplers = [it for it in sched.items if it.sample]
        tokens, logprobs = self.sampler.sample(logits, [it.request.request_id for it in samplers],
                                               [it.request.params for it in samplers],
                                               [it.output_index for it in samplers])
        sampled = {it.request.request_id: (t, lp) for it, t, lp in zip(samplers, tokens, logprobs)}
        self.scheduler.postprocess(sched, sampled)
        observe = getattr(self.perf_model, "observe", None)
        if observe is not None and sched.batch is not None:      # online correction of the model
            observe(sched.batch, time.perf_counter() - t0)
        outs = []
        for it in sched.items:
            req = it.request
            tok = sampled.get(req.request_id)
            if req.finished:
                self.sampler.forget(req.request_id)
            outs.append(StepOutput(req.request_id, tok[0] if tok else None, tok[1] if tok else None,
                                   req.num_computed, req.prompt_len, req.finish_reason))
        self.streams.publish(early + outs)
        return early + outs

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationResult]:
        """Runs the prompts together (continuous batching) until all finish."""
        return generate_all(self, prompts, params)


def generate_all(engine, prompts: list[list[int]], params: SamplingParams) -> list[GenerationResult]:
    """Runs the prompts together on any engine (one process or a grid) until all finish."""
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
                                f"({engine.scheduler.pool.num_blocks} blocks of {engine.scheduler.pool.block_size}) is too small")
        for o in outs:
            if o.token_id is None:
                continue
            now = time.monotonic()
            res = results[o.request_id]
            if not res.token_ids:
                res.ttft_s = now - t0
            else:
                res.tbt_s.append(now - last[o.request_id])
            last[o.request_id] = now
            res.token_ids.append(o.token_id)
            res.logprobs.append(o.logprob)
            if o.finish_reason is not None:
                res.finish_reason = o.finish_reason.value
    return [results[r] for r in rids]
