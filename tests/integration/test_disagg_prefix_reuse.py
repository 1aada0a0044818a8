"""The decode instance's prefix cache on the disaggregated path, with real processes (scripts/up.py's
Cluster, TCP backend), driving the flow the router drives (kvstore.Reserve -> decode.PrepareReceive
-> prefill.Prefill -> decode.Decode) by hand, with PrepareReceiveRequest.prompt_token_ids set.

A chat's second turn (the first turn's prompt, its answer, a question) reaches the decode instance that
decoded the first turn: its destination says which leading tokens the instance holds already
(GroupReceiver.cached_tokens: the full blocks of the first turn's prompt and answer), the prefill
instance sends only the rest (PrefillDone.kv_bytes, the decode side's received-bytes counter), and the
tokens equal those of one process with caching off. A Decode that brings another prompt than the one
prepared is refused (INVALID_ARGUMENT) and frees its blocks.
"""
from __future__ import annotations

import urllib.request
import uuid
from types import SimpleNamespace

import grpc
import pytest

from common.client import RouterClient
from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.metrics import kv_transfer_bytes
from common.rpc import client as rpc_client
from common.rpc import convert
from common.rpc.protos import common_pb2, decode_pb2, decode_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc, prefill_pb2, \
    prefill_pb2_grpc
from common.sampling_params import SamplingParams
from scripts.up import Cluster, ClusterConfig
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.timeout(300)

PROMPT = [(7 * i + 3) % 300 + 10 for i in range(150)]
QUESTION = [(11 * i + 5) % 280 + 12 for i in range(9)]
MAX_TOKENS = 4
SAMPLING = common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
BLOCK = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_random_hf_model(tmp_path_factory.mktemp("prefix-reuse-model"), "llama", num_attention_heads=4,
                                 num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=512, seed=17)


