"""The engine loop on a tiny random-weight HF Llama (float32, CPU): preemption mid-prefill and
resumption, per-request streaming (iterators and callbacks), cancellation that frees blocks,
continuous batching of decodes and prefill chunks in one forward pass, identical greedy tokens
under LARS + adaptive chunking and FCFS + fixed chunks, and top log-probabilities."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.engine.stream import TokenEvent
from common.errors import CapacityError
from common.model.loader import load_checkpoint
from common.perf_model.analytic import AnalyticModel
from common.perf_model.calibrated import CalibratedModel
from common.perf_model.online import OnlineCorrection
from common.sampling_params import SamplingParams
from tests.fixtures.hf_models import write_random_hf_model

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
# chunks shrink as the context grows: 1 ms + 20 us/token + 1 us per query-key pair, 10 ms budget
ATTN = CalibratedModel([2e-5, 1e-6, 1e-6, 0.0, 1e-3])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_random_hf_model(tmp_path_factory.mktemp("loop") / "llama", seed=5, tokenizer=False)
    return load_checkpoint(str(path))


def make_engine(checkpoint, *, block=16, num_blocks=64, perf_model=None, prefix_caching=True,
                **sched) -> LLMEngine:
    sched.setdefault("chunk_size", 32)
    cfg = EngineConfig(model="(preloaded)", cache=CacheConfig(block_size=block, num_blocks=num_blocks,
                                                             prefix_caching=prefix_caching),
                       scheduler=SchedulerConfig(**sched))
    return LLMEngine(cfg, checkpoint, perf_model=perf_model)


def prompts(lengths, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 320) for _ in range(n)] for n in lengths]


def alone(checkpoint, prompt, params=GREEDY) -> list[int]:
    return make_engine(checkpoint, chunk_size=4096).generate([prompt], params)[0].token_ids


def record_batches(engine: LLMEngine) -> list[list[tuple[str, int, int, bool]]]:
    """Wraps the model runner: every forward pass's (request, start, tokens, decode?) items."""
    calls = []
    run = engine.executor.runner.run

    def wrapped(items):
        calls.append([(it.request.request_id, it.start, it.num_tokens,
                       bool(it.request.output_ids) and it.start == it.request.num_tokens - 1)
                      for it in items])
        engine.pool.check()
        return run(items)

    engine.executor.runner.run = wrapped
    return calls


# ---- top log-probabilities ---------------------------------------------------------------------------
@pytest.mark.parametrize("base", [GREEDY, SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0, seed=3)],
                         ids=["greedy", "seeded"])
def test_top_logprobs_change_no_token_and_describe_every_position(checkpoint, base):
    """Two prompts batched (one in chunks): asking for top_logprobs=4 gives the same tokens and
    logprobs as not asking, and 4 sorted alternatives per token that agree with the chosen one."""
    ps = prompts((30, 70), seed=9)
    ref = make_engine(checkpoint).generate(ps, base)
    got = make_engine(checkpoint).generate(ps, replace(base, top_logprobs=4))
    for r, g in zip(ref, got):
        assert (g.token_ids, g.logprobs) == (r.token_ids, r.logprobs) and len(g.token_ids) == 12
        assert r.top_logprobs == [] and len(g.top_logprobs) == len(g.token_ids)
        for token, lp, top in zip(g.token_ids, g.logprobs, g.top_logprobs):
            ids, values = [t for t, _ in top], [v for _, v in top]
            assert len(top) == 4 and values == sorted(values, reverse=True) and values[0] >= lp
            if token in ids:
                assert values[ids.index(token)] == lp
            if base.greedy:
                assert top[0] == (token, lp)


def test_streams_carry_top_logprobs(checkpoint):
    engine = make_engine(checkpoint)
    evs = [ev for ev in engine.stream(prompts((20,), seed=4)[0], replace(GREEDY, max_tokens=5, top_logprobs=2))
           if ev.token_id is not None]
    assert len(evs) == 5 and all(len(ev.top_logprobs) == 2 and ev.top_logprobs[0] == (ev.token_id, ev.logprob)
                                 for ev in evs)


