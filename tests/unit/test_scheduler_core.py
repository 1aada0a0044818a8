"""The engine scheduler core (common/scheduler/scheduler.py) without a model: queues, chunks, cursors,
KV blocks and preemption. Requests come from a small factory; a step "runs" by postprocessing."""
from __future__ import annotations

import itertools

import pytest

from common.config import SchedulerConfig
from common.errors import CapacityError, InvalidRequestError
from common.kv_cache.block_pool import BlockPool
from common.sampling_params import SamplingParams
from common.scheduler.request import FinishReason, Request, Status
from common.scheduler.scheduler import Scheduler, SchedulerOutput

_clock = itertools.count()


def make_req(rid: str, prompt_len: int, max_tokens: int = 8, eos: int | None = None,
             max_model_len: int = 1 << 30) -> Request:
    return Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens),
                   arrival_s=float(next(_clock)), eos_ids=frozenset({eos} if eos is not None else ()),
                   max_model_len=max_model_len)


def make_sched(chunk: int = 8, blocks: int = 64, block_size: int = 4, batch_tokens: int = 1024,
               seqs: int = 16, kvp_tokens: int | None = None) -> Scheduler:
    cfg = SchedulerConfig(chunk_size=chunk, max_batch_tokens=batch_tokens, max_num_seqs=seqs)
    return Scheduler(cfg, BlockPool(blocks, block_size), kvp_tokens=kvp_tokens)


def run(s: Scheduler, out: SchedulerOutput, token: int = 1) -> list[Request]:
    """Completes a scheduled step: every sampling item gets `token`. Checks the pool afterwards."""
    done = s.postprocess(out, {it.request.request_id: (token, -0.5) for it in out.items if it.sample})
    s.pool.check()
    return done


def plan(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(it.request.request_id, it.start, it.num_tokens, it.sample) for it in out.items]


def test_prompt_is_prefilled_in_chunks_and_the_last_chunk_samples():
    s = make_sched(chunk=4)
    r = make_req("a", 10)
    s.add(r)
    assert r.status is Status.WAITING and list(s.waiting) == [r]
    chunks = []
    while not r.output_ids:
        out = s.schedule()
        chunks.append(plan(out))
        run(s, out)
    assert chunks == [[("a", 0, 4, False)], [("a", 4, 4, False)], [("a", 8, 2, True)]]
    assert r.status is Status.RUNNING and s.running == [r] and not s.waiting
    assert r.num_computed == 10 and r.output_ids == [1]
    assert len(s.pool.table("a")) == s.pool.blocks_for(10)
    out = s.schedule()                     # then one-token decodes
    assert plan(out) == [("a", 10, 1, True)]


def test_decodes_are_scheduled_before_prefills():
    s = make_sched(chunk=6)
    a = make_req("a", 3)
    s.add(a)
    run(s, s.schedule())                   # a prefilled, now decoding
    b = make_req("b", 20)
    s.add(b)
    out = s.schedule()
    assert plan(out) == [("a", 3, 1, True), ("b", 0, 6, False)]


