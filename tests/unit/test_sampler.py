"""Sampler: greedy, seeds, top-k, top-p, temperature, logprobs of the chosen tokens, top logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from common.engine.sampler import Sampler
from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams

V = 50


def logits(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def draw(params: SamplingParams, lg: torch.Tensor, n: int, rid: str = "r") -> list[int]:
    """n successive draws for one request from the same logits row."""
    s = Sampler()
    return [s.sample(lg, [rid], [params])[0][0] for _ in range(n)]


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    lg = logits()
    toks, lps, tops = Sampler().sample(lg, ["a", "b", "c", "d"], [SamplingParams()] * 4)
    assert tops == {}                                           # nobody asked
    assert toks == lg.argmax(-1).tolist()
    ref = torch.log_softmax(lg, -1)
    for i, (t, lp) in enumerate(zip(toks, lps)):
        assert lp == pytest.approx(ref[i, t].item(), abs=1e-6)
        assert lp <= 0


def test_logprobs_are_of_the_model_distribution_whatever_the_settings():
    lg = logits(1)
    ref = torch.log_softmax(lg, -1)[0]
    s = Sampler()
    for _ in range(20):
        (t,), (lp,), _ = s.sample(lg, ["r"], [SamplingParams(temperature=0.7, top_k=5, seed=3)])
        assert lp == pytest.approx(ref[t].item(), abs=1e-6)


def test_seed_reproducible_and_seeds_differ():
    lg = logits(1, seed=1)
    p = SamplingParams(temperature=1.5, seed=1234)
    a, b = draw(p, lg, 40), draw(p, lg, 40)
    assert a == b
    c = draw(SamplingParams(temperature=1.5, seed=99), lg, 40)
    assert a != c
    assert len(set(a)) > 1          # it really samples


def test_per_request_generators_are_independent_of_batch_mates():
    lg = logits(2, seed=2)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = draw(p, lg[:1], 10, rid="x")
    s = Sampler()
    together = [s.sample(lg, ["x", "y"], [p, SamplingParams(temperature=1.0, seed=8)])[0][0]
                for _ in range(10)]
    assert together == alone


def test_forget_restarts_the_seeded_stream():
    lg = logits(1, seed=3)
    p = SamplingParams(temperature=1.0, seed=5)
    s = Sampler()
    first = [s.sample(lg, ["r"], [p])[0][0] for _ in range(5)]
    s.forget("r")
    again = [s.sample(lg, ["r"], [p])[0][0] for _ in range(5)]
    assert first == again


def test_top_k_one_and_tiny_top_p_are_greedy():
    lg = logits(1, seed=4)
    best = int(lg.argmax())
    assert set(draw(SamplingParams(temperature=2.0, top_k=1, seed=0), lg, 20)) == {best}
    assert set(draw(SamplingParams(temperature=2.0, top_p=1e-6, seed=0), lg, 20)) == {best}


def test_top_k_keeps_only_the_k_best():
    lg = logits(1, seed=5)
    top3 = set(torch.topk(lg[0], 3).indices.tolist())
    got = draw(SamplingParams(temperature=5.0, top_k=3, seed=0), lg, 200)
    assert set(got) <= top3 and len(set(got)) == 3


def test_top_p_keeps_the_smallest_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two (0.5 < 0.7 <= 0.8)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    lg = probs.log()
    got = draw(SamplingParams(temperature=1.0, top_p=0.7, seed=0), lg, 300)
    assert set(got) == {1, 3}
    got = draw(SamplingParams(temperature=1.0, top_p=0.85, seed=0), lg, 300)
    assert set(got) == {1, 3, 2}


def test_low_temperature_concentrates_and_high_spreads():
    lg = logits(1, seed=6)
    cold = draw(SamplingParams(temperature=0.05, seed=0), lg, 50)
    hot = draw(SamplingParams(temperature=10.0, seed=0), lg, 50)
    assert len(set(cold)) <= 2 and len(set(hot)) > 10


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 3.0e38])
def test_extreme_finite_temperatures_sample_without_nan(temperature):
    """Fuzzing found temperature = 1e-45 (a valid float32 > 0): logits / 1e-45 were all +-inf, their
    softmax NaN, and torch.multinomial raised on a decode worker, which took the instance down."""
    lg = logits(2, seed=3).to(torch.float32)
    for top in (dict(), dict(top_k=5), dict(top_p=0.5)):
        toks = draw(SamplingParams(temperature=temperature, seed=1, **top), lg[:1], 20)
        if temperature < 1:
            assert set(toks) == {int(lg[0].argmax())}          # as cold as it gets: the argmax
        else:
            assert all(0 <= t < V for t in toks)


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(max_tokens=-1), dict(temperature=-0.1),
                                 dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")), dict(top_k=-1),
                                 dict(top_logprobs=-1), dict(top_logprobs=21), dict(top_logprobs=2.0)])
def test_sampling_params_validation(bad):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad)


def test_greedy_property():
    assert SamplingParams().greedy and SamplingParams(temperature=1.0, top_k=1).greedy
    assert not SamplingParams(temperature=0.5).greedy


def test_seeded_draw_depends_only_on_seed_index_and_logits():
    """Token i of a seeded request: the same from a fresh sampler (a decode instance that never saw
    token 0) as from the one that drew tokens 0..i-1; different indices draw differently."""
    lg = logits(1, seed=5)
    p = SamplingParams(temperature=2.0, seed=42)
    carried = Sampler()
    seq = [carried.sample(lg, ["r"], [p], [i])[0][0] for i in range(30)]
    fresh = [Sampler().sample(lg, ["r"], [p], [i])[0][0] for i in range(30)]
    assert seq == fresh
    assert len(set(seq)) > 3                                   # the index moves the draw
    other = [Sampler().sample(lg, ["r"], [SamplingParams(temperature=2.0, seed=43)], [i])[0][0] for i in range(30)]
    assert other != seq


def test_token_seed_mixes_both_and_stays_in_range():
    from common.engine.sampler import token_seed
    seeds = {token_seed(s, i) for s in (0, 1, 2**62, 12345) for i in range(50)}
    assert len(seeds) == 200 and all(0 <= x < 2**63 for x in seeds)


# ---- top log-probabilities ------------------------------------------------------------------------
MIXED = [SamplingParams(top_logprobs=5),                                           # greedy
         SamplingParams(),                                                         # not asked
         SamplingParams(temperature=1.0, top_k=3, seed=1, top_logprobs=20),        # sampled
         SamplingParams(temperature=0.8, seed=2, top_logprobs=1)]


def test_top_logprobs_are_sorted_of_log_softmax_and_agree_with_the_chosen_token():
    lg = logits(4, seed=7)
    toks, lps, tops = Sampler().sample(lg, ["a", "b", "c", "d"], MIXED, [0, 0, 0, 0])
    ref = torch.log_softmax(lg, -1)                                              # [4, V]
    assert set(tops) == {0, 2, 3}                                                # row 1 did not ask
    for b, top in tops.items():
        k = MIXED[b].top_logprobs
        ids, values = [t for t, _ in top], [lp for _, lp in top]
        assert len(top) == k and all(isinstance(t, int) for t in ids)
        assert values == sorted(values, reverse=True)
        assert ids == torch.topk(ref[b], k).indices.tolist()                     # the k most likely
        assert values == pytest.approx(ref[b, ids].tolist(), abs=1e-6)
        if toks[b] in ids:                                                       # the same float
            assert values[ids.index(toks[b])] == lps[b]
    assert tops[0][0] == (toks[0], lps[0])                                       # greedy: the argmax
    assert toks[2] in [t for t, _ in tops[2]]                                    # top_k=3 draw, in the top 20


def test_asking_for_top_logprobs_changes_no_token():
    lg = logits(4, seed=8)
    plain = [SamplingParams(**{f: getattr(p, f) for f in ("temperature", "top_k", "seed")}) for p in MIXED]
    for i in range(5):
        with_top = Sampler().sample(lg, ["a", "b", "c", "d"], MIXED, [i] * 4)
        without = Sampler().sample(lg, ["a", "b", "c", "d"], plain, [i] * 4)
        assert with_top[:2] == without[:2] and without[2] == {}


def test_top_logprobs_beyond_the_vocabulary_lists_every_token():
    lg = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    _, _, tops = Sampler().sample(lg, ["r"], [SamplingParams(top_logprobs=20)])
    assert [t for t, _ in tops[0]] == [1, 3, 2, 0]
    assert [lp for _, lp in tops[0]] == pytest.approx([math.log(p) for p in (0.5, 0.3, 0.15, 0.05)], abs=1e-6)
