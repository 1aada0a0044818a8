"""The float32 pure-torch attention oracle (float64 when given float64 inputs).

Written to be obviously right, not fast: every fast backend is tested against it.
"""
from __future__ import annotations

import torch

from common.attention.base import AttentionBackend


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate the contract's shapes: q [n, Hq, D], k, v [L, Hkv, D], Hq % Hkv == 0."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[2] != k.shape[2] \
            or k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"attention wants q [n, Hq, D], k = v [L, Hkv, D] with Hq % Hkv == 0; got "
                         f"q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int, k_start: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        check_shapes(q, k, v)
        n, hq, d = q.shape
        L, hkv, _ = k.shape
        g = hq // hkv
        cdt = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
        qf = q.to(cdt).reshape(n, hkv, g, d)                          # query head h -> kv head h // g
        kf, vf = k.to(cdt), v.to(cdt)
        s = torch.einsum("nhgd,lhd->hgnl", qf, kf) * scale            # [Hkv, g, n, L]
        q_pos = q_start + torch.arange(n, device=q.device)
        k_pos = k_start + torch.arange(L, device=q.device)
        visible = k_pos[None, :] <= q_pos[:, None]                    # [n, L], bottom-right causal
        s = s.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)                              # [Hkv, g, n]; -inf if no key
        p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse).unsqueeze(-1))  # 0 on masked keys
        out = torch.einsum("hgnl,lhd->nhgd", p, vf)                   # [n, Hkv, g, D]
        return out.reshape(n, hq, d).to(q.dtype), lse.permute(2, 0, 1).reshape(n, hq)