# ---- preemption ------------------------------------------------------------------------------------
@pytest.mark.parametrize("caching", [False, True], ids=["recompute", "prefix-cache"])
@pytest.mark.parametrize("mode", ["fcfs-fixed", "lars-adaptive"])
def test_request_preempted_mid_prefill_resumes_to_the_same_greedy_tokens(checkpoint, mode, caching):
    """12 blocks of 16 tokens. `b` (40 tokens, decoding 40) arrives first, `a` (150 tokens) second.
    While `a` is mid-prefill the cache fills; `b`'s decode needs a block and the latest arrival, `a`,
    is preempted: its KV is dropped and recomputed once `b` is done (with prefix caching, from the
    part of its full blocks still cached). Both match their solo runs."""
    b_prompt, a_prompt = prompts((40, 150), seed=1)
    b_params = SamplingParams(max_tokens=40, ignore_eos=True)
    ref_b, ref_a = alone(checkpoint, b_prompt, b_params), alone(checkpoint, a_prompt)
    kw = dict(chunk_size=32) if mode == "fcfs-fixed" else dict(
        policy="lars", chunking="adaptive", iteration_budget_s=0.006, perf_model=ATTN)
    engine = make_engine(checkpoint, num_blocks=12, prefix_caching=caching, **kw)
    calls = record_batches(engine)
    rb = engine.add_request(b_prompt, b_params, "b")
    first_b = []
    while not first_b:                                     # b prefilled, decoding
        first_b = [o.token_id for o in engine.step() if o.token_id is not None]
    ra = engine.add_request(a_prompt, GREEDY, "a")
    req_a = engine.scheduler.requests[ra]
    preempted_at = []                                      # a's cached tokens when it was preempted
    schedule = engine.scheduler.schedule

    def watched():
        done_before = req_a.num_computed
        out = schedule()
        if ra in out.preempted:
            preempted_at.append((done_before, len(req_a.output_ids)))
        return out

    engine.scheduler.schedule = watched
    got = {rb: first_b, ra: []}
    while engine.has_unfinished():
        outs = engine.step()
        assert outs, "stuck"
        for o in outs:
            if o.token_id is not None:
                got[o.request_id].append(o.token_id)
        engine.pool.check()
    preempted_mid_prefill = any(0 < done < len(a_prompt) and n_out == 0 for done, n_out in preempted_at)
    assert preempted_mid_prefill, [c for c in calls if any(r == "a" for r, *_ in c)]
    assert got[ra] == ref_a and got[rb] == ref_b
    assert engine.pool.num_used == 0
    a_spans = [(s, n) for c in calls for r, s, n, _ in c if r == "a"]
    restarts = [s for (s0, n0), (s, _) in zip(a_spans, a_spans[1:]) if s != s0 + n0]
    if caching:                          # resumed after its cached full blocks, not from scratch
        assert restarts and all(0 < s < len(a_prompt) and s % 16 == 0 for s in restarts), a_spans
    else:
        assert restarts and all(s == 0 for s in restarts), a_spans   # its prompt was started twice


# ---- streaming and cancellation -------------------------------------------------------------------
def test_streams_yield_each_requests_tokens_in_order(checkpoint):
    ps = prompts((70, 9, 33))
    refs = [alone(checkpoint, p) for p in ps]
    engine = make_engine(checkpoint)
    streams = [engine.stream(p, GREEDY) for p in ps]
    events: dict[int, list[TokenEvent]] = {i: [] for i in range(3)}
    live = set(range(3))
    while live:                                  # consume them in turn: one shared batch
        for i in sorted(live):
            try:
                events[i].append(next(streams[i]))
            except StopIteration:
                live.discard(i)
    for i, ref in enumerate(refs):
        evs = events[i]
        assert [e.token_id for e in evs] == ref
        assert [e.index for e in evs] == list(range(len(ref)))
        assert [e.finish_reason for e in evs] == [None] * (len(ref) - 1) + ["length"]
        assert streams[i].token_ids == ref and streams[i].finish_reason == "length"
    assert engine.pool.num_used == 0


def test_callbacks_see_tokens_as_they_are_produced(checkpoint):
    ps = prompts((20, 50), seed=3)
    engine = make_engine(checkpoint)
    seen: list[tuple[str, int, int | None]] = []
    rids = [engine.add_request(p, GREEDY) for p in ps]
    for rid in rids:
        engine.subscribe(rid, lambda ev: seen.append((ev.request_id, ev.index, ev.token_id)))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        for rid in rids:                          # a callback ran in the step that sampled the token
            req = engine.scheduler.requests.get(rid)
            if req is not None:
                assert sum(1 for r, _, _ in seen if r == rid) == len(req.output_ids)
    for rid, p in zip(rids, ps):
        mine = [(i, t) for r, i, t in seen if r == rid]
        assert [i for i, _ in mine] == list(range(GREEDY.max_tokens))
        assert [t for _, t in mine] == alone(checkpoint, p)


