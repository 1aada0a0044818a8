"""The one-server simulator: the paper's scheduling examples and the batch invariants.

Work is given in predicted seconds: with `LINEAR` every prompt token costs 0.1 ms, so a 10 s prefill
is 100,000 tokens and a 0.5 s one is 5,000. `ATTN` adds quadratic attention, per-sequence and
per-iteration costs, so chunks must shrink as the KV grows.
"""
from __future__ import annotations

import random

import pytest

from common.errors import ConfigError
from common.perf_model.calibrated import CalibratedModel
from common.scheduler.chunking import ChunkingConfig
from common.scheduler.simulate import SimConfig, SimRequest, simulate

PER_TOKEN = 1e-4
LINEAR = CalibratedModel([PER_TOKEN, 0, 0, 0, 0])
ATTN = CalibratedModel([2e-5, 3e-10, 5e-9, 1e-4, 2e-3])     # token, attn pair, kv token, seq, const
BUDGET = 0.05
TOL = ChunkingConfig().tolerance


def tokens(seconds: float) -> int:
    return round(seconds / PER_TOKEN)


def three_requests(short_work_s: float):
    """Paper: long w=10 s, d=16 s at t=0; two short ones, d=1 s, arriving at t=5."""
    return [SimRequest("long", 0.0, tokens(10.0), ttft_slo_s=16.0),
            SimRequest("s1", 5.0, tokens(short_work_s), ttft_slo_s=1.0),
            SimRequest("s2", 5.0, tokens(short_work_s), ttft_slo_s=1.0)]


def run(reqs, policy, model=LINEAR, **kw):
    kw.setdefault("long_threshold", 32_768)
    return simulate(reqs, model, SimConfig(t_target_s=BUDGET, policy=policy, **kw))


def test_three_requests_paper_numbers():
    """w_short = 0.5 s. FCFS runs the long one to the end first: both short ones miss by ~5 s.
    These exact numbers leave the short ones no slack at all (together they need the whole of
    [5 s, 6 s]), so the iteration already running at t = 5 s makes one of them miss by a fraction of
    an iteration under any policy; LARS still serves both within ~0.25 s of their deadline."""
    reqs = three_requests(0.5)
    fcfs = run(reqs, "fcfs")
    assert fcfs.met("long") and not fcfs.met("s1") and not fcfs.met("s2")
    assert fcfs.ttft("s1") > 5.0 and fcfs.ttft("s2") > 5.0
    for policy in ("edf", "lars"):
        res = run(reqs, policy)
        assert res.met("long"), policy
        assert max(res.ttft("s1"), res.ttft("s2")) < 1.3, policy


def test_three_requests_lars_meets_all_fcfs_misses_short_ones():
    """The same example with shorts of w = 0.25 s (some slack left): LARS meets every deadline,
    FCFS misses both short ones."""
    reqs = three_requests(0.25)
    lars, fcfs = run(reqs, "lars"), run(reqs, "fcfs")
    ids = ("long", "s1", "s2")
    assert all(lars.met(r) for r in ids), {r: lars.ttft(r) for r in ids}
    assert fcfs.met("long") and not fcfs.met("s1") and not fcfs.met("s2")
    # LARS lets the long one (rho 0.6 at t=5) run first and yield a share; the short ones overtake
    # as their slack shrinks: the long one is preempted at a chunk boundary, then resumes
    long_starts = [s for s, _, _ in lars.traces["long"].chunks]
    gaps = [b - a for a, b in zip(long_starts, long_starts[1:])]
    assert max(gaps) > 3 * BUDGET


def steady_shorts(period=0.25, work_s=0.2, until=30.0):
    reqs = [SimRequest("long", 0.0, tokens(10.0), ttft_slo_s=16.0)]
    t, i = 0.1, 0
    while t < until:
        reqs.append(SimRequest(f"s{i}", round(t, 6), tokens(work_s), ttft_slo_s=1.0))
        t, i = t + period, i + 1
    return reqs


def test_edf_starves_long_request_under_steady_short_load_then_convoys():
    """80% load of short requests, each due 1 s after arrival: their deadlines stay ahead of the
    long one's (16 s) until t = 15 s, so EDF gives the long one only the leftover capacity. Once its
    deadline has passed it is the earliest deadline in the queue and runs alone: a convoy in which
    every short request that arrives misses."""
    res = run(steady_shorts(), "edf")
    long = res.traces["long"]
    done_by_deadline = sum(n for start, n, _ in long.chunks if start < long.deadline_s)
    assert done_by_deadline < 0.5 * tokens(10.0)
    assert not res.met("long") and long.ttft > 20.0
    window = (long.deadline_s + 0.5, long.first_token_s - 1.0)
    convoy = [t for rid, t in res.traces.items()
              if rid != "long" and window[0] <= t.request.arrival_s <= window[1]]
    assert convoy and not any(t.met_ttft for t in convoy)


