"""Overload: a burst of far more requests than one small decode instance serves within a tight TTFT
SLO, after a first like it (admission learns online what load adds). Admitted requests meet it on
average (p90 within three iterations), the rest are rejected promptly with
RESOURCE_EXHAUSTED and a retry hint (admission's, or the kvstore's KV-full one), and none hangs
(every call has a deadline)."""
from __future__ import annotations

import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from common.auth import bearer, resolve_api_key
from common.client import RouterClient
from common.metrics import TTFT_BUCKETS
from common.rpc import client as rpc_client
from common.rpc.protos import router_pb2_grpc
from common.rpc.status import retry_after_s
from scripts.up import Cluster, ClusterConfig
from tests.fixtures.hf_models import write_random_hf_model

pytestmark = pytest.mark.timeout(300)

TTFT_SLO_S = 0.6
BURST = 96                 # more than the decode instance's KV holds at once: some are refused for KV
PROMPT = 200               # the burst's 96 prompts of 200 tokens take ~1 s here, ~2x the SLO (with 120
                           # tokens and a 1 s SLO, once admission stopped over-predicting, this machine
                           # served all 96 within 0.64 s: no overload)
ITERATION_BUDGET_S = 0.16
DEADLINE_S = 30.0
# p90 within three iterations of the SLO, on the router's clock: the largest bucket bound of its
# first-token histogram within that (1.0 s for 0.6 + 3 x 0.16)
P90_BOUND_S = max(b for b in TTFT_BUCKETS if b <= TTFT_SLO_S + 3 * ITERATION_BUDGET_S)


