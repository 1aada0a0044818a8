"""The CUDA attention backend and the compiled Triton decode kernel against the float64 reference."""
from __future__ import annotations

import itertools

import pytest
import torch

from common.attention.cuda import ATEN_FLASH, EINSUM, CudaAttentionBackend
from common.attention.reference import ReferenceBackend

REF = ReferenceBackend()
INF = float("inf")
TOL = {torch.bfloat16: dict(atol=2e-2, rtol=1e-2), torch.float16: dict(atol=5e-3, rtol=5e-3),
       torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _qkv(n, hq, hkv, L, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g).to(device=device, dtype=dtype)
                 for s in ((n, hq, d), (L, hkv, d), (L, hkv, d)))


def _check(backend, q, k, v, q_start, k_start, scale=0.125):
    o, l = backend.forward(q, k, v, q_start=q_start, k_start=k_start, scale=scale)
    ro, rl = REF.forward(q.double(), k.double(), v.double(), q_start=q_start, k_start=k_start, scale=scale)
    assert o.shape == q.shape and o.dtype == q.dtype and l.shape == q.shape[:2]
    assert l.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert not o.isnan().any() and not l.isnan().any()
    assert torch.equal(l == -INF, rl == -INF)
    tol = TOL[q.dtype]
    torch.testing.assert_close(o.double(), ro, **tol)
    fin = rl != -INF
    torch.testing.assert_close(l[fin].double(), rl[fin], **tol)


# --- prefill-chunk attention ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("chunk,cached", list(itertools.product([1, 7, 64, 130], [0, 17, 300, 2000])))
def test_chunk_over_cached_context(device, dtype, chunk, cached):
    q, k, v = _qkv(chunk, 8, 2, cached + chunk, 128, dtype, device, seed=chunk + cached)
    _check(CudaAttentionBackend(), q, k, v, q_start=cached, k_start=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_gqa_ratios_tokens_not_heads(device, dtype, ratio):
    q, k, v = _qkv(5, 2 * ratio, 2, 400, 64, dtype, device, seed=ratio)
    be = CudaAttentionBackend()
    _check(be, q, k, v, q_start=395, k_start=0)          # a chunk of 5 over 395 cached keys
    _check(be, q, k, v, q_start=1000, k_start=0)         # an earlier KVP shard: non-causal


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_general_layouts_and_fully_masked_rows(device, dtype):
    be = CudaAttentionBackend()
    for n, L, q_start, k_start in itertools.product([1, 3, 8], [1, 5, 41], [0, 4, 37], [0, 3, 12, 50]):
        q, k, v = _qkv(n, 6, 3, L, 64, dtype, device, seed=n * 100 + L)
        _check(be, q, k, v, q_start=q_start, k_start=k_start)    # k_start > q_start: empty rows


@pytest.mark.parametrize("shards", [1, 4, "auto"])
def test_kv_shards_for_a_short_chunk_over_a_long_context(device, shards):
    q, k, v = _qkv(16, 32, 8, 20_000, 128, torch.bfloat16, device, seed=5)
    be = CudaAttentionBackend(kv_shards=shards, shard_min_tokens=1024)
    _check(be, q, k, v, q_start=20_000 - 16, k_start=0)
    if shards == "auto":
        assert be._shards(q, 20_000 - 15, be.op_for(q)) > 1


def test_flash_op_lse_layout_is_natural_log_tokens_by_heads(device):
    # 5 tokens, 3 heads: a transposed LSE cannot pass; compare the raw op against the einsum op.
    q, k, v = (t.unsqueeze(0) for t in _qkv(5, 3, 3, 9, 64, torch.bfloat16, device))
    o, l = ATEN_FLASH.fn(q, k, v, False, 0.125)
    ro, rl = EINSUM.fn(q.float(), k.float(), v.float(), False, 0.125)
    assert l.shape == (1, 5, 3)
    torch.testing.assert_close(l, rl, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(o.float(), ro, atol=2e-2, rtol=1e-2)


def test_float64_inputs_use_the_exact_fallback(device):
    q, k, v = _qkv(7, 4, 2, 30, 64, torch.float64, device)
    _check(CudaAttentionBackend(), q, k, v, q_start=23, k_start=0)


# --- Triton decode, compiled --------------------------------------------------------------------------

def _paged(lens, hq, hkv, d, page, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max([-(-n // page) for n in lens] + [1])
    num_blocks = len(lens) * max_blocks + 1
    k = torch.randn(num_blocks, page, hkv, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(num_blocks, page, hkv, d, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(len(lens), hq, d, generator=g).to(device=device, dtype=dtype)
    tables = torch.randperm(num_blocks, generator=g)[:len(lens) * max_blocks].view(len(lens), max_blocks)
    return q, k, v, tables.to(device=device, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32, device=device)


def _check_decode(out, lse, q, k, v, tables, lens, scale):
    ro, rl = REF.decode_paged(q.double(), k.double(), v.double(), tables, lens, scale=scale)
    assert torch.equal(lse == -INF, rl == -INF)
    tol = TOL[torch.float32] if q.dtype == torch.float32 else TOL[q.dtype]
    torch.testing.assert_close(out.double(), ro, **tol)
    fin = rl != -INF
    torch.testing.assert_close(lse[fin].double(), rl[fin], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("splits", [1, 7, None])
def test_triton_decode_against_reference(device, dtype, ratio, splits):
    from common.attention.triton_decode import paged_decode_attention
    lens = [0, 1, 16, 17, 63, 64, 65, 1000, 4097]
    q, k, v, tables, seq = _paged(lens, 8 * ratio // 2, 4, 128, 16, dtype, device, seed=ratio)
    out, lse = paged_decode_attention(q, k, v, tables, seq, 0.088, num_splits=splits)
    _check_decode(out, lse, q, k, v, tables, seq, 0.088)


def test_backend_decode_paged_uses_triton_and_matches(device):
    q, k, v, tables, seq = _paged([5, 300, 0], 32, 8, 128, 16, torch.bfloat16, device)
    out, lse = CudaAttentionBackend().decode_paged(q, k, v, tables, seq, scale=0.088)
    _check_decode(out, lse, q, k, v, tables, seq, 0.088)


def test_triton_decode_in_a_cuda_graph_replays_new_lengths_bitwise(device):
    from common.attention.triton_decode import paged_decode_attention
    q, k, v, tables, seq = _paged([100, 2000, 7, 0], 32, 8, 128, 16, torch.bfloat16, device, seed=1)
    out = torch.empty_like(q)
    paged_decode_attention(q, k, v, tables, seq, 0.088, out=out)             # compile before capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _, lse = paged_decode_attention(q, k, v, tables, seq, 0.088, out=out)
    seq.copy_(torch.tensor([2000, 3, 0, 1999], dtype=torch.int32))
    tables.copy_(tables.flip(0))
    g.replay()
    want_o, want_l = paged_decode_attention(q, k, v, tables, seq, 0.088)
    torch.cuda.synchronize()
    assert torch.equal(out, want_o) and torch.equal(lse, want_l)
