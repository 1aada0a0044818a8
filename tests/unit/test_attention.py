"""Attention backends against the float32/float64 reference, and the reference against explicit fp64."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from common.attention.cpu import CpuFlashBackend
from common.attention.reference import ReferenceBackend
from common.attention.registry import get_backend
from common.errors import ConfigError

REF = ReferenceBackend()
FLASH = CpuFlashBackend()
INF = float("inf")
BF16_TOL = dict(atol=2e-2, rtol=1e-2)


def _qkv(n, hq, hkv, L, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=g) for s in ((n, hq, d), (L, hkv, d), (L, hkv, d)))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _explicit_fp64(q, k, v, q_start, k_start, scale):
    """Head by head, row by row: softmax over the visible keys, in float64. Returns out, lse."""
    n, hq, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros(n, hq, d, dtype=torch.float64)
    lse = torch.full((n, hq), -INF, dtype=torch.float64)
    for i in range(n):
        vis = [j for j in range(k.shape[0]) if k_start + j <= q_start + i]
        if not vis:
            continue
        for h in range(hq):
            kh, vh = k[vis, h // g].double(), v[vis, h // g].double()
            s = kh @ q[i, h].double() * scale
            out[i, h] = torch.softmax(s, 0) @ vh
            lse[i, h] = math.log(sum(math.exp(x) for x in s.tolist()))
    return out, lse


def _close(got, want, dtype):
    tol = BF16_TOL if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), want.double(), **tol)


def _check_against_reference(backend, q, k, v, q_start, k_start, scale=0.25):
    o, l = backend.forward(q, k, v, q_start=q_start, k_start=k_start, scale=scale)
    ro, rl = REF.forward(q, k, v, q_start=q_start, k_start=k_start, scale=scale)
    assert o.shape == q.shape and o.dtype == q.dtype and l.shape == q.shape[:2] and l.dtype == torch.float32
    assert not o.isnan().any() and not l.isnan().any()
    assert torch.equal(l == -INF, rl == -INF)
    _close(o, ro, q.dtype)
    fin = rl != -INF
    _close(l[fin], rl[fin], q.dtype)


# --- the oracle itself -------------------------------------------------------------------------------

@pytest.mark.parametrize("n,L,q_start,k_start,hq,hkv", [
    (5, 9, 4, 0, 3, 3),     # chunk over cached context
    (3, 4, 10, 0, 4, 2),    # earlier shard, GQA
    (6, 5, 0, 2, 6, 2),     # keys start after the first queries: empty rows
    (4, 12, 2, 0, 3, 1),    # keys after the last query
])
def test_reference_matches_explicit_fp64_softmax(n, L, q_start, k_start, hq, hkv):
    q, k, v = _qkv(n, hq, hkv, L, d=8)
    want_o, want_l = _explicit_fp64(q, k, v, q_start, k_start, 0.3)
    o, l = REF.forward(q.double(), k.double(), v.double(), q_start=q_start, k_start=k_start, scale=0.3)
    assert o.dtype == torch.float64 and l.dtype == torch.float64
    torch.testing.assert_close(o, want_o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(l, want_l, atol=1e-12, rtol=1e-12)
    o32, l32 = REF.forward(q, k, v, q_start=q_start, k_start=k_start, scale=0.3)
    assert o32.dtype == torch.float32 and l32.dtype == torch.float32
    torch.testing.assert_close(o32.double(), want_o, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [REF, FLASH], ids=lambda b: b.name)
def test_empty_inputs_give_zero_and_minus_inf(backend):
    q, k, v = _qkv(4, 6, 2, 0)
    o, l = backend.forward(q, k, v, q_start=7, k_start=0, scale=0.25)          # L == 0
    assert torch.equal(o, torch.zeros_like(q)) and torch.equal(l, torch.full((4, 6), -INF))
    q, k, v = _qkv(0, 6, 2, 5)
    o, l = backend.forward(q, k, v, q_start=7, k_start=0, scale=0.25)          # n == 0
    assert o.shape == (0, 6, 16) and l.shape == (0, 6)
    q, k, v = _qkv(4, 6, 2, 5)
    o, l = backend.forward(q, k, v, q_start=0, k_start=10, scale=0.25)         # every key after every query
    assert torch.equal(o, torch.zeros_like(q)) and torch.equal(l, torch.full((4, 6), -INF))


@pytest.mark.parametrize("backend", [REF, FLASH], ids=lambda b: b.name)
def test_bad_shapes_raise(backend):
    q, k, v = _qkv(4, 6, 4, 5)   # 6 % 4 != 0
    with pytest.raises(ValueError):
        backend.forward(q, k, v, q_start=5, k_start=0, scale=0.25)


# --- cpu_flash against the reference ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk,cached", list(itertools.product([1, 7, 64, 130], [0, 1, 17, 300])))
def test_chunk_over_cached_context(chunk, cached, dtype):
    q, k, v = _qkv(chunk, 4, 2, cached + chunk, dtype=dtype)
    _check_against_reference(FLASH, q, k, v, q_start=cached, k_start=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,keys,start", [(64, 64, 0), (10, 6, 0), (33, 33, 4096), (1, 1, 7)])
def test_a_chunk_with_no_key_before_it_is_one_causal_call(n, keys, start, dtype):
    """A prompt's first chunk, or a chunk at a KVP shard's first position (k_start == q_start): one
    top-left causal call, no merge; queries past the last key see every key."""
    q, k, v = _qkv(n, 6, 2, keys, dtype=dtype)
    _check_against_reference(FLASH, q, k, v, q_start=start, k_start=start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_single_query(dtype):
    q, k, v = _qkv(1, 8, 2, 333, dtype=dtype)
    _check_against_reference(FLASH, q, k, v, q_start=332, k_start=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 5, 64])
def test_earlier_kvp_shard_is_non_causal(n, dtype):
    q, k, v = _qkv(n, 6, 2, 200, dtype=dtype)
    _check_against_reference(FLASH, q, k, v, q_start=500, k_start=100)       # keys 100..299, queries 500..


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ratio", [1, 3, 4])
def test_gqa_ratios_with_tokens_not_heads(ratio, dtype):
    q, k, v = _qkv(5, 2 * ratio, 2, 40, dtype=dtype)
    _check_against_reference(FLASH, q, k, v, q_start=35, k_start=0)          # chunk of 5 over 35 cached
    _check_against_reference(FLASH, q, k, v, q_start=100, k_start=0)         # earlier shard


def test_gqa_head_mapping_is_grouped_not_tiled():
    # query head h reads kv head h // (Hq // Hkv): make kv heads distinguishable and check directly.
    q = torch.zeros(1, 4, 2)
    k = torch.zeros(3, 2, 2)
    v = torch.stack([torch.tensor([[1.0, 1.0], [2.0, 2.0]])] * 3)            # kv head 0 -> 1, kv head 1 -> 2
    for backend in (REF, FLASH):
        o, _ = backend.forward(q, k, v, q_start=2, k_start=0, scale=1.0)
        torch.testing.assert_close(o[0, :, 0], torch.tensor([1.0, 1.0, 2.0, 2.0]))


def test_general_layouts_match_reference():
    # Every relative placement of a query block and a key block, including keys after the queries,
    # partial overlap, and keys starting after the first queries (empty rows).
    for n, L, q_start, k_start in itertools.product([1, 3, 8], [1, 5, 12], [0, 4, 10], [0, 3, 6, 12]):
        q, k, v = _qkv(n, 6, 3, L, d=8, seed=n * 1000 + L)
        _check_against_reference(FLASH, q, k, v, q_start=q_start, k_start=k_start)


def test_float64_inputs_stay_float64():
    q, k, v = _qkv(7, 4, 2, 30, dtype=torch.float64)
    o, l = FLASH.forward(q, k, v, q_start=23, k_start=0, scale=0.25)
    ro, rl = REF.forward(q, k, v, q_start=23, k_start=0, scale=0.25)
    assert o.dtype == torch.float64 and l.dtype == torch.float64
    torch.testing.assert_close(o, ro, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(l, rl, atol=1e-10, rtol=1e-10)


def test_non_contiguous_views():
    # The model slices q, k, v out of one fused projection: strided views must work.
    qkv = torch.randn(40, 8 + 2 + 2, 16)
    q, k, v = qkv[-9:, :8], qkv[:, 8:10], qkv[:, 10:]
    assert not q.is_contiguous() and not k.is_contiguous()
    _check_against_reference(FLASH, q, k, v, q_start=31, k_start=0)
    # The CPU kernel silently misreads a head dim that is not unit-stride: the backend must copy then.
    q2, k2, v2 = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v))
    k3, v3 = torch.randn(40, 2, 32)[..., ::2], torch.randn(40, 2, 32)[..., ::2]
    assert q2.stride(-1) != 1 and k3.stride(-1) != 1
    _check_against_reference(FLASH, q2, k2, v2, q_start=31, k_start=0)
    _check_against_reference(FLASH, q2, k3, v3, q_start=31, k_start=0)
    _check_against_reference(FLASH, q2[:1], k3, v3, q_start=39, k_start=0)   # decode


# --- paged decode (the base class default) ----------------------------------------------------------

@pytest.mark.parametrize("backend", [REF, FLASH], ids=lambda b: b.name)
def test_decode_paged_matches_per_sequence_reference(backend):
    g = torch.Generator().manual_seed(3)
    bs, hq, hkv, d, num_blocks = 16, 6, 2, 8, 48
    seq_lens = torch.tensor([0, 1, 16, 17, 100], dtype=torch.int32)
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=g)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=g)
    max_blocks = 8
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)           # disjoint random blocks
    block_tables = perm[:len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks).clone()
    for b, n in enumerate(seq_lens.tolist()):
        block_tables[b, -(-n // bs):] = -1                                     # padding must never be read
    q = torch.randn(len(seq_lens), hq, d, generator=g)
    o, l = backend.decode_paged(q, k_cache, v_cache, block_tables, seq_lens, scale=0.3)
    assert o.shape == q.shape and l.shape == (len(seq_lens), hq)
    for b, n in enumerate(seq_lens.tolist()):
        # Gather the keys token by token (independent of the default's block-wise gather).
        idx = [(int(block_tables[b, t // bs]), t % bs) for t in range(n)]
        k = torch.stack([k_cache[i, j] for i, j in idx]) if n else k_cache.new_zeros(0, hkv, d)
        v = torch.stack([v_cache[i, j] for i, j in idx]) if n else v_cache.new_zeros(0, hkv, d)
        ro, rl = REF.forward(q[b:b + 1], k, v, q_start=max(n - 1, 0), k_start=0, scale=0.3)
        torch.testing.assert_close(o[b:b + 1], ro, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l[b:b + 1], rl, atol=1e-5, rtol=1e-5)
    assert torch.equal(o[0], torch.zeros(hq, d)) and torch.equal(l[0], torch.full((hq,), -INF))


# --- registry ---------------------------------------------------------------------------------------

def test_registry_names():
    assert get_backend("reference").name == "reference"
    assert get_backend("cpu_flash").name == "cpu_flash"
    assert get_backend().name == "cpu_flash"
    assert get_backend("auto", torch.device("cpu")).name == "cpu_flash"
    with pytest.raises(ConfigError, match="cpu_flash"):
        get_backend("flashinfer")
    with pytest.raises(ConfigError):
        get_backend("auto", "no-such-device")


def test_registry_cuda_is_config_error_when_missing():
    try:
        import common.attention.cuda  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError):
            get_backend("cuda")
        with pytest.raises(ConfigError):
            get_backend("auto", "cuda")
    else:
        pytest.skip("the CUDA backend exists")


@pytest.mark.parametrize("backend", [REF, FLASH], ids=lambda b: b.name)
def test_decode_paged_empty_batch(backend):
    o, l = backend.decode_paged(torch.zeros(0, 4, 8), torch.zeros(2, 16, 2, 8), torch.zeros(2, 16, 2, 8),
                                torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), scale=0.3)
    assert o.shape == (0, 4, 8) and l.shape == (0, 4) and l.dtype == torch.float32
