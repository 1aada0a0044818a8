"""Prefix caching through the engine on a tiny random-weight HF Llama (float32, CPU): a warm request
(its prefix's KV reused) gives the same greedy tokens and logprobs, within float32 rounding, as the
same prompt run cold with caching off, whatever the chunking; a multi-turn chat reuses the previous
turn's prompt and answer; concurrent requests share a prefix; under memory pressure the cache is
evicted, never a block in use, and the follow-up falls back to prefill with identical outputs."""
from __future__ import annotations

import random

import pytest

from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.model.loader import load_checkpoint
from common.sampling_params import SamplingParams
from tests.fixtures.hf_models import write_random_hf_model

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=11)
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_random_hf_model(tmp_path_factory.mktemp("prefix") / "llama", seed=7, tokenizer=False)
    return load_checkpoint(str(path))


def make_engine(checkpoint, *, caching=True, chunk=32, num_blocks=64, **sched) -> LLMEngine:
    cfg = EngineConfig(model="(preloaded)",
                       cache=CacheConfig(block_size=16, num_blocks=num_blocks, prefix_caching=caching),
                       scheduler=SchedulerConfig(chunk_size=chunk, **sched))
    return LLMEngine(cfg, checkpoint)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 320) for _ in range(n)]


def checked(engine: LLMEngine) -> list[tuple[str, int, int]]:
    """Wraps the model runner: records every item (request, start, tokens) and checks the pool."""
    calls = []
    run = engine.executor.runner.run

    def wrapped(items):
        calls.extend((it.request.request_id, it.start, it.num_tokens) for it in items)
        engine.pool.check()
        return run(items)

    engine.executor.runner.run = wrapped
    return calls


def cold(checkpoint, prompt, params=GREEDY, chunk=4096):
    return make_engine(checkpoint, caching=False, chunk=chunk).generate([prompt], params)[0]


def same(got, ref) -> None:
    assert got.token_ids == ref.token_ids
    assert got.logprobs == pytest.approx(ref.logprobs, abs=LOGPROB_TOL, rel=0)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("chunk", [32, 24], ids=["chunk32", "chunk24"])
def test_warm_questions_about_a_document_match_cold_runs(checkpoint, chunk, params):
    """A 100-token document, then two questions about it: each question's prompt starts with the
    document's 96 tokens of full blocks, which it reuses (chunk 24: boundaries unlike the cold run's)."""
    doc = tokens(100, seed=1)
    q1, q2 = doc + tokens(7, seed=2), doc + tokens(11, seed=3)
    engine = make_engine(checkpoint, chunk=chunk)
    calls = checked(engine)
    first = engine.generate([q1], params)[0]
    assert first.num_cached_tokens == 0
    second = engine.generate([q2], params)[0]
    assert second.num_cached_tokens == 96
    starts = [s for rid, s, n in calls if rid == "req-1"]
    assert starts[0] == 96                             # its prefill began after the cached prefix
    same(first, cold(checkpoint, q1, params))
    same(second, cold(checkpoint, q2, params))
    engine.pool.check()
    assert engine.pool.num_used == 0 and engine.pool.num_cached > 0


def test_a_multi_turn_chat_reuses_the_previous_turns_prompt_and_answer(checkpoint):
    engine = make_engine(checkpoint)
    history = tokens(40, seed=4)
    for turn in range(3):
        res = engine.generate([history], GREEDY)[0]
        same(res, cold(checkpoint, history))
        if turn:     # all but the previous turn's last token (its KV was never computed) is cached
            assert res.num_cached_tokens == (len(history) - 1 - len(new)) // 16 * 16 > 0
        new = tokens(9, seed=10 + turn)
        history = history + res.token_ids + new
    assert engine.pool.num_used == 0


def test_concurrent_requests_sharing_a_prefix_match_their_cold_runs(checkpoint):
    """Two requests with one 64-token prefix, together (the second waits for the first to compute
    it), then a third while the first two decode: it shares their blocks (reference counts 2+)."""
    doc = tokens(64, seed=5)
    ps = [doc + tokens(5, seed=6), doc + tokens(3, seed=7), doc + tokens(8, seed=8)]
    engine = make_engine(checkpoint)
    calls = checked(engine)
    r0 = engine.add_request(ps[0], GREEDY)
    r1 = engine.add_request(ps[1], GREEDY)
    got = {r0: [], r1: []}
    lps = {r0: [], r1: []}
    shared = []
    while engine.has_unfinished():
        for o in engine.step():
            if o.token_id is not None:
                got[o.request_id].append(o.token_id)
                lps[o.request_id].append(o.logprob)
        if len(got[r0]) == 2 and len(got) == 2:
            r2 = engine.add_request(ps[2], GREEDY)
            got[r2], lps[r2] = [], []
        if len(got) == 3 and r2 in engine.pool.tables and not shared:
            t2 = engine.pool.table(r2)[:4]
            shared = [engine.pool.ref_counts[b] for b in t2]
    assert [s for rid, s, n in calls if rid == r2][0] == 64
    assert len(shared) == 4 and all(c >= 2 for c in shared)
    for rid, p in zip((r0, r1, r2), ps):
        ref = cold(checkpoint, p)
        assert got[rid] == ref.token_ids
        assert lps[rid] == pytest.approx(ref.logprobs, abs=LOGPROB_TOL, rel=0)
    engine.pool.check()
    assert engine.pool.num_used == 0


