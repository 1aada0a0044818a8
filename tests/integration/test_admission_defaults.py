"""`make up` at its defaults (scripts/up.py's Cluster: built-in model, prefill spp = 2, decode
kvp = 2, the router's default SLOs) admits and answers prompts of 256, 3,000 and 7,500 tokens (the
7,500-token answer, minutes of CPU, in `make test-all`; `make test` sees it admitted): the
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
from common.errors import CapacityError
from common.rpc import client as rpc_client
from common.rpc.protos import router_pb2, router_pb2_grpc
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


def answer(cluster: Cluster, n: int) -> str:
    with RouterClient(cluster.router_address, timeout_s=1200) as c:
        out = c.complete(token_ids=prompt(n, n), max_tokens=2)
    assert out.prompt_tokens == n and len(out.token_ids) == 2, (n, out)
    return out.route


def test_defaults_admit_and_answer_256_and_3000_token_prompts(cluster: Cluster):
    assert {answer(cluster, n) for n in (256, 3000)} == {"disaggregated"}


@pytest.mark.slow
def test_defaults_answer_a_7500_token_prompt(cluster: Cluster):
    """Whole: minutes of prefill on this CPU at the defaults (`make test-all`); `make test` checks
    that it is admitted (below)."""
    assert answer(cluster, 7500) == "disaggregated"


def test_a_7500_token_prompt_is_admitted_and_a_tight_slo_beside_it_is_rejected_quickly(cluster: Cluster):
    """A 300-token prompt alone takes t; asking for its first token within 2t is fine on an idle
    deployment. A 7,500-token prompt is admitted at the defaults (its deadline grows with its
    predicted prefill time). Sent again with a deadline 0.5 s past that prediction, it has less slack
    than the 300-token prompt's work: the prefill pool's LARS must keep it first, so the same
    300-token request with its 2t SLO is rejected at once with RESOURCE_EXHAUSTED and a retry hint
    (gRPC pushback). (With the default deadline, LARS runs the short one first and admission, which
    predicts that order, admits it.) Then the long one is cancelled and the deployment still serves."""
    with RouterClient(cluster.router_address, timeout_s=600) as c:
        alone = c.complete(token_ids=prompt(300, 5), max_tokens=2).ttft_s
        assert c.complete(token_ids=prompt(300, 6), max_tokens=2, ttft_slo_s=2 * alone + 0.5).token_ids
    slo = 2 * alone + 0.5
    with rpc_client.blocking_channel(cluster.router_address, metadata=cluster.auth_metadata) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        probe = stub.Generate(RouterClient.request(token_ids=prompt(7500, 1), max_tokens=2), timeout=1200)
        started = next(iter(probe))
        assert started.WhichOneof("event") == "started", started
        st = started.started
        assert st.prompt_tokens == 7500 and st.route == router_pb2.ROUTE_DISAGGREGATED
        assert st.HasField("predicted_ttft_s") and 0 < st.predicted_ttft_s <= st.ttft_slo_s
        probe.cancel()
        time.sleep(1.5)             # the router and the prefill engine have let the probe go
        # Another prompt of the same length: the probe's prefilled chunks stay in the prefix cache,
        # and a prompt that reused them would have less work left, hence more slack.
        long = stub.Generate(RouterClient.request(token_ids=prompt(7500, 2), max_tokens=2,
                                                  ttft_slo_s=st.predicted_ttft_s + 0.5), timeout=1200)
        events = iter(long)
        assert next(events).WhichOneof("event") == "started"
        # At once, before the first progress event: the router knows what it admitted. (A prefill
        # that outruns its prediction gains slack as it goes; given seconds, the long prompt can
        # afford the short one first, and LARS rightly lets it pass: waiting for the first progress
        # event, one chunk of ~2.5 s in, it was admitted that way whenever the pool's correction had
        # been learned on a busier machine than the one the long prompt then ran on.)
        time.sleep(0.1)
        req = RouterClient.request(token_ids=prompt(300, 7), max_tokens=2, ttft_slo_s=slo)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(req, timeout=60))
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert time.monotonic() - t0 < 2.0, "rejected quickly"
        assert "ttft_slo" in info.value.details() and retry_after_s(info.value) > 0
        long.cancel()
    # The cancelled prompt leaves the prefill instance's queue at once (router and engine gauges);
    # the router's next load sample (every 0.25 s) shows it: admitted again within seconds.
    deadline = time.monotonic() + 10.0
    with RouterClient(cluster.router_address, timeout_s=600) as c:
        while True:
            try:
                assert len(c.complete(token_ids=prompt(256, 8), max_tokens=2).token_ids) == 2
                break
            except CapacityError:
                assert time.monotonic() < deadline, "still refused 10 s after the long prompt was cancelled"
                time.sleep(0.5)
