"""Adaptive and fixed chunkers: budget fit, search space, hard limits (prompt end, KVP boundary)."""
from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.scheduler.chunking import AdaptiveChunker, ChunkingConfig, FixedChunker, tokens_to_boundary
from common.scheduler.types import BatchShape, ReqView


def toy_predict(batch: BatchShape) -> float:
    """1 ms + 10 us per token + 1 ns per query-key pair + 10 ns per decode KV token."""
    if batch.is_empty:
        return 0.0
    pairs = sum(n * (c + n / 2) for n, c in batch.prefills)
    return 1e-3 + 1e-5 * batch.num_tokens + 1e-9 * pairs + 1e-8 * sum(c + 1 for c in batch.decodes)


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, batch):
        self.calls += 1
        return self.fn(batch)


def view(prompt=1_000_000, done=0, last=0, kvp=None):
    return ReqView("r", 0.0, prompt, num_computed=done, last_chunk=last, kvp_tokens=kvp)


def brute_force(predict, batch, budget, req, cfg=ChunkingConfig()):
    """Largest legal chunk that fits, by trying every candidate."""
    best = 0
    end = tokens_to_boundary(req)
    cap = cfg.max_chunk
    if req.last_chunk:
        cap = min(cap, max(cfg.min_chunk, 2 * req.last_chunk))
    cands = [c for c in range(cfg.min_chunk, cap + 1, cfg.multiple) if c < end]
    if end <= cap:
        cands.append(end)
    for c in cands:
        if predict(batch.with_prefill(c, req.num_computed)) <= budget * (1 + cfg.tolerance):
            best = max(best, c)
    return best


def test_config_validation():
    with pytest.raises(ConfigError):
        ChunkingConfig(min_chunk=48, multiple=32)
    with pytest.raises(ConfigError):
        ChunkingConfig(min_chunk=64, max_chunk=32)
    with pytest.raises(ConfigError):
        ChunkingConfig(tolerance=-0.1)
    with pytest.raises(ConfigError):
        FixedChunker(0)


@pytest.mark.parametrize("budget", [0.003, 0.01, 0.02, 0.05, 0.2])
@pytest.mark.parametrize("done", [0, 10_000, 100_000, 999_000])
def test_adaptive_is_largest_fitting_chunk(budget, done):
    batch = BatchShape().with_decodes([5000, 20_000])
    req = view(done=done)
    got = AdaptiveChunker(toy_predict).chunk(batch, budget, req)
    assert got == brute_force(toy_predict, batch, budget, req)
    if got:
        assert got % 32 == 0 or got == req.remaining_prompt
        assert toy_predict(batch.with_prefill(got, done)) <= budget * 1.1


def test_binary_search_uses_few_predictions():
    predict = Counting(toy_predict)
    AdaptiveChunker(predict).chunk(BatchShape(), 0.05, view())
    assert predict.calls <= 10          # 256 candidates: 1 + 8 probes


def test_bounds_min_max_and_growth_cap():
    ch = AdaptiveChunker(lambda b: 0.0)           # everything fits: the caps decide
    assert ch.chunk(BatchShape(), 1.0, view()) == 8192
    assert ch.chunk(BatchShape(), 1.0, view(done=64, last=100)) == 192     # 2 x 100, on the grid
    assert ch.chunk(BatchShape(), 1.0, view(done=64, last=5)) == 32        # never below min_chunk
    assert ch.chunk(BatchShape(), 1.0, view(), max_tokens=100) == 96


def test_clipped_at_prompt_end_and_kvp_boundary_even_off_grid():
    ch = AdaptiveChunker(lambda b: 0.0)
    assert ch.chunk(BatchShape(), 1.0, view(prompt=1000, done=990)) == 10
    assert ch.chunk(BatchShape(), 1.0, view(prompt=5000, done=0)) == 5000
    assert ch.chunk(BatchShape(), 1.0, view(done=0, kvp=1000)) == 1000
    assert ch.chunk(BatchShape(), 1.0, view(done=1990, kvp=1000)) == 10
    assert ch.chunk(BatchShape(), 1.0, view(done=2000, kvp=1000)) == 1000
    fixed = FixedChunker(512)
    assert fixed.chunk(BatchShape(), 0.0, view(prompt=700, done=512)) == 188
    assert fixed.chunk(BatchShape(), 0.0, view(done=900, kvp=1000)) == 100
    assert fixed.chunk(BatchShape(), 0.0, view(), max_tokens=300) == 300
    assert fixed.chunk(BatchShape(), 0.0, view()) == 512         # ignores the budget


def test_returns_zero_when_nothing_fits():
    decodes = BatchShape().with_decodes([100_000] * 40)         # these alone fill the budget
    budget = toy_predict(decodes)
    assert AdaptiveChunker(toy_predict).chunk(decodes, budget * 0.9, view()) == 0
    assert AdaptiveChunker(toy_predict).chunk(BatchShape(), 1.0, view(), max_tokens=0) == 0
    # a short tail still fits where a full min chunk would not
    tail = view(prompt=1000, done=995)
    just_enough = toy_predict(BatchShape(((5, 995),)))
    assert AdaptiveChunker(toy_predict).chunk(BatchShape(), just_enough, tail) == 5


def test_chunk_never_grows_as_kv_grows():
    ch = AdaptiveChunker(toy_predict)
    req, sizes = view(prompt=300_000), []
    while req.in_prefill:
        n = ch.chunk(BatchShape(), 0.05, req)
        assert n > 0
        sizes.append(n)
        req = req.advanced(n)
    assert sizes[0] > sizes[-1] >= 32
    body = sizes[:-1]                          # the last one is clipped at the prompt end
    assert all(a >= b for a, b in zip(body, body[1:])), body
    assert sum(sizes) == 300_000


def test_chunks_never_cross_kvp_boundary():
    m = 3000                                   # not a multiple of 32 on purpose
    ch = AdaptiveChunker(toy_predict)
    req, hit = view(prompt=20_000, kvp=m), 0
    while req.in_prefill:
        n = ch.chunk(BatchShape(), 0.02, req)
        start, end = req.num_computed, req.num_computed + n
        assert start // m == (end - 1) // m, (start, n)
        hit += end % m == 0
        req = req.advanced(n)
    assert hit == 20_000 // m                  # every boundary was reached exactly