@pytest.mark.parametrize("sched", [{}, dict(policy="lars", chunking="adaptive")], ids=["fcfs", "lars"])
def test_concurrent_questions_about_a_document_compute_it_once(checkpoint, sched):
    """Four questions about one 100-token document (96 tokens of full blocks), added together: the
    model computes the document once (counted over every item the runner saw), the other three
    reuse its 96 tokens, and every answer matches its cold run with caching off."""
    doc = tokens(100, seed=50)
    qs = [doc + tokens(3 + i, seed=51 + i) for i in range(4)]
    engine = make_engine(checkpoint, **sched)
    calls = checked(engine)
    got = engine.generate(qs, GREEDY)
    assert sorted(g.num_cached_tokens for g in got) == [0, 96, 96, 96]
    prompt_tokens = sum(len(q) for q in qs)
    decode_tokens = len(qs) * (GREEDY.max_tokens - 1)
    assert sum(n for _, _, n in calls) == prompt_tokens - 3 * 96 + decode_tokens
    for g, q in zip(got, qs):
        same(g, cold(checkpoint, q))
    engine.pool.check()
    assert engine.pool.num_used == 0


def test_eviction_under_memory_pressure_falls_back_to_prefill(checkpoint):
    """12 blocks of 16. Document A (100 tokens) is cached, then document B (150 tokens) needs most of
    the cache and evicts A's blocks (the least recently used); A's question then prefills again,
    from whatever is left, to the same outputs. No block in use is evicted: every step checks the pool
    and every output matches its cold run."""
    doc_a, doc_b = tokens(100, seed=20), tokens(150, seed=21)
    engine = make_engine(checkpoint, num_blocks=12)
    calls = checked(engine)
    qa = doc_a + tokens(6, seed=22)
    first = engine.generate([doc_a + tokens(4, seed=23)], GREEDY)[0]
    assert engine.pool.num_cached == 6
    b = engine.generate([doc_b], GREEDY)[0]
    assert engine.pool.evictions > 0
    again = engine.generate([qa], GREEDY)[0]
    assert again.num_cached_tokens < 96
    assert [s for rid, s, n in calls if rid == "req-2"][0] == again.num_cached_tokens
    same(first, cold(checkpoint, doc_a + tokens(4, seed=23)))
    same(b, cold(checkpoint, doc_b))
    same(again, cold(checkpoint, qa))
    engine.pool.check()
    assert engine.pool.num_used == 0


def test_caching_off_prefills_everything(checkpoint):
    doc = tokens(40, seed=30)
    engine = make_engine(checkpoint, caching=False)
    calls = checked(engine)
    engine.generate([doc], GREEDY)
    res = engine.generate([doc + [5, 6]], GREEDY)[0]
    assert res.num_cached_tokens == 0 and [s for rid, s, n in calls if rid == "req-1"][0] == 0
    assert engine.pool.num_cached == 0


def test_metrics_count_hit_tokens_and_only_computed_prompt_tokens(checkpoint):
    """The engine thread's StepRecorder: query and hit tokens per started request; the prompt tokens
    counted as computed leave the cached prefix out; the cached blocks show as reclaimable."""
    from common.engine.async_engine import StepRecorder
    from common.metrics import Metrics, new_registry
    registry = new_registry(process_collector=False)
    rec = StepRecorder(Metrics(registry, role="decode", pool="p", instance="d0", model_name="m"))
    engine = make_engine(checkpoint)
    doc = tokens(70, seed=40)
    for prompt in (doc + [5], doc + [6, 7]):
        rid = engine.add_request(prompt, GREEDY)
        rec.track(rid, 0)
        while engine.has_unfinished():
            rec.step(0.01, engine.step(), engine.stats())

    def value(name, **labels):
        return registry.get_sample_value(name, {"pool": "p", "role": "decode", "instance": "d0", **labels})

    assert value("mnemosyne_prefix_cache_query_tokens_total", model_name="m") == 71 + 72
    assert value("mnemosyne_prefix_cache_hit_tokens_total", model_name="m") == 64
    assert value("mnemosyne_tokens_total", kind="prompt", model_name="m") == 71 + 72 - 64
    cached = engine.pool.num_cached
    assert cached > 0 and value("mnemosyne_kv_blocks_cached", group="0", tp_rank="0") == cached
    assert value("mnemosyne_kv_blocks_free", group="0", tp_rank="0") == engine.pool.num_blocks
