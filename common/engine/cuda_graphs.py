"""CUDA graphs for the decode step: one graph per captured batch size, all in one memory pool.

A decode step (every item one token, every item sampling) of batch n is padded to the next captured
size b and replayed. Everything a step varies lives in persistent device buffers the graphs read:

    input_ids [b] int64, positions [b] int64, slots [b] int64   (cache slot the token's K/V goes to)
    seq_lens [b] int32, block_tables [b, max_blocks] int32       (what the decode kernel reads)

`run` fills pinned host mirrors, copies them in (5 small async copies), replays, and returns the first n
rows of the logits. Padded rows hold token 0 at position 0, write their K/V into the reserved scratch
block (so they never touch a live page), and have seq_len 0: the decode kernel reads nothing for them
and gives them output 0, so no NaN can arise.

The graph-safe forward context does no host work per layer: it writes K/V with index_copy_ into the
cache and calls `backend.decode_paged` (the Triton split-KV kernel, common/attention/triton_decode.py,
whose launch depends only on shapes). Not covered: tensor parallel runs inside a GQA group (kv_map) and
KV-cache parallel merges (combine); those steps run eagerly.

Used by LLMEngine on CUDA for every decode-only step it covers (EngineConfig.cuda_graphs; the grid's
workers run eagerly). On CPU, staging,
padding and the padded eager step (`load` + `eager`, no graph) are tested against the ForwardContext
path (tests/unit/test_triton_decode.py). Capture and replay are checked on a GPU by tests/gpu/test_cuda_graphs.py
(replay bitwise equal to the same padded step run eagerly, and close to the ForwardContext path) and
the graph section of bench/gpu_probe.py; their first H200 run found that buffers allocated inside
capture()'s inference mode could not be restaged by `load` (fixed; CPU regression test in
tests/unit/test_triton_decode.py). tests/gpu/test_engine_gpu.py runs the engine with and without graphs
against transformers on the GPU.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import torch

from common.attention.base import AttentionBackend
from common.kv_cache.paged import PagedKVCache

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64)


class GraphDecodeContext:
    """The forward context of a padded decode batch whose indices all live on the device.

    slots [b] int64, block_tables [b, max_blocks] int32, seq_lens [b] int32 (keys after this step's
    write; 0 for padded rows)."""

    def __init__(self, cache: PagedKVCache, backend: AttentionBackend, scale: float, slots: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
        self.cache = cache
        self.backend = backend
        self.scale = scale
        self.slots = slots
        self.block_tables = block_tables
        self.seq_lens = seq_lens

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [b, Hq, D], k/v [b, Hkv, D] -> out [b, Hq, D]."""
        self.cache.write(layer, self.slots, k, v)
        out, _ = self.backend.decode_paged(q, self.cache.k(layer), self.cache.v(layer), self.block_tables,
                                           self.seq_lens, scale=self.scale)
        return out


