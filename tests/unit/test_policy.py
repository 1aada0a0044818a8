"""Ordering policies (FCFS, EDF, LARS), the LARS budget share and the long-prefill predicate."""
from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.scheduler.policy import (EDF, FCFS, LARS, POLICIES, effective_budget, finish_started,
                                     is_long_prefill, make_policy, order, steal_slack)
from common.scheduler.types import ReqView


def req(rid, arrival=0.0, prompt=1000, done=0, deadline=None, started=None):
    return ReqView(rid, arrival, prompt, num_computed=done, ttft_deadline_s=deadline,
                   started=done > 0 if started is None else started)


def linear_work(per_token=1e-3):
    """(remaining, total) seconds for a model where every prompt token costs `per_token`."""
    return lambda r: (per_token * r.remaining_prompt, per_token * r.prompt_len)


def test_registry_by_name_and_unknown_name():
    assert set(POLICIES) == {"fcfs", "edf", "lars"}
    assert isinstance(make_policy("fcfs"), FCFS)
    assert isinstance(make_policy("EDF"), EDF)
    lars = make_policy("lars", rho_max=0.5)
    assert isinstance(lars, LARS) and lars.rho_max == 0.5
    with pytest.raises(ConfigError, match="sjf"):
        make_policy("sjf")
    with pytest.raises(ConfigError):
        LARS(rho_max=1.0)


def test_fcfs_orders_by_arrival_then_id():
    reqs = [req("b", 2.0), req("a", 2.0), req("c", 1.0, deadline=1.5)]
    assert [r.request_id for r in order(FCFS(), reqs, 3.0, linear_work())] == ["c", "a", "b"]


def test_edf_orders_by_deadline_and_puts_no_deadline_last():
    reqs = [req("none", 0.0), req("late", 1.0, deadline=20.0), req("soon", 2.0, deadline=5.0)]
    assert [r.request_id for r in order(EDF(), reqs, 3.0, linear_work())] == ["soon", "late", "none"]


def test_lars_rho_is_slack_over_total_work():
    # paper example at t=5: long (10 s of work, 5 s done, due at 16) and short (0.5 s, due at 6)
    long = req("long", 0.0, prompt=10_000, done=5_000, deadline=16.0)
    short = req("short", 5.0, prompt=500, deadline=6.0)
    work = linear_work(1e-3)
    assert LARS.rho(long, 5.0, *work(long)) == pytest.approx((16 - 5 - 5) / 10)
    assert LARS.rho(short, 5.0, *work(short)) == pytest.approx((6 - 5 - 0.5) / 0.5)
    assert LARS.rho(req("x"), 5.0, 1.0, 1.0) is None
    # the same absolute slack is riskier for the long job: it ranks first
    a = req("a", 0.0, prompt=10_000, deadline=12.0)       # slack 2 s over 10 s of work
    b = req("b", 0.0, prompt=1_000, deadline=3.0)         # slack 2 s over 1 s of work
    assert [r.request_id for r in order(LARS(steal_slack=False), [b, a], 0.0, work)] == ["a", "b"]
    # ...but behind a, b would finish at 11 s (due at 3): a's 2 s of slack absorb b's 1 s of work
    assert [r.request_id for r in order(LARS(), [b, a], 0.0, work)] == ["b", "a"]


def _finishes(entries, now):
    t, out = now, {}
    for view, rem, _ in entries:
        t += rem
        out[view.request_id] = t
    return out


def _met(entries, now):
    fin = _finishes(entries, now)
    return {v.request_id for v, _, _ in entries
            if v.ttft_deadline_s is not None and fin[v.request_id] <= v.ttft_deadline_s + 1e-9}


@pytest.mark.parametrize("seed", range(200))
def test_slack_stealing_only_adds_met_deadlines(seed):
    """Random queues: every request that meets its deadline in rho order (serial finish estimate)
    still meets it after stealing; a late request is never passed; requests without a deadline stay
    in the same relative order at the back."""
    import random
    rng = random.Random(seed)
    now = rng.uniform(0, 5)
    entries = []
    for i in range(rng.randint(1, 9)):
        rem = rng.choice([0.05, 0.2, 0.5, 1.0, 3.0, 8.0]) * rng.uniform(0.5, 1.5)
        total = rem * rng.uniform(1.0, 2.0)
        deadline = None if rng.random() < 0.15 else now + rng.uniform(-1.0, 15.0)
        entries.append((req(f"r{i}", rng.uniform(0, now), prompt=1000, deadline=deadline), rem, total))
    plain = LARS(steal_slack=False).arrange(entries, now)
    stolen = LARS().arrange(entries, now)
    assert sorted(e[0].request_id for e in stolen) == sorted(e[0].request_id for e in plain)
    assert _met(plain, now) <= _met(stolen, now)
    fin_plain, fin_stolen = _finishes(plain, now), _finishes(stolen, now)
    for v, rem, _ in plain:
        if v.ttft_deadline_s is not None and fin_plain[v.request_id] > v.ttft_deadline_s + 1e-9 \
                and now + rem > v.ttft_deadline_s:        # late whatever happens: nobody passes it
            assert fin_stolen[v.request_id] <= fin_plain[v.request_id] + 1e-9
    no_deadline = [e[0].request_id for e in stolen if e[0].ttft_deadline_s is None]
    assert no_deadline == [e[0].request_id for e in plain if e[0].ttft_deadline_s is None]
    assert [e[0].ttft_deadline_s is None for e in stolen] == sorted(e[0].ttft_deadline_s is None for e in stolen)


