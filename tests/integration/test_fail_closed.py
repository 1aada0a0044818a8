"""Fail-closed KV with real processes (scripts/up.py's Cluster, TCP backend), driving the disaggregated
flow the router drives (kvstore.Reserve -> decode.PrepareReceive -> prefill.Prefill -> decode.Decode)
by hand, so a test can hand a service a stale placement or corrupt KV on its way:

- a placement released and placed again under the same id has a new epoch: PrepareReceive, Decode
  (prefilled or not) and the prefill's KV with the old one are refused (FAILED_PRECONDITION, or the
  receiver refusing the chunks), and a request prepared under the old one is freed on the decode side;
- KV whose bytes change in flight (a proxy flips one bit) fails its checksum at the receiver: the
  prefill and the Decode call end with DATA_LOSS, Decode yields no token, every block comes back.
"""
from __future__ import annotations

import uuid
from types import SimpleNamespace

import grpc
import pytest

from common.errors import CHECKSUM_MISMATCH
from common.metadata.store import MetadataStore
from common.rpc import client as rpc_client
from common.rpc.protos import (common_pb2, decode_pb2, decode_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc, prefill_pb2,
                               prefill_pb2_grpc)
from scripts.up import Cluster, ClusterConfig
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.kv_proxy import CorruptingProxy
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.timeout(300)

