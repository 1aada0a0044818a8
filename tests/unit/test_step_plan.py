"""The grid's driver <-> worker contract (common/parallel/plan.py): plans and results round-trip
through their JSON encoding, top log-probabilities included."""
from __future__ import annotations

import dataclasses
import json

import pytest

from common.errors import WorkerFailedError
from common.parallel.plan import (SeqPlan, StepPlan, StepResult, TableCache, TableDelta, decode_plan, decode_result,
                                  encode_plan, encode_result)


def test_step_plan_round_trip():
    plan = StepPlan(3, [SeqPlan("a", 0, [1, 2, 3], True, [[0, 1]], 0.7, 0.9, 5, 11, None, 2, top_logprobs=4),
                        SeqPlan("b", 16, [9], False, [[2], [3]])],
                    forget=["z"], timeline=[(0, 1.0, 2.0)])
    assert decode_plan(encode_plan(plan)) == plan
    assert decode_plan(encode_plan(plan)).seqs[1].top_logprobs == 0


def test_step_plan_encoding_carries_every_field():
    """encode_plan builds its dict by hand (asdict deep-copies the block tables): a field added to
    StepPlan or SeqPlan must not be left out of it."""
    plan = StepPlan(7, [SeqPlan("a", 32, [5], True, [[4, 5]], 0.5, 0.8, 3, 1, {"backend": "tcp"}, 1, 2, [3])],
                    forget=["x"], stop=False, dump={"dir": "d"}, timeline=[(1, 0.5, 0.75)])
    assert json.loads(encode_plan(plan)) == json.loads(json.dumps(dataclasses.asdict(plan)))


def test_step_result_round_trip_with_and_without_top_logprobs():
    res = StepResult(4, {"a": (7, -0.5), "b": (1, -2.25)}, [(0, 1.0, 2.0), (1, 2.0, 3.5)], 0.25,
                     top_logprobs={"a": ((7, -0.5), (3, -1.0625))})
    assert decode_result(encode_result(res)) == res
    plain = StepResult(5, {"a": (7, -0.5)}, [], 0.0, error="boom")
    assert decode_result(encode_result(plain)) == plain and plain.top_logprobs == {}


def test_plans_carry_what_changed_in_the_block_tables_and_workers_rebuild_them_whole():
    """TableDelta (driver) and TableCache (every worker): through growth, a second request, a
    preempted request's new table, a forgotten request's id reused, and the pruning of requests
    left out of plans, each worker's tables equal the driver's in every plan, while a growing
    table travels as its new blocks only (a 1M-token request's 65,536 ids took ~6 ms of JSON a
    step on each side)."""
    delta, cache = TableDelta(), TableCache()
    steps = iter(range(10_000))

    def send(tables: dict[str, list[list[int]]], forget: tuple[str, ...] = ()) -> StepPlan:
        step = next(steps)
        for rid in forget:
            delta.forget(rid)
        seqs = [delta.seq(step, SeqPlan(rid, 0, [1], False, t)) for rid, t in tables.items()]
        delta.prune(step)
        plan = decode_plan(encode_plan(StepPlan(step, seqs, list(forget))))
        got = cache.apply(plan)
        assert {s.request_id: s.tables for s in got.seqs} == tables
        assert all(s.table_from is None for s in got.seqs)
        return plan

    a = [[0, 1], [8]]
    first = send({"a": [list(t) for t in a]})
    assert first.seqs[0].table_from is None                            # first time: whole
    grown = send({"a": [[0, 1, 2], [8]], "b": [[5], []]})
    assert grown.seqs[0].tables == [[2], []] and grown.seqs[0].table_from == [2, 1]
    assert grown.seqs[1].table_from is None
    again = send({"a": [[0, 1, 2, 3], [8, 9]]})
    assert again.seqs[0].tables == [[3], [9]]
    # preempted and rebuilt on other blocks: whole, where it no longer continues the old one
    rebuilt = send({"a": [[4, 1], [8, 9, 10]], "b": [[5, 6], [7]]})
    assert rebuilt.seqs[0].tables == [[4, 1], [10]] and rebuilt.seqs[0].table_from == [0, 2]
    assert rebuilt.seqs[1].tables == [[6], [7]]
    # forgotten, then the same id again: whole
    reused = send({"b": [[5, 6], [7]]}, forget=("b",))
    assert reused.seqs[0].table_from is None
    # "a" left out of plans for longer than the driver keeps it: sent whole again, and understood
    for _ in range(2 * TableDelta.PRUNE_STEPS + 2):
        send({"b": [[5, 6], [7]]})
    back = send({"a": [[4, 1, 11], [8, 9, 10]]})
    assert back.seqs[0].table_from is None


def test_a_worker_refuses_a_table_delta_for_a_request_it_has_no_table_of():
    with pytest.raises(WorkerFailedError, match="does not have"):
        TableCache().apply(StepPlan(4, [SeqPlan("a", 0, [1], False, [[3]], table_from=[2])]))
