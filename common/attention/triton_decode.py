"""Split-KV paged decode attention in Triton, exact with a natural-log LSE.

One query token per sequence attends over its whole paged KV cache. Two kernels:

  stage 1, grid (B, Hkv, S): program (b, h, s) takes the q_per_kv query heads of KV head h together
      (GQA without expanding K/V: each K/V tile is loaded once for all of them), reads the block table
      of sequence b on the device, and runs an online softmax over split s of the sequence's tiles
      (a tile = BLOCK_N consecutive token positions, gathered page by page). It writes a partial output
      [G, D] and a natural-log LSE [G] per query head; a split with no token writes (0, -inf).
  stage 2, grid (B, Hq): merges the S partials with the exact LSE merge of `common.attention.merge`
      (NaN / +inf treated as empty, max -inf -> 0, normalised by max(sum w, 1e-10)) into
      out [B, Hq, D] (q.dtype) and lse [B, Hq] (float32).

The split of a sequence is computed on the device from its length (tiles_per_split =
cdiv(cdiv(len, BLOCK_N), S)), so the launch depends only on shapes: the call can be captured in a CUDA
graph and replayed with new lengths and block tables.

Numerics: every load is converted to float32 and every accumulation is float32. Products go through
tl.dot: input_precision "ieee" for float32 caches; "tf32" for bf16/fp16 caches, which is exact for Q·K
(bf16 and fp16 values are exactly representable in tf32) and rounds the probabilities to 10 mantissa
bits for P·V (finer than the bf16 probabilities flash kernels use).

Where it runs: compiled for CUDA tensors; on CPU tensors only under Triton's interpreter, which must be
chosen before triton is imported (TRITON_INTERPRET=1: Triton's own library functions are decorated at
its import), so the CPU tests run the kernels in a subprocess. The interpreter ignores input_precision
and computes in float32 throughout. This file was developed on CPU (triton 3.9.0, torch 2.13 CPU): the
numerics are tested in the interpreter, and stage 1 is compiled ahead of time for sm_90 in the unit tests
(it lowers, streams K/V with cp.async, does not spill). On a GPU, tests/gpu/test_cuda_attention.py and
bench/gpu_probe.py exercise it: on one H200 (triton 3.6, torch 2.11) every case matched the float64
reference and it read K/V at 72-92% of the copy bandwidth for B x L >= 128K (bench/results/gpu_probe.json).
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU engine does not need Triton; `available()` says so
    triton = None
    tl = None

MIN_SPLIT_TOKENS = 256      # a split shorter than this costs more in launch/merge than it gains
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4         # stage-1 programs wanted per SM before splitting stops


def available() -> bool:
    return triton is not None


def _stage1(q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, po_ptr, plse_ptr,
            stride_qb, stride_qh,
            stride_kn, stride_ks, stride_kh,
            stride_vn, stride_vs, stride_vh,
            stride_btb,
            stride_ob, stride_oh, stride_os,
            stride_lb, stride_lh,
            scale,
            G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr,
            BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
            PRECISION: tl.constexpr):
    """q [B, Hq, D]; k, v [num_blocks, PAGE, Hkv, D]; bt [B, max_blocks] int32; len [B] int32.
    po [B, Hq, S, D] float32, plse [B, Hq, S] float32. Stride 1 along D (and S): vectorised loads."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(len_ptr + b)
    n_tiles = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    t0 = s * per_split
    t1 = tl.minimum(t0 + per_split, n_tiles)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    d_mask = offs_d < HEAD_DIM
    heads = kvh * G + offs_g                                                    # [BLOCK_G]
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_G, BLOCK_D]

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    for t in range(t0, t1):
        tok = t * BLOCK_N + offs_n                                              # [BLOCK_N]
        n_mask = tok < seq_len
        page = tl.load(bt_ptr + b64 * stride_btb + tok // PAGE, mask=n_mask, other=0).to(tl.int64)
        slot = tok % PAGE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + page[:, None] * stride_kn + slot[:, None] * stride_ks + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)                     # [BLOCK_N, BLOCK_D]
        sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale          # [BLOCK_G, BLOCK_N]
        sc = tl.where(n_mask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))      # finite: every tile in [t0, t1) holds a token
        alpha = tl.exp(m - m_new)                 # 0 on the first tile (m = -inf)
        p = tl.exp(sc - m_new[:, None])           # 0 on masked tokens
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_base + page[:, None] * stride_vn + slot[:, None] * stride_vs + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new

    nonempty = l > 0                               # an empty split: m = -inf, l = 0, acc = 0
    out = acc / tl.where(nonempty, l, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, l, 1.0)), float("-inf"))
    o_ptrs = po_ptr + b64 * stride_ob + heads[:, None] * stride_oh + s * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(plse_ptr + b64 * stride_lb + heads * stride_lh + s, lse, mask=g_mask)


