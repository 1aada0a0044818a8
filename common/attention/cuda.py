"""CUDA attention: prefill chunks through a flash kernel that returns its LSE, decode through Triton.

Prefill-chunk attention (`forward`) splits the keys exactly as the CPU backend does
(common/attention/cpu.py), so that every kernel call is either non-causal or square-causal and the
kernels' own causal alignment (top-left in PyTorch's ops, bottom-right in flash-attn >= 2.1) never
matters:

    A = keys at positions <= q_start           every query sees all of them: non-causal
    B = keys at positions q_start+1 .. q_start+n_b   query i (1 <= i <= n_b) sees B key j iff j <= i-1:
        square causal over q[1 : n_b+1]; queries past the last key (i > n_b) see all of B: non-causal

and the partial results are merged with `merge_attention_states`. Keys after the last query are
dropped; queries before the first key are empty rows (0, -inf).

Kernels ("dense ops"), first that applies wins:
  - flash-attn's `flash_attn_func` (fp16/bf16), only when the package is importable;
  - `aten::_scaled_dot_product_flash_attention` (fp16/bf16, head dim <= 256): takes [B, H, L, D],
    returns out [B, H, L, D] and logsumexp [B, H, L] float32, natural log; accepts fewer K/V heads
    than query heads (FlashAttention-2 GQA), so K/V are never expanded;
  - `aten::_scaled_dot_product_efficient_attention` (any float dtype incl. fp32): same layouts, its
    logsumexp is [B, H, ceil(L / 32) * 32] (sliced to L here); no GQA, so the query heads of a KV head
    are folded into the sequence dim for non-causal calls and K/V are expanded for the (small)
    square-causal part, as the CPU backend does;
  - a float32/float64 einsum fallback (float64 inputs, odd head dims, tensors not on CUDA), O(n * L)
    memory.
Every LSE is sanitised (NaN / +inf, FlashAttention's "empty row" sentinel, -> -inf; such rows' output
-> 0).

A short chunk over a long context underfills the GPU (a flash kernel parallelises over batch x heads x
128-query tiles): the non-causal part is then cut into KV shards run as one batched call and
LSE-merged (`kv_shards`).

Decode (`decode_paged`) is the Triton split-KV kernel of common/attention/triton_decode.py on CUDA
tensors, the base class's gather path otherwise.

Importing this module makes no CUDA call and does not import triton or flash-attn. What has been run
where: the splitting, sharding, folding and merging logic is tested on CPU with CPU stand-ins for the
kernels (tests/unit/test_triton_decode.py); the CUDA kernels themselves are exercised only by
tests/gpu/test_cuda_attention.py and bench/gpu_probe.py, which pass on an H200
(bench/results/gpu/gpu_tests_h200.log, bench/results/gpu_probe.json).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from common.attention.base import AttentionBackend
from common.attention.merge import merge_attention_states, merge_stacked
from common.attention.reference import check_shapes

log = logging.getLogger(__name__)

# fn(q [B, n, Hq, D], k, v [B, L, Hkv, D], causal, scale) -> (out [B, n, Hq, D], lse [B, n, Hq]),
# raw (unsanitised) LSE in natural log. causal is only ever asked for with n == L.
DenseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DenseOp:
    """One dense attention kernel and what it accepts."""
    name: str
    fn: DenseFn
    gqa: bool                  # accepts Hkv < Hq without expanded K/V


# --- the kernels ------------------------------------------------------------------------------------

def _bhld(t: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] -> [B, H, L, D] view with unit stride along D (what the aten ops require)."""
    t = t.transpose(1, 2)
    return t if t.stride(-1) == 1 else t.contiguous()


def _aten_flash(q, k, v, causal, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(_bhld(q), _bhld(k), _bhld(v), 0.0, causal, False,
                                                              scale=scale)
    return res[0].transpose(1, 2), res[1].transpose(1, 2)          # [B, n, H, D], [B, n, H]


def _aten_efficient(q, k, v, causal, scale):
    n = q.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(_bhld(q), _bhld(k), _bhld(v), None, True,
                                                                      0.0, causal, scale=scale)[:2]
    return out.transpose(1, 2), lse[..., :n].transpose(1, 2)       # lse is padded to a multiple of 32


def _flash_attn_pkg(q, k, v, causal, scale):
    from flash_attn import flash_attn_func
    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_attn_probs=True)
    return out, lse.transpose(1, 2)                                # lse [B, H, n] -> [B, n, H]


