"""Every service's /metrics during an end-to-end run (scripts/up.py's Cluster, a tiny random HF
model): each family the services record is there with values that match the requests sent."""
from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from common.client import RouterClient
from common.metrics import scrape, total
from scripts.up import Cluster, ClusterConfig
from tests.fixtures.waiting import wait_until
from tests.fixtures.hf_models import write_random_hf_model

pytestmark = pytest.mark.timeout(300)

SHORT = 64
MAX_TOKENS = 6


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(7 * i + 13 * seed + 3) % 300 + 10 for i in range(n)]


PROMPTS = [prompt(n, s) for s, n in enumerate((20, 150, 40, 200))]     # 2 short, 2 via prefill




def has(samples: dict, name: str) -> bool:
    return any(n == name for n, _ in samples)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = write_random_hf_model(tmp_path_factory.mktemp("metrics-model"), "llama", num_hidden_layers=2,
                                  max_position_embeddings=512, seed=3)
    cfg = ClusterConfig(model=str(model), kv_backend="tcp", router_port=0, prefill_spp=1, decode_kvp=1,
                        decode_kv_tokens=2048, prefill_kv_tokens=1024, chunk_size=64,
                        short_prompt_tokens=SHORT, deployment=f"metrics-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp("logs")))
    with Cluster(cfg) as c:
        yield c


def test_every_service_exports_its_metrics(cluster: Cluster):
    urls = cluster.metrics_urls
    assert set(urls) == {"kvstore", "prefill", "decode", "router"}, urls
    with RouterClient(cluster.router_address, timeout_s=120) as client:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            outs = list(pool.map(lambda p: client.complete(token_ids=p, max_tokens=MAX_TOKENS), PROMPTS))
        # one request the router refuses (prompt too long): an error by status code
        with pytest.raises(Exception):
            client.complete(token_ids=prompt(600), max_tokens=2)
    streamed = sum(len(o.token_ids) for o in outs)
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    n = len(PROMPTS)

    import time
    deadline = time.monotonic() + 10
    while True:     # the engines publish their gauges after their last step; blocks are freed last
        m = {name: scrape(url) for name, url in urls.items()}
        r, p, d = m["router"], m["prefill"], m["decode"]
        free_ok = total(d, "mnemosyne_kv_blocks_used") == 0 and total(p, "mnemosyne_kv_blocks_used") == 0
        if free_ok or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    # router: one TTFT / latency / queue observation per request, one TBT per token after the first
    assert total(r, "mnemosyne_time_to_first_token_seconds_count") == n
    assert total(r, "mnemosyne_request_latency_seconds_count") == n
    assert total(r, "mnemosyne_queue_time_seconds_count") == n
    assert total(r, "mnemosyne_time_between_tokens_seconds_count") == streamed - n
    assert 0 < total(r, "mnemosyne_time_to_first_token_seconds_sum") < 60 * n
    assert total(r, "mnemosyne_requests_finished_total") == n
    assert total(r, "mnemosyne_slo_requests_total", slo="ttft") == n
    assert total(r, "mnemosyne_admission_decisions_total", outcome="admitted") == n
    assert total(r, "mnemosyne_active_requests") == 0
    assert total(r, "mnemosyne_admission_queued_requests") == 0
    assert total(r, "mnemosyne_slo_target_seconds", slo="ttft", prompt_class="short") > 0
    assert total(r, "mnemosyne_rpc_errors_total", code="INVALID_ARGUMENT") == 1

    # engines: every token computed once; prompts split into chunks; KV all free again
    generated = total(p, "mnemosyne_tokens_total", kind="generated") + \
        total(d, "mnemosyne_tokens_total", kind="generated")
    assert generated == streamed
    prompt_tokens = total(p, "mnemosyne_tokens_total", kind="prompt") + \
        total(d, "mnemosyne_tokens_total", kind="prompt")
    assert prompt_tokens == sum(len(x) for x in PROMPTS)
    assert total(p, "mnemosyne_prefill_chunk_tokens_sum") == sum(len(x) for x in PROMPTS if len(x) >= SHORT)
    for e in (p, d):
        assert total(e, "mnemosyne_iteration_seconds_count") > 0
        assert total(e, "mnemosyne_batch_size_count") == total(e, "mnemosyne_iteration_seconds_count")
        assert total(e, "mnemosyne_kv_blocks_used") == 0
        assert total(e, "mnemosyne_kv_blocks_free") > 0
        assert total(e, "mnemosyne_kv_block_size_tokens") == 16
        assert total(e, "mnemosyne_scheduler_queued_prefill_tokens") == 0
        assert total(e, "mnemosyne_active_requests") == 0
        assert 0 < total(e, "mnemosyne_perf_model_scale") < 100    # LARS + adaptive: an online-corrected model
    long_prompts = [x for x in PROMPTS if len(x) >= SHORT]
    assert total(p, "mnemosyne_kv_transfer_seconds_count", backend="tcp", direction="send") == len(long_prompts)
    assert total(d, "mnemosyne_kv_transfer_seconds_count", backend="tcp", direction="recv") == len(long_prompts)
    sent = total(p, "mnemosyne_kv_transfer_bytes_total", direction="send")
    assert sent > 0 and sent == total(d, "mnemosyne_kv_transfer_bytes_total", direction="recv")

    # kvstore: every reservation, and both instances live
    k = m["kvstore"]
    assert total(k, "mnemosyne_kvstore_reservations_total", outcome="reserved") == n
    # read from Redis once a second (METRICS_REFRESH_S), beside the lease reaper: the whole burst can
    # finish between two refreshes, so wait for the next one
    wait_until(lambda: total(scrape(urls["kvstore"]), "mnemosyne_kvstore_live_instances") == 2, 5.0,
               "the kvstore's live-instance gauge shows both instances")
    for name, s in m.items():
        assert has(s, "process_resident_memory_bytes"), name
