"""Failures with real processes (scripts/up.py's Cluster, TCP backend, short leases).

- A decode grid worker is SIGKILLed while a request decodes: the client gets UNAVAILABLE naming the
  failure within seconds (no hang), the placement leaves Redis, the surviving worker exits (its blocks
  go with it), and the instance rebuilds its grid, registers again and serves correctly.
- The router is SIGKILLed mid-request: nobody can release the placement, so its lease expires in
  Redis (counted as an expiry); the decode instance sees its Decode call cancelled and frees its
  blocks at once.
"""
from __future__ import annotations

import os
import signal
import time
import uuid

import grpc
import psutil
import pytest

from common.client import RouterClient
from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.model.tokenizer import load_tokenizer
from common.rpc import client as rpc_client
from common.rpc.protos import decode_pb2, decode_pb2_grpc, router_pb2_grpc
from common.sampling_params import SamplingParams
from scripts.up import Cluster, ClusterConfig
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.placements import placement_for
from tests.fixtures.processes import grid_workers
from tests.fixtures.waiting import wait_until as _wait_until

pytestmark = pytest.mark.timeout(300)

M = 256
LEASE_S = 2.0
PROMPT = [(11 * i + 5) % 300 + 10 for i in range(280)]        # both KVP groups
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_random_hf_model(tmp_path_factory.mktemp("fault-model"), "llama", num_attention_heads=6,
                                     num_key_value_heads=2, num_hidden_layers=4, max_position_embeddings=1024,
                                     seed=11))


@pytest.fixture(scope="module")
def reference(model) -> list[int]:
    engine = LLMEngine(EngineConfig(model=model, cache=CacheConfig(block_size=16, num_blocks=64),
                                    scheduler=SchedulerConfig(chunk_size=64)),
                       extra_eos_ids=load_tokenizer(model).eos_token_ids)
    ids = engine.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS))[0].token_ids
    assert len(ids) == MAX_TOKENS          # no early EOS: the request is still decoding when we strike
    return ids


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    cfg = ClusterConfig(insecure=True,   # the test calls the kvstore, decode and Redis directly (plaintext)
                        model=model, kv_backend="tcp", router_port=0, kvp_tokens=M, decode_kv_tokens=2048,
                        prefill_kv_tokens=1024, chunk_size=64, short_prompt_tokens=64, lease_s=LEASE_S,
                        deployment=f"faults-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp("fault-logs")))
    with Cluster(cfg) as c:
        yield c


def wait_until(cond, timeout_s: float, what: str):
    return _wait_until(cond, timeout_s, what, tolerate=(grpc.RpcError,))   # a service coming back: ask again


def decode_all_free(cluster: Cluster) -> bool:
    with rpc_client.blocking_channel(cluster.services["decode"].address, default_deadline_s=2.0) as ch:
        stats = decode_pb2_grpc.DecodeStub(ch).Stats(decode_pb2.StatsRequest())
    return len(stats.groups) == 2 and all(g.free_blocks == g.total_blocks for g in stats.groups)


def decode_workers(cluster: Cluster) -> list[psutil.Process]:
    """The decode instance's worker processes, rank order."""
    return grid_workers(cluster.services["decode"].pid)


def start_request(cluster: Cluster, rid: str):
    """Opens a Generate stream and reads until the decode instance produced a few tokens."""
    ch = rpc_client.blocking_channel(cluster.router_address, metadata=cluster.auth_metadata)
    call = router_pb2_grpc.RouterStub(ch).Generate(
        RouterClient.request(token_ids=PROMPT, max_tokens=MAX_TOKENS, request_id=rid), timeout=60)
    seen = 0
    for ev in call:
        if ev.HasField("delta"):
            seen += len(ev.delta.token_ids)
        if seen >= 3:
            return ch, call
    raise AssertionError("the request ended before the fault")


def test_killed_decode_worker_gives_a_clear_error_fast_and_frees_everything(cluster, store, reference):
    workers = decode_workers(cluster)
    assert len(workers) == 2
    rid = f"doomed-{uuid.uuid4().hex[:8]}"
    ch, call = start_request(cluster, rid)
    try:
        assert placement_for(store, rid) is not None
        t_kill = time.monotonic()
        os.kill(workers[1].pid, signal.SIGKILL)                 # the worker of KVP group 1
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        elapsed = time.monotonic() - t_kill
    finally:
        ch.close()
    err = info.value
    assert err.code() is grpc.StatusCode.UNAVAILABLE, err
    assert "decode instance" in err.details() and "worker" in err.details(), err.details()
    assert elapsed < 10, f"the client waited {elapsed:.1f} s"

    wait_until(lambda: placement_for(store, rid) is None and store.num_placements() == 0, LEASE_S + 5,
               "placement removed from Redis")
    workers[0].wait(15)                                         # the surviving worker is gone, blocks and all

    # The instance rebuilds its grid, registers again and serves the same tokens.
    wait_until(lambda: len(decode_workers(cluster)) == 2 and decode_all_free(cluster), 90, "decode instance back")
    wait_until(lambda: [i.role for i in store.list_instances()].count("decode") == 1, 30, "decode registered")
    with RouterClient(cluster.router_address, timeout_s=120) as c:
        out = c.complete(token_ids=PROMPT, max_tokens=MAX_TOKENS)
    assert out.route == "disaggregated" and out.token_ids == reference
    wait_until(lambda: decode_all_free(cluster), 10, "decode blocks freed")


def test_killed_router_lets_the_lease_expire_and_the_decode_side_frees(cluster, store):
    expired = store.expired_total()
    rid = f"orphan-{uuid.uuid4().hex[:8]}"
    ch, call = start_request(cluster, rid)
    try:
        os.kill(cluster.services["router"].pid, signal.SIGKILL)
        cluster.services["router"].proc.wait(10)
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        ch.close()
    t_kill = time.monotonic()
    wait_until(lambda: decode_all_free(cluster), 10, "decode blocks freed after the cancelled Decode call")
    wait_until(lambda: placement_for(store, rid) is None, LEASE_S + 5, "lease expired")
    wait_until(lambda: store.num_placements() == 0 and store.expired_total() == expired + 1, 5,
               "expiry reaped and counted")
    assert time.monotonic() - t_kill < LEASE_S + 5
    cluster.restart("router")