def test_slack_stealing_moves_to_the_latest_position_that_meets():
    work = linear_work(1e-3)
    # a: 4 s due at 20, b: 4 s due at 20, c: 1 s due at 6 -> c passes b only (finishes at 5)
    a, b, c = (req("a", 0.0, prompt=4000, deadline=20.0), req("b", 0.1, prompt=4000, deadline=20.0),
               req("c", 0.2, prompt=1000, deadline=6.0))
    entries = [(r, *work(r)) for r in (a, b, c)]
    assert [e[0].request_id for e in steal_slack(entries, 0.0)] == ["a", "c", "b"]
    # but not past a request it would make late: a' (4 s due at 4.5) cannot absorb c' (1 s due at 3)
    a2, c2 = req("a2", 0.0, prompt=4000, deadline=4.5), req("c2", 0.1, prompt=1000, deadline=3.0)
    assert [e[0].request_id for e in LARS().arrange([(r, *work(r)) for r in (c2, a2)], 0.0)] == ["a2", "c2"]


def test_lars_finishes_a_started_prefill_when_no_deadline_is_lost():
    """Two similar prompts: a (0.8 s, started 0.6 s ago, 0.2 s left) and b (0.9 s, just arrived),
    both due 2 s after arrival. rho ranks b first (1.1 / 0.9 = 1.22 against 1.2 / 0.8 = 1.5), and the
    two would trade places every iteration (least-laxity thrashing: both finish at ~the sum). LARS
    finishes a first: b still meets its deadline behind it."""
    work = linear_work(1e-3)
    a = req("a", 0.0, prompt=800, done=600, deadline=2.0)
    b = req("b", 0.6, prompt=900, deadline=2.6)
    entries = [(r, *work(r)) for r in (a, b)]
    assert LARS.rho(b, 0.6, *work(b)) < LARS.rho(a, 0.6, *work(a))
    assert [v.request_id for v, _, _ in LARS(finish_started=False).arrange(entries, 0.6)] == ["b", "a"]
    assert [v.request_id for v, _, _ in LARS().arrange(entries, 0.6)] == ["a", "b"]
    # the paper's rule alone (make_policy with steal_slack off) keeps rho order
    assert not make_policy("lars", steal_slack=False).finish_started
    # but a short prompt still passes a long prefill under way that would make it miss
    long = req("long", 0.0, prompt=10_000, done=5_000, deadline=16.0)
    short = req("short", 5.0, prompt=500, deadline=6.0)
    entries = [(r, *work(r)) for r in (long, short)]
    assert [v.request_id for v, _, _ in LARS().arrange(entries, 5.0)] == ["short", "long"]
    # a prompt under way never passes one with less work left that LARS runs first (d: 0.1 s, due
    # 0.15 s after arrival, rho 0.5), only those with more (b)
    d = req("d", 0.65, prompt=100, deadline=0.8)
    entries = [(r, *work(r)) for r in (a, b, d)]
    assert [v.request_id for v, _, _ in LARS(finish_started=False).arrange(entries, 0.65)] == ["d", "b", "a"]
    assert [v.request_id for v, _, _ in LARS().arrange(entries, 0.65)] == ["d", "a", "b"]


def test_replay_finishes_in_the_order_lars_reaches_by_re_ranking():
    """A started prompt (0.7 s left of 0.85, due in 2.35 s) leads a new 0.5 s one (due in 1.48 s) by
    rho (1.94 against 1.96), so a single arrangement finishes it first; re-ranked every 0.05 s step,
    the waiting one's rho falls below the running one's at the first step, and with less work left it
    keeps the lead: it finishes first, at 0.55 s, the long one having done one step. Without a
    crossing the replay is the arrangement's serial order."""
    from common.scheduler.policy import replay
    long = req("long", 0.0, prompt=850, done=150, deadline=2.35)
    short = req("short", 0.0, prompt=500, deadline=1.48)
    entries = [(long, 0.7, 0.85), (short, 0.5, 0.5)]
    assert [v.request_id for v, _, _ in LARS().arrange(entries, 0.0)] == ["long", "short"]
    out = replay(LARS(), entries, 0.0, 0.05)
    assert [rid for rid, _ in out] == ["short", "long"]
    assert out[0][1] == pytest.approx({"long": 0.05, "short": 0.5})
    assert out[1][1] == pytest.approx({"long": 0.7, "short": 0.5})
    roomy = req("roomy", 0.0, prompt=500, deadline=5.0)
    out = replay(LARS(), [(long, 0.7, 0.85), (roomy, 0.5, 0.5)], 0.0, 0.05)
    assert [rid for rid, _ in out] == ["long", "roomy"] and out[0][1] == pytest.approx({"long": 0.7, "roomy": 0.0})
    # steps grow to keep at most max_steps; FCFS never re-ranks
    assert [rid for rid, _ in replay(FCFS(), entries, 0.0, 1e-6, max_steps=4)] == ["long", "short"]


