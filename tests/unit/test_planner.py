"""Batch formation: policy order, budget, one long prefill per batch, requeue on 0, admission hook."""
from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.scheduler.chunking import AdaptiveChunker, FixedChunker
from common.scheduler.planner import PlannerConfig, plan_prefills
from common.scheduler.policy import FCFS, LARS
from common.scheduler.types import BatchShape, ReqView


def toy_predict(batch: BatchShape) -> float:
    """1 ms + 10 us per token + 1 ns per query-key pair + 10 ns per decode KV token."""
    if batch.is_empty:
        return 0.0
    pairs = sum(n * (c + n / 2) for n, c in batch.prefills)
    return 1e-3 + 1e-5 * batch.num_tokens + 1e-9 * pairs + 1e-8 * sum(c + 1 for c in batch.decodes)


def work(r):
    return 1e-5 * r.remaining_prompt, 1e-5 * r.prompt_len


def req(rid, arrival, prompt, done=0, deadline=None):
    return ReqView(rid, arrival, prompt, num_computed=done, ttft_deadline_s=deadline)


def plan(cands, *, policy=FCFS(), budget=0.05, chunker=None, predict=None, **kw):
    cfg = PlannerConfig(budget, **{k: v for k, v in kw.items() if k != "admit"})
    return plan_prefills(BatchShape(), cands, 0.0, policy=policy,
                         chunker=chunker or AdaptiveChunker(toy_predict),
                         work=work, config=cfg, admit=kw.get("admit"), predict=predict)


def test_config_validation():
    with pytest.raises(ConfigError):
        PlannerConfig(0.0)
    with pytest.raises(ConfigError):
        PlannerConfig(0.05, max_batch_tokens=0)


def test_fills_budget_in_policy_order_and_requeues_the_rest():
    cands = [req("b", 1.0, 100_000), req("a", 0.0, 100_000), req("c", 2.0, 100_000)]
    p = plan(cands)
    assert p.chunks[0][0] == "a"                       # FCFS: earliest first, gets the big chunk
    assert toy_predict(p.batch) <= 0.05 * 1.1
    assert set(p.waiting) | {rid for rid, _ in p.chunks} == {"a", "b", "c"}
    assert p.waiting                                   # the budget ran out: the rest wait
    assert not p.forced


def test_at_most_one_long_prefill():
    cands = [req("l1", 0.0, 100_000, done=5000), req("l2", 1.0, 100_000, done=6000), req("s", 2.0, 500)]
    p = plan(cands, long_threshold=4096, budget=1.0)
    ids = [rid for rid, _ in p.chunks]
    assert "l1" in ids and "l2" not in ids and "s" in ids
    assert "l2" in p.waiting


def test_long_prefill_fills_only_its_lars_share():
    long = req("long", 0.0, 1_000_000, done=10_000, deadline=1000.0)     # lots of slack: rho >> 0.4
    p = plan([long], policy=LARS(rho_max=0.4), long_threshold=4096, budget=0.05)
    assert toy_predict(p.batch) <= 0.05 * 0.6 * 1.1
    full = plan([long], policy=FCFS(), long_threshold=4096, budget=0.05)
    assert p.chunks[0][1] < full.chunks[0][1]


def test_token_and_sequence_limits():
    cands = [req(f"r{i}", float(i), 1000) for i in range(5)]
    p = plan(cands, budget=10.0, chunker=FixedChunker(512), max_batch_tokens=1200, max_num_seqs=4)
    assert [n for _, n in p.chunks] == [512, 512, 176]
    p = plan(cands, budget=10.0, chunker=FixedChunker(100), max_num_seqs=2)
    assert len(p.chunks) == 2 and len(p.waiting) == 3


def test_admit_hook_refusal_requeues():
    refused = {"a"}
    p = plan([req("a", 0.0, 1000), req("b", 1.0, 1000)], budget=10.0,
             admit=lambda r, n: r.request_id not in refused)
    assert [rid for rid, _ in p.chunks] == ["b"] and p.waiting == ("a",)