def prompt(n: int, seed: int) -> list[int]:
    return [(7 * i + 13 * seed + 3) % 300 + 10 for i in range(n)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = write_random_hf_model(tmp_path_factory.mktemp("overload-model"), "llama", num_hidden_layers=2,
                                  max_position_embeddings=512, seed=5)
    cfg = ClusterConfig(model=str(model), kv_backend="tcp", router_port=0, prefill_spp=1, decode_kvp=1,
                        decode_kv_tokens=4096, prefill_kv_tokens=1024, chunk_size=64, short_prompt_tokens=256,
                        deployment=f"overload-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp("logs")))
    with Cluster(cfg) as c:
        yield c


def one(stub: router_pb2_grpc.RouterStub, ids: list[int]) -> dict:
    """One request with its own TTFT SLO: ttft (None if rejected), code, retry hint, seconds. Timed
    from the call on a channel that is already connected (a client reuses its channel; 96 handshakes
    at once on this 2-core machine are the test's own cost, not the service's)."""
    req = RouterClient.request(token_ids=ids, max_tokens=4, ttft_slo_s=TTFT_SLO_S)
    t0 = time.monotonic()
    ttft = predicted = None
    try:
        for ev in stub.Generate(req, timeout=DEADLINE_S):
            if ev.WhichOneof("event") == "started" and ev.started.HasField("predicted_ttft_s"):
                predicted = ev.started.predicted_ttft_s
            if ev.WhichOneof("event") == "delta" and ev.delta.token_ids and ttft is None:
                ttft = time.monotonic() - t0
        return {"ttft": ttft, "code": "OK", "retry": None, "s": time.monotonic() - t0, "predicted": predicted}
    except grpc.RpcError as e:
        return {"ttft": None, "code": e.code().name, "retry": retry_after_s(e), "s": time.monotonic() - t0,
                "details": e.details()}


def router_metrics(cluster: Cluster) -> list[str]:
    return urllib.request.urlopen(cluster.metrics_urls["router"], timeout=10).read().decode().splitlines()


def router_ttft_totals(cluster: Cluster, within_s: float) -> tuple[float, float, float]:
    """(count, sum, count at most `within_s`: one of its bucket bounds) of the router's first-token
    histogram, over all prompt classes."""
    count = total = within = 0.0
    for line in router_metrics(cluster):
        if line.startswith("mnemosyne_time_to_first_token_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith("mnemosyne_time_to_first_token_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("mnemosyne_time_to_first_token_seconds_bucket") and f'le="{within_s}"' in line:
            within += float(line.rsplit(" ", 1)[1])
    return count, total, within


def test_overload_admits_what_meets_the_slo_and_rejects_the_rest(cluster: Cluster):
    with rpc_client.blocking_channel(cluster.router_address, metadata=bearer(resolve_api_key())) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        stub = router_pb2_grpc.RouterStub(ch)
        # Warm up: the router's admission corrects the pools' own model by measured TTFTs alone, and
        # learns its load factor from a first burst like the one judged (what the load adds to a
        # prediction is learned online, from the load this deployment sees).
        for i in range(4):      # seeds the bursts do not use: prompt(n, s) repeats with period 300
            one(stub, prompt(PROMPT, 200 + i))     # in s, and a repeated prompt would hit the prefix cache
        with ThreadPoolExecutor(BURST) as pool:
            list(pool.map(lambda i: one(stub, prompt(PROMPT, 100 + i)), range(BURST)))
        time.sleep(1.0)
        before = router_ttft_totals(cluster, P90_BOUND_S)
        with ThreadPoolExecutor(BURST) as pool:
            results = list(pool.map(lambda i: one(stub, prompt(PROMPT, i)), range(BURST)))
    after = router_ttft_totals(cluster, P90_BOUND_S)
    learned = [line for line in router_metrics(cluster) if line.startswith(("mnemosyne_admission_load_factor",
                                                                           "mnemosyne_admission_ttft_"))]
    print("router learned:", learned)
    ok = [r for r in results if r["code"] == "OK"]
    rejected = [r for r in results if r["code"] != "OK"]
    codes = {r["code"] for r in rejected}
    print(f"admitted {len(ok)}, rejected {len(rejected)} {codes}; "
          f"(TTFT, predicted) {sorted((round(r['ttft'], 3), round(r['predicted'] or 0, 3)) for r in ok)}")
    assert ok and rejected, "the burst must overload the instance but some requests must get through"
    assert codes == {"RESOURCE_EXHAUSTED"}
    assert all(r["retry"] is not None and r["retry"] > 0 for r in rejected), [
        r["details"] for r in rejected if not r["retry"]]
    # rejected promptly: the router rejects a queued request at its latest start (within the SLO on its
    # clock); the rest is this machine's 2 cores shared by the burst's 96 client threads and the services
    assert max(r["s"] for r in rejected) < TTFT_SLO_S + 1.0, sorted((round(r["s"], 3), r["details"])
                                                                 for r in rejected)[-3:]
    ttfts = sorted(r["ttft"] for r in ok)
    # Admission predicts each prompt to the end of the decode instance's iteration (up to its budget,
    # 0.8 x the 0.2 s TBT SLO) that finishes it, times the load factor learned from the first burst.
    # How fast a burst runs still varies with what else the 2 cores do (its iterations took 0.15-0.42 s
    # for the same work): over 17 runs here the mean was 0.25-0.47 s and the p90 0.28-0.73 s, 11 of 17
    # bursts met the SLO with every admitted request, the worst with 57% (before the iteration ends and
    # the load factor: mean 0.50-0.54 s here, 0.62 s once in CI, p90 0.78-0.99 s).
    # The SLO and the prediction run from the request's arrival at the router (router.proto Started);
    # the client's clock above also holds the test's own 96 threads on the same 2 cores (0.25 s of a
    # 0.48 s mean, with the machine loaded; its p90 reached 1.15 s in 3 of 7 runs on a slow day): the
    # mean and the p90 are judged on the router's TTFTs of the burst, the p90 by its histogram's bucket.
    count, total, within = (a - b for a, b in zip(after, before))
    print(f"router-side TTFT mean {total / count:.3f}s over {count}, {within:.0f} within {P90_BOUND_S}s; "
          f"client-side mean {sum(ttfts) / len(ttfts):.3f}s, p90 {ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))]:.3f}s")
    assert count == len(ok)
    assert total / count <= TTFT_SLO_S, (total / count, ttfts)
    assert within >= 0.9 * count, (within, count, ttfts)
    assert all(r["s"] < DEADLINE_S for r in results)
