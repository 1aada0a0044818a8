"""The router's one retry, with real processes (scripts/up.py's Cluster, TCP backend, short leases).

- A decode grid worker is SIGKILLed while a long prompt is being prefilled (no token sent yet): the
  router places the request again once the decode instance is back and the client gets the whole
  answer, equal to the offline engine's, as if nothing happened; the retry is counted by reason, and
  while the decode instance rebuilds, the prefill instance computes the prompt into its prefix cache
  (starting from what the failed attempt computed), and the retry sends that KV, not computing it again.
- The same, once the prefill has passed KVP group 0's share of the prompt (the decode side holds it
  whole): the decode instance replaces the worker in place and keeps group 0's share, so the retry
  receives only group 1's (232 of the 1000 tokens' KV).
- A decode grid worker is SIGKILLed after tokens were streamed: the worker is replaced in place and
  the request resumes (its group-1 KV computed again on the decode instance): the client gets every
  token, equal to the offline engine's, with no retry.
- The decode main process is SIGKILLed after tokens were streamed: no retry (the client would see a
  seam); the stream ends within 5 s with UNAVAILABLE saying tokens were already sent.
In every case no placement, lease or decode block is left afterwards.
- The decode instance's registration lapses just before a request is placed (its record gone from
  Redis, as when a clock step on Redis's host expires it; the instance registers again on its next
  heartbeat): the router places the request again after a heartbeat and the client gets its answer,
  not NOT_FOUND.
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
from common.metadata.store import MetadataStore
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

M = 768
LEASE_S = 2.0
# Both KVP groups; 63 prefill chunks of 16 with a model big enough that they take about a second
# (the fault must land while the prefill runs).
PROMPT = [(13 * i + 7) % 300 + 10 for i in range(1000)]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_random_hf_model(tmp_path_factory.mktemp("retry-model"), "llama", num_attention_heads=8,
                                     num_key_value_heads=2, head_dim=64, num_hidden_layers=6,
                                     intermediate_size=1024, max_position_embeddings=2048, seed=17))


def offline(model: str, prompt: list[int]) -> list[int]:
    engine = LLMEngine(EngineConfig(model=model, cache=CacheConfig(block_size=16, num_blocks=128),
                                    scheduler=SchedulerConfig(chunk_size=64)),
                       extra_eos_ids=load_tokenizer(model).eos_token_ids)
    ids = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS))[0].token_ids
    assert len(ids) == MAX_TOKENS
    return ids


@pytest.fixture(scope="module")
def reference(model) -> list[int]:
    return offline(model, PROMPT)


def fresh(n: int) -> list[int]:
    """PROMPT with another first token: no instance has any of its blocks cached."""
    return [n] + PROMPT[1:]


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    cfg = ClusterConfig(insecure=True,   # the test reads the decode instance's Stats directly (plaintext)
                        model=model, kv_backend="tcp", router_port=0, kvp_tokens=M, decode_kv_tokens=2048,
                        prefill_kv_tokens=2048, prefill_spp=1, chunk_size=16, short_prompt_tokens=64,
                        pool_flags=("--chunking", "fixed"),   # chunks of 16: the prefill streams KV as it goes
                        lease_s=LEASE_S, deployment=f"retry-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp("retry-logs")))
    with Cluster(cfg) as c:
        yield c


def wait_until(cond, timeout_s: float, what: str):
    return _wait_until(cond, timeout_s, what, tolerate=(grpc.RpcError,))


def decode_all_free(cluster: Cluster) -> bool:
    with rpc_client.blocking_channel(cluster.services["decode"].address, default_deadline_s=2.0) as ch:
        stats = decode_pb2_grpc.DecodeStub(ch).Stats(decode_pb2.StatsRequest())
    return len(stats.groups) == 2 and all(g.free_blocks == g.total_blocks for g in stats.groups)


def decode_worker(cluster: Cluster) -> psutil.Process:
    """The decode instance's worker of KVP group 1 (rank 2)."""
    assert len(grid_workers(cluster.services["decode"].pid)) == 2
    return grid_worker(cluster.services["decode"].pid, 2)


def retries(cluster: Cluster) -> float:
    return total(scrape(cluster.metrics_urls["router"]), "mnemosyne_request_retries_total")