def _einsum(q, k, v, causal, scale):
    """Plain float32 (float64) attention; exact, memory O(n * L). K/V heads may be fewer (GQA)."""
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bnhgd,blhd->bhgnl", q.to(cdt).reshape(b, n, hkv, g, d), k.to(cdt)) * scale
    if causal:
        s = s.masked_fill(torch.ones(n, k.shape[1], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                               # [B, Hkv, g, n]
    p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse).unsqueeze(-1))
    out = torch.einsum("bhgnl,blhd->bnhgd", p, v.to(cdt)).reshape(b, n, hq, d)
    return out.to(q.dtype), lse.permute(0, 3, 1, 2).reshape(b, n, hq)


FLASH_ATTN = DenseOp("flash_attn", _flash_attn_pkg, gqa=True)
ATEN_FLASH = DenseOp("aten_flash", _aten_flash, gqa=True)
ATEN_EFFICIENT = DenseOp("aten_efficient", _aten_efficient, gqa=False)
EINSUM = DenseOp("einsum", _einsum, gqa=True)


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:      # ImportError, or a build for another torch / CUDA (OSError, RuntimeError)
        return False
    return True


def choose_op(dtype: torch.dtype, head_dim: int, flash_attn_ok: bool) -> DenseOp:
    """The kernel for a dtype and head dim (see the module docstring for the order)."""
    half = dtype in (torch.float16, torch.bfloat16)
    if half and head_dim <= 256 and head_dim % 8 == 0:
        return FLASH_ATTN if flash_attn_ok else ATEN_FLASH
    if dtype in (torch.float16, torch.bfloat16, torch.float32) and head_dim % 8 == 0:
        return ATEN_EFFICIENT
    return EINSUM


# --- the backend ------------------------------------------------------------------------------------

