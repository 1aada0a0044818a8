"""The LSE merge: split attention over disjoint key shards, merge, compare with attention over all keys."""
from __future__ import annotations

import pytest
import torch

from common.attention.merge import merge_attention_states, merge_stacked
from common.attention.reference import ReferenceBackend

REF = ReferenceBackend()
INF = float("inf")


def _qkv(n, hq, hkv, L, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hq, d, generator=g, dtype=dtype), torch.randn(L, hkv, d, generator=g, dtype=dtype),
            torch.randn(L, hkv, d, generator=g, dtype=dtype))


def _split_and_merge(q, k, v, cuts, q_start, scale=0.25):
    """Attend over k[cuts[i]:cuts[i+1]] separately (absolute positions kept), then merge."""
    outs, lses = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        o, l = REF.forward(q, k[a:b], v[a:b], q_start=q_start, k_start=a, scale=scale)
        outs.append(o)
        lses.append(l)
    return merge_attention_states(outs, lses)


@pytest.mark.parametrize("q_start", [1000, 995])  # non-causal (decode-like) and a causal chunk at the end
def test_four_way_split_equals_full_fp64(q_start):
    # n=5 tokens, 3 heads: a [heads, tokens] mix-up cannot pass. Shard [999, 1000) holds one token;
    # with q_start=995 the last shards are partly or fully invisible to early rows.
    q, k, v = _qkv(5, 3, 3, 1000)
    full_o, full_l = REF.forward(q, k, v, q_start=q_start, k_start=0, scale=0.25)
    o, l = _split_and_merge(q, k, v, [0, 1, 400, 999, 1000], q_start)
    assert o.dtype == torch.float64 and l.dtype == torch.float64
    torch.testing.assert_close(o, full_o, atol=1e-12, rtol=0)
    torch.testing.assert_close(l, full_l, atol=1e-12, rtol=0)


def test_empty_shards_in_middle_and_at_ends():
    q, k, v = _qkv(5, 3, 1, 300)
    full_o, full_l = REF.forward(q, k, v, q_start=300, k_start=0, scale=0.25)
    o, l = _split_and_merge(q, k, v, [0, 0, 100, 100, 100, 300, 300], q_start=300)
    torch.testing.assert_close(o, full_o, atol=1e-12, rtol=0)
    torch.testing.assert_close(l, full_l, atol=1e-12, rtol=0)


def test_all_shards_empty_gives_zero_and_minus_inf():
    n, h, d = 5, 3, 8
    outs = [torch.zeros(n, h, d) for _ in range(3)]
    lses = [torch.full((n, h), -INF) for _ in range(3)]
    o, l = merge_attention_states(outs, lses)
    assert torch.equal(o, torch.zeros(n, h, d))
    assert torch.equal(l, torch.full((n, h), -INF))


def test_some_rows_empty_everywhere():
    q, k, v = _qkv(5, 3, 3, 50)
    # keys at 40..49, queries at 38..42: rows 0 and 1 see nothing in any shard.
    o, l = _split_and_merge(q, k[40:], v[40:], [0, 4, 10], q_start=38 - 40)
    assert torch.equal(o[:2], torch.zeros_like(o[:2])) and torch.equal(l[:2], torch.full_like(l[:2], -INF))
    full_o, full_l = REF.forward(q, k[40:], v[40:], q_start=38, k_start=40, scale=0.25)
    torch.testing.assert_close(o, full_o, atol=1e-12, rtol=0)
    torch.testing.assert_close(l, full_l, atol=1e-12, rtol=0)


def test_bad_lse_values_and_garbage_in_empty_shards_never_leak_nan():
    n, h, d = 5, 3, 8
    good_o, good_l = torch.randn(n, h, d), torch.randn(n, h)
    garbage = torch.full((n, h, d), float("nan"))
    for bad in (float("nan"), INF, -INF):
        o, l = merge_attention_states([garbage, good_o, garbage], [torch.full((n, h), bad), good_l,
                                                                   torch.full((n, h), bad)])
        assert not o.isnan().any() and not l.isnan().any()
        torch.testing.assert_close(o, good_o)
        torch.testing.assert_close(l, good_l)


def test_formula_against_explicit_fp64():
    g = torch.Generator().manual_seed(1)
    outs = [torch.randn(5, 3, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    lses = [torch.randn(5, 3, generator=g, dtype=torch.float64) * 30 for _ in range(3)]
    o, l = merge_attention_states(outs, lses)
    want_l = torch.stack(lses).exp().sum(0).log()
    want_o = sum(torch.exp(li - want_l).unsqueeze(-1) * oi for oi, li in zip(outs, lses))
    torch.testing.assert_close(l, want_l, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(o, want_o, atol=1e-12, rtol=1e-12)


def test_large_lse_does_not_overflow():
    o, l = merge_attention_states([torch.ones(2, 3, 4), 3 * torch.ones(2, 3, 4)],
                                  [torch.full((2, 3), 1000.0), torch.full((2, 3), 1000.0)])
    torch.testing.assert_close(o, 2 * torch.ones(2, 3, 4))
    torch.testing.assert_close(l, torch.full((2, 3), 1000.0 + 0.6931471805599453))


def test_single_shard_is_identity():
    o_in, l_in = torch.randn(5, 3, 8), torch.randn(5, 3)
    o, l = merge_attention_states([o_in], [l_in])
    torch.testing.assert_close(o, o_in)
    torch.testing.assert_close(l, l_in)


def test_bf16_within_tolerance_and_dtypes():
    q, k, v = _qkv(5, 3, 3, 600, dtype=torch.float32)
    full_o, full_l = REF.forward(q, k, v, q_start=600, k_start=0, scale=0.25)
    o, l = _split_and_merge(q.bfloat16(), k.bfloat16(), v.bfloat16(), [0, 150, 151, 600], q_start=600)
    assert o.dtype == torch.bfloat16 and l.dtype == torch.float32
    torch.testing.assert_close(o.float(), full_o, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(l, full_l, atol=2e-2, rtol=1e-2)


def test_stacked_form_matches_list_form():
    outs = [torch.randn(5, 3, 8) for _ in range(4)]
    lses = [torch.randn(5, 3) for _ in range(4)]
    lses[2][1] = -INF
    o1, l1 = merge_attention_states(outs, lses)
    o2, l2 = merge_stacked(torch.stack(outs), torch.stack(lses))
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    assert l1.dtype == torch.float32


def test_shape_errors():
    with pytest.raises(ValueError):
        merge_attention_states([], [])
    with pytest.raises(ValueError):
        merge_attention_states([torch.zeros(5, 3, 8)], [torch.zeros(3, 5)])  # transposed lse
    with pytest.raises(ValueError):
        merge_stacked(torch.zeros(2, 5, 3, 8), torch.zeros(2, 5, 3, 1))