@pytest.mark.parametrize("seed", range(200))
def test_finishing_started_prefills_loses_no_deadline(seed):
    """Random queues: whatever finish_started returns, every request meeting its deadline in the
    order it was given (serial finish estimate) still meets it, and none already late finishes
    later; when it reorders, the started prefills lead in arrival order."""
    import random
    rng = random.Random(seed)
    now = rng.uniform(0, 5)
    entries = []
    for i in range(rng.randint(1, 9)):
        rem = rng.choice([0.05, 0.2, 0.5, 1.0, 3.0]) * rng.uniform(0.5, 1.5)
        total = rem * rng.uniform(1.0, 2.0)
        deadline = None if rng.random() < 0.15 else now + rng.uniform(-1.0, 10.0)
        entries.append((req(f"r{i}", rng.uniform(0, now), prompt=1000, done=rng.choice([0, 0, 300]),
                            deadline=deadline), rem, total))
    given = LARS(finish_started=False).arrange(entries, now)
    out = finish_started(given, now)
    assert [e[0].request_id for e in LARS().arrange(entries, now)] == [e[0].request_id for e in out]
    assert sorted(e[0].request_id for e in out) == sorted(e[0].request_id for e in given)
    before, after = _finishes(given, now), _finishes(out, now)
    for v, _, _ in given:
        if v.ttft_deadline_s is None:
            continue
        limit = v.ttft_deadline_s if before[v.request_id] <= v.ttft_deadline_s + 1e-9 else before[v.request_id]
        assert after[v.request_id] <= limit + 1e-9
    # only started prefills move, and only past requests with at least as much work left
    rank = {e[0].request_id: i for i, e in enumerate(given)}
    rem = {e[0].request_id: e[1] for e in given}
    assert [e[0].request_id for e in out if not e[0].started] == \
        [e[0].request_id for e in given if not e[0].started]
    for i, (v, _, _) in enumerate(out):
        for w, _, _ in out[i + 1:]:
            if rank[w.request_id] < rank[v.request_id]:        # v passed w
                assert v.started and rem[w.request_id] >= rem[v.request_id] - 1e-9
                assert v.ttft_deadline_s is not None or w.ttft_deadline_s is None


def test_lars_puts_requests_without_deadline_last_and_late_ones_first():
    work = linear_work(1e-3)
    reqs = [req("none", 0.0), req("ok", 1.0, deadline=100.0), req("late", 2.0, deadline=2.5)]
    assert [r.request_id for r in order(LARS(), reqs, 3.0, work)] == ["late", "ok", "none"]


def test_effective_budget_clips_rho():
    assert effective_budget(0.05, None) == 0.05
    assert effective_budget(0.05, -3.0) == 0.05            # out of slack: the whole budget
    assert effective_budget(0.05, 0.1) == pytest.approx(0.045)
    assert effective_budget(0.05, 7.0) == pytest.approx(0.03)   # capped at rho_max = 0.4
    assert effective_budget(0.05, 7.0, rho_max=0.5) == pytest.approx(0.025)


def test_prefill_budget_only_lars_yields():
    long = req("long", 0.0, prompt=10_000, done=5_000, deadline=16.0)
    rem, tot = linear_work()(long)
    assert FCFS().prefill_budget(0.05, long, 5.0, rem, tot) == 0.05
    assert EDF().prefill_budget(0.05, long, 5.0, rem, tot) == 0.05
    assert LARS().prefill_budget(0.05, long, 5.0, rem, tot) == pytest.approx(0.05 * 0.6)


def test_long_prefill_predicate_counts_processed_tokens():
    assert not is_long_prefill(req("a", prompt=1_000_000, done=0))
    assert is_long_prefill(req("a", prompt=1_000_000, done=256 * 1024))
    assert is_long_prefill(req("a", prompt=5000, done=2048), long_threshold=2048)
    assert not is_long_prefill(req("a", prompt=2048, done=2048), long_threshold=1024)   # prefill done
