"""Fast CPU attention on PyTorch's flash kernel, exact for every layout of the contract.

The kernel, aten::_scaled_dot_product_flash_attention_for_cpu, takes [B, H, L, D] and returns
(out [B, H, L, D] in the input dtype, lse [B, H, L] float32 natural log). Its is_causal is TOP-LEFT
aligned, it crashes the process (SIGFPE) on zero queries or zero keys, with an additive mask a fully
masked row gives lse 0 (not -inf), and it silently computes garbage when the last (head) dim is not
unit-stride (any other strides, even 0, are fine, so K/V are passed as strided views, not copied).
So we never call it with an empty side or a mask, and the keys are split

    A = keys at positions <= q_start        (visible to every query: non-causal)
    B = keys at positions q_start+1 .. q_start+n-1   seen by queries 1..n-1 (top-left causal is right:
        query i sees B key j iff j <= i - 1, and rows past the last key see all of B)

and the two are merged with `merge_attention_states`. Keys after the last query are dropped; queries
before the first key (k_start > q_start) are empty rows (0, -inf) and the rest start at k_start. Decode
(n == 1, L == q_start + 1 - k_start) is a single non-causal call.
"""
from __future__ import annotations

import torch

from common.attention.base import AttentionBackend
from common.attention.merge import merge_attention_states
from common.attention.reference import check_shapes

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernel assumes stride 1 along the head dim and reads wrong data otherwise."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty(n: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_zeros(n, q.shape[1], q.shape[2]),
            torch.full((n, q.shape[1]), float("-inf"), dtype=lse_dtype, device=q.device))


def _noncausal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query sees every key. q [n, Hq, D], k, v [L, Hkv, D], n, L > 0.

    GQA without expanding K/V: rows are independent, so the g query heads of a kv head are folded into
    the sequence dim, q -> [1, Hkv, n*g, D].
    """
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qf = q.reshape(n, hkv, g, d).permute(1, 0, 2, 3).reshape(1, hkv, n * g, d)   # copies
    kf = k.permute(1, 0, 2).unsqueeze(0)          # [1, Hkv, L, D]; a strided view: a copy costs more
    vf = v.permute(1, 0, 2).unsqueeze(0)
    out, lse = _flash(_unit_last(qf), _unit_last(kf), _unit_last(vf), 0.0, False, scale=scale)      # [1, Hkv, n*g, D], [1, Hkv, n*g]
    out = out.reshape(hkv, n, g, d).permute(1, 0, 2, 3).reshape(n, hq, d)
    lse = lse.reshape(hkv, n, g).permute(1, 0, 2).reshape(n, hq)
    return out, lse


def _causal_topleft(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Query i sees keys j <= i (top-left). q [n, Hq, D], k, v [m, Hkv, D], 0 < m <= n: no row is empty."""
    g = q.shape[1] // k.shape[1]
    qf = q.permute(1, 0, 2).unsqueeze(0)                                  # [1, Hq, n, D]
    kf = k.repeat_interleave(g, dim=1).permute(1, 0, 2).unsqueeze(0)      # [1, Hq, m, D]
    vf = v.repeat_interleave(g, dim=1).permute(1, 0, 2).unsqueeze(0)
    out, lse = _flash(_unit_last(qf), _unit_last(kf), _unit_last(vf), 0.0, True, scale=scale)       # [1, Hq, n, D], [1, Hq, n]
    return out[0].permute(1, 0, 2), lse[0].transpose(0, 1)


class CpuFlashBackend(AttentionBackend):
    name = "cpu_flash"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int, k_start: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        check_shapes(q, k, v)
        n = q.shape[0]
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        skip = min(max(k_start - q_start, 0), n)     # queries before the first key: empty rows
        if skip:
            head_out, head_lse = _empty(skip, q)
            out, lse = self.forward(q[skip:], k, v, q_start=q_start + skip, k_start=k_start, scale=scale)
            return torch.cat([head_out, out]), torch.cat([head_lse, lse])
        # Now k_start <= q_start (or n == 0). Local key index of position p is p - k_start.
        n_a = min(k.shape[0], q_start + 1 - k_start)                 # keys at positions <= q_start
        n_b = min(k.shape[0], q_start + n - k_start) - n_a           # keys in (q_start, q_start + n)
        if n == 0 or n_a <= 0:
            return _empty(n, q)
        out, lse = _noncausal(q, k[:n_a], v[:n_a], scale)
        if n_b > 0:
            out_b, lse_b = _causal_topleft(q[1:], k[n_a:n_a + n_b], v[n_a:n_a + n_b], scale)
            out_m, lse_m = merge_attention_states([out[1:], out_b], [lse[1:], lse_b])
            out, lse = torch.cat([out[:1], out_m]), torch.cat([lse[:1], lse_m])
        return out.to(q.dtype), lse.to(lse_dtype)
