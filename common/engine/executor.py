"""Executors: what runs a scheduled step, behind one small interface, so that one engine step loop
(common/engine/engine.py) serves every layout.

    submit(sched, sinks)   start one step (the SchedulerOutput, and the KV sinks its first chunks carry)
    collect() -> ExecResult   the oldest submitted step's sampled tokens (and top logprobs where
                           asked) and its service time
    depth                  how many steps may be in flight (1 here; spp for a grid's pipeline)
    forget(rid)            the request ended: drop its sampler state
    kv_holders, kv_expect, kv_cancel, kv_events, kv_addresses   the KV connector's worker side
    repairable, repair()   replace a dead worker in place (a decode grid), reporting the KV lost
    dump_kv, shutdown

`LocalExecutor` (this file) runs the model, the sampler and the KV cache in this process.
`GridExecutor` (common/parallel/driver.py) is the control plane of a TP x SPP x KVP grid.
"""
from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from common.attention.registry import get_backend
from common.config import EngineConfig, ModelConfig
from common.engine.model_runner import ModelRunner
from common.engine.sampler import Sampler
from common.errors import WorkerFailedError
from common.kv_cache.block_pool import BlockPool
from common.kv_cache.paged import PagedKVCache
from common.kv_connector.types import KVAck, KVEvent, KVSink, kv_layout
from common.kv_connector.worker import KVWorker
from common.model.llama import LlamaModel, to_empty
from common.model.loader import Checkpoint
from common.model.packed_cache import PackedCache
from common.parallel.tp import build_shard, tp_shard
from common.sampling_params import TopLogprobs
from common.scheduler.scheduler import SchedulerOutput

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GRAPH_SCRATCH_ID = "__cuda-graph-scratch__"     # owns the block CUDA-graph padding rows write into


@dataclass(frozen=True)
class ExecResult:
    tokens: dict[str, tuple[int, float]]   # sampling requests: request id -> (token, logprob)
    service_s: float | None                # the step's service time, what the perf model predicts
    cpu_s: float | None = None             # this process's CPU time for it (in-process executors)
    top_logprobs: dict[str, TopLogprobs] = field(default_factory=dict)   # the requests that asked


class Executor(ABC):
    depth: int = 1
    kv_holders: int = 1                    # processes that hold KV and report KVEvents
    threads: int | None = None             # torch threads per model process (None: this one's)

    @abstractmethod
    def submit(self, sched: SchedulerOutput, sinks: dict[str, KVSink]) -> None: ...

    @abstractmethod
    def collect(self) -> ExecResult: ...

    @abstractmethod
    def forget(self, request_id: str) -> None: ...

    @abstractmethod
    def kv_expect(self, request_id: str, tables: list[list[int]], num_tokens: int, epoch: int = 0,
                  cached: int | list[int] = 0) -> list[KVAck]:
        """Every holder registers its part of a request's incoming KV (chunks of placement `epoch`
        only; the tokens `cached` says are in the tables already and never arrive: the prompt's
        first `cached`, or per group its leading tokens); one ack per holder."""

    @abstractmethod
    def kv_cancel(self, request_id: str) -> dict[int, list[int]]:
        """Every holder forgets the request, and answers once it did (a grid waits for all): returns
        {KVP group: its blocks a late write may still land in} (a NIXL write granted, neither
        finished nor recalled): the caller withholds them for good."""

    @abstractmethod
    def kv_events(self) -> list[KVEvent]:
        """The holders' terminal reports since the last call."""

    @abstractmethod
    def kv_addresses(self, group: int) -> list[str]:
        """The KV receivers of a KVP group, one per TP rank."""

    def kv_group_holders(self, group: int) -> list[int]:
        """The holder ids (KVAck.holder, KVEvent.holder) of a KVP group's KV."""
        return [0]

    @abstractmethod
    def dump_kv(self, tables: list[list[int]], num_tokens: int, directory: str) -> list[str]: ...

    def check_alive(self) -> None:
        """WorkerFailedError when a process of this executor died (called while the engine idles,
        when no step would notice). In-process executors have none to lose."""

    #: whether `repair` can replace a dead process in place
    repairable: bool = False

    def repair(self) -> set[int]:
        """After a WorkerFailedError: replaces the dead processes, keeping the others and their KV;
        returns the KVP groups whose KV was lost. Steps in flight are dropped (the caller submits
        them again). Raises WorkerFailedError when it cannot."""
        raise WorkerFailedError("this executor cannot replace a process in place")

    def shutdown(self) -> None:
        pass


def build_model(cfg: ModelConfig, checkpoint: Checkpoint, dtype: torch.dtype, device: str,
                first_layer: int = 0, last_layer: int | None = None, cache: PackedCache | None = None) -> LlamaModel:
    """Builds a stage of the model without initialising weights, then loads its tensors. On the CPU it
    is a grid rank's build with the whole model (common/parallel/tp.py build_shard: packed, and with
    `cache` mapped from the stage's packed file when one was saved)."""
    last = cfg.num_layers if last_layer is None else last_layer
    if torch.device(device).type == "cpu":
        return build_shard(checkpoint, tp_shard(cfg, 0, 1), None, first_layer, last, dtype, cache)
    with torch.device("meta"):
        model = LlamaModel(cfg, first_layer, last_layer)
    model = to_empty(model, device)
    model.load_weights(checkpoint.weights(model.wanted))
    return model.to(dtype).eval()


