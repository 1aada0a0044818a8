"""Failures with real processes (scripts/up.py's Cluster, TCP backend, short leases).

- A decode grid worker is SIGKILLed while a request decodes: the surviving worker keeps running and
  the dead one is replaced in place (the instance stays registered), and the request resumes: the
  client gets every token, exactly, with no error.
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
from common.metrics import scrape, total
from common.model.tokenizer import load_tokenizer
from common.rpc import client as rpc_client
from common.rpc.protos import decode_pb2, decode_pb2_grpc, router_pb2_grpc
from common.sampling_params import SamplingParams
from scripts.up import Cluster, ClusterConfig
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.placements import placement_for
from tests.fixtures.processes import grid_worker, grid_workers
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
    """Opens a Generate stream and reads until the decode instance produced a few tokens; returns
    the channel, the call and the tokens read."""
    ch = rpc_client.blocking_channel(cluster.router_address, metadata=cluster.auth_metadata)
    call = router_pb2_grpc.RouterStub(ch).Generate(
        RouterClient.request(token_ids=PROMPT, max_tokens=MAX_TOKENS, request_id=rid), timeout=60)
    seen: list[int] = []
    for ev in call:
        if ev.HasField("delta"):
            seen += ev.delta.token_ids
        if len(seen) >= 3:
            return ch, call, seen
    raise AssertionError("the request ended before the fault")


def test_killed_decode_worker_is_replaced_in_place_and_the_request_resumes(cluster, store, reference):
    """The request decoding over both KVP groups loses group 1's KV with its worker. The other worker
    keeps its process; the dead one is replaced in place, so the instance never leaves the pool (same
    registration, same engine), and the request resumes: its group-1 KV is computed again on the
    decode instance and the client gets every token, exactly the single-process ones, with one
    longer gap and no error."""
    workers = [grid_worker(cluster.services["decode"].pid, rank) for rank in (1, 2)]
    assert len(decode_workers(cluster)) == 2
    registered = [(i.instance_id, i.engine_epoch) for i in store.list_instances() if i.role == "decode"]
    replaced = total(scrape(cluster.metrics_urls["decode"]), "mnemosyne_worker_replacements_total")
    rid = f"resumed-{uuid.uuid4().hex[:8]}"
    ch, call, toks = start_request(cluster, rid)
    try:
        assert placement_for(store, rid) is not None
        t_kill = last = time.monotonic()
        os.kill(workers[1].pid, signal.SIGKILL)                 # the worker of KVP group 1
        gap = 0.0
        for ev in call:
            if ev.HasField("delta"):
                now = time.monotonic()
                gap, last = max(gap, now - last), now
                toks += ev.delta.token_ids
    finally:
        ch.close()
    assert toks == reference
    assert gap < 5, f"the client waited {gap:.1f} s for a token"
    now = [grid_worker(cluster.services["decode"].pid, rank) for rank in (1, 2)]
    assert now[0].pid == workers[0].pid and now[1].pid != workers[1].pid     # only the dead rank is new
    assert [(i.instance_id, i.engine_epoch) for i in store.list_instances() if i.role == "decode"] == registered
    assert total(scrape(cluster.metrics_urls["decode"]), "mnemosyne_worker_replacements_total") == replaced + 1
    wait_until(lambda: decode_all_free(cluster) and store.num_placements() == 0, LEASE_S + 5,
               "blocks freed and placement released")
    with RouterClient(cluster.router_address, timeout_s=120) as c:
        out = c.complete(token_ids=PROMPT, max_tokens=MAX_TOKENS)
    assert out.token_ids == reference
    wait_until(lambda: decode_all_free(cluster), 10, "decode blocks freed")
    assert time.monotonic() - t_kill < 60


def test_killed_router_lets_the_lease_expire_and_the_decode_side_frees(cluster, store):
    expired = store.expired_total()
    rid = f"orphan-{uuid.uuid4().hex[:8]}"
    ch, call, _ = start_request(cluster, rid)
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