@pytest.fixture(scope="module")
def rpc(model, tmp_path_factory):
    cfg = ClusterConfig(model=str(model), kv_backend="tcp", router_port=0, prefill_spp=1, decode_kvp=1,
                        decode_kv_tokens=1024, prefill_kv_tokens=512, chunk_size=64, short_prompt_tokens=64,
                        block_size=BLOCK, admission=False, pool_flags=("--chunking", "fixed"), insecure=True,
                        deployment=f"prefix-reuse-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp("prefix-reuse-logs")))
    with Cluster(cfg) as c:
        channels = {name: rpc_client.blocking_channel(c.services[name].address, default_deadline_s=30.0)
                    for name in ("kvstore", "decode", "prefill")}
        yield SimpleNamespace(kvstore=kvstore_pb2_grpc.KVStoreStub(channels["kvstore"]),
                              decode=decode_pb2_grpc.DecodeStub(channels["decode"]),
                              prefill=prefill_pb2_grpc.PrefillStub(channels["prefill"]),
                              decode_metrics=c.metrics_urls["decode"], prefill_metrics=c.metrics_urls["prefill"],
                              router=c.router_address)
        for ch in channels.values():
            ch.close()


def received_bytes(url: str) -> float:
    """The decode instance's mnemosyne_kv_transfer_bytes_total{direction="recv"}."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mnemosyne_kv_transfer_bytes_total{") and 'direction="recv"' in line)


def prepared(rpc, rid: str, prompt: list[int]) -> tuple[common_pb2.Placement, common_pb2.KVDestination]:
    placement = rpc.kvstore.Reserve(kvstore_pb2.ReserveRequest(request_id=rid, num_tokens=len(prompt),
                                                               max_new_tokens=MAX_TOKENS)).placement
    dest = rpc.decode.PrepareReceive(decode_pb2.PrepareReceiveRequest(
        request_id=rid, placement=placement, prompt_token_ids=prompt)).destination
    return placement, dest


def turn(rpc, prompt: list[int]) -> tuple[list[int], int, common_pb2.KVDestination]:
    """One disaggregated request by hand: (tokens, PrefillDone.kv_bytes, the KV destination)."""
    rid = f"pr-{uuid.uuid4().hex[:10]}"
    placement, dest = prepared(rpc, rid, prompt)
    first, kv_bytes = None, None
    for ev in rpc.prefill.Prefill(prefill_pb2.PrefillRequest(request_id=rid, token_ids=prompt, sampling=SAMPLING,
                                                             placement=placement, destination=dest), timeout=60):
        if ev.HasField("first_token"):
            first = ev.first_token.token_id
        if ev.HasField("done"):
            kv_bytes = ev.done.kv_bytes
    tokens = [first]
    for ev in rpc.decode.Decode(decode_pb2.DecodeRequest(request_id=rid, prompt_token_ids=prompt, placement=placement,
                                                         first_token_id=first, sampling=SAMPLING), timeout=60):
        tokens += ev.delta.token_ids
    rpc.kvstore.Release(kvstore_pb2.ReleaseRequest(request_id=rid, epoch=placement.epoch))
    return tokens, kv_bytes, dest


def test_a_second_turn_receives_only_the_tokens_the_decode_cache_lacks(rpc, model):
    before = received_bytes(rpc.decode_metrics)
    toks1, bytes1, dest1 = turn(rpc, PROMPT)
    mid = received_bytes(rpc.decode_metrics)
    second = PROMPT + toks1 + QUESTION
    toks2, bytes2, dest2 = turn(rpc, second)
    after = received_bytes(rpc.decode_metrics)
    # the decode side computed the first turn's 150 prompt tokens' KV (received) and 3 answer tokens
    cached = (len(PROMPT) + MAX_TOKENS - 1) // BLOCK * BLOCK
    assert [g.cached_tokens for g in dest1.groups] == [0]
    assert sum(g.cached_tokens for g in dest2.groups) == cached
    per_token = kv_transfer_bytes(convert.layout_from_proto(dest1.layout), 1)
    assert bytes1 == per_token * len(PROMPT) and bytes2 == per_token * (len(second) - cached)
    assert mid - before == bytes1 and after - mid == bytes2     # what the decode side counted received
    ref = LLMEngine(EngineConfig(model=str(model), cache=CacheConfig(block_size=BLOCK, num_blocks=64,
                                                                     prefix_caching=False),
                                 scheduler=SchedulerConfig(chunk_size=64)))
    for prompt, toks in ((PROMPT, toks1), (second, toks2)):
        assert toks == ref.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0].token_ids


def test_a_prompt_the_decode_instance_prefills_itself_streams_its_progress(rpc):
    """Decode without first_token_id: the instance prefills the prompt in chunks (64 tokens here) and
    sends DecodeProgress after each one before the first token (the router's admission counts what
    such a prompt has left by them)."""
    ids = [(13 * i + 7) % 290 + 11 for i in range(150)]
    evs = list(rpc.decode.Decode(decode_pb2.DecodeRequest(request_id=f"dp-{uuid.uuid4().hex[:10]}",
                                                          prompt_token_ids=ids, sampling=SAMPLING), timeout=60))
    kinds = [e.WhichOneof("event") for e in evs]
    assert kinds == ["progress", "progress"] + ["delta"] * MAX_TOKENS + ["finished"]
    assert [(e.progress.tokens_done, e.progress.tokens_total) for e in evs[:2]] == [(64, 150), (128, 150)]


def test_a_decode_with_another_prompt_than_the_prepared_one_is_refused(rpc):
    toks, _, _ = turn(rpc, PROMPT)                           # (cached at the decode side if not yet)
    rid = f"pr-{uuid.uuid4().hex[:10]}"
    placement, dest = prepared(rpc, rid, PROMPT + toks)
    assert sum(g.cached_tokens for g in dest.groups) > 0
    other = [PROMPT[0] + 1] + PROMPT[1:] + toks
    with pytest.raises(grpc.RpcError) as info:
        list(rpc.decode.Decode(decode_pb2.DecodeRequest(request_id=rid, prompt_token_ids=other, placement=placement,
                                                        first_token_id=5, sampling=SAMPLING), timeout=60))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "differs from the one prepared" in info.value.details()
    rpc.decode.Abort(common_pb2.AbortRequest(request_id=rid))
    rpc.kvstore.Release(kvstore_pb2.ReleaseRequest(request_id=rid, epoch=placement.epoch))
    stats = lambda: rpc.decode.Stats(decode_pb2.StatsRequest())          # noqa: E731
    wait_until(lambda: all(g.free_blocks == g.total_blocks for g in stats().groups), 10, "blocks freed")


def test_through_the_router_a_second_turn_sends_only_what_the_decode_cache_lacks(rpc, model):
    """The same through the router (make up's flow): it sends the prompt with PrepareReceive, so the
    decode instance's cached prefix does not travel again. The second turn's uncached rest (16 + 60
    tokens) is above short_prompt_tokens, so it is prefilled on the prefill instance whether or not the
    kvstore's index has heard of the decode side's blocks yet (with a short rest and the blocks indexed
    the router would send it decode-only, to the instance holding them)."""
    prompt = [(5 * i + 2) % 290 + 11 for i in range(140)]
    question = [(13 * i + 7) % 270 + 15 for i in range(60)]
    per_token = None
    with RouterClient(rpc.router, timeout_s=120) as client:
        before = received_bytes(rpc.decode_metrics)
        first = client.complete(token_ids=prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
        mid = received_bytes(rpc.decode_metrics)
        second = prompt + list(first.token_ids) + question
        again = client.complete(token_ids=second, max_tokens=MAX_TOKENS, ignore_eos=True)
        after = received_bytes(rpc.decode_metrics)
    assert first.route == again.route == "disaggregated"
    per_token = (mid - before) / len(prompt)
    cached = (len(prompt) + MAX_TOKENS - 1) // BLOCK * BLOCK      # the first turn's full blocks
    assert per_token > 0 and after - mid == per_token * (len(second) - cached), (mid - before, after - mid)
    ref = LLMEngine(EngineConfig(model=str(model), cache=CacheConfig(block_size=BLOCK, num_blocks=64,
                                                                     prefix_caching=False),
                                 scheduler=SchedulerConfig(chunk_size=64)))
    for p, out in ((prompt, first), (second, again)):
        assert list(out.token_ids) == ref.generate([p], SamplingParams(max_tokens=MAX_TOKENS,
                                                                       ignore_eos=True))[0].token_ids


def test_a_follow_up_sent_right_after_the_answer_is_prefilled_where_its_prefix_is_cached(rpc, model):
    """The decode instance reports its newly cached blocks to the kvstore's index before its stream
    ends (a heartbeat at the request's end), so a second turn sent the moment the first one's answer
    is complete already finds them: its uncached rest (16 + 9 tokens) is short, and the router sends
    it decode-only to the instance holding the first turn (not to the prefill pool)."""
    prompt = [(3 * i + 1) % 280 + 13 for i in range(150)]
    with RouterClient(rpc.router, timeout_s=120) as client:
        first = client.complete(token_ids=prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
        second = prompt + list(first.token_ids) + QUESTION
        again = client.complete(token_ids=second, max_tokens=MAX_TOKENS, ignore_eos=True)
    cached = (len(prompt) + MAX_TOKENS - 1) // BLOCK * BLOCK
    assert (first.route, again.route) == ("disaggregated", "decode_only")
    assert again.cached_prompt_tokens == cached
    ref = LLMEngine(EngineConfig(model=str(model), cache=CacheConfig(block_size=BLOCK, num_blocks=64,
                                                                     prefix_caching=False),
                                 scheduler=SchedulerConfig(chunk_size=64)))
    assert list(again.token_ids) == ref.generate([second], SamplingParams(max_tokens=MAX_TOKENS,
                                                                          ignore_eos=True))[0].token_ids


def prefill_cache_hits(url: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mnemosyne_prefix_cache_hit_tokens_total"))


def test_a_cache_only_prefill_fills_the_prefill_cache_and_sends_nothing(rpc, model):
    prompt = [(9 * i + 4) % 270 + 17 for i in range(120)]
    events = list(rpc.prefill.Prefill(prefill_pb2.PrefillRequest(
        request_id=f"warm-{uuid.uuid4().hex[:8]}", token_ids=prompt, sampling=SAMPLING, cache_only=True), timeout=60))
    kinds = [ev.WhichOneof("event") for ev in events]
    assert "first_token" not in kinds and kinds[-1] == "done" and "progress" in kinds, kinds
    assert events[-1].done.kv_bytes == 0
    assert max(ev.progress.tokens_done for ev in events if ev.HasField("progress")) == len(prompt)
    hits = prefill_cache_hits(rpc.prefill_metrics)
    toks, kv_bytes, dest = turn(rpc, prompt)
    assert prefill_cache_hits(rpc.prefill_metrics) - hits == len(prompt) // BLOCK * BLOCK
    # the KV of the cached blocks was sent from the cache, all of it: the decode side decodes exactly
    assert kv_bytes == kv_transfer_bytes(convert.layout_from_proto(dest.layout), len(prompt))
    ref = LLMEngine(EngineConfig(model=str(model), cache=CacheConfig(block_size=BLOCK, num_blocks=64,
                                                                     prefix_caching=False),
                                 scheduler=SchedulerConfig(chunk_size=64)))
    assert toks == ref.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0].token_ids


def test_a_cache_only_prefill_takes_no_destination(rpc):
    rid = f"pr-{uuid.uuid4().hex[:10]}"
    placement, dest = prepared(rpc, rid, PROMPT)
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(rpc.prefill.Prefill(prefill_pb2.PrefillRequest(request_id=rid, token_ids=PROMPT, sampling=SAMPLING,
                                                                destination=dest, cache_only=True), timeout=60))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "cache_only" in info.value.details()
    finally:
        rpc.decode.Abort(common_pb2.AbortRequest(request_id=rid))
        rpc.kvstore.Release(kvstore_pb2.ReleaseRequest(request_id=rid, epoch=placement.epoch))
