"""Prefix caching on real grids (worker processes, gloo): a warm follow-up reuses the KV its prefix
left in the groups that hold it and gives the single-process cold run's greedy tokens and logprobs
(within 1e-5). KVP 2 with M = 64: the document's cached prefix fills group 0 and part of group 1, or
ends exactly on the group boundary; SPP 2: blocks are named only once every stage has written them.
Questions about the document that arrive together compute it once, on every grid."""
from __future__ import annotations

import pytest

from common.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.parallel.driver import ParallelEngine
from common.sampling_params import SamplingParams
from tests.fixtures.hf_models import write_random_hf_model

pytestmark = pytest.mark.timeout(300)

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
DOC = [(7 * i + 3) % 300 + 10 for i in range(100)]
# (prompt, tokens it reuses): the first computes everything; the second reuses 96 tokens (group 0's
# 64 and 32 of group 1's); the third shares only the first 64 tokens (exactly group 0).
FOLLOW_UPS = [(DOC + [21, 22, 23, 24, 25], 0), (DOC + [31, 32, 33], 96),
              (DOC[:64] + [(3 * i) % 200 + 5 for i in range(20)], 64)]


def engine_config(model, spp=1, kvp=1, caching=True) -> EngineConfig:
    return EngineConfig(model=str(model), cache=CacheConfig(block_size=16, num_blocks=32, prefix_caching=caching),
                        scheduler=SchedulerConfig(chunk_size=16),
                        parallel=ParallelConfig(spp=spp, kvp=kvp, kvp_tokens=64 if kvp > 1 else None))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_random_hf_model(tmp_path_factory.mktemp("prefix_grid"), "llama", num_attention_heads=4,
                                 num_key_value_heads=2, num_hidden_layers=4, seed=3)


@pytest.fixture(scope="module")
def cold(model):
    """One process, caching off, every prompt on a fresh engine."""
    return [LLMEngine(engine_config(model, caching=False)).generate([p], PARAMS)[0] for p, _ in FOLLOW_UPS]


@pytest.mark.parametrize("spp,kvp", [(1, 2), (2, 1)], ids=["kvp2", "spp2"])
def test_warm_follow_ups_on_a_grid_match_cold_single_process_runs(model, cold, spp, kvp):
    with ParallelEngine(engine_config(model, spp=spp, kvp=kvp)) as eng:
        got = [eng.generate([p], PARAMS)[0] for p, _ in FOLLOW_UPS]
        eng.blocks.check()
        assert eng.blocks.num_used == 0 and eng.blocks.num_cached > 0
        if kvp > 1:                                   # the cache spans both groups
            assert all(p.num_cached for p in eng.blocks.pools)
    assert [g.num_cached_tokens for g in got] == [n for _, n in FOLLOW_UPS]
    for ref, g in zip(cold, got):
        assert g.token_ids == ref.token_ids
        assert max(abs(x - y) for x, y in zip(g.logprobs, ref.logprobs)) < 1e-5


QUESTIONS = [DOC + [41 + i] * (2 + i) for i in range(3)]


@pytest.mark.parametrize("spp,kvp", [(1, 2), (2, 1)], ids=["kvp2", "spp2"])
def test_concurrent_questions_on_a_grid_compute_the_document_once(model, spp, kvp):
    """Three questions about DOC added together: the first computes its 96 tokens of full blocks (over
    both groups with KVP 2), the other two wait and reuse them; tokens and logprobs equal the cold
    single-process runs (within 1e-5)."""
    refs = [LLMEngine(engine_config(model, caching=False)).generate([q], PARAMS)[0] for q in QUESTIONS]
    with ParallelEngine(engine_config(model, spp=spp, kvp=kvp)) as eng:
        got = eng.generate(QUESTIONS, PARAMS)
        eng.blocks.check()
        assert eng.blocks.num_used == 0
    assert [g.num_cached_tokens for g in got] == [0, 96, 96]
    for ref, g in zip(refs, got):
        assert g.token_ids == ref.token_ids
        assert max(abs(x - y) for x, y in zip(g.logprobs, ref.logprobs)) < 1e-5
