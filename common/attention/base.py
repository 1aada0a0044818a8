"""The attention backend contract.

Every backend computes, for ONE sequence, exact softmax attention of a block of queries over a
contiguous run of keys, and returns the output together with its natural-log log-sum-exp, so that
partial results over disjoint key sets can be merged exactly (`common.attention.merge`).

Positions are absolute. Queries sit at positions q_start .. q_start+n-1; keys at k_start .. k_start+L-1.
Key j is visible to query i iff  k_start + j <= q_start + i  (bottom-right causal alignment). When every
key precedes every query (an earlier KVP shard) this is plain non-causal attention. A query row with no
visible key yields output 0 and lse -inf, never NaN.

Shapes:  q [n, Hq, D]   k, v [L, Hkv, D]   Hq % Hkv == 0, query head h reads kv head h // (Hq // Hkv)
Returns: out [n, Hq, D] in q.dtype, lse [n, Hq] float32 (natural log).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class AttentionBackend(ABC):
    name: str = "base"

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int, k_start: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """See the module docstring."""

    def decode_paged(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched decode over a paged cache: each sequence's single query sees all its keys.

        q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]
        int32; seq_lens [B] int32 (keys per sequence, may be 0). Returns out [B, Hq, D], lse [B, Hq].
        The default gathers each sequence's keys and calls `forward`; GPU backends override it.
        """
        bs = k_cache.shape[1]
        outs, lses = [], []
        for b in range(q.shape[0]):
            n = int(seq_lens[b])
            nb = -(-n // bs)
            blocks = block_tables[b, :nb].long()
            k = k_cache.index_select(0, blocks).flatten(0, 1)[:n]
            v = v_cache.index_select(0, blocks).flatten(0, 1)[:n]
            o, l = self.forward(q[b:b + 1], k, v, q_start=max(n - 1, 0), k_start=0, scale=scale)
            outs.append(o)
            lses.append(l)
        if not outs:  # empty batch: torch.cat([]) would raise
            return q.new_zeros(q.shape), torch.empty(0, q.shape[1], dtype=torch.float32, device=q.device)
        return torch.cat(outs), torch.cat(lses)
