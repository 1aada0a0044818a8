"""The engine scheduler in planned mode (LARS / EDF / FCFS with adaptive or fixed chunks), no model.

A virtual clock stands in for the forward pass: each scheduled batch lasts exactly what the
performance model predicts for it, then is postprocessed (every sampling item gets token 1). KV blocks
come from the real BlockPool, so admission and preemption are the engine's own.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from common.config import SchedulerConfig
from common.errors import ConfigError
from common.kv_cache.block_pool import BlockPool
from common.perf_model.calibrated import CalibratedModel
from common.sampling_params import SamplingParams
from common.scheduler.policy import LARS
from common.scheduler.request import Request, Status
from common.scheduler.scheduler import Scheduler, SchedulerOutput
from common.scheduler.types import BatchShape

PER_TOKEN = 1e-4
LINEAR = CalibratedModel([PER_TOKEN, 0, 0, 0, 0])            # work in seconds = tokens * 0.1 ms
ATTN = CalibratedModel([2e-5, 3e-10, 5e-9, 1e-4, 2e-3])       # token, attn pair, kv token, seq, const
BUDGET = 0.05
TOL = 0.10


def tokens(seconds: float) -> int:
    return round(seconds / PER_TOKEN)


@dataclass
class Spec:
    rid: str
    arrival_s: float
    prompt_len: int
    max_tokens: int = 1
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None


@dataclass
class Run:
    sched: Scheduler
    batches: list[tuple[float, SchedulerOutput]] = field(default_factory=list)
    shapes: list[BatchShape] = field(default_factory=list)       # taken when each was scheduled
    progress: list[list[int]] = field(default_factory=list)      # prefill positions before each batch

    def in_prefill_past(self, threshold: int) -> list[int]:
        """Per batch: requests that were in prefill with >= threshold tokens done when it was planned."""
        return [sum(p >= threshold for p in ps) for ps in self.progress]
    first_token: dict[str, float] = field(default_factory=dict)
    reqs: dict[str, Request] = field(default_factory=dict)
    specs: dict[str, Spec] = field(default_factory=dict)

    seen: dict[str, float] = field(default_factory=dict)          # when the scheduler got each request

    def ttft(self, rid: str) -> float:
        return self.first_token[rid] - self.seen[rid]

    def met(self, rid: str) -> bool:
        return self.ttft(rid) <= self.specs[rid].ttft_slo_s + 1e-9

    def chunks(self, rid: str) -> list[tuple[float, int, int]]:
        """(start time, first position, tokens) of each item of `rid`."""
        return [(t, it.start, it.num_tokens) for t, out in self.batches for it in out.items
                if it.request.request_id == rid]


def make_sched(model=ATTN, blocks: int = 20_000, block_size: int = 16, kvp_tokens: int | None = None,
               clock=None, **cfg) -> Scheduler:
    cfg.setdefault("policy", "lars")
    cfg.setdefault("chunking", "adaptive")
    cfg.setdefault("iteration_budget_s", BUDGET)
    cfg.setdefault("max_num_seqs", 256)
    cfg.setdefault("max_batch_tokens", 1 << 20)
    return Scheduler(SchedulerConfig(**cfg), BlockPool(blocks, block_size), kvp_tokens=kvp_tokens,
                     clock=clock or (lambda: 0.0), perf_model=model)


def drive(specs: list[Spec], model=ATTN, max_batches: int = 100_000, at_boundaries: bool = False,
          **kw) -> Run:
    """Runs the requests to completion in virtual time; checks the pool after every step.

    A request that arrives while a batch runs is handed to the scheduler when the batch ends. TTFT and
    deadlines count from the arrival, or with `at_boundaries` from that hand-over: the paper's fluid
    example sampled at iteration boundaries, where no iteration-level scheduler can act sooner."""
    now = [0.0]
    sched = make_sched(model, clock=lambda: now[0], **kw)
    run = Run(sched, specs={s.rid: s for s in specs})
    pending = sorted(specs, key=lambda s: (s.arrival_s, s.rid))
    for _ in range(max_batches):
        while pending and pending[0].arrival_s <= now[0] + 1e-12:
            s = pending.pop(0)
            arrival = max(s.arrival_s, now[0]) if at_boundaries else s.arrival_s
            run.seen[s.rid] = arrival
            deadline = None if s.ttft_slo_s is None else arrival + s.ttft_slo_s
            req = Request(s.rid, [7] * s.prompt_len, SamplingParams(max_tokens=s.max_tokens, ignore_eos=True),
                          arrival, ttft_deadline_s=deadline, tbt_slo_s=s.tbt_slo_s)
            run.reqs[s.rid] = req
            sched.add(req)
        if not sched.has_unfinished():
            if not pending:
                return run
            now[0] = pending[0].arrival_s
            continue
        run.progress.append([r.next_pos for r in sched.requests.values() if r.unscheduled > 1])
        out = sched.schedule()
        assert out.items, "nothing scheduled although requests wait"
        assert out.predicted_s == pytest.approx(model.predict(out.shape()))
        run.batches.append((now[0], out))
        run.shapes.append(out.shape())
        now[0] += out.predicted_s
        sampled = {it.request.request_id: (1, -0.1) for it in out.items if it.sample}
        for rid in sampled:
            run.first_token.setdefault(rid, now[0])
        sched.postprocess(out, sampled)
        sched.pool.check()
    raise AssertionError("not finished")


# ---- batch invariants -----------------------------------------------------------------------------
def mixed_workload(seed=0, n_short=40, n_long=3, rate=8.0) -> list[Spec]:
    rng = random.Random(seed)
    specs, t = [], 0.0
    for i in range(n_short):
        t += rng.expovariate(rate)
        specs.append(Spec(f"s{i}", t, rng.randint(50, 3000), rng.randint(1, 30), 2.0, BUDGET))
    for i in range(n_long):
        specs.append(Spec(f"L{i}", 0.2 * i, rng.randint(40_000, 80_000), 4, 60.0))
    return specs


@pytest.mark.parametrize("policy", ["lars", "edf", "fcfs"])
def test_every_batch_within_budget_one_long_prefill_and_kvp_boundaries(policy):
    m = 7000                                        # KVP group size, off the 32-token grid
    threshold = 16_384
    run = drive(mixed_workload(), policy=policy, long_threshold=threshold, kvp_tokens=m)
    assert all(len(r.output_ids) == r.params.max_tokens for r in run.reqs.values())
    long_waited = False
    for (_, out), shape, ready in zip(run.batches, run.shapes, run.in_prefill_past(threshold)):
        if not out.forced and shape.prefills:                        # within the budget (+10%)
            assert out.predicted_s <= out.budget_s * (1 + TOL), (out.predicted_s, shape)
        longs = [ctx for _, ctx in shape.prefills if ctx >= threshold]
        assert len(longs) <= 1                                       # never two long prefills
        for n, ctx in shape.prefills:
            assert ctx // m == (ctx + n - 1) // m, (ctx, n)          # never crosses a KVP boundary
        long_waited |= len(longs) == 1 and ready >= 2
    if policy != "fcfs":                # (FCFS finishes one long prompt before the next is long)
        assert long_waited              # two long prefills were ready, one ran: the rule was exercised
    assert run.sched.pool.num_used == 0
    kvp_clipped = [n for shape in run.shapes for n, ctx in shape.prefills if (ctx + n) % m == 0]
    assert kvp_clipped                                               # clipping really happened


def test_chunk_size_never_grows_for_one_long_prompt():
    run = drive([Spec("long", 0.0, 200_000)], long_threshold=1 << 30)
    sizes = [n for _, _, n in run.chunks("long")]
    body = sizes[:-1]                                  # the last chunk is clipped at the prompt end
    assert all(a >= b for a, b in zip(body, body[1:]))
    assert sizes[0] >= 4 * sizes[-2]                   # they really do shrink as the KV grows
    assert all(out.predicted_s <= BUDGET * (1 + TOL) for _, out in run.batches)
    assert all(n % 32 == 0 for n in body)


def test_decodes_first_and_their_tbt_slo_lowers_the_budget():
    now = [0.0]
    s = make_sched(clock=lambda: now[0])
    a = Request("a", [7] * 40, SamplingParams(max_tokens=10), 0.0, tbt_slo_s=0.02)
    s.add(a)
    out = s.schedule()
    s.postprocess(out, {"a": (1, 0.0)})
    s.add(Request("b", [7] * 50_000, SamplingParams(max_tokens=1), 0.0))
    out = s.schedule()
    assert [(it.request.request_id, it.num_tokens) for it in out.items][0] == ("a", 1)
    assert out.budget_s == pytest.approx(0.8 * 0.02) and out.predicted_s <= 0.8 * 0.02 * (1 + TOL)
    s.postprocess(out, {"a": (1, 0.0)})
    s.abort("a")
    out = s.schedule()                                 # no decode: the configured budget again
    assert out.budget_s == BUDGET and out.predicted_s > 0.02 * (1 + TOL)


def test_prefill_role_budget_is_preemption_interval_over_pipeline_depth():
    cfg = SchedulerConfig(policy="lars", chunking="adaptive", role="prefill", preempt_interval_s=0.4)
    s = Scheduler(cfg, BlockPool(100, 16), perf_model=ATTN, pipeline_depth=4)
    assert s.budget_s == pytest.approx(0.1)
    assert SchedulerConfig(role="decode", tbt_slo_s=0.03).iteration_budget(4) == pytest.approx(0.024)
    assert SchedulerConfig(tbt_slo_s=0.03, tbt_headroom=1.0).iteration_budget() == 0.03
    assert SchedulerConfig(iteration_budget_s=0.7, role="prefill").iteration_budget(2) == 0.7


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="need a performance model"):
        Scheduler(SchedulerConfig(chunking="adaptive"), BlockPool(10, 16))
    with pytest.raises(ConfigError, match="policy='lars'"):
        Scheduler(SchedulerConfig(policy="lars"), BlockPool(10, 16))
    Scheduler(SchedulerConfig(policy="edf"), BlockPool(10, 16))      # EDF with fixed chunks: no model
    for bad in (dict(policy="sjf"), dict(chunking="dynamic"), dict(role="both"), dict(tbt_slo_s=0),
                dict(min_chunk=48), dict(min_chunk=64, max_chunk=32), dict(rho_max=1.0),
                dict(long_threshold=0), dict(iteration_budget_s=-1.0), dict(tbt_headroom=0.0),
                dict(tbt_headroom=1.5)):
        with pytest.raises(ConfigError, match="scheduler"):
            SchedulerConfig(**bad)


# ---- ordering --------------------------------------------------------------------------------------
@pytest.mark.parametrize("stealing", [False, True], ids=["rho-alone", "slack-stealing"])
def test_lars_orders_by_slack_over_total_work(stealing):
    """Same slack (1 s), different lengths: the long one is riskier and goes first; a request
    without a deadline goes last; an urgent short one beats both. In that order the short one would
    finish at 2.4 s, past its 1.2 s deadline, while the long one has 0.8 s to spare: slack stealing
    runs the short one first and both meet."""
    now = [0.0]
    s = make_sched(LINEAR, clock=lambda: now[0], long_threshold=1 << 30, slack_stealing=stealing)
    specs = [("none", 20_000, None), ("short", 2_000, 1.2), ("long", 20_000, 3.0), ("urgent", 2_000, 0.25)]
    for i, (rid, n, d) in enumerate(specs):
        s.add(Request(rid, [7] * n, SamplingParams(max_tokens=1), 0.0, ttft_deadline_s=d))
    # rho: urgent (0.25-0.2)/0.2 = 0.25, long (3-2)/2 = 0.5, short (1.2-0.2)/0.2 = 5, none: no deadline
    policy = LARS()
    rhos = {r.request_id: policy.rho(s._view(r), 0.0, *s.table.work(s._view(r))) for r in s.waiting
            if r.ttft_deadline_s is not None}
    assert rhos == pytest.approx({"urgent": 0.25, "long": 0.5, "short": 5.0}, rel=0.02)
    out = s.schedule()
    assert [it.request.request_id for it in out.items] == ["urgent"]    # it fills the whole budget
    order = ["urgent"]
    s.postprocess(out, {})
    while s.waiting or any(r.num_computed < r.prompt_len for r in s.running):
        out = s.schedule()
        order += [it.request.request_id for it in out.items if it.request.request_id not in order]
        s.postprocess(out, {it.request.request_id: (1, 0.0) for it in out.items if it.sample})
    assert order[:3] == (["urgent", "short", "long"] if stealing else ["urgent", "long", "short"])
    assert order[-1] == "none"


def test_planned_mode_preempts_by_recompute_and_frees_everything():
    """A cache too small for everyone: the latest arrivals are preempted (KV freed, recomputed),
    every request still produces all its tokens and the pool ends empty."""
    specs = [Spec(f"r{i}", 0.01 * i, 300 + 40 * i, 40, 5.0) for i in range(6)]
    run = drive(specs, blocks=95, block_size=16, policy="lars")
    assert all(len(r.output_ids) == 40 for r in run.reqs.values())
    assert sum(r.num_preemptions for r in run.reqs.values()) > 0
    assert any(out.preempted for _, out in run.batches)
    assert run.sched.pool.num_used == 0


def test_waiting_request_with_received_kv_is_scheduled_as_a_decode():
    """Disaggregation: a request whose prompt KV arrived from a prefill instance joins as a decode."""
    s = make_sched()
    req = Request("d", [7] * 100, SamplingParams(max_tokens=3), 0.0)
    s.pool.allocate("d", 100)
    req.num_computed = 100
    req.append(5, -0.1)
    s.add(req)
    s.add(Request("p", [7] * 500, SamplingParams(max_tokens=1), 0.0))
    out = s.schedule()
    assert [(it.request.request_id, it.start, it.num_tokens) for it in out.items][0] == ("d", 100, 1)
    assert out.shape().decodes == (100,) and req.status is Status.RUNNING


# ---- the paper's three-request example ------------------------------------------------------------
def three_requests(short_work_s: float) -> list[Spec]:
    """Paper: long w=10 s, d=16 s at t=0; two short ones, d=1 s, arriving at t=5."""
    return [Spec("long", 0.0, tokens(10.0), 1, 16.0),
            Spec("s1", 5.0, tokens(short_work_s), 1, 1.0),
            Spec("s2", 5.0, tokens(short_work_s), 1, 1.0)]


def three(short_work_s: float, policy: str) -> Run:
    return drive(three_requests(short_work_s), LINEAR, policy=policy, long_threshold=32_768)


def test_three_requests_lars_meets_all_fcfs_misses_the_short_ones():
    """With shorts of w = 0.25 s (the long one still has 6 s of slack, the shorts 0.25 s each):
    LARS meets every deadline in the engine scheduler, FCFS misses both short ones by ~5 s."""
    lars, fcfs = three(0.25, "lars"), three(0.25, "fcfs")
    assert all(lars.met(r) for r in ("long", "s1", "s2")), {r: lars.ttft(r) for r in lars.specs}
    assert fcfs.met("long") and not fcfs.met("s1") and not fcfs.met("s2")
    assert min(fcfs.ttft("s1"), fcfs.ttft("s2")) > 4.0
    # the long one was preempted at a chunk boundary while the short ones ran, then resumed
    starts = [t for t, _, _ in lars.chunks("long")]
    assert max(b - a for a, b in zip(starts, starts[1:])) > 3 * BUDGET


def test_three_requests_with_the_papers_exact_numbers():
    """w_short = 0.5 s: together the shorts need all of their 1 s window, so they make it only if
    nothing else runs until both are done. Seen at the first iteration boundary after t = 5 (the
    paper's fluid example as an iteration-level scheduler sees it): LARS meets all three; FCFS
    misses the short ones by ~5 s."""
    lars = drive(three_requests(0.5), LINEAR, policy="lars", long_threshold=32_768, at_boundaries=True)
    fcfs = drive(three_requests(0.5), LINEAR, policy="fcfs", long_threshold=32_768, at_boundaries=True)
    assert 5.0 <= lars.seen["s1"] == lars.seen["s2"] < 5.0 + 1.1 * BUDGET
    assert all(lars.met(r) for r in ("long", "s1", "s2")), {r: lars.ttft(r) for r in lars.specs}
    assert fcfs.met("long") and min(fcfs.ttft("s1"), fcfs.ttft("s2")) > 5.0
    # nothing of the long one ran between the shorts' arrival and their last token
    done = max(lars.first_token["s1"], lars.first_token["s2"])
    assert not [t for t, _, _ in lars.chunks("long") if lars.seen["s1"] <= t < done - 1e-9]


def test_three_requests_rho_alone_misses_and_slack_stealing_is_what_meets():
    """The paper's rule alone (rho = slack / total work) ranks the long one first at t = 5 (rho 6/10
    = 0.6 against 0.5/0.5 = 1.0) and a long prefill keeps >= 1 - rho_max of each iteration until the
    shorts' rho falls below its own: the shorts miss. Slack stealing moves them ahead because the long
    one still meets its deadline behind them."""
    alone = drive(three_requests(0.5), LINEAR, policy="lars", long_threshold=32_768, at_boundaries=True,
                  slack_stealing=False)
    assert alone.met("long") and not alone.met("s1") and not alone.met("s2")
    assert max(alone.ttft("s1"), alone.ttft("s2")) < 1.25
    sched = alone.sched
    view = lambda rid, done: sched._view(Request(rid, [7] * tokens(10.0 if rid == "long" else 0.5),
                                                 SamplingParams(), 0.0, num_computed=done,
                                                 ttft_deadline_s=16.0 if rid == "long" else 6.0))
    long_v, s1, s2 = view("long", tokens(5.0)), view("s1", 0), view("s2", 0)
    rho = lambda v: LARS.rho(v, 5.0, *sched.table.work(v))
    assert rho(long_v) == pytest.approx(0.6) and rho(s1) == pytest.approx(1.0)
    entries = [(v, *sched.table.work(v)) for v in (long_v, s1, s2)]
    assert [v.request_id for v, _, _ in LARS(steal_slack=False).arrange(entries, 5.0)] == ["long", "s1", "s2"]
    assert [v.request_id for v, _, _ in LARS().arrange(entries, 5.0)] == ["s1", "s2", "long"]


def test_three_requests_arriving_mid_iteration_lose_only_the_iteration_in_flight():
    """Arriving at exactly t = 5 while a chunk of the long one runs, the shorts wait for it to end
    (no iteration-level scheduler can do better); LARS misses their deadline by at most that wait."""
    lars = three(0.5, "lars")
    boundary = min(t for t, _ in lars.batches if t >= 5.0)
    assert 0.0 < boundary - 5.0 < 1.1 * BUDGET
    assert lars.met("long")
    assert max(lars.ttft("s1"), lars.ttft("s2")) <= 1.0 + (boundary - 5.0) + 1e-9


def test_lars_finishes_the_prompt_under_way_before_a_similar_later_one():
    """a (0.8 s of work) runs alone from t = 0; b (0.9 s) arrives at 0.6, both due 2 s after arrival.
    By rho alone b ranks first when it arrives (1.1 / 0.9 against 1.2 / 0.8); then the waiting
    one's rho falls below the running one's every few iterations and the two share the machine: a
    gets its first token well after its 0.8 s alone, with no deadline gained. LARS (finishing what
    started when no deadline is lost) serves a by 0.8 s and b right after: the TTFT admission
    predicted for a at its arrival holds."""
    specs = [Spec("a", 0.0, tokens(0.8), 1, 2.0), Spec("b", 0.6, tokens(0.9), 1, 2.0)]
    lars = drive(specs, LINEAR, policy="lars")
    rho_only = drive(specs, LINEAR, policy="lars", slack_stealing=False)
    assert lars.ttft("a") == pytest.approx(0.8, abs=1.1 * BUDGET)
    assert lars.first_token["b"] == pytest.approx(1.7, abs=1.1 * BUDGET)
    assert rho_only.ttft("a") > 0.8 + 2 * BUDGET          # shared with b (the thrashing above)
    assert all(run.met(r) for run in (lars, rho_only) for r in ("a", "b"))
    # nothing of b ran before a's last iteration (which b's first chunk fills up)
    assert not [t for t, _, _ in lars.chunks("b") if t < lars.first_token["a"] - 1.1 * BUDGET]


def test_edf_starves_the_long_request_under_steady_short_load_then_convoys():
    """80% load of 0.2 s requests due 1 s after arrival (overload together with the long one): their
    deadlines stay ahead of the long one's until it is lost; then it is the earliest deadline and runs
    alone while every short request arriving meanwhile misses."""
    specs = [Spec("long", 0.0, tokens(10.0), 1, 16.0)]
    t, i = 0.1, 0
    while t < 24.0:
        specs.append(Spec(f"s{i}", round(t, 6), tokens(0.2), 1, 1.0))
        t, i = t + 0.25, i + 1
    edf = drive(specs, LINEAR, policy="edf", long_threshold=32_768)
    assert not edf.met("long") and edf.ttft("long") > 20.0
    done_by_deadline = sum(n for t0, _, n in edf.chunks("long") if t0 < 16.0)
    assert done_by_deadline < 0.5 * tokens(10.0)
    convoy = [r for r, s in edf.specs.items() if r != "long" and 16.5 <= s.arrival_s <= edf.ttft("long") - 1]
    assert convoy and not any(edf.met(r) for r in convoy)


def test_a_remnant_chunk_does_not_throttle_the_next_one():
    """b's first chunk is the 32-token remnant a's last chunk left; next iteration b runs alone and
    gets a full-budget chunk, not 2 x 32 (only a batch's first prefill chunk anchors growth)."""
    s = make_sched(LINEAR, policy="fcfs", chunking="adaptive")
    s.add(Request("a", [7] * 1056, SamplingParams(max_tokens=1), 0.0))
    s.add(Request("b", [7] * 4000, SamplingParams(max_tokens=1), 1.0))
    sizes = []
    for _ in range(3):
        out = s.schedule()
        sizes.append([(it.request.request_id, it.num_tokens) for it in out.items])
        s.postprocess(out, {it.request.request_id: (1, 0.0) for it in out.items if it.sample})
    assert sizes[0] == [("a", 544)]
    assert sizes[1] == [("a", 512), ("b", 32)]
    assert sizes[2] == [("b", 544)]
    assert s.requests["b"].last_chunk == 544