def test_single_long_prompt_chunks_never_grow():
    res = run([SimRequest("long", 0.0, 400_000)], "lars", model=ATTN)
    sizes = [n for _, n, _ in res.traces["long"].chunks]
    body = sizes[:-1]                                  # the last chunk is clipped at the prompt end
    assert all(a >= b for a, b in zip(body, body[1:]))
    assert sizes[0] >= 4 * sizes[-2]                  # and they really do shrink
    assert all(b.predicted_s <= BUDGET * (1 + TOL) for b in res.batches)


def mixed_workload(seed=0, n_short=60, n_long=3, rate=6.0):
    rng = random.Random(seed)
    reqs, t = [], 0.0
    for i in range(n_short):
        t += rng.expovariate(rate)
        reqs.append(SimRequest(f"s{i}", t, rng.randint(50, 3000), max_new_tokens=rng.randint(1, 40),
                               ttft_slo_s=2.0, tbt_slo_s=BUDGET))
    for i in range(n_long):
        reqs.append(SimRequest(f"L{i}", 0.2 * i, rng.randint(60_000, 120_000), max_new_tokens=5,
                               ttft_slo_s=60.0))
    return reqs


@pytest.mark.parametrize("policy", ["fcfs", "edf", "lars"])
def test_mixed_workload_batch_invariants(policy):
    m = 7000                                           # KVP group size, off the 32-token grid
    reqs = mixed_workload()
    res = run(reqs, policy, model=ATTN, long_threshold=16_384, kvp_tokens=m)
    by_id = {r.request_id: r for r in reqs}
    assert all(len(t.token_times) == t.request.max_new_tokens for t in res.traces.values())
    longs_waited = 0
    for b in res.batches:
        if b.chunks and not b.forced:
            assert b.predicted_s <= BUDGET * (1 + TOL), b           # within the budget (+10%)
        assert len(b.long_ids) <= 1                                   # never two long prefills
        for rid, n, ctx in b.chunks:
            assert n > 0 and ctx + n <= by_id[rid].prompt_len
            assert ctx // m == (ctx + n - 1) // m, (rid, ctx, n)      # never crosses a KVP boundary
        longs_waited += any(rid.startswith("L") for rid in b.waiting) and bool(b.long_ids)
    assert longs_waited > 0                          # the one-long rule was exercised
    # every chunk of every request is contiguous, and requests that got 0 were served later
    for t in res.traces.values():
        pos = 0
        for _, n, ctx in t.chunks:
            assert ctx == pos
            pos += n
        assert pos == t.request.prompt_len
    requeued = {rid for b in res.batches for rid in b.waiting}
    assert requeued and all(res.traces[rid].first_token_s is not None for rid in requeued)


def test_adaptive_keeps_decode_tbt_where_fixed_chunks_do_not():
    """Decodes co-run with a long prefill: fixed 2048-token chunks push iterations (hence TBT) far
    past the budget at long context; adaptive chunks keep every iteration within it."""
    reqs = [SimRequest("long", 0.0, 300_000)] + [
        SimRequest(f"d{i}", 0.01 * i, 100, max_new_tokens=400, tbt_slo_s=BUDGET) for i in range(4)]
    adaptive = run(reqs, "fcfs", model=ATTN)
    fixed = run(reqs, "fcfs", model=ATTN, adaptive=False, chunk_size=2048)
    worst = lambda res: max(max(res.traces[f"d{i}"].tbts) for i in range(4))
    assert worst(adaptive) <= BUDGET * (1 + TOL)
    assert worst(fixed) > 2 * BUDGET


def test_input_validation():
    with pytest.raises(ConfigError):
        simulate([SimRequest("a", 0.0, 10), SimRequest("a", 1.0, 10)], LINEAR)
    with pytest.raises(ConfigError):
        simulate([SimRequest("a", 0.0, 0)], LINEAR)
    with pytest.raises(ConfigError):
        simulate([SimRequest("a", 0.0, 10)], LINEAR, SimConfig(policy="nope"))