def test_starvation_guard_forces_smallest_chunk_when_batch_would_be_empty():
    p = plan([req("a", 0.0, 1000)], budget=1e-6)      # not even 32 tokens fit
    assert p.forced and p.chunks == (("a", 32),) and p.waiting == ()
    decodes = BatchShape().with_decode(10)
    p = plan_prefills(decodes, [req("a", 0.0, 1000)], 0.0, policy=FCFS(),
                      chunker=AdaptiveChunker(toy_predict), work=work, config=PlannerConfig(1e-6))
    assert not p.forced and p.chunks == () and p.waiting == ("a",)   # decodes still make progress


def linear_predict(batch: BatchShape) -> float:
    return 1e-5 * batch.num_tokens                 # the same cost per token as `work`


@pytest.mark.parametrize("chunker", [AdaptiveChunker(linear_predict), FixedChunker(512)], ids=["adaptive", "fixed"])
def test_filler_never_costs_a_request_in_the_batch_its_deadline(chunker):
    """The head needs 4 ms more and is due in 4 ms: it finishes this iteration only if nothing else
    joins it. With 2 ms to spare, filler may add up to 2 ms. Without protection (FCFS, or no
    predictor), filler fills the budget."""
    head = lambda d: req("head", 0.0, 400, deadline=d)
    filler = req("filler", 1.0, 100_000, deadline=1000.0)
    tight = plan([head(0.004), filler], policy=LARS(), chunker=chunker, predict=linear_predict)
    assert tight.chunks == (("head", 400),) and tight.waiting == ("filler",)
    spare = plan([head(0.006), filler], policy=LARS(), chunker=chunker, predict=linear_predict)
    assert spare.chunks[0] == ("head", 400)
    added = linear_predict(spare.batch) - 0.004
    assert (0.0 < added <= 0.002 + 1e-12) if isinstance(chunker, AdaptiveChunker) else added == 0.0
    for unprotected in (plan([head(0.004), filler], policy=LARS(steal_slack=False), chunker=chunker,
                             predict=linear_predict),
                        plan([head(0.004), filler], policy=LARS(), chunker=chunker)):
        assert [rid for rid, _ in unprotected.chunks] == ["head", "filler"]
    # a request already late by more than an iteration is past saving: filler joins it
    late = plan([head(-1.0), filler], policy=LARS(), chunker=chunker, predict=linear_predict)
    assert [rid for rid, _ in late.chunks] == ["head", "filler"]


def test_only_the_first_prefill_chunk_of_a_batch_anchors_growth():
    """The head prefill's chunk bounds its next one (2x growth); a chunk that filled the remnant the
    head left does not, so the remnant request gets a full chunk next time."""
    head = req("head", 0.0, 4000)
    tail = req("tail", 1.0, 4000)
    chunker = AdaptiveChunker(linear_predict)
    p = plan([head, tail], chunker=chunker, budget=0.01)        # 1000 tokens of budget
    assert [rid for rid, _ in p.chunks] == ["head"] and p.anchors == ("head",)
    head2 = req("head", 0.0, 600)                                # its tail: 600 tokens, 400 left over
    p = plan([head2, tail], chunker=chunker, budget=0.01)
    (h, nh), (t, nt) = p.chunks
    assert (h, t) == ("head", "tail") and nh == 600 and 0 < nt <= 480 and p.anchors == ("head",)
    # next iteration: tail alone is not held to 2x its remnant chunk
    tail_after = ReqView("tail", 1.0, 4000, num_computed=nt, last_chunk=0)
    assert chunker.chunk(BatchShape(), 0.01, tail_after) > 2 * nt
    assert chunker.chunk(BatchShape(), 0.01, ReqView("tail", 1.0, 4000, num_computed=nt, last_chunk=nt)) <= 2 * nt
