"""What one forward pass needs besides the weights: where each sequence's queries and keys are.

The model calls `ctx.attend(layer, q, k, v)` once per layer. The context stores the new K/V into the
paged cache (only on the worker that owns them), attends each sequence over the keys this worker holds,
and, under KV-cache parallelism, merges the partial outputs of all groups through `combine`.

Single-token sequences that see every key held here (a decode, or any query of an earlier KVP shard)
go to the backend together, in one `decode_paged` call per layer over the block tables; the block
tables and lengths are built once per step. The others (prefill chunks) are attended one by one:
over a view of the cache where their blocks are consecutive, and where the table is a few runs of
consecutive blocks (a long prompt's table with the holes of blocks other requests held or the prefix
cache keeps), once per run, merged exactly like KVP shards: without copying the keys. Gathering a
524,288-token context into one tensor took 45 ms a layer here, as long as a 32-token chunk's attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from common.attention.base import AttentionBackend
from common.attention.merge import merge_attention_states
from common.kv_cache.paged import PagedKVCache

#: A prefill sequence whose blocks form at most this many runs of consecutive blocks is attended per
#: run (views of the cache, merged); one with more is gathered into one tensor (a copy).
MAX_RUNS = 16


@dataclass(frozen=True)
class SeqAttn:
    """One sequence of the flat batch, as seen by this worker."""
    rows: slice                # its query rows in the flat batch
    q_start: int               # absolute position of its first query token
    kv_start: int              # absolute position of the first key held here (a KVP shard start)
    kv_len: int                # keys held here, after this step's write, that it attends to
    block_table: list[int]     # local blocks holding those keys, in token order


Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
VECTOR_BLOCKS = 64         # block_runs scans tables longer than this in numpy


def block_runs(table: list[int], num_tokens: int, block_size: int, max_runs: int = MAX_RUNS
               ) -> list[tuple[int, int, int]] | None:
    """The first `num_tokens` keys of a block table as runs of consecutive blocks: (first token,
    first block, tokens) each, in token order; None when there are more than `max_runs`. Long tables
    are scanned in numpy (every prefill chunk of a 1M-token prompt scans its 65,536 blocks: 5.5 ms a
    chunk in a Python loop)."""
    nb = -(-num_tokens // block_size)
    if nb > VECTOR_BLOCKS:
        ids = np.asarray(table[:nb], dtype=np.int64)
        starts = np.flatnonzero(np.diff(ids) != 1) + 1
        if len(starts) >= max_runs:
            return None
        bounds = [0, *starts.tolist(), nb]
        return [(i * block_size, int(ids[i]), min(j * block_size, num_tokens) - i * block_size)
                for i, j in zip(bounds[:-1], bounds[1:])]
    runs: list[tuple[int, int, int]] = []
    i = 0
    while i < nb:
        j = i + 1
        while j < nb and table[j] == table[j - 1] + 1:
            j += 1
        if len(runs) == max_runs:
            return None
        runs.append((i * block_size, table[i], min(j * block_size, num_tokens) - i * block_size))
        i = j
    return runs


class ForwardContext:
    def __init__(self, cache: PagedKVCache, backend: AttentionBackend, seqs: list[SeqAttn], scale: float,
                 write_rows: torch.Tensor | None, write_slots: torch.Tensor | None,
                 combine: Combine | None = None,
                 kv_map: tuple[tuple[int, int, int], ...] | None = None) -> None:
        """write_rows [N] int64: rows whose K/V this worker stores, at cache slots write_slots [N].

        kv_map: (q_lo, q_hi, kv) runs when the local query heads do not map uniformly onto the local
        KV heads (a tensor-parallel split inside a GQA group); attention then runs per run."""
        self.cache = cache
        self.backend = backend
        self.seqs = seqs
        self.scale = scale
        self.write_rows = write_rows
        self.write_slots = write_slots
        self.combine = combine
        self.kv_map = kv_map
        # Rows 0 .. N-1 in order (one process writes every row it computes): store k, v as they are,
        # without a gather. Checked on CPU only (on CUDA the comparison would synchronise).
        self.write_all = (write_rows is not None and write_rows.device.type == "cpu" and write_rows.numel() > 0
                          and torch.equal(write_rows, torch.arange(len(write_rows))))
        # Decodes: one query row that sees all of its kv_len keys (kv_start + kv_len - 1 <= q_start).
        # Under kv_map the per-run head slices of the cache are not contiguous: keep the general loop.
        decode: list[SeqAttn] = []
        self.rest: list[SeqAttn] = []                       # attended one by one
        self.runs: list[list[tuple[int, int, int]] | None] = []   # per rest seq: block_runs (None: gather)
        for s in seqs:
            if kv_map is None and s.rows.stop - s.rows.start == 1 and 0 < s.kv_len <= s.q_start + 1 - s.kv_start:
                decode.append(s)
            elif s.kv_len > 0:
                self.rest.append(s)
                self.runs.append(block_runs(s.block_table, s.kv_len, cache.block_size, MAX_RUNS))
        self.decode_rows: torch.Tensor | None = None       # [B] int64 query rows of the decodes
        self.decode_in_order = False                        # rows are 0 .. T-1: no gather/scatter
        if decode:
            dev = cache.data.device
            bs = cache.block_size
            nb = max(-(-s.kv_len // bs) for s in decode)
            tables = np.full((len(decode), nb), -1, dtype=np.int32)      # (numpy: 4x torch.tensor on a list)
            for i, s in enumerate(decode):
                row = s.block_table[:nb]
                tables[i, :len(row)] = row
            self.decode_tables = torch.from_numpy(tables).to(dev)          # [B, nb]
            self.decode_lens = torch.tensor([s.kv_len for s in decode], dtype=torch.int32, device=dev)
            starts = [s.rows.start for s in decode]
            self.decode_rows = torch.tensor(starts, dtype=torch.long, device=dev)
            self.decode_in_order = starts == list(range(len(starts)))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> out [T, Hq, D]."""
        if self.write_all and len(self.write_rows) == k.shape[0]:
            self.cache.write(layer, self.write_slots, k, v)
        elif self.write_rows is not None and self.write_rows.numel():
            self.cache.write(layer, self.write_slots, k.index_select(0, self.write_rows),
                             v.index_select(0, self.write_rows))
        if self.decode_rows is not None and self.decode_in_order and not self.rest \
                and len(self.decode_rows) == q.shape[0]:               # an all-decode step
            out, lse = self.backend.decode_paged(q, self.cache.k(layer), self.cache.v(layer), self.decode_tables,
                                                 self.decode_lens, scale=self.scale)
            return out if self.combine is None else self.combine(out, lse.float())
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        if self.decode_rows is not None:
            o, l = self.backend.decode_paged(q.index_select(0, self.decode_rows), self.cache.k(layer),
                                             self.cache.v(layer), self.decode_tables, self.decode_lens,
                                             scale=self.scale)                  # [B, Hq, D], [B, Hq]
            out.index_copy_(0, self.decode_rows, o)
            lse.index_copy_(0, self.decode_rows, l.float())
        for s, runs in zip(self.rest, self.runs):
            if runs is None:                             # fragmented: one gathered copy
                parts = [(0, *self.cache.gather(layer, s.block_table, s.kv_len))]
            else:                                        # views of the cache, run by run
                k_all, v_all, bs = self.cache.k(layer), self.cache.v(layer), self.cache.block_size
                parts = [(t0, k_all[b0:b0 + -(-n // bs)].flatten(0, 1)[:n], v_all[b0:b0 + -(-n // bs)].flatten(0, 1)[:n])
                         for t0, b0, n in runs]
            heads = [(slice(None), slice(None))] if self.kv_map is None else \
                [(slice(q_lo, q_hi), slice(kv, kv + 1)) for q_lo, q_hi, kv in self.kv_map]
            for qh, kvh in heads:
                outs, lses = [], []
                for t0, ks, vs in parts:
                    o, l = self.backend.forward(q[s.rows, qh], ks[:, kvh], vs[:, kvh], q_start=s.q_start,
                                                k_start=s.kv_start + t0, scale=self.scale)
                    outs.append(o)
                    lses.append(l)
                o, l = (outs[0], lses[0]) if len(outs) == 1 else merge_attention_states(outs, lses)
                out[s.rows, qh] = o
                lse[s.rows, qh] = l
        if self.combine is not None:
            out = self.combine(out, lse)
        return out