def _stage2(po_ptr, plse_ptr, out_ptr, lse_ptr,
            stride_ob, stride_oh, stride_os,
            stride_lb, stride_lh,
            stride_fb, stride_fh, stride_fd,
            stride_eb,
            HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
            BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """The LSE merge of `common.attention.merge.merge_stacked`, one (sequence, query head) per program."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(plse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    lse = tl.where((lse != lse) | (lse == float("inf")), float("-inf"), lse)     # NaN / +inf: empty
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse - mx)                                                         # [BLOCK_S]
    w_sum = tl.sum(w, 0)
    o = tl.load(po_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)               # [BLOCK_S, BLOCK_D]
    o = tl.where(w[:, None] > 0, o, 0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.maximum(w_sum, 1e-10)
    tl.store(out_ptr + b * stride_fb + h * stride_fh + offs_d * stride_fd,
             out.to(out_ptr.dtype.element_ty), mask=d_mask)
    lse_out = tl.where(w_sum > 0, mx + tl.log(tl.maximum(w_sum, 1e-30)), float("-inf"))  # no log(0)
    tl.store(lse_ptr + b * stride_eb + h, lse_out)


@functools.cache
def _kernels():
    """(stage1, stage2) through triton.jit: compiled, or interpreted under TRITON_INTERPRET=1."""
    return triton.jit(_stage1), triton.jit(_stage2)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)            # triton >= 3.4; older ones read the variable
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """Splits so that B * Hkv * S fills the GPU, with splits of >= MIN_SPLIT_TOKENS keys.

    Depends only on shapes (max_len is the block table's capacity), never on the lengths on the
    device, so the choice is fixed under CUDA-graph capture.
    """
    if device.type != "cuda":
        return max(1, min(4, -(-max_len // MIN_SPLIT_TOKENS)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-PROGRAMS_PER_SM * sms // max(batch * kv_heads, 1))
    return max(1, min(want, -(-max_len // MIN_SPLIT_TOKENS), MAX_SPLITS))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None, block_n: int | None = None,
                           out: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one query per sequence over its paged keys.

    q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] (any strides but a unit one along D,
    e.g. a layer view of `PagedKVCache.data`); block_tables [B, max_blocks] int32 (entries past a
    sequence's length are never read); seq_lens [B] int32 (may be 0). Returns out [B, Hq, D] in q.dtype (written into `out` when
    given) and lse [B, Hq] float32, natural log; a sequence of length 0 gives (0, -inf).
    No host synchronisation: safe to capture in a CUDA graph.
    """
    if triton is None:
        raise ImportError("triton is not installed; paged_decode_attention needs it")
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or q.shape[2] != k_cache.shape[3] \
            or q.shape[1] % k_cache.shape[2] != 0:
        raise ValueError(f"paged decode wants q [B, Hq, D], k_cache = v_cache [blocks, block_size, Hkv, D] "
                         f"with Hq % Hkv == 0; got q {tuple(q.shape)} k {tuple(k_cache.shape)} "
                         f"v {tuple(v_cache.shape)}")
    B, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    if block_tables.dim() != 2 or block_tables.shape[0] != B or seq_lens.shape != (B,) \
            or block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError(f"block_tables must be [B, max_blocks] int32 and seq_lens [B] int32 with B = {B}; "
                         f"got {tuple(block_tables.shape)} {block_tables.dtype}, "
                         f"{tuple(seq_lens.shape)} {seq_lens.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged decode wants caches with unit stride along the head dim (views of "
                         "PagedKVCache.data are); copying a whole cache here would cost more than the kernel")
    if q.stride(-1) != 1:
        q = q.contiguous()
    g = hq // hkv
    if num_splits is None:
        num_splits = default_num_splits(B, hkv, block_tables.shape[1] * page, q.device)
    if block_n is None:
        block_n = 64 if d <= 128 else 32
    lse = torch.empty(B, hq, dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out, lse
    part_o = torch.empty(B, hq, num_splits, d, dtype=torch.float32, device=q.device)   # [B, Hq, S, D]
    part_lse = torch.empty(B, hq, num_splits, dtype=torch.float32, device=q.device)    # [B, Hq, S]
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"paged_decode_attention runs on CUDA tensors, or on CPU tensors under Triton's "
                         f"interpreter (TRITON_INTERPRET=1 before triton is imported); got {q.device}")
    stage1, stage2 = _kernels()
    block_d = max(16, triton.next_power_of_2(d))
    precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    stage1[(B, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part_o, part_lse,
        q.stride(0), q.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        float(scale),
        G=g, HEAD_DIM=d, PAGE=page, NUM_SPLITS=num_splits,
        BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_D=block_d, BLOCK_N=block_n,
        PRECISION=precision, num_warps=4, num_stages=2)
    stage2[(B, hq)](
        part_o, part_lse, out, lse,
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0),
        HEAD_DIM=d, NUM_SPLITS=num_splits,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d, num_warps=4)
    return out, lse


def kv_bytes(seq_lens: list[int], kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V one decode step reads: the floor a bandwidth-bound kernel is measured against."""
    return 2 * sum(seq_lens) * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


__all__ = ["available", "paged_decode_attention", "default_num_splits", "kv_bytes"]