def back_to_idle(cluster: Cluster, store: MetadataStore) -> None:
    """No placement or lease in Redis, every decode block free, the decode instance registered."""
    wait_until(lambda: store.num_placements() == 0, LEASE_S + 5, "no placement left")
    wait_until(lambda: decode_all_free(cluster), 60, "every decode block free")
    wait_until(lambda: [i.role for i in store.list_instances()].count("decode") == 1, 30, "decode registered")


def stream(cluster: Cluster, rid: str, kill_when, victim: psutil.Process | None = None,
           prompt: list[int] = PROMPT):
    """Runs one request; SIGKILLs `victim` (default: the decode worker of KVP group 1) at the first
    event for which `kill_when(event, tokens so far)` holds. Returns (tokens, error or None, seconds
    from the kill to the end)."""
    tokens: list[int] = []
    t_kill = None
    with rpc_client.blocking_channel(cluster.router_address, metadata=cluster.auth_metadata) as ch:
        call = router_pb2_grpc.RouterStub(ch).Generate(
            RouterClient.request(token_ids=prompt, max_tokens=MAX_TOKENS, request_id=rid), timeout=120)
        victim = victim or decode_worker(cluster)
        try:
            for ev in call:
                if ev.HasField("delta"):
                    tokens.extend(ev.delta.token_ids)
                if t_kill is None and kill_when(ev, tokens):
                    os.kill(victim.pid, signal.SIGKILL)
                    t_kill = time.monotonic()
        except grpc.RpcError as e:
            assert t_kill is not None, f"the request failed before the fault: {e.code()}: {e.details()}"
            return tokens, e, time.monotonic() - t_kill
    assert t_kill is not None, "the request ended before the fault"
    return tokens, None, time.monotonic() - t_kill


def prefill_cache_hits(cluster: Cluster) -> float:
    return total(scrape(cluster.metrics_urls["prefill"]), "mnemosyne_prefix_cache_hit_tokens_total")


def test_a_worker_lost_before_the_first_token_is_retried_invisibly(cluster, store, reference):
    before, hits_before = retries(cluster), prefill_cache_hits(cluster)
    tokens, err, _ = stream(cluster, f"retried-{uuid.uuid4().hex[:8]}",
                            lambda ev, toks: ev.HasField("progress") and not toks)
    assert err is None, f"{err.code()}: {err.details()}"
    assert tokens == reference
    assert retries(cluster) >= before + 1
    # While the decode instance rebuilt, the prefill instance computed the prompt into its prefix
    # cache (a cache_only Prefill, starting from the blocks the failed attempt had computed): the
    # retry found every full block of the prompt there and sent their KV without computing them.
    full_blocks = len(PROMPT) // 16 * 16
    assert prefill_cache_hits(cluster) >= hits_before + full_blocks + 16
    back_to_idle(cluster, store)


def decode_kv_received(cluster: Cluster) -> float:
    return total(scrape(cluster.metrics_urls["decode"]), "mnemosyne_kv_transfer_bytes_total", direction="recv")


def test_a_worker_lost_once_its_groups_share_arrived_is_retried_with_only_the_lost_share(cluster, store, model):
    """Killed when the prefill has computed 896 of the 1000 tokens (no token sent yet): group 0's 768
    tokens have reached the decode instance, which keeps them through the worker's replacement (named
    in group 0's prefix cache); the router's retry, placed on the same instance, gets them from there
    and receives only group 1's 232 tokens' KV. (The decode side counts KV received by requests whose
    intake completed: the failed attempt's adds nothing.)"""
    prompt = fresh(5)
    wait_until(lambda: decode_all_free(cluster), 60, "decode instance serving")
    before, received = retries(cluster), decode_kv_received(cluster)
    tokens, err, _ = stream(cluster, f"share-{uuid.uuid4().hex[:8]}",
                            lambda ev, toks: ev.HasField("progress") and ev.progress.tokens_done >= 896 and not toks,
                            prompt=prompt)
    assert err is None, f"{err.code()}: {err.details()}"
    assert tokens == offline(model, prompt)
    assert retries(cluster) == before + 1
    share = decode_kv_received(cluster) - received
    # a fault-free request of another fresh 1000-token prompt: the KV of all of it
    back_to_idle(cluster, store)
    with RouterClient(cluster.router_address, timeout_s=120) as c:
        assert len(c.complete(token_ids=fresh(6), max_tokens=2).token_ids) == 2
    whole = decode_kv_received(cluster) - received - share
    assert share * len(prompt) == whole * (len(prompt) - M), (share, whole)
    back_to_idle(cluster, store)