def dump_kv_file(cache: PagedKVCache, table: list[int], num_tokens: int, path: str) -> str:
    """Debug/test hook: writes one holder's K/V of a request (`num_tokens` of its group's tokens
    at `table`, its layers and heads) to `path` as safetensors."""
    from safetensors.torch import save_file
    tensors = {"num_tokens": torch.tensor([num_tokens]), "num_blocks": torch.tensor([len(table)])}
    for layer in cache.layers:
        if num_tokens:
            k, v = cache.gather(layer, table, len(table) * cache.block_size)
            tensors[f"k.{layer}"], tensors[f"v.{layer}"] = k.float().contiguous(), v.float().contiguous()
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


class LocalExecutor(Executor):
    """The model, its paged KV cache, the sampler and the KV connector's worker side, in this
    process; one step at a time (depth 1), done by `submit`. `pool`: the engine's block pool (the
    one group of its KVPBlockManager); a CUDA-graph scratch block is taken from it."""

    def __init__(self, cfg: EngineConfig, checkpoint: Checkpoint, pool: BlockPool, max_model_len: int) -> None:
        self.cfg = cfg
        mc: ModelConfig = checkpoint.config
        self.dtype = TORCH_DTYPES[cfg.dtype]
        self.model = build_model(mc, checkpoint, self.dtype, cfg.device,
                                 cache=PackedCache() if cfg.weight_cache else None)
        self.pool = pool
        self.max_model_len = max_model_len
        self.cache = PagedKVCache(range(mc.num_layers), pool.num_blocks, pool.block_size, mc.num_kv_heads,
                                  mc.head_dim, self.dtype, cfg.device)
        self.backend = get_backend(cfg.attention_backend, cfg.device)
        self.runner = ModelRunner(self.model, self.cache, pool, self.backend, cfg.device)
        self.graph_steps = 0                                     # decode steps replayed from CUDA graphs
        self.graphs = self._graph_runner()
        self.sampler = Sampler()
        self.kv = KVWorker(0, kv_layout(mc, cfg.cache, cfg.dtype, mc.num_kv_heads), self.cache, cfg.kv_backend,
                           cfg.kv_host)
        self._result: ExecResult | None = None

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
        """Float32 logits [sampling items, vocab]: a graph replay for a decode step the graphs
        cover, else the eager ModelRunner."""
        g = self.graphs
        if g is not None and all(it.num_tokens == 1 and it.sample for it in items):
            if not g.graphs:
                g.capture()
            if g.can_run(items):
                self.graph_steps += 1
                return g.run(items, self.pool)
        return self.runner.run(items)

    def submit(self, sched: SchedulerOutput, sinks: dict[str, KVSink]) -> None:
        w0, c0 = time.perf_counter(), time.process_time()
        items = sched.items
        logits = self._forward(items)
        if sinks or self.kv.sinks:                    # prefill role: send the KV just written
            for it in items:
                rid = it.request.request_id
                self.kv.stream(rid, it.start, it.num_tokens, self.pool.table(rid), it.sample, sinks.get(rid))
        samplers = [it for it in items if it.sample]
        tokens, logprobs, tops = self.sampler.sample(logits, [it.request.request_id for it in samplers],
                                                     [it.request.params for it in samplers],
                                                     [it.output_index for it in samplers])
        sampled = {it.request.request_id: (t, lp) for it, t, lp in zip(samplers, tokens, logprobs)}
        self._result = ExecResult(sampled, time.perf_counter() - w0, time.process_time() - c0,
                                  {samplers[b].request.request_id: top for b, top in tops.items()})

    def collect(self) -> ExecResult:
        res, self._result = self._result, None
        assert res is not None, "collect() without submit()"
        return res

    def forget(self, request_id: str) -> None:
        self.sampler.forget(request_id)

    def kv_expect(self, request_id: str, tables: list[list[int]], num_tokens: int, epoch: int = 0,
                  cached: int | list[int] = 0) -> list[KVAck]:
        return [self.kv.expect(request_id, tables, num_tokens, epoch, cached)]

    def kv_cancel(self, request_id: str) -> dict[int, list[int]]:
        poisoned = self.kv.cancel(request_id)
        return {0: poisoned} if poisoned else {}

    def kv_events(self) -> list[KVEvent]:
        return self.kv.poll_events()

    def kv_addresses(self, group: int) -> list[str]:
        return [self.kv.address]

    def dump_kv(self, tables: list[list[int]], num_tokens: int, directory: str) -> list[str]:
        return [dump_kv_file(self.cache, tables[0], num_tokens, os.path.join(directory, "kv-g0-s0-t0.safetensors"))]

    def shutdown(self) -> None:
        self.kv.close()