@pytest.mark.parametrize("when", ["mid-prefill", "mid-decode"])
def test_cancel_mid_stream_frees_blocks_and_others_continue(checkpoint, when):
    ps = prompts((120, 30, 45), seed=2)
    refs = [alone(checkpoint, p) for p in ps]
    engine = make_engine(checkpoint, chunk_size=16)
    victim, *others = [engine.stream(p, GREEDY) for p in ps]
    req = engine.scheduler.requests[victim.request_id]
    if when == "mid-prefill":
        while req.num_computed == 0:
            engine.step()
        assert 0 < req.num_computed < req.prompt_len
    else:
        for _ in range(3):
            next(victim)
        assert req.output_ids and req.num_computed >= req.prompt_len
    used = engine.pool.num_used
    assert victim.cancel() is True and victim.cancel() is False
    engine.pool.check()
    assert engine.pool.num_used < used and victim.request_id not in engine.pool.tables
    rest = list(victim)                              # the abort event, then the end
    assert rest[-1].finish_reason == "abort" and rest[-1].token_id is None
    assert victim.done and victim.finish_reason == "abort"
    for s, ref in zip(others, refs[1:]):
        assert list(s.tokens()) == ref
    engine.pool.check()
    assert engine.pool.num_used == 0 and not engine.has_unfinished()


def test_a_stream_that_outgrows_the_whole_cache_raises_capacity_error(checkpoint):
    """4 blocks of 16 tokens. The growing request is preempted for a newcomer (which completes), then
    recomputed, and at 64 tokens it can grow no further: its stream raises CapacityError (it is
    aborted, its blocks freed) instead of the engine spinning."""
    engine = make_engine(checkpoint, num_blocks=4, block=16)
    blocker = engine.stream(prompts((40,))[0], SamplingParams(max_tokens=100, ignore_eos=True))
    next(blocker)
    s = engine.stream(prompts((30,), seed=9)[0], GREEDY)
    assert list(s.tokens()) == alone(checkpoint, prompts((30,), seed=9)[0])
    with pytest.raises(CapacityError):
        list(blocker)
    assert len(blocker.token_ids) == 64 - 40 + 1          # the last one it had no room to cache
    engine.pool.check()
    assert engine.pool.num_used == 0 and not engine.has_unfinished()


# ---- continuous batching and exactness across chunkings --------------------------------------------
def test_one_forward_pass_mixes_decodes_and_prefill_chunks(checkpoint):
    ps = prompts((8, 12, 100, 90), seed=4)
    refs = [alone(checkpoint, p) for p in ps]
    engine = make_engine(checkpoint, chunk_size=24)
    calls = record_batches(engine)
    results = engine.generate(ps, GREEDY)
    assert [r.token_ids for r in results] == refs
    mixed = [c for c in calls if any(d for *_, d in c) and any(n > 1 for _, _, n, _ in c)]
    assert mixed, calls
    assert max(len({r for r, *_ in c}) for c in mixed) >= 3       # several requests in one pass


def test_lars_adaptive_gives_the_same_greedy_tokens_as_fcfs_fixed(checkpoint):
    ps = prompts((150, 7, 64, 33, 101), seed=6)
    fixed = make_engine(checkpoint, chunk_size=32)
    lars = make_engine(checkpoint, policy="lars", chunking="adaptive", iteration_budget_s=0.01,
                       perf_model=ATTN)
    lars_calls = record_batches(lars)
    now = lars.scheduler.clock()
    rids = [lars.add_request(p, GREEDY, ttft_deadline_s=now + 0.05 * (5 - i)) for i, p in enumerate(ps)]
    got = {r: [] for r in rids}
    while lars.has_unfinished():
        for o in lars.step():
            if o.token_id is not None:
                got[o.request_id].append(o.token_id)
    ref = fixed.generate(ps, GREEDY)
    assert [got[r] for r in rids] == [r.token_ids for r in ref]
    sizes = {n for c in lars_calls for _, _, n, d in c if not d}
    assert len(sizes - {32}) >= 2, sizes                         # really other chunkings
    first = [r for r, s, n, d in lars_calls[0]]
    assert first[0] == rids[4]                                    # the most urgent went first


def test_engine_falls_back_to_the_analytic_model_without_a_profile(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MNEMOSYNE_CACHE", str(tmp_path))
    engine = make_engine(checkpoint, policy="lars", chunking="adaptive")
    assert isinstance(engine.perf_model, OnlineCorrection)
    assert isinstance(engine.perf_model.base, AnalyticModel)
    assert engine.generate(prompts((40,)), GREEDY)[0].token_ids == alone(checkpoint, prompts((40,))[0])
    assert engine.perf_model.observations > 0            # every step's time corrected the model
    # its stats (what the heartbeat and the gauge publish) carry the scale it runs at now
    assert engine.stats().model_scale == pytest.approx(engine.perf_model.scale)
    assert engine.scheduler.table.scale == pytest.approx(engine.perf_model.scale)
    assert make_engine(checkpoint).stats().model_scale is None       # FCFS + fixed: no model
