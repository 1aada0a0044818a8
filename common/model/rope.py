"""Rotary position embeddings, rotate-half convention (as Hugging Face Llama), absolute positions.

cos/sin are computed in float32 from integer positions, then cast to the activations' dtype, exactly
as transformers does, so that float32 results match it bit for bit in the common case.
"""
from __future__ import annotations

import math

import torch

from common.config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, with linear or llama3 scaling applied."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling.kind == "linear":
        return inv / scaling.factor
    if scaling.kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        low_wavelen = scaling.original_max_position / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


class Rope:
    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling) -> None:
        self.inv_freq = inv_frequencies(head_dim, theta, scaling)  # [D/2] float32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> cos, sin [T, 1, D] in `dtype` (broadcast over heads)."""
        inv = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv[None, :]          # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                    # [T, D]
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] -> rotated x, same shape and dtype."""
    return x * cos + rotate_half(x) * sin
