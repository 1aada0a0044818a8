"""The grid's driver <-> worker contract (common/parallel/plan.py): plans and results round-trip
through their JSON encoding, top log-probabilities included."""
from __future__ import annotations

import dataclasses
import json

from common.parallel.plan import SeqPlan, StepPlan, StepResult, decode_plan, decode_result, encode_plan, encode_result


def test_step_plan_round_trip():
    plan = StepPlan(3, [SeqPlan("a", 0, [1, 2, 3], True, [[0, 1]], 0.7, 0.9, 5, 11, None, 2, top_logprobs=4),
                        SeqPlan("b", 16, [9], False, [[2], [3]])],
                    forget=["z"], timeline=[(0, 1.0, 2.0)])
    assert decode_plan(encode_plan(plan)) == plan
    assert decode_plan(encode_plan(plan)).seqs[1].top_logprobs == 0


def test_step_plan_encoding_carries_every_field():
    """encode_plan builds its dict by hand (asdict deep-copies the block tables): a field added to
    StepPlan or SeqPlan must not be left out of it."""
    plan = StepPlan(7, [SeqPlan("a", 32, [5], True, [[4, 5]], 0.5, 0.8, 3, 1, {"backend": "tcp"}, 1, 2)],
                    forget=["x"], stop=False, dump={"dir": "d"}, timeline=[(1, 0.5, 0.75)])
    assert json.loads(encode_plan(plan)) == json.loads(json.dumps(dataclasses.asdict(plan)))


def test_step_result_round_trip_with_and_without_top_logprobs():
    res = StepResult(4, {"a": (7, -0.5), "b": (1, -2.25)}, [(0, 1.0, 2.0), (1, 2.0, 3.5)], 0.25,
                     top_logprobs={"a": ((7, -0.5), (3, -1.0625))})
    assert decode_result(encode_result(res)) == res
    plain = StepResult(5, {"a": (7, -0.5)}, [], 0.0, error="boom")
    assert decode_result(encode_result(plain)) == plain and plain.top_logprobs == {}
