"""Who keeps a disaggregated request's placement alive, with real processes (scripts/up.py's Cluster,
TCP backend, a 0.5 s lease):

- between PrepareReceive and its Decode call (the whole prefill) the router renews the lease, so a
  prefill that takes several leases still completes, with the tokens of one process;
- a request prepared on the decode instance whose router is gone (nobody renews, nobody calls Decode)
  is freed there once its placement expires: the blocks come back, nothing is renewed forever.
"""
from __future__ import annotations

import time
import uuid

import grpc
import pytest

from common.client import RouterClient
from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.metadata.store import MetadataStore
from common.rpc import client as rpc_client
from common.rpc import convert
from common.rpc.protos import decode_pb2, decode_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc, router_pb2
from common.sampling_params import SamplingParams
from scripts.up import Cluster, ClusterConfig
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.timeout(300)

LEASE_S = 0.5
PROMPT = [(13 * i + 7) % 300 + 10 for i in range(900)]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    # 16 layers and 4-token chunks: a prefill of PROMPT takes a few leases, even on a fast machine
    return str(write_random_hf_model(tmp_path_factory.mktemp("lease-model"), "llama", num_attention_heads=6,
                                     num_key_value_heads=2, num_hidden_layers=16, max_position_embeddings=1024,
                                     seed=13))


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    cfg = ClusterConfig(insecure=True,   # the test calls the kvstore, decode and Redis directly (plaintext)
                        model=model, kv_backend="tcp", router_port=0, kvp_tokens=512, decode_kv_tokens=2048,
                        prefill_kv_tokens=1024, chunk_size=4, short_prompt_tokens=64, lease_s=LEASE_S,
                        # fixed 4-token chunks (the pools default to adaptive ones, which would take
                        # the whole prompt at once on an idle machine; 8-token ones took 0.96 s on a
                        # quiet one, under the two leases the test needs)
                        pool_flags=("--chunking", "fixed"),
                        deployment=f"leases-{uuid.uuid4().hex[:8]}", admission=False,
                        log_dir=str(tmp_path_factory.mktemp("lease-logs")))
    with Cluster(cfg) as c:
        yield c


def decode_stats(cluster: Cluster) -> decode_pb2.StatsResponse:
    with rpc_client.blocking_channel(cluster.services["decode"].address, default_deadline_s=5.0) as ch:
        return decode_pb2_grpc.DecodeStub(ch).Stats(decode_pb2.StatsRequest())


def used_blocks(cluster: Cluster) -> int:
    return sum(g.total_blocks - g.free_blocks for g in decode_stats(cluster).groups)


def test_router_keeps_the_lease_through_a_prefill_longer_than_it(cluster, model):
    ref = LLMEngine(EngineConfig(model=model, cache=CacheConfig(block_size=16, num_blocks=128),
                                 scheduler=SchedulerConfig(chunk_size=64))).generate(
        [PROMPT], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0]
    t0 = time.monotonic()
    with RouterClient(cluster.router_address, timeout_s=120) as c:
        evs = list(c.stream(c.request(token_ids=PROMPT, max_tokens=MAX_TOKENS)))
    assert evs[0].started.route == router_pb2.ROUTE_DISAGGREGATED
    ttft = evs[-1].finished.timings.ttft_s
    assert ttft > 2 * LEASE_S, f"the prefill took {ttft:.2f} s: too short to outlive the lease"
    toks = [t for e in evs if e.HasField("delta") for t in e.delta.token_ids]
    assert toks[:len(ref.token_ids)] == ref.token_ids[:len(toks)] and len(toks) >= 1
    assert time.monotonic() - t0 < 120
    wait_until(lambda: used_blocks(cluster) == 0, 10, "decode blocks freed")


def test_prepared_request_of_a_dead_router_is_freed_when_its_lease_expires(cluster):
    store = MetadataStore(cluster.redis_url, deployment=cluster.config.deployment)
    rid = f"orphan-{uuid.uuid4().hex[:8]}"
    try:
        with rpc_client.blocking_channel(cluster.services["kvstore"].address, default_deadline_s=5.0) as ch:
            placement = kvstore_pb2_grpc.KVStoreStub(ch).Reserve(
                kvstore_pb2.ReserveRequest(request_id=rid, num_tokens=700, max_new_tokens=8)).placement
        with rpc_client.blocking_channel(cluster.services["decode"].address, default_deadline_s=5.0) as ch:
            decode_pb2_grpc.DecodeStub(ch).PrepareReceive(
                decode_pb2.PrepareReceiveRequest(request_id=rid, placement=placement))
        assert used_blocks(cluster) > 0
        # the "router" is gone: no renewals, no Decode call
        t0 = time.monotonic()
        wait_until(lambda: store.get_placement(rid) is None, LEASE_S + 5, "placement expired")
        wait_until(lambda: used_blocks(cluster) == 0, 5, "the decode instance freed the prepared blocks")
        assert time.monotonic() - t0 < LEASE_S + 8
        time.sleep(2 * LEASE_S)                              # and nobody brings it back
        assert store.get_placement(rid) is None and used_blocks(cluster) == 0
        # a Decode call that comes too late fails cleanly
        with rpc_client.blocking_channel(cluster.services["decode"].address, default_deadline_s=5.0) as ch:
            with pytest.raises(grpc.RpcError):
                list(decode_pb2_grpc.DecodeStub(ch).Decode(decode_pb2.DecodeRequest(
                    request_id=rid, prompt_token_ids=PROMPT[:700], placement=placement, first_token_id=5,
                    sampling=convert.sampling_to_proto(SamplingParams(max_tokens=8)))))
        assert used_blocks(cluster) == 0
    finally:
        store.close()