LEASE_S = 3.0
PROMPT = [(7 * i + 3) % 300 + 10 for i in range(150)]
MAX_TOKENS = 4
SAMPLING = common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = write_random_hf_model(tmp_path_factory.mktemp("fail-closed-model"), "llama", num_attention_heads=4,
                                  num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=512, seed=17)
    cfg = ClusterConfig(model=str(model), kv_backend="tcp", router_port=0, prefill_spp=1, decode_kvp=1,
                        decode_kv_tokens=1024, prefill_kv_tokens=512, chunk_size=64, short_prompt_tokens=64,
                        lease_s=LEASE_S, admission=False, pool_flags=("--chunking", "fixed"),
                        insecure=True, deployment=f"fail-closed-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp("fail-closed-logs")))
    with Cluster(cfg) as c:
        yield c


@pytest.fixture(scope="module")
def rpc(cluster):
    channels = {name: rpc_client.blocking_channel(cluster.services[name].address, default_deadline_s=30.0)
                for name in ("kvstore", "decode", "prefill")}
    store = MetadataStore(cluster.redis_url, deployment=cluster.config.deployment)
    yield SimpleNamespace(kvstore=kvstore_pb2_grpc.KVStoreStub(channels["kvstore"]),
                          decode=decode_pb2_grpc.DecodeStub(channels["decode"]),
                          prefill=prefill_pb2_grpc.PrefillStub(channels["prefill"]), store=store)
    store.close()
    for ch in channels.values():
        ch.close()


def reserve(rpc, rid: str) -> common_pb2.Placement:
    return rpc.kvstore.Reserve(kvstore_pb2.ReserveRequest(request_id=rid, num_tokens=len(PROMPT),
                                                          max_new_tokens=MAX_TOKENS)).placement


def renew(rpc, placement: common_pb2.Placement) -> bool:
    rpc.kvstore.Renew(kvstore_pb2.RenewRequest(request_id=placement.request_id, epoch=placement.epoch))
    return True


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def all_free(rpc) -> bool:
    stats = rpc.decode.Stats(decode_pb2.StatsRequest())
    return all(g.free_blocks == g.total_blocks for g in stats.groups)


def settled(rpc) -> None:
    """Nothing left behind: every decode block free, no placement in Redis."""
    wait_until(lambda: all_free(rpc) and rpc.store.num_placements() == 0, 10, "blocks and placements freed")


def rid_() -> str:
    return f"fc-{uuid.uuid4().hex[:10]}"


def test_stale_epoch_prepare_receive_and_decode_are_refused(rpc):
    rid = rid_()
    old = reserve(rpc, rid)
    rpc.kvstore.Release(kvstore_pb2.ReleaseRequest(request_id=rid, epoch=old.epoch))
    new = reserve(rpc, rid)
    assert new.epoch > old.epoch > 0
    err = rpc_error(lambda: rpc.decode.PrepareReceive(decode_pb2.PrepareReceiveRequest(request_id=rid,
                                                                                       placement=old)))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert f"placement epoch {old.epoch} is stale (the live placement's is {new.epoch})" in err.details()
    assert all_free(rpc)                                             # nothing was reserved for it
    renew(rpc, new)                 # nobody else renews it: a slow machine must not let it expire here
    dest = rpc.decode.PrepareReceive(decode_pb2.PrepareReceiveRequest(request_id=rid, placement=new)).destination
    assert dest.epoch == new.epoch and not all_free(rpc)
    # Decode of the prepared request with the old placement; a self-prefilled Decode with it
    for request, needle in ((decode_pb2.DecodeRequest(request_id=rid, prompt_token_ids=PROMPT, placement=old,
                                                      first_token_id=5, sampling=SAMPLING),
                             f"Decode with placement epoch {old.epoch}, but its KV was prepared for epoch {new.epoch}"),
                            (decode_pb2.DecodeRequest(request_id=rid, prompt_token_ids=PROMPT[:8], placement=old,
                                                      sampling=SAMPLING),
                             f"placement epoch {old.epoch} is stale")):
        err = rpc_error(lambda: list(rpc.decode.Decode(request)))
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION and needle in err.details()
    assert rpc.decode.Abort(common_pb2.AbortRequest(request_id=rid)).found
    rpc.kvstore.Release(kvstore_pb2.ReleaseRequest(request_id=rid, epoch=new.epoch))
    settled(rpc)


def test_a_request_prepared_under_a_replaced_placement_is_freed(rpc):
    """Its placement was released and the id placed again (another epoch): the decode instance, which
    checks prepared requests against the kvstore, frees the old one's blocks."""
    rid = rid_()
    old = reserve(rpc, rid)
    rpc.decode.PrepareReceive(decode_pb2.PrepareReceiveRequest(request_id=rid, placement=old))
    assert not all_free(rpc)
    rpc.kvstore.Release(kvstore_pb2.ReleaseRequest(request_id=rid, epoch=old.epoch))
    new = reserve(rpc, rid)
    # (the new placement renewed meanwhile, as its router would: else it expires too)
    wait_until(lambda: renew(rpc, new) and all_free(rpc), LEASE_S + 5, "the stale prepared request freed")
    assert rpc.store.get_placement(rid).epoch == new.epoch               # the new one is untouched
    rpc.kvstore.Release(kvstore_pb2.ReleaseRequest(request_id=rid, epoch=new.epoch))
    settled(rpc)


def test_prefill_kv_with_a_stale_epoch_is_refused(rpc):
    """Refused by the prefill instance before any KV leaves: it checks the destination against the
    kvstore's live placement (the receivers' own refusal of a chunk of another epoch is
    test_kv_transfer.py's)."""
    rid = rid_()
    live = reserve(rpc, rid)
    dest = rpc.decode.PrepareReceive(decode_pb2.PrepareReceiveRequest(request_id=rid, placement=live)).destination
    stale_placement, stale_dest = common_pb2.Placement(), common_pb2.KVDestination()
    stale_placement.CopyFrom(live)
    stale_dest.CopyFrom(dest)
    stale_placement.epoch = stale_dest.epoch = live.epoch - 1
    # placement and destination disagree: refused before any work
    err = rpc_error(lambda: list(rpc.prefill.Prefill(prefill_pb2.PrefillRequest(
        request_id=rid, token_ids=PROMPT, sampling=SAMPLING, placement=stale_placement, destination=dest))))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    # a prefill holding the stale pair (which agree with each other): the live placement is newer
    err = rpc_error(lambda: list(rpc.prefill.Prefill(prefill_pb2.PrefillRequest(
        request_id=rid, token_ids=PROMPT, sampling=SAMPLING, placement=stale_placement, destination=stale_dest),
        timeout=60)))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert (f"prepared for placement epoch {live.epoch - 1}, the kvstore's live placement has epoch {live.epoch}"
            in err.details())
    assert rpc.decode.Abort(common_pb2.AbortRequest(request_id=rid)).found
    rpc.kvstore.Release(kvstore_pb2.ReleaseRequest(request_id=rid, epoch=live.epoch))
    settled(rpc)


def test_kv_corrupted_in_flight_ends_with_data_loss_and_no_token(rpc):
    rid = rid_()
    placement = reserve(rpc, rid)
    dest = rpc.decode.PrepareReceive(decode_pb2.PrepareReceiveRequest(request_id=rid,
                                                                      placement=placement)).destination
    proxies = []
    for g in dest.groups:
        for w in g.workers:
            proxies.append(CorruptingProxy(w.address))
            w.address = proxies[-1].address
    try:
        first, events = None, []
        with pytest.raises(grpc.RpcError) as info:
            for ev in rpc.prefill.Prefill(prefill_pb2.PrefillRequest(
                    request_id=rid, token_ids=PROMPT, sampling=SAMPLING, placement=placement, destination=dest),
                    timeout=60):
                events.append(ev)
                if ev.HasField("first_token"):
                    first = ev.first_token.token_id
        assert any(p.flipped.is_set() for p in proxies)
        assert info.value.code() is grpc.StatusCode.DATA_LOSS and CHECKSUM_MISMATCH in info.value.details()
        # No PrefillDone; the prefill may end before its first token (a refused chunk ends it at once)
        # or after it (the refusal came with the last chunk).
        assert not any(ev.HasField("done") for ev in events)
        tokens = []
        with pytest.raises(grpc.RpcError) as info:
            for ev in rpc.decode.Decode(decode_pb2.DecodeRequest(
                    request_id=rid, prompt_token_ids=PROMPT, placement=placement,
                    first_token_id=first if first is not None else PROMPT[-1],     # any token: its KV is bad
                    sampling=SAMPLING), timeout=60):
                tokens += ev.delta.token_ids
        assert info.value.code() is grpc.StatusCode.DATA_LOSS and CHECKSUM_MISMATCH in info.value.details()
        assert tokens == []
    finally:
        for p in proxies:
            p.close()
    rpc.kvstore.Release(kvstore_pb2.ReleaseRequest(request_id=rid, epoch=placement.epoch))
    settled(rpc)