class CudaAttentionBackend(AttentionBackend):
    name = "cuda"

    def __init__(self, op: DenseOp | None = None, *, num_sms: int | None = None,
                 kv_shards: int | str = "auto", shard_min_tokens: int = 1024, use_flash_attn: bool = True) -> None:
        """op: force one dense kernel (tests use CPU stand-ins); None picks per dtype (`choose_op`).
        num_sms: the GPU's SM count for the shard heuristic (None: asked of the device on first use).
        kv_shards: "auto", or a fixed number of KV shards for the non-causal part (1: never shard).
        shard_min_tokens: "auto" never makes a shard shorter than this.
        """
        if kv_shards != "auto" and (not isinstance(kv_shards, int) or kv_shards < 1):
            raise ValueError(f"kv_shards must be 'auto' or a positive int, got {kv_shards!r}")
        self.op = op
        self.num_sms = num_sms
        self.kv_shards = kv_shards
        self.shard_min_tokens = shard_min_tokens
        self.use_flash_attn = use_flash_attn
        self._flash_attn_ok: bool | None = None     # decided on first use, not at import
        self._flash_gqa_ok = True                   # cleared if the aten flash op refuses Hkv < Hq

    # ---- kernel choice ---------------------------------------------------------------------------
    def op_for(self, q: torch.Tensor) -> DenseOp:
        if self.op is not None:
            return self.op
        if q.device.type != "cuda":     # the aten kernels above are CUDA-only; stay exact elsewhere
            return EINSUM
        if self._flash_attn_ok is None:
            self._flash_attn_ok = self.use_flash_attn and _flash_attn_importable()
        return choose_op(q.dtype, q.shape[-1], self._flash_attn_ok)

    def _sms(self, device: torch.device) -> int:
        if self.num_sms is None:
            self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count \
                if device.type == "cuda" else 1
        return self.num_sms

    def _call(self, op: DenseOp, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, n, Hq, D], k, v [B, L, Hkv, D] -> out [B, n, Hq, D] (q.dtype), lse [B, n, Hq] sanitised.

        K/V are expanded only for an op without GQA support (callers fold queries first where they can).
        """
        g = q.shape[2] // k.shape[2]
        if g > 1 and op is ATEN_FLASH and not self._flash_gqa_ok:
            op = _expanding(op)
        if g > 1 and not op.gqa:
            k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
        try:
            out, lse = op.fn(q, k, v, causal, scale)
        except RuntimeError as e:
            if op is not ATEN_FLASH or g == 1:
                raise
            # Some builds check equal head counts in the op itself: expand K/V from now on.
            log.warning("aten flash attention refused Hkv < Hq (%s); expanding K/V from now on", e)
            self._flash_gqa_ok = False
            return self._call(op, q, k, v, causal, scale)
        return _sanitise(out, lse)

    # ---- pieces ----------------------------------------------------------------------------------
    def _shards(self, q: torch.Tensor, num_keys: int, op: DenseOp) -> int:
        """KV shards for a non-causal call of q [n, Hq, D] over num_keys keys."""
        if self.kv_shards != "auto":
            return max(1, min(self.kv_shards, num_keys))
        n, hq, _ = q.shape
        tiles = hq * -(-n // 128)                      # flash work units: heads x 128-query tiles
        sms = self._sms(q.device)
        if tiles >= sms:
            return 1
        return max(1, min(-(-2 * sms // tiles), num_keys // self.shard_min_tokens))

    def _noncausal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query sees every key. q [n, Hq, D], k, v [L, Hkv, D], n, L > 0 -> [n, Hq, D], [n, Hq]."""
        op = self.op_for(q)
        n, hq, d = q.shape
        L, hkv, _ = k.shape
        g = hq // hkv
        fold = g > 1 and not op.gqa
        if fold:
            # Rows are independent: the g query heads of a KV head become g*n rows of one head.
            q = q.reshape(n, hkv, g, d).permute(2, 0, 1, 3).reshape(g * n, hkv, d)   # [g*n, Hkv, D]
        shards = self._shards(q, L, op)
        m = -(-L // shards)                            # keys per shard; the last may be shorter
        full = L // m                                  # shards of exactly m keys, run as one batch
        outs, lses = [], []
        if full:
            qb = q.unsqueeze(0).expand(full, *q.shape).contiguous()                  # [S, n', H, D]
            o, l = self._call(op, qb, k[:full * m].view(full, m, hkv, d), v[:full * m].view(full, m, hkv, d),
                              False, scale)
            outs.append(o)
            lses.append(l)
        if full * m < L:
            o, l = self._call(op, q.unsqueeze(0), k[full * m:].unsqueeze(0), v[full * m:].unsqueeze(0), False, scale)
            outs.append(o)
            lses.append(l)
        out, lse = torch.cat(outs), torch.cat(lses)   # [S, n', H, D], [S, n', H]
        out, lse = (out[0], lse[0]) if out.shape[0] == 1 else merge_stacked(out, lse)
        if fold:
            out = out.reshape(g, n, hkv, d).permute(1, 2, 0, 3).reshape(n, hq, d)
            lse = lse.reshape(g, n, hkv).permute(1, 2, 0).reshape(n, hq)
        return out, lse

    def _causal_square(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query i sees keys j <= i. q [m, Hq, D], k, v [m, Hkv, D], m > 0."""
        out, lse = self._call(self.op_for(q), q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), True, scale)
        return out[0], lse[0]

    # ---- the contract ----------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int, k_start: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        check_shapes(q, k, v)
        n = q.shape[0]
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        skip = min(max(k_start - q_start, 0), n)       # queries before the first key: empty rows
        if skip:
            head_out, head_lse = _empty(skip, q)
            out, lse = self.forward(q[skip:], k, v, q_start=q_start + skip, k_start=k_start, scale=scale)
            return torch.cat([head_out, out]), torch.cat([head_lse, lse])
        n_a = min(k.shape[0], q_start + 1 - k_start)                 # keys at positions <= q_start
        n_b = min(k.shape[0], q_start + n - k_start) - n_a           # keys in (q_start, q_start + n)
        if n == 0 or n_a <= 0:
            return _empty(n, q)
        out, lse = self._noncausal(q, k[:n_a], v[:n_a], scale)
        if n_b > 0:
            kb, vb = k[n_a:n_a + n_b], v[n_a:n_a + n_b]
            o_b, l_b = self._causal_square(q[1:1 + n_b], kb, vb, scale)
            if n_b < n - 1:                             # rows past the last key see all of B
                o_c, l_c = self._noncausal(q[1 + n_b:], kb, vb, scale)
                o_b, l_b = torch.cat([o_b, o_c]), torch.cat([l_b, l_c])
            o_m, l_m = merge_attention_states([out[1:], o_b], [lse[1:], l_b])
            out, lse = torch.cat([out[:1], o_m]), torch.cat([lse[:1], l_m])
        return out.to(q.dtype), lse.to(lse_dtype)

    def decode_paged(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Triton split-KV kernel on CUDA tensors (see the base class for the contract)."""
        if q.is_cuda:
            from common.attention import triton_decode
            if triton_decode.available():
                return triton_decode.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
        return super().decode_paged(q, k_cache, v_cache, block_tables, seq_lens, scale=scale)


def _expanding(op: DenseOp) -> DenseOp:
    return DenseOp(op.name + "+expand", op.fn, gqa=False)


def _sanitise(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN / +inf LSE (empty-row sentinels) -> -inf, and their rows' output -> 0."""
    lse = lse.float() if lse.dtype not in (torch.float32, torch.float64) else lse
    empty = torch.isnan(lse) | (lse == float("inf")) | (lse == float("-inf"))   # no host sync: always mask
    return out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))


def _empty(n: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_zeros(n, q.shape[1], q.shape[2]),
            torch.full((n, q.shape[1]), float("-inf"), dtype=lse_dtype, device=q.device))
