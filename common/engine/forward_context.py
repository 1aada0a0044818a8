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

A table of many runs (`plan_parts`): the blocks wholly at or before the chunk's first query position
are seen by every query of the chunk, so their order does not matter; they are taken in id order, and
the longest runs of consecutive ids (at most MAX_RUNS, each >= MIN_VIEW_BLOCKS) are attended where
they lie, the few blocks left over gathered into one tensor. Only the blocks the chunk itself spans
keep their positions (few: one chunk's worth). A pool that served a few requests hands blocks back
tail first (BlockPool.free), so a long prompt's later blocks come descending, one run each: the
served 524K-token prefill spent 35% of its time gathering its whole context for every chunk.
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
#: run (views of the cache, merged); one with more is planned by `plan_parts`.
MAX_RUNS = 16
#: plan_parts: a run of consecutive block ids shorter than this is gathered with the other short ones.
MIN_VIEW_BLOCKS = 8
#: plan_parts: the blocks a chunk spans form at most this many runs, else they are gathered (in order).
MAX_TAIL_RUNS = 4


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


def block_runs(table: list[int], num_tokens: int, block_size: int, max_runs: int = MAX_RUNS,
               ids: np.ndarray | None = None) -> list[tuple[int, int, int]] | None:
    """The first `num_tokens` keys of a block table as runs of consecutive blocks: (first token,
    first block, tokens) each, in token order; None when there are more than `max_runs`. Long tables
    are scanned in numpy (every prefill chunk of a 1M-token prompt scans its 65,536 blocks: 5.5 ms a
    chunk in a Python loop); `ids`: those blocks as an int64 array, where the caller has it."""
    nb = -(-num_tokens // block_size)
    if nb > VECTOR_BLOCKS:
        ids = np.asarray(table[:nb], dtype=np.int64) if ids is None else ids[:nb]
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


@dataclass(frozen=True)
class Part:
    """Keys of one backend call: `n` keys whose first has local position `t0` (its absolute position
    is kv_start + t0), either the consecutive blocks from `b0` (a view) or the blocks `gather` (a copy,
    int64 on the cache's device)."""
    t0: int
    n: int
    b0: int = -1
    gather: torch.Tensor | None = None


def plan_parts(table: list[int], kv_start: int, kv_len: int, q_start: int, block_size: int,
               device: torch.device | str = "cpu") -> list[Part]:
    """How a prefill sequence attends its `kv_len` keys held here (see the module docstring): one
    part per run when there are at most MAX_RUNS; else the full blocks every query sees (positions
    <= q_start) in id order, as views of their longest runs and one gathered rest, then the blocks
    the chunk spans in position order."""
    bs = block_size
    nb = -(-kv_len // bs)
    table_ids = np.asarray(table[:nb], dtype=np.int64) if nb > VECTOR_BLOCKS else None   # converted once
    runs = block_runs(table, kv_len, bs, MAX_RUNS, table_ids)
    if runs is not None:
        return [Part(t0, n, b0) for t0, b0, n in runs]
    n_pre = max(0, min((q_start - kv_start + 1) // bs, kv_len // bs, nb))   # full blocks seen by all queries
    parts: list[Part] = []
    if n_pre:
        ids = np.sort(table_ids[:n_pre] if table_ids is not None else np.asarray(table[:n_pre], dtype=np.int64))
        starts = np.concatenate([[0], np.flatnonzero(np.diff(ids) != 1) + 1, [n_pre]])
        lens = np.diff(starts)
        order = np.argsort(-lens, kind="stable")[:MAX_RUNS]
        views = [int(i) for i in order if lens[i] >= MIN_VIEW_BLOCKS]
        # A part of n keys given t0 = 0 is visible to every query (its keys' positions are taken as
        # kv_start .. kv_start + n - 1 <= q_start): the attention is the same whatever their order.
        parts += [Part(0, int(lens[i]) * bs, int(ids[starts[i]])) for i in sorted(views)]
        keep = np.ones(n_pre, dtype=bool)
        for i in views:
            keep[starts[i]:starts[i + 1]] = False
        rest = ids[keep]
        if len(rest):
            parts.append(Part(0, len(rest) * bs, gather=torch.from_numpy(rest).to(device)))
    tail, t_tail = table[n_pre:nb], n_pre * bs
    if kv_len > t_tail:
        tail_runs = block_runs(tail, kv_len - t_tail, bs, MAX_TAIL_RUNS)
        if tail_runs is not None:
            parts += [Part(t_tail + t0, n, b0) for t0, b0, n in tail_runs]
        else:
            parts.append(Part(t_tail, kv_len - t_tail, gather=torch.tensor(tail, dtype=torch.long, device=device)))
    return parts


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
        self.parts: list[list[Part]] = []                  # per rest seq: its backend calls
        for s in seqs:
            if kv_map is None and s.rows.stop - s.rows.start == 1 and 0 < s.kv_len <= s.q_start + 1 - s.kv_start:
                decode.append(s)
            elif s.kv_len > 0:
                self.rest.append(s)
                self.parts.append(plan_parts(s.block_table, s.kv_start, s.kv_len, s.q_start, cache.block_size,
                                             cache.data.device))
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

    def in_place_decode(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(block tables [rows, nb] int32, lengths [rows] int32, cache slots [rows] int64) when this step
        is `rows` one-token decodes and nothing else, attention on a backend whose decode_paged runs the
        CPU decode kernel where it applies, no per-run head map: what common/model/decode_layers.py runs
        in one call (merging each layer's partial results through `combine` under KV-cache
        parallelism). Without combine every row is a decode in row order whose K/V this process stores
        at its slot as computed. Under KV-cache parallelism a row may have no keys in this group (length
        0: zeros, lse -inf, as attend gives) and its K/V may be stored by another group (slot -1).
        None otherwise."""
        if (self.rest or self.kv_map is not None or rows == 0 or self.write_rows is None
                or not getattr(self.backend, "cpu_decode_kernel", False)):
            return None
        if self.combine is None:
            if not (self.write_all and len(self.write_rows) == rows and self.decode_in_order
                    and self.decode_rows is not None and len(self.decode_rows) == rows):
                return None
            return self.decode_tables, self.decode_lens, self.write_slots
        if self.write_rows.device.type != "cpu" or (self.decode_rows is not None and self.decode_rows.device.type != "cpu"):
            return None
        slots = torch.full((rows,), -1, dtype=torch.int64)
        if self.write_rows.numel():
            slots[self.write_rows] = self.write_slots.to(torch.int64)
        if self.decode_rows is None:                           # no keys of any row here
            return torch.full((rows, 1), -1, dtype=torch.int32), torch.zeros(rows, dtype=torch.int32), slots
        if self.decode_in_order and len(self.decode_rows) == rows:
            return self.decode_tables, self.decode_lens, slots
        tables = torch.full((rows, self.decode_tables.shape[1]), -1, dtype=torch.int32)
        lens = torch.zeros(rows, dtype=torch.int32)
        tables[self.decode_rows] = self.decode_tables.to(torch.int32)
        lens[self.decode_rows] = self.decode_lens
        return tables, lens, slots

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
        k_all, v_all, bs = self.cache.k(layer), self.cache.v(layer), self.cache.block_size
        for s, plan in zip(self.rest, self.parts):
            parts = []
            for p in plan:
                if p.gather is None:                     # a view of consecutive blocks
                    b1 = p.b0 + -(-p.n // bs)
                    parts.append((p.t0, k_all[p.b0:b1].flatten(0, 1)[:p.n], v_all[p.b0:b1].flatten(0, 1)[:p.n]))
                else:                                    # scattered blocks: a copy
                    parts.append((p.t0, k_all.index_select(0, p.gather).flatten(0, 1)[:p.n],
                                  v_all.index_select(0, p.gather).flatten(0, 1)[:p.n]))
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
