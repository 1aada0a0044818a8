"""What one forward pass needs besides the weights: where each sequence's queries and keys are.

The model calls `ctx.attend(layer, q, k, v)` once per layer. The context stores the new K/V into the
paged cache (only on the worker that owns them), attends each sequence over the keys this worker holds,
and, under KV-cache parallelism, merges the partial outputs of all groups through `combine`.

Single-token sequences that see every key held here (a decode, or any query of an earlier KVP shard)
go to the backend together, in one `decode_paged` call per layer over the block tables; the block
tables and lengths are built once per step. The others (prefill chunks) are attended one by one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from common.attention.base import AttentionBackend
from common.kv_cache.paged import PagedKVCache


@dataclass(frozen=True)
class SeqAttn:
    """One sequence of the flat batch, as seen by this worker."""
    rows: slice                # its query rows in the flat batch
    q_start: int               # absolute position of its first query token
    kv_start: int              # absolute position of the first key held here (a KVP shard start)
    kv_len: int                # keys held here, after this step's write, that it attends to
    block_table: list[int]     # local blocks holding those keys, in token order


Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
        for s in seqs:
            if kv_map is None and s.rows.stop - s.rows.start == 1 and 0 < s.kv_len <= s.q_start + 1 - s.kv_start:
                decode.append(s)
            elif s.kv_len > 0:
                self.rest.append(s)
        self.decode_rows: torch.Tensor | None = None       # [B] int64 query rows of the decodes
        self.decode_in_order = False                        # rows are 0 .. T-1: no gather/scatter
        if decode:
            dev = cache.data.device
            bs = cache.block_size
            nb = max(-(-s.kv_len // bs) for s in decode)
            self.decode_tables = torch.tensor([s.block_table[:nb] + [-1] * (nb - len(s.block_table[:nb]))
                                               for s in decode], dtype=torch.int32, device=dev)  # [B, nb]
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
        for s in self.rest:
            ks, vs = self.cache.gather(layer, s.block_table, s.kv_len)
            if self.kv_map is None:
                o, l = self.backend.forward(q[s.rows], ks, vs, q_start=s.q_start, k_start=s.kv_start,
                                            scale=self.scale)
                out[s.rows] = o
                lse[s.rows] = l
                continue
            for q_lo, q_hi, kv in self.kv_map:
                o, l = self.backend.forward(q[s.rows, q_lo:q_hi], ks[:, kv:kv + 1], vs[:, kv:kv + 1],
                                            q_start=s.q_start, k_start=s.kv_start, scale=self.scale)
                out[s.rows, q_lo:q_hi] = o
                lse[s.rows, q_lo:q_hi] = l
        if self.combine is not None:
            out = self.combine(out, lse)
        return out
