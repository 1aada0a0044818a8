"""Protobuf-aware fuzzing (tests/fixtures/fuzz.py) of every RPC of a real deployment: scripts/up.py's
Cluster on loopback (Redis, kvstore, prefill, decode with 2 KVP groups, router with an API key),
unsupervised so a crash stays visible.

A few hundred requests (the full >= 10,000 run is bench/fuzz.py): no process exits or loses a grid
worker, no call goes past its deadline, every answer is OK or a status the contract allows for bad
input (fuzz.judge), and afterwards the deployment still serves a long prompt (prefill -> KV transfer
-> decode) and a short one. Plus each bug the fuzzer found, as the request that reproduced it.
"""
from __future__ import annotations

import grpc
import pytest

from bench.fuzz import cluster_config, crashes, processes, serves, small_model
from common.rpc.protos import common_pb2, decode_pb2, kvstore_pb2, prefill_pb2
from scripts.up import Cluster
from tests.fixtures import fuzz

pytestmark = pytest.mark.timeout(600)

REQUESTS = 300
SEED = 20261205


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    model = small_model(tmp_path_factory.mktemp("fuzz-model"))
    with Cluster(cluster_config(model, str(tmp_path_factory.mktemp("fuzz-logs")))) as c:
        target = fuzz.target_of(c.router_address, c.kvstore_address, c.api_key or "")
        addresses = {n: c.services[n].address for n in ("router", "prefill", "decode", "kvstore")}
        yield c, target, addresses


def test_fuzzed_requests_get_an_allowed_status_and_break_nothing(deployment):
    cluster, target, addresses = deployment
    assert target.api_key and target.decode_instance and target.decode_groups == 2
    before = processes(cluster)
    tally = fuzz.run(addresses, fuzz.Fuzzer(SEED, target), range(REQUESTS), deadline_s=20.0, workers=4)
    assert tally.total == REQUESTS
    assert len(tally.counts) == len(fuzz.all_rpcs())          # every RPC was fuzzed
    assert tally.problems == []
    assert crashes(before, processes(cluster)) == []
    ok, how = serves(cluster, target.vocab_size)
    assert ok, how


def send(address: str, rpc_name: str, request, metadata=(), timeout: float = 20.0) -> fuzz.Outcome:
    """One call of `rpc_name` with `request` (a message, or raw bytes sent as they are)."""
    rpc = next(r for r in fuzz.all_rpcs() if r.name == rpc_name)
    raw = request if isinstance(request, bytes) else None
    case = fuzz.Case(0, rpc, "found", rpc.request() if raw is not None else request, tuple(metadata), raw=raw)
    with grpc.insecure_channel(address) as ch:
        return fuzz.call(ch, case, timeout)


def _prefill(backend: str, rid: str = "found-prefill") -> prefill_pb2.PrefillRequest:
    return prefill_pb2.PrefillRequest(
        request_id=rid, token_ids=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=1),
        destination=common_pb2.KVDestination(request_id=rid, backend=backend, groups=[common_pb2.GroupReceiver(
            group=0, token_start=0, token_end=3, block_ids=[0],
            workers=[common_pb2.WorkerEndpoint(tp_rank=0, address="127.0.0.1:1")])]))


# What the fuzzer found answered outside the contract, hanging, or failing an engine: each request as
# it reproduced the bug, with the status it must get now.
FOUND = {
    # the kvstore split the request into 33 million KVP groups (2.3 GB, minutes) before refusing it
    "reserve-huge-max-new-tokens": ("kvstore", "KVStore.Reserve", kvstore_pb2.ReserveRequest(
        request_id="huge", num_tokens=12, max_new_tokens=2**31 - 2), {"INVALID_ARGUMENT"}),
    # logits / 1e-45 were +-inf, softmax NaN: torch.multinomial raised on a decode worker (grid rebuilt)
    "decode-temperature-1e-45": ("decode", "Decode.Decode", decode_pb2.DecodeRequest(
        request_id="tiny-temperature", prompt_token_ids=[41, 278, 216],
        sampling=common_pb2.SamplingParams(temperature=1.4e-45, seed=1, max_tokens=2)), {"OK"}),
    # an unknown KV backend in the destination failed the whole prefill engine when it built the sender
    "prefill-unknown-backend": ("prefill", "Prefill.Prefill", _prefill("0"), {"INVALID_ARGUMENT"}),
    "prefill-unavailable-backend": ("prefill", "Prefill.Prefill", _prefill("nixl"), {"INVALID_ARGUMENT"}),
    # bytes that do not parse: grpc's UNKNOWN "Unexpected DecodeError"
    "kvstore-corrupt-bytes": ("kvstore", "KVStore.Release", b"\n\x08\xe6uzz-4\r4", {"INVALID_ARGUMENT"}),
    "decode-corrupt-bytes": ("decode", "Decode.Decode", b"\xff\xff\xff", {"INVALID_ARGUMENT"}),
    "prefill-corrupt-bytes": ("prefill", "Prefill.Abort", b"\x0a\x05ab", {"INVALID_ARGUMENT"}),
    "router-corrupt-bytes": ("router", "Router.Generate", b"\x1a\x05\x0a\x03\x80", {"INVALID_ARGUMENT"}),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_found_by_fuzzing(deployment, name):
    cluster, target, addresses = deployment
    server, rpc_name, request, codes = FOUND[name]
    before = processes(cluster)
    md = (("authorization", f"Bearer {target.api_key}"),) if server == "router" else ()
    out = send(addresses[server], rpc_name, request, md)
    assert out.code in codes, out
    assert out.seconds < 10
    assert crashes(before, processes(cluster)) == []


def test_a_prefill_id_is_refused_while_its_previous_call_cleans_up(deployment):
    """Fuzzing found a Prefill reusing the id of one that had just ended waited for its KV until the
    client's deadline: the first call's clean-up aborted the second's transfer. Calls with one id,
    back to back and concurrent, now each end quickly (served, refused as running, or the transfer
    to a dead receiver failed)."""
    from concurrent.futures import ThreadPoolExecutor
    _, target, addresses = deployment
    # placed on the decode instance (on 127.0.0.1, where the destination's receiver is), so prefill
    # accepts the destination and the calls reach the engine
    placed = send(addresses["kvstore"], "KVStore.Reserve", kvstore_pb2.ReserveRequest(
        request_id="same-id", num_tokens=3, max_new_tokens=1, instance_id=target.decode_instance))
    assert placed.code == "OK", placed
    try:
        with ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(lambda _: send(addresses["prefill"], "Prefill.Prefill",
                                                _prefill("tcp", "same-id"), timeout=30), range(9)))
    finally:
        send(addresses["kvstore"], "KVStore.Release", kvstore_pb2.ReleaseRequest(request_id="same-id"))
    assert all(o.seconds < 10 for o in outs), [(o.code, o.details[:80], round(o.seconds, 1)) for o in outs]
    assert {o.code for o in outs} <= {"INVALID_ARGUMENT", "UNAVAILABLE"}, outs
    assert "UNAVAILABLE" in {o.code for o in outs}, outs      # some reached the (failing) transfer

