"""The fuzzer itself (tests/fixtures/fuzz.py), without servers: it covers every RPC and every kind of
case, a case is the same whatever order cases are made in, requests stay within what one call can
carry, membership RPCs never name a real instance, and `judge` holds the contract."""
from __future__ import annotations

from collections import Counter

import pytest

from tests.fixtures import fuzz

TARGET = fuzz.Target(vocab_size=320, model="m", decode_instance="decode-real", decode_groups=2, kvp_tokens=128,
                     api_key="mn-key")


@pytest.fixture(scope="module")
def cases() -> list[fuzz.Case]:
    f = fuzz.Fuzzer(7, TARGET)
    return [f.case(i) for i in range(1500)]


def test_every_rpc_and_kind_is_generated(cases):
    assert {c.rpc.name for c in cases} == {r.name for r in fuzz.all_rpcs()}
    assert len(fuzz.all_rpcs()) == 18                                  # KVStore.MatchPrefix the 18th
    assert set(Counter(c.kind for c in cases)) == {"valid", "mutated", "random", "corrupt"}
    router = [c for c in cases if c.rpc.service == "Router"]
    assert any(c.metadata == (("authorization", "Bearer mn-key"),) for c in router)
    assert any(c.metadata == () for c in router)                       # some without a key
    assert any(c.cancel_after is not None for c in cases if c.rpc.streaming)


def test_cases_are_reproducible_in_any_order(cases):
    f = fuzz.Fuzzer(7, TARGET)
    for i in (1499, 3, 700, 3):
        assert fuzz.describe(f.case(i), 10_000) == fuzz.describe(cases[i], 10_000)


def test_requests_serialize_and_stay_within_a_few_megabytes(cases):
    sizes = [len(c.raw) if c.raw is not None else c.request.ByteSize() for c in cases]
    assert max(sizes) < 16 << 20                                       # the fuzzer's send limit
    assert sorted(sizes)[len(sizes) // 2] < 1000                      # most are small


def test_membership_rpcs_only_name_fuzz_instances(cases):
    for c in cases:
        if c.raw is None and c.rpc.name in ("KVStore.RegisterInstance", "KVStore.Heartbeat",
                                            "KVStore.DeregisterInstance"):
            iid = c.request.instance.instance_id if c.rpc.method == "RegisterInstance" else c.request.instance_id
            assert iid.startswith("fuzz-"), fuzz.describe(c)


@pytest.mark.parametrize("rpc_name, outcome, bad", [
    ("Router.Generate", fuzz.Outcome("OK"), False),
    ("Router.Generate", fuzz.Outcome("INVALID_ARGUMENT"), False),
    ("Router.Generate", fuzz.Outcome("UNAUTHENTICATED"), False),
    ("Router.Generate", fuzz.Outcome("CANCELLED", cancelled=True), False),
    ("Router.Generate", fuzz.Outcome("CANCELLED"), True),                  # the fuzzer did not cancel
    ("Router.Generate", fuzz.Outcome("UNKNOWN", "Unexpected DecodeError"), True),
    ("Router.Generate", fuzz.Outcome("INTERNAL", "internal error: KeyError"), True),
    ("Router.Generate", fuzz.Outcome("DEADLINE_EXCEEDED", seconds=20), True),
    ("KVStore.Renew", fuzz.Outcome("NOT_FOUND"), False),
    ("Decode.Stats", fuzz.Outcome("NOT_FOUND"), True),
    ("Prefill.Prefill", fuzz.Outcome("UNAVAILABLE", "cannot connect to KV receiver"), False),
    ("Decode.Decode", fuzz.Outcome("UNAVAILABLE", "worker rank 1 closed the connection"), True),
    ("KVStore.Heartbeat", fuzz.Outcome("RESOURCE_EXHAUSTED", "received metadata size exceeds hard limit"), True),
])
def test_judge(rpc_name, outcome, bad):
    rpc = next(r for r in fuzz.all_rpcs() if r.name == rpc_name)
    case = fuzz.Case(0, rpc, "mutated", rpc.request(), cancel_after=1 if outcome.cancelled else None)
    assert (fuzz.judge(case, outcome) is not None) is bad
