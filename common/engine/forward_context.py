"""What one forward pass needs besides the weights: where each sequence's queries and keys are.

The model calls `ctx.attend(layer, q, k, v)` once per layer. The context stores the new K/V into the
paged cache (only on the worker that owns them), attends each sequence over the keys this worker holds,
and, under KV-cache parallelism, merges the partial outputs of all groups through `combine`.
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

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> out [T, Hq, D]."""
        if self.write_rows is not None and self.write_rows.numel():
            self.cache.write(layer, self.write_slots, k.index_select(0, self.write_rows),
                             v.index_select(0, self.write_rows))
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for s in self.seqs:
            if s.kv_len == 0:
                continue
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