class DecodeGraphRunner:
    def __init__(self, model, cache: PagedKVCache, backend: AttentionBackend, *, max_blocks_per_seq: int,
                 scratch_block: int, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 device: str | torch.device = "cuda") -> None:
        """model: a LlamaModel holding all layers (first and last stage); cache: its PagedKVCache on
        `device`; scratch_block: a cache block no request will ever own (the caller reserves it);
        max_blocks_per_seq: block-table width, fixed at capture (a longer sequence runs eagerly).
        Nothing touches the GPU before `capture()`."""
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive, got {batch_sizes!r}")
        if not 0 <= scratch_block < cache.num_blocks:
            raise ValueError(f"scratch_block {scratch_block} is not a block of the cache (0..{cache.num_blocks - 1})")
        self.model = model
        self.cache = cache
        self.backend = backend
        self.device = torch.device(device)
        self.sizes = sorted(set(int(b) for b in batch_sizes))
        self.max_blocks = max_blocks_per_seq
        self.scratch_block = scratch_block
        self.scale = model.cfg.head_dim ** -0.5
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}     # [b, vocab] float32, owned by the graph pool
        self.pool = None
        self._copied: torch.cuda.Event | None = None   # host mirrors may be rewritten once this fires
        self.dev: dict[str, torch.Tensor] = {}          # persistent device buffers, made on first use
        self.host: dict[str, torch.Tensor] = {}         # their (pinned) host mirrors

    # ---- buffers -----------------------------------------------------------------------------------
    def _alloc(self) -> None:
        # Made outside inference mode even when capture() (which is) allocates them: `load` rewrites
        # them in place from ordinary code, which PyTorch refuses for inference tensors.
        with torch.inference_mode(False):
            self._alloc_buffers()

    def _alloc_buffers(self) -> None:
        bmax, dev = self.sizes[-1], self.device
        self.dev = {"input_ids": torch.zeros(bmax, dtype=torch.long, device=dev),
                    "positions": torch.zeros(bmax, dtype=torch.long, device=dev),
                    "slots": torch.zeros(bmax, dtype=torch.long, device=dev),
                    "seq_lens": torch.zeros(bmax, dtype=torch.int32, device=dev),
                    "block_tables": torch.zeros(bmax, self.max_blocks, dtype=torch.int32, device=dev)}
        pin = self.device.type == "cuda"             # async host->device copies need pinned memory
        self.host = {k: torch.zeros(v.shape, dtype=v.dtype, pin_memory=pin) for k, v in self.dev.items()}
        self._fill_padding(0, bmax)
        for k, v in self.dev.items():
            v.copy_(self.host[k])

    def _fill_padding(self, lo: int, hi: int) -> None:
        h = self.host
        h["input_ids"][lo:hi] = 0
        h["positions"][lo:hi] = 0
        h["slots"][lo:hi] = self.scratch_block * self.cache.block_size
        h["seq_lens"][lo:hi] = 0
        h["block_tables"][lo:hi] = self.scratch_block

    def _forward(self, b: int) -> torch.Tensor:
        """The padded step on the first b rows of the device buffers -> logits [b, vocab] float32."""
        d = self.dev
        ctx = GraphDecodeContext(self.cache, self.backend, self.scale, d["slots"][:b], d["block_tables"][:b],
                                 d["seq_lens"][:b])
        hidden = self.model(self.model.embed(d["input_ids"][:b]), d["positions"][:b], ctx)   # [b, hidden]
        return self.model.logits(hidden)

    # ---- capture -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        """Warms every size up eagerly (Triton compiles, cuBLAS picks kernels), then captures them from
        the largest down into one pool. Warm-up steps only write the scratch block."""
        # Rope keeps inv_freq on the CPU and copies it per call; a pageable host copy cannot be captured.
        rope = self.model.rope
        rope.inv_freq = rope.inv_freq.to(self.device)
        if not self.dev:
            self._alloc()
        for b in reversed(self.sizes):
            self._forward(b)
        torch.cuda.synchronize(self.device)
        for b in reversed(self.sizes):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.outputs[b] = self._forward(b)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize(self.device)

    # ---- steps -------------------------------------------------------------------------------------
    def padded_size(self, n: int) -> int | None:
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def can_run(self, items) -> bool:
        """Whether this scheduled batch is a decode step the graphs cover."""
        return (bool(self.graphs) and 0 < len(items) <= self.sizes[-1]
                and all(it.num_tokens == 1 and it.sample for it in items)
                and all(-(-(it.start + 1) // self.cache.block_size) <= self.max_blocks for it in items))

    def load(self, token_ids: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]) -> int:
        """Stages one decode step (token i at positions[i] of a sequence with block table tables[i])
        into the device buffers; returns the padded batch size."""
        n = len(token_ids)
        b = self.padded_size(n)
        if b is None or not (len(positions) == len(tables) == n):
            raise ValueError(f"cannot stage a decode step of {n} tokens (captured sizes {self.sizes})")
        if not self.dev:
            self._alloc()
        if self._copied is not None:
            self._copied.synchronize()                 # the previous step's copies have read the mirrors
        h, bs = self.host, self.cache.block_size
        self._fill_padding(n, b)
        for i, (tok, pos, table) in enumerate(zip(token_ids, positions, tables)):
            nb = -(-(pos + 1) // bs)
            if nb > self.max_blocks or len(table) < nb:
                raise ValueError(f"row {i}: position {pos} needs {nb} blocks; table has {len(table)}, "
                                 f"graphs hold {self.max_blocks}")
            h["input_ids"][i] = tok
            h["positions"][i] = pos
            h["slots"][i] = table[pos // bs] * bs + pos % bs
            h["seq_lens"][i] = pos + 1
            h["block_tables"][i, :nb] = torch.as_tensor(table[:nb], dtype=torch.int32)
            h["block_tables"][i, nb:] = self.scratch_block
        for k, v in self.dev.items():
            v[:b].copy_(self.host[k][:b], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return b

    @torch.inference_mode()
    def replay(self, n: int, b: int) -> torch.Tensor:
        """Replays the graph of size b; returns logits [n, vocab] float32 (a copy)."""
        self.graphs[b].replay()
        return self.outputs[b][:n].clone()

    @torch.inference_mode()
    def eager(self, n: int, b: int) -> torch.Tensor:
        """The same padded step without the graph (the bitwise reference for replay)."""
        return self._forward(b)[:n].clone()

    def run(self, items, pool) -> torch.Tensor:
        """A ModelRunner-style decode step: items (ScheduledItem, one token each, all sampling), pool the
        BlockPool holding their tables. Returns float32 logits [len(items), vocab] in item order."""
        ids = [it.request.token_ids(it.start, it.start + 1)[0] for it in items]
        b = self.load(ids, [it.start for it in items], [pool.table(it.request.request_id) for it in items])
        return self.replay(len(items), b)