def test_a_worker_lost_after_tokens_were_sent_is_replaced_and_the_request_resumes(cluster, store, model):
    prompt = fresh(7)
    wait_until(lambda: decode_all_free(cluster), 60, "decode instance serving")
    before = retries(cluster)
    pids = {p.pid for p in grid_workers(cluster.services["decode"].pid)}
    rid = f"resume-{uuid.uuid4().hex[:8]}"
    tokens, err, elapsed = stream(cluster, rid, lambda ev, toks: len(toks) >= 3, prompt=prompt)
    assert err is None, f"{err.code()}: {err.details()}"
    assert tokens == offline(model, prompt)
    assert elapsed < 10, f"the rest of the request took {elapsed:.1f} s"
    assert retries(cluster) == before
    now = {p.pid for p in grid_workers(cluster.services["decode"].pid)}
    assert len(now) == 2 and len(now & pids) == 1          # the survivor, and the replaced worker
    back_to_idle(cluster, store)


def test_a_request_placed_while_the_decode_registration_lapsed_is_placed_again(cluster, store):
    """Admission's load sample (refreshed every 0.25 s) still shows the decode instance, the kvstore
    no longer knows it: the first Reserve fails NOT_FOUND, the router waits a heartbeat and places it
    again. The race with the router's next sample and the instance's own re-registration (both every
    0.25 s) is run until the router's log shows the second placement; an attempt that lost it (the
    sample already showed no decode instance: RESOURCE_EXHAUSTED no_instance) is run again."""
    from common.errors import CapacityError
    [decode] = [i.instance_id for i in store.list_instances("decode")]
    log = cluster.log_dir / "router.log"
    short = PROMPT[:40]
    with RouterClient(cluster.router_address, timeout_s=60) as c:
        assert len(c.complete(token_ids=short, max_tokens=1).token_ids) == 1          # connected
        for attempt in range(20):
            wait_until(lambda: [i.role for i in store.list_instances()].count("decode") == 1, 10, "decode registered")
            time.sleep(0.6)                    # the router's sample shows it fresh again
            mark = log.stat().st_size
            store.deregister_instance(decode)
            try:
                out = c.complete(token_ids=short, max_tokens=3, ttft_slo_s=30.0)
            except CapacityError:
                continue                       # the router's sample saw it gone first
            assert len(out.token_ids) == 3
            with log.open() as f:
                f.seek(mark)
                if "placing it again" in f.read():
                    break
        else:
            pytest.fail("no attempt reached the kvstore while the registration was gone: the path was not exercised")
    back_to_idle(cluster, store)


def test_a_decode_instance_lost_after_tokens_were_sent_ends_clearly_within_5_s(cluster, store):
    """Its main process killed: nothing is left to resume the request, and a retry would show the
    client a seam. Last in this module: the instance is started again at the end."""
    wait_until(lambda: decode_all_free(cluster), 60, "decode instance serving")
    before = retries(cluster)
    rid = f"seam-{uuid.uuid4().hex[:8]}"
    tokens, err, elapsed = stream(cluster, rid, lambda ev, toks: len(toks) >= 3,
                                  victim=psutil.Process(cluster.services["decode"].pid), prompt=fresh(8))
    assert err is not None, "the request completed although its decode instance died"
    assert err.code() is grpc.StatusCode.UNAVAILABLE, err
    assert "token(s) were streamed" in err.details() and "not retried" in err.details(), err.details()
    assert elapsed < 5, f"the client waited {elapsed:.1f} s"
    assert retries(cluster) == before
    wait_until(lambda: placement_for(store, rid) is None, LEASE_S + 5, "placement released")
    cluster.services["decode"].proc.wait(10)
    cluster.restart("decode")
    back_to_idle(cluster, store)
    with RouterClient(cluster.router_address, timeout_s=60) as c:      # and it serves again
        assert len(c.complete(token_ids=PROMPT, max_tokens=4).token_ids) == 4