def test_batch_token_budget_and_sequence_limit():
    s = make_sched(chunk=8, batch_tokens=10)
    for rid in "abc":
        s.add(make_req(rid, 8))
    assert plan(s.schedule()) == [("a", 0, 8, True), ("b", 0, 2, False)]
    s = make_sched(chunk=8, seqs=2)
    for rid in "abc":
        s.add(make_req(rid, 8))
    out = s.schedule()
    assert [it.request.request_id for it in out.items] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_chunks_never_cross_a_kvp_group_boundary():
    s = make_sched(chunk=4, kvp_tokens=6)
    r = make_req("a", 14)
    s.add(r)
    spans = []
    while not r.output_ids:
        out = s.schedule()
        spans += [(it.start, it.start + it.num_tokens) for it in out.items]
        run(s, out)
    assert spans == [(0, 4), (4, 6), (6, 10), (10, 12), (12, 14)]
    assert all(a // 6 == (b - 1) // 6 for a, b in spans)
    assert s.chunk_for(r, budget=100) == 1            # decode: unscheduled == 1


def test_inflight_cursor_lets_the_next_chunk_start_at_next_pos():
    s = make_sched(chunk=4)
    r = make_req("a", 12)
    s.add(r)
    first = s.schedule()
    assert plan(first) == [("a", 0, 4, False)]
    assert r.num_computed == 0 and r.num_inflight == 4 and r.next_pos == 4
    second = s.schedule()                             # before the first step completed
    assert plan(second) == [("a", 4, 4, False)]
    third = s.schedule()
    assert plan(third) == [("a", 8, 4, True)]
    assert r.next_pos == 12 and r.unscheduled == 0
    assert plan(s.schedule()) == []                   # everything known is in flight: nothing to do
    assert len(s.pool.table("a")) == 3                # blocks for all in-flight chunks are held
    run(s, first)
    assert r.num_computed == 4 and r.num_inflight == 8 and not r.output_ids
    run(s, second)
    run(s, third)
    assert r.num_computed == 12 and r.num_inflight == 0 and r.output_ids == [1]
    assert plan(s.schedule()) == [("a", 12, 1, True)]


def test_no_decode_while_the_last_chunk_is_in_flight():
    s = make_sched(chunk=8)
    r = make_req("a", 5)
    s.add(r)
    out = s.schedule()
    assert plan(out) == [("a", 0, 5, True)]
    assert plan(s.schedule()) == []                   # the sampled token is not known yet
    run(s, out)
    assert plan(s.schedule()) == [("a", 5, 1, True)]


def test_finish_by_eos_max_tokens_and_max_model_len_frees_blocks():
    s = make_sched(chunk=16)
    a = make_req("a", 5, max_tokens=10, eos=2)
    b = make_req("b", 5, max_tokens=2)
    c = make_req("c", 5, max_tokens=10, max_model_len=7)
    for r in (a, b, c):
        s.add(r)
    out = s.schedule()
    assert run(s, out, token=1) == []
    done = run(s, s.schedule(), token=1)              # b reaches max_tokens, c max_model_len
    assert {r.request_id for r in done} == {"b", "c"}
    assert b.finish_reason is FinishReason.LENGTH and c.finish_reason is FinishReason.LENGTH
    assert c.num_tokens == 7
    done = run(s, s.schedule(), token=2)              # a samples its eos
    assert done == [a] and a.finish_reason is FinishReason.STOP and a.status is Status.FINISHED
    assert not s.has_unfinished() and s.pool.num_used == 0


def test_add_rejects_duplicates_and_prompts_larger_than_the_cache():
    s = make_sched(blocks=4, block_size=4)
    s.add(make_req("a", 15))                          # 15 + 1 tokens = 4 blocks: fits an empty cache
    with pytest.raises(InvalidRequestError):
        s.add(make_req("a", 3))
    with pytest.raises(CapacityError):
        s.add(make_req("b", 16))
    assert list(s.requests) == ["a"]


def test_abort_anywhere_frees_everything():
    s = make_sched(chunk=4)
    a, b, c = make_req("a", 3), make_req("b", 10), make_req("c", 4)
    for r in (a, b):
        s.add(r)
    run(s, s.schedule())                              # a decoding, b mid-prefill
    s.add(c)                                          # c waiting
    assert s.pool.num_used > 0
    assert s.abort("b") is b and b.finish_reason is FinishReason.ABORT
    assert s.abort("c") is c and s.abort("a") is a
    assert s.abort("nobody") is None
    s.pool.check()
    assert s.pool.num_used == 0 and not s.running and not s.waiting and not s.has_unfinished()


def test_abort_while_a_step_is_in_flight_is_ignored_by_postprocess():
    s = make_sched(chunk=4)
    r = make_req("a", 4)
    s.add(r)
    out = s.schedule()
    s.abort("a")
    assert run(s, out) == [] and r.output_ids == [] and s.pool.num_used == 0


def test_preemption_frees_the_latest_arrival_and_recomputes_it():
    # 6 blocks of 4 tokens. a: 8 prompt tokens (at most 20 tokens: 5 blocks), b: 12. Both prefilled
    # (2 + 3 blocks); a's first decode takes the last block, b's needs one more: the cache is full
    # and b (the later arrival) is preempted.
    s = make_sched(chunk=16, blocks=6, block_size=4)
    a, b = make_req("a", 8, max_tokens=12), make_req("b", 12, max_tokens=20)
    s.add(a)
    s.add(b)
    run(s, s.schedule())
    assert s.pool.num_used == 5
    preempted = None
    for _ in range(12):
        out = s.schedule()
        if out.preempted:
            preempted = out
            break
        run(s, out)
    assert preempted is not None and preempted.preempted == ["b"]
    assert b.status is Status.WAITING and b.num_computed == 0 and b.num_preemptions == 1
    assert list(s.waiting) == [b] and s.running == [a]
    assert "b" not in s.pool.tables
    assert plan(preempted)[0][0] == "a"
    run(s, preempted)
    # b comes back as a prefill of its prompt AND its generated tokens, then samples the next one.
    known = b.num_tokens
    generated = len(b.output_ids)
    for _ in range(20):                               # let a finish so b fits again
        if a.status is not Status.RUNNING:
            break
        run(s, s.schedule())
    assert a.finish_reason is FinishReason.LENGTH
    out = s.schedule()
    assert plan(out) == [("b", 0, known, True)]
    run(s, out)
    assert len(b.output_ids) == generated + 1 and b.num_computed == known
    s.abort("b")
    assert s.pool.num_used == 0


def test_a_request_larger_than_the_whole_cache_stalls_instead_of_looping():
    # 24-token cache; a would grow to 8 + 20 tokens. When it cannot grow and has no victim, the
    # schedule is empty (the engine turns that into CapacityError) rather than spinning.
    s = make_sched(chunk=16, blocks=6, block_size=4)
    a = make_req("a", 8, max_tokens=20)
    s.add(a)
    for _ in range(40):
        out = s.schedule()
        if not out.items:
            break
        run(s, out)
    assert not out.items and a.num_tokens == 25
    s.abort("a")
    assert s.pool.num_used == 0


def test_running_prefills_go_before_new_arrivals():
    s = make_sched(chunk=4, batch_tokens=4)
    a, b = make_req("a", 8), make_req("b", 8)
    s.add(a)
    run(s, s.schedule())
    s.add(b)
    assert plan(s.schedule())[0][0] == "a"
