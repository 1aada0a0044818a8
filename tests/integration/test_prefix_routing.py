"""Cache-aware routing through the real services (scripts/up.py's Cluster: Redis, kvstore, a prefill
instance, a decode instance with 2 KVP groups, the router; real processes, gRPC and Redis).

A document, then the same document with another question: the second request's Started event reports
the document's full blocks as cached, it goes to an instance the kvstore's prefix index lists as holding
them, and its tokens and logprobs are those of the single-process engine with prefix caching off. The
index follows evictions (filler prompts push the document out of the prefill instance's cache) and
forgets an instance that leaves (stopped), and requests still succeed after it (the decode instance,
which cached the document's KV it received, prefills the rest of the next question itself).
"""
from __future__ import annotations

import signal
import urllib.request
import uuid

import pytest

from common.client import RouterClient
from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.metadata.prefix_index import PrefixIndex
from common.metadata.store import MetadataStore
from common.model.tokenizer import load_tokenizer
from common.rpc import client as rpc_client
from common.rpc.protos import kvstore_pb2, kvstore_pb2_grpc, router_pb2
from common.sampling_params import SamplingParams
from scripts.up import Cluster, ClusterConfig
from services.router.prefix import prompt_hashes
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.timeout(300)

SHORT = 64                      # prompts below this many tokens skip the prefill pool
BLOCK = 16
MAX_TOKENS = 8


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(11 * i + 29 * seed + 5) % 300 + 10 for i in range(n)]


DOC = prompt(320, 1)            # 20 full blocks
QUESTIONS = [prompt(20 + 4 * k, 10 + k) for k in range(3)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_random_hf_model(tmp_path_factory.mktemp("prefix-model"), "llama", num_hidden_layers=2,
                                     max_position_embeddings=1024, seed=5))


@pytest.fixture(scope="module")
def cold(model):
    """The reference: the single-process engine with prefix caching off."""
    engine = LLMEngine(EngineConfig(model=model, cache=CacheConfig(block_size=BLOCK, num_blocks=128,
                                                                   prefix_caching=False),
                                    scheduler=SchedulerConfig(chunk_size=64)),
                       extra_eos_ids=load_tokenizer(model).eos_token_ids)
    return lambda ids: engine.generate([ids], SamplingParams(max_tokens=MAX_TOKENS))[0]


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    cfg = ClusterConfig(insecure=True, model=model, router_port=0, http_port=-1, prefill_spp=1, kvp_tokens=256,
                        decode_kv_tokens=1024, prefill_kv_tokens=1024, chunk_size=64, short_prompt_tokens=SHORT,
                        deployment=f"prefix-{uuid.uuid4().hex[:8]}", supervise=False,
                        log_dir=str(tmp_path_factory.mktemp("logs")))
    with Cluster(cfg) as c:
        yield c


def generate(cluster: Cluster, ids: list[int]):
    with RouterClient(cluster.router_address, timeout_s=120) as c:
        evs = list(c.stream(c.request(token_ids=ids, max_tokens=MAX_TOKENS)))
    toks = [t for e in evs if e.HasField("delta") for t in e.delta.token_ids]
    lps = [lp for e in evs if e.HasField("delta") for lp in e.delta.logprobs]
    return evs[0].started, toks, lps


def matches(cluster: Cluster, ids: list[int]) -> dict[str, int]:
    """Instance id -> blocks of `ids` the kvstore's index says it holds (MatchPrefix, hashed under each
    live instance's published chain; the full blocks of ids[:-1], as the router asks)."""
    out: dict[str, int] = {}
    with rpc_client.blocking_channel(cluster.kvstore_address) as ch:
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        for inst in stub.ListInstances(kvstore_pb2.ListInstancesRequest(), timeout=10).instances:
            s = inst.scheduling
            assert s.prefix_hash_root and s.prefix_block_size == BLOCK, "prefix caching is on by default"
            hashes = prompt_hashes(ids, s.prefix_hash_root, s.prefix_block_size)
            for m in stub.MatchPrefix(kvstore_pb2.MatchPrefixRequest(block_hashes=hashes), timeout=10).matches:
                if m.instance_id == inst.instance_id:
                    out[m.instance_id] = m.matched_blocks
    return out


def router_counter(cluster: Cluster, name: str, **labels) -> float:
    """The router's counter `name` (summed over the samples with `labels`), from its /metrics."""
    text = urllib.request.urlopen(cluster.metrics_urls["router"], timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def check_exact(cold, ids, toks, lps):
    ref = cold(ids)
    assert toks == ref.token_ids
    assert max(abs(a - b) for a, b in zip(lps, ref.logprobs)) < 1e-4


def test_a_second_question_about_a_document_goes_where_it_is_cached(cluster, cold):
    doc_blocks = len(DOC) // BLOCK
    first = DOC + QUESTIONS[0]
    started, toks, lps = generate(cluster, first)
    assert started.route == router_pb2.ROUTE_DISAGGREGATED and not started.HasField("cached_prompt_tokens")
    check_exact(cold, first, toks, lps)
    prefill_id = started.prefill_instance
    # the prefill instance's heartbeats report the document's blocks to the index
    wait_until(lambda: matches(cluster, first).get(prefill_id, 0) >= doc_blocks, 10, "the index lists the document")

    second = DOC + QUESTIONS[1]
    started, toks, lps = generate(cluster, second)
    held = matches(cluster, second)
    where = started.prefill_instance or started.decode_instance
    assert started.cached_prompt_tokens >= doc_blocks * BLOCK
    assert held.get(where, 0) * BLOCK >= started.cached_prompt_tokens      # sent to an instance holding it
    check_exact(cold, second, toks, lps)                                      # = prefix caching off
    assert router_counter(cluster, "mnemosyne_router_prefix_matched_tokens_total") >= doc_blocks * BLOCK
    assert router_counter(cluster, "mnemosyne_router_prefix_routed_total", target="miss") == 1
    assert router_counter(cluster, "mnemosyne_router_prefix_routed_total",
                          target="prefill" if started.prefill_instance else "decode") == 1

    # Fillers push the document out of the prefill instance's cache (64 blocks): the index follows.
    for k in range(2):
        filler = prompt(500, 40 + k)
        s, toks, lps = generate(cluster, filler)
        assert s.prefill_instance == prefill_id
        check_exact(cold, filler, toks, lps)
    wait_until(lambda: matches(cluster, first).get(prefill_id, 0) < doc_blocks, 10, "the index drops evicted blocks")

    # The prefill instance leaves: none of its entries stays in the index.
    store = MetadataStore(cluster.redis_url, deployment=cluster.config.deployment, password=cluster.redis_password)
    try:
        index = PrefixIndex(store)
        assert index.held(prefill_id)
        svc = cluster.services["prefill"]
        svc.proc.send_signal(signal.SIGTERM)
        svc.proc.wait(30)
        assert not index.held(prefill_id)
        assert prefill_id not in matches(cluster, prompt(500, 41))
        # Without it, the decode instance holding the document prefills the rest itself.
        third = DOC + QUESTIONS[2]
        started, toks, lps = generate(cluster, third)
        assert started.route == router_pb2.ROUTE_DECODE_ONLY
        assert started.cached_prompt_tokens >= doc_blocks * BLOCK
        assert matches(cluster, third).get(started.decode_instance, 0) >= doc_blocks
        check_exact(cold, third, toks, lps)
        assert prefill_id not in matches(cluster, third)
    finally:
        store.close()
