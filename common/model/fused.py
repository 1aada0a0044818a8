"""Fused RMSNorm and RoPE for CUDA tensors, in Triton: one kernel each where eager PyTorch launches 7
(RMSNorm: cast, square, mean, add, rsqrt, multiply, cast, weight) and 2 x 5 (RoPE of q and k: two
products, a negation, a concatenation, a sum).

At batch 1 a decode step is ~40 small kernels per layer; on an H200 with Llama-3-8B shapes they took
2.2 ms of a 6.7 ms step (bench/results/gpu/step_profile_h200_4k_before.json), each a few microseconds
of launch and tail for almost no bytes.

Numerics follow the eager code (common/model/llama.py RMSNorm, common/model/rope.py apply_rope):
  rms_norm  float32 row statistics, x * rsqrt(mean(x^2) + eps) rounded to the input dtype, then times the
            weight rounded to the input dtype, as Hugging Face's LlamaRMSNorm. The row sum is reduced
            in another order than torch's mean, so float32 results agree to rounding, not bitwise.
  rope      x * cos and rotate_half(x) * sin each rounded to the dtype, then their sum rounded: the same
            roundings as the eager expression, so the result is bitwise equal to it. The kernels are
            compiled with enable_fp_fusion=False: a fused multiply-add would round once where the
            eager code rounds twice (the first H200 run of the float32 RoPE test caught exactly that).

Used by the model on CUDA tensors when Triton is importable, unless MNEMOSYNE_FUSED_OPS=0; the eager
code runs everywhere else. On CPU tensors the kernels run only under Triton's interpreter
(TRITON_INTERPRET=1 set before triton is imported), which is how the CPU tests check them.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:        # the CPU engine does not need Triton
    triton = None
    tl = None


def available() -> bool:
    return triton is not None


def enabled_for(x: torch.Tensor) -> bool:
    """Whether the model should use the fused kernels for this tensor."""
    return x.is_cuda and triton is not None and os.environ.get("MNEMOSYNE_FUSED_OPS", "1") != "0"


def _rounded(v, IS_BF16: tl.constexpr):
    """float32 `v` rounded to nearest-even at bf16 precision, still float32 (then casting it to bf16 is
    exact). Done on the bits because Triton's interpreter truncates float32 -> bf16 conversions, so the
    CPU tests would otherwise check another rounding than the GPU runs. Finite inputs only."""
    if IS_BF16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        v = bits.to(tl.float32, bitcast=True)
    return v


def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps,
                     BLOCK: tl.constexpr, IS_BF16: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    y = _rounded(xf * (1.0 / tl.sqrt(var + eps)), IS_BF16)            # x.to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = _rounded(w.to(tl.float32) * y, IS_BF16)                      # weight * x, in dtype
    tl.store(out_ptr + row * stride_out + cols, out.to(x.dtype), mask=mask)


def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
                 stride_qot, stride_qoh, stride_kot, stride_koh,
                 HQ: tl.constexpr, HALF: tl.constexpr, IS_BF16: tl.constexpr):
    """Program (t, h): head h of token t; heads 0..HQ-1 are q's, the rest k's."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, 2 * HALF)
    rot = tl.where(i < HALF, i + HALF, i - HALF)
    sign = tl.where(i < HALF, -1.0, 1.0)
    c = tl.load(cos_ptr + t * stride_ct + i).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_st + i).to(tl.float32)
    if h < HQ:
        src = q_ptr + t * stride_qt + h * stride_qh
        dst = qo_ptr + t * stride_qot + h * stride_qoh
    else:
        src = k_ptr + t * stride_kt + (h - HQ) * stride_kh
        dst = ko_ptr + t * stride_kot + (h - HQ) * stride_koh
    x = tl.load(src + i)
    xr = tl.load(src + rot).to(tl.float32) * sign                      # rotate_half(x): exact
    a = _rounded(x.to(tl.float32) * c, IS_BF16)                        # x * cos
    b = _rounded(xr * s, IS_BF16)                                      # rotate_half(x) * sin
    tl.store(dst + i, _rounded(a + b, IS_BF16).to(x.dtype))


@functools.cache
def _kernels():
    global _rounded
    _rounded = triton.jit(_rounded)          # a Triton function the kernels call: jit it first
    return triton.jit(_rms_norm_kernel), triton.jit(_rope_kernel)


def rms_norm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N] -> same shape and dtype; weight [N] (the model's dtype, as x)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        kernel, _ = _kernels()
        block = triton.next_power_of_2(n)
        kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), n, eps,
                               BLOCK=block, IS_BF16=x.dtype == torch.bfloat16,
                               num_warps=4 if block <= 4096 else 8, enable_fp_fusion=False)
    return out.view(x.shape)


def rope_supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (d % 2 == 0 and d & (d - 1) == 0 and q.dtype == k.dtype == cos.dtype
            and q.dtype in (torch.float32, torch.bfloat16)
            and q.stride(-1) == k.stride(-1) == cos.stride(-1) == 1)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D], cos/sin [T, 1, D] -> rotated (q, k), new tensors, one launch."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    qo = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    ko = torch.empty((t, hkv, d), dtype=k.dtype, device=k.device)
    if t:
        _, kernel = _kernels()
        kernel[(t, hq + hkv)](q, k, cos, sin, qo, ko,
                              q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
                              qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
                              HQ=hq, HALF=d // 2, IS_BF16=q.dtype == torch.bfloat16, num_warps=1,
                              enable_fp_fusion=False)
    return qo, ko
