"""`make up` at its defaults (scripts/up.py's Cluster: built-in model, prefill spp = 2, decode
kvp = 2, the router's default SLOs) admits and answers prompts of 256, 3,000 and 7,500 tokens: the
default TTFT deadline grows with the prompt's predicted prefill time on the pools' own model, so an
idle deployment admits every prompt that fits max_model_len. Then, under load, a request whose own
TTFT SLO cannot be met is rejected quickly with RESOURCE_EXHAUSTED and a retry hint.
"""
from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest

from common.client import RouterClient
from common.rpc import client as rpc_client
from common.rpc.protos import router_pb2_grpc
from common.rpc.status import retry_after_s
from scripts.up import Cluster, ClusterConfig

pytestmark = [pytest.mark.timeout(1500)]


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(7 * i + 13 * seed + 3) % 5000 + 100 for i in range(n)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cfg = ClusterConfig(kv_backend="tcp", router_port=0, deployment=f"defaults-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp("logs")))
    with Cluster(cfg) as c:
        yield c


def test_defaults_admit_and_answer_256_3000_and_7500_token_prompts(cluster: Cluster):
    routes = {}
    for n in (256, 3000, 7500):
        with RouterClient(cluster.router_address, timeout_s=1200) as c:
            out = c.complete(token_ids=prompt(n, n), max_tokens=2)
        assert out.prompt_tokens == n and len(out.token_ids) == 2, (n, out)
        routes[n] = out.route
    assert set(routes.values()) == {"disaggregated"}


def test_a_tight_slo_under_load_is_rejected_quickly_with_a_retry_hint(cluster: Cluster):
    """A 300-token prompt alone takes t; asking for its first token within 2t is fine on an idle
    deployment, but not while a 3,000-token prompt occupies the prefill instance: rejected at once
    with RESOURCE_EXHAUSTED and a retry hint (gRPC pushback)."""
    with RouterClient(cluster.router_address, timeout_s=600) as c:
        alone = c.complete(token_ids=prompt(300, 5), max_tokens=2).ttft_s
        assert c.complete(token_ids=prompt(300, 6), max_tokens=2, ttft_slo_s=2 * alone + 0.5).token_ids
    slo = 2 * alone + 0.5
    t = threading.Thread(target=lambda: RouterClient(cluster.router_address, timeout_s=1200).complete(
        token_ids=prompt(3000, 1), max_tokens=2), daemon=True)
    t.start()
    time.sleep(1.5)                                   # the router has seen the load by now
    req = RouterClient.request(token_ids=prompt(300, 7), max_tokens=2, ttft_slo_s=slo)
    t0 = time.monotonic()
    with rpc_client.blocking_channel(cluster.router_address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(router_pb2_grpc.RouterStub(ch).Generate(req, timeout=60))
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert time.monotonic() - t0 < 2.0, "rejected quickly"
    assert "ttft_slo" in info.value.details() and retry_after_s(info.value) > 0
    t.join(1200)
