"""The router against real services in this process: kvstore (real Redis), one prefill and one
decode instance (single-process engines on their own threads), real gRPC on loopback.

Routing by prompt length, discovery from the kvstore's heartbeats, admission's load from them
(never from an address an instance registered), text prompts with the chat
template and exact text deltas, logprobs on request, the Abort RPC, client cancellation reaching
every instance, duplicate ids, the instances' own input checks, falling back to the short path
when no prefill instance is alive.
"""
from __future__ import annotations

import socket
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.client import RouterClient
from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.errors import InvalidRequestError
from common.model.tokenizer import load_tokenizer
from common.rpc import client as rpc_client
from common.rpc.protos import (common_pb2, decode_pb2, decode_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc, prefill_pb2,
                               prefill_pb2_grpc, router_pb2, router_pb2_grpc)
from common.sampling_params import SamplingParams
from services.decode.config import DecodeConfig
from services.decode.service import DecodeService
from services.kvstore.config import KVStoreConfig
from services.kvstore.service import KVStoreService
from services.prefill.config import PrefillConfig
from services.prefill.service import PrefillService
from services.router.config import RouterConfig
from services.router.service import RouterService
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.loop import Loop
from tests.fixtures.waiting import wait_until as _wait_until

pytestmark = pytest.mark.timeout(120)
SHORT = 32
LONG_RUN = 900              # tokens: a request that is still running when we abort or cancel it

TBT_SLO = SchedulerConfig().tbt_slo_s          # the pools' default, published to the router


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(5 * i + 17 * seed + 1) % 300 + 10 for i in range(n)]



def engine_config(model: str) -> EngineConfig:
    return EngineConfig(model=model, cache=CacheConfig(block_size=16, num_blocks=128),
                        scheduler=SchedulerConfig(chunk_size=32))


class Stack:
    def __init__(self, model: str, redis_url: str) -> None:
        self.model = model
        self.loop = Loop(120.0)
        self.kv = self.loop.run(KVStoreService.start(KVStoreConfig(
            port=0, redis_url=redis_url, deployment=f"router-{uuid.uuid4().hex[:8]}", lease_s=5.0,
            reap_interval_s=0.1, grace_s=0.5)))
        self.decode = self.loop.run(DecodeService.start(DecodeConfig(kvstore=self.kv.address,
                                                                     engine=engine_config(model), grace_s=0.5)))
        self.prefill = self.start_prefill()
        self.router = self.loop.run(RouterService.start(RouterConfig(
            kvstore=self.kv.address, port=0, model=model, short_prompt_tokens=SHORT, discovery_ttl_s=0.1,
            grace_s=0.5)))

    def start_prefill(self) -> PrefillService:
        return self.loop.run(PrefillService.start(PrefillConfig(kvstore=self.kv.address,
                                                                engine=engine_config(self.model), grace_s=0.5)))

    def close(self) -> None:
        for svc in (self.router, self.prefill, self.decode, self.kv):
            self.loop.run(svc.stop())
        self.loop.close()

    def client(self) -> RouterClient:
        return RouterClient(self.router.address, timeout_s=60)

    def engines_idle(self) -> bool:
        """No request and every block free on both instances (read from their engine threads)."""
        d, p = self.decode.instance.engine.stats, self.prefill.instance.engine.stats
        return (d.running == d.waiting == p.running == p.waiting == 0 and d.free_blocks == d.total_blocks
                and p.free_blocks == p.total_blocks)

    def placements(self) -> int:
        return self.kv.store.num_placements()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_random_hf_model(tmp_path_factory.mktemp("router-model"), "llama", num_hidden_layers=2,
                                     max_position_embeddings=1024, seed=3))


@pytest.fixture(scope="module")
def stack(model, redis_url):
    s = Stack(model, redis_url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def offline(model):
    engine = LLMEngine(engine_config(model), extra_eos_ids=load_tokenizer(model).eos_token_ids)
    return lambda ids, n=12: engine.generate([ids], SamplingParams(max_tokens=n))[0]


def wait_until(cond, timeout_s: float = 10.0, what: str = "condition"):
    return _wait_until(cond, timeout_s, what, poll_s=0.02)


def test_model_info_and_health(stack, model):
    with rpc_client.blocking_channel(stack.router.address) as ch:
        info = router_pb2_grpc.RouterStub(ch).ModelInfo(router_pb2.ModelInfoRequest())
    assert info.name == model.rsplit("/", 1)[-1] and info.vocab_size == 320 and info.max_model_len == 1024
    assert {1, 3} <= set(info.eos_token_ids) and info.bos_token_id == 0
    for svc in (stack.router, stack.decode, stack.prefill):
        with rpc_client.blocking_channel(svc.address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_discovery_sees_the_heartbeating_instances(stack):
    live = stack.loop.run(stack.router.router.discovery.instances())
    by_role = {i.role: i for i in live}
    assert by_role["decode"].address == stack.decode.address
    assert by_role["decode"].capacity == (128,) and by_role["decode"].block_size == 16
    assert by_role["prefill"].address == stack.prefill.address


def test_instances_publish_their_scheduling_and_the_router_judges_them_by_it(stack):
    """Each pool instance's registration carries its scheduler's model, budget, chunking and TBT
    SLO; the router's admission builds each instance's model from it and takes the decode pool's
    TBT SLO as the default."""
    live = {i.role: i for i in stack.loop.run(stack.router.router.discovery.instances(fresh=True))}
    for role in ("prefill", "decode"):
        info = live[role].scheduling
        assert info is not None and info.perf_model is not None
        assert (info.chunking, info.chunk_size, info.tbt_slo_s) == ("fixed", 32, TBT_SLO)
        assert info.max_model_len == 1024
    gate = stack.router.router.gate
    stack.loop.run(gate.refresh(fresh=True))
    ctl = gate.controller
    assert set(ctl.models) == {live["prefill"].instance_id, live["decode"].instance_id}
    assert ctl.tbt_slo_s == TBT_SLO
    # the router's prediction of a prompt alone is the instance's own: fixed 32-token chunks
    # (FCFS pools schedule without a model: they publish the one they would load)
    from common.engine.profile import load_perf_model
    from common.scheduler.types import BatchShape
    eng = stack.prefill.instance.engine.engine
    model = eng.perf_model or load_perf_model(eng, online=False)
    own = sum(model.predict(BatchShape(((32, c),))) for c in range(0, 320, 32))
    assert ctl.models[live["prefill"].instance_id].table.time(320) == pytest.approx(own, rel=0.01)


def test_per_request_slos_reach_the_pools_as_deadlines(stack, offline, monkeypatch):
    """A request's own TTFT / TBT SLO (what `mnemosyne generate --ttft-slo-s/--tbt-slo-s` sends) is
    honoured: the instances receive the first-token deadline (absolute, their monotonic clock) and
    the TBT SLO; without them, the router's defaults go (a deadline scaled with the work, the
    decode pool's TBT SLO)."""
    seen: dict[str, dict] = {}

    def spy(instance, name):
        engine = instance.engine
        orig = getattr(engine, name)

        def wrapped(*args, **kwargs):
            seen[name] = dict(kwargs, at=time.monotonic())
            return orig(*args, **kwargs)
        monkeypatch.setattr(engine, name, wrapped)
    spy(stack.prefill.instance, "generate")
    spy(stack.decode.instance, "add_prefilled")
    ids = prompt(200, 7)
    with stack.client() as c:
        out = c.complete(token_ids=ids, max_tokens=4, ttft_slo_s=30.0, tbt_slo_s=0.5)
    assert out.token_ids == offline(ids, 4).token_ids
    pre, dec = seen["generate"], seen["add_prefilled"]
    assert 25.0 < pre["ttft_deadline_s"] - pre["at"] <= 30.0 and pre["tbt_slo_s"] == 0.5
    assert dec["tbt_slo_s"] == 0.5
    # the short path: the decode instance gets both
    spy(stack.decode.instance, "generate")
    with stack.client() as c:
        c.complete(token_ids=prompt(SHORT - 1, 8), max_tokens=2, ttft_slo_s=7.0)
    short = seen["generate"]
    assert 5.0 < short["ttft_deadline_s"] - short["at"] <= 7.0 and short["tbt_slo_s"] == TBT_SLO
    # no SLO of its own: the class default (2 s) or more, and the decode pool's TBT SLO
    with stack.client() as c:
        c.complete(token_ids=prompt(SHORT - 1, 9), max_tokens=2)
    short = seen["generate"]
    assert 1.0 < short["ttft_deadline_s"] - short["at"] and short["tbt_slo_s"] == TBT_SLO
    wait_until(lambda: stack.engines_idle() and stack.placements() == 0, what="everything released")


@pytest.mark.parametrize("n, route", [(SHORT - 1, "decode_only"), (SHORT, "disaggregated"),
                                      (200, "disaggregated")])
def test_routes_by_prompt_length_and_matches_offline(stack, offline, n, route):
    ids = prompt(n, n)
    with stack.client() as c:
        out = c.complete(token_ids=ids, max_tokens=12)
    assert out.route == route and out.prompt_tokens == n
    ref = offline(ids)
    assert out.token_ids == ref.token_ids and out.finish_reason == ref.finish_reason
    assert max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs)) < 1e-4
    wait_until(lambda: stack.engines_idle() and stack.placements() == 0, what="everything released")


def test_chat_text_prompt_gives_exact_text_deltas(stack, model, offline):
    tok = load_tokenizer(model)
    text = "What is the capital of France? Grüße aus München 🙂"
    deltas: list[str] = []
    with stack.client() as c:
        out = c.complete(text=text, chat=True, max_tokens=20, logprobs=False, on_text=deltas.append)
    ids = tok.apply_chat_template([{"role": "user", "content": text}])
    assert out.prompt_tokens == len(ids) and out.route == "disaggregated"
    assert out.token_ids == offline(ids, 20).token_ids
    assert out.text == "".join(deltas) == tok.decode(out.token_ids, skip_special_tokens=True)
    assert out.logprobs == []                                     # not asked for


def _running_request(stack, rid: str, ids: list[int]):
    """A Generate call that is past its first tokens; returns (channel, call, events so far)."""
    ch = rpc_client.blocking_channel(stack.router.address)
    call = router_pb2_grpc.RouterStub(ch).Generate(
        RouterClient.request(token_ids=ids, max_tokens=LONG_RUN, request_id=rid), timeout=60)
    seen = []
    for ev in call:
        seen.append(ev)
        if sum(len(e.delta.token_ids) for e in seen if e.HasField("delta")) >= 2:
            return ch, call, seen
    raise AssertionError("the request ended too early")


def test_an_id_reused_right_after_a_cancel_is_a_new_request(stack, offline):
    """The instances know a request by the router's per-attempt id (the client's plus a suffix): a
    client that cancels and at once sends the same id again gets a fresh answer, not the tail of the
    cancelled one (which had answered finish=abort after one token). The race is narrow on this tiny
    model (one try in three showed it without the per-attempt ids): four rounds."""
    ids = prompt(100, 7)
    want = offline(ids, 12).token_ids
    with RouterClient(stack.router.address, timeout_s=60) as c:
        def send():
            try:
                return c.complete(token_ids=ids, max_tokens=12, request_id="reused")
            except InvalidRequestError as e:          # the router has not seen the cancel yet
                assert "already running" in str(e)
                return None
        for _ in range(4):
            ch, call, _ = _running_request(stack, "reused", ids)
            call.cancel()
            ch.close()
            again = wait_until(send, timeout_s=5.0, what="the id free again")
            assert again.request_id == "reused" and again.finish_reason == "length"
            assert again.token_ids == want
    wait_until(lambda: stack.engines_idle() and stack.placements() == 0, what="everything released")


def test_abort_rpc_finishes_the_stream_as_aborted_and_frees(stack, offline):
    ids = prompt(100, 7)
    assert len(offline(ids, LONG_RUN).token_ids) == LONG_RUN        # no early EOS
    ch, call, _ = _running_request(stack, "to-abort", ids)
    try:
        with rpc_client.blocking_channel(stack.router.address) as ch2:
            stub = router_pb2_grpc.RouterStub(ch2)
            assert stub.Abort(common_pb2.AbortRequest(request_id="to-abort")).found
            assert not stub.Abort(common_pb2.AbortRequest(request_id="never-was")).found
        rest = list(call)
    finally:
        ch.close()
    assert rest[-1].finished.finish_reason == common_pb2.FINISH_REASON_ABORTED
    assert sum(len(e.delta.token_ids) for e in rest if e.HasField("delta")) < LONG_RUN
    wait_until(lambda: stack.engines_idle() and stack.placements() == 0, what="everything released")


def test_admission_sees_a_running_decode_through_the_heartbeats(stack):
    """The router's default load source is the kvstore's listing: the decode instance's heartbeats
    (every heartbeat_interval_s, 0.25 s) show its running request, then its end, in the router's
    snapshot itself (not the admission's local bookkeeping of what it admitted)."""
    gate = stack.router.router.gate
    did = stack.decode.instance.instance_id

    def seen():
        load = gate.snapshot.loads.get(did)
        return load is not None and load.running_decodes >= 1 and load.active_requests >= 1
    ch, call, _ = _running_request(stack, "seen-by-admission", prompt(100, 7))
    try:
        wait_until(seen, timeout_s=5.0, what="the running decode in the heartbeat load")
        load = gate.snapshot.loads[did]
        assert load.kv_used_blocks[0] > 0 and load.kv_block_size == 16
        assert 0 <= time.monotonic() - load.observed_at < 2.0            # aged on Redis's clock
        call.cancel()
    finally:
        ch.close()
    wait_until(lambda: gate.snapshot.loads[did].running_decodes == 0 and gate.snapshot.loads[did].active_requests == 0,
               timeout_s=5.0, what="the end of the request in the heartbeat load")
    wait_until(lambda: stack.engines_idle() and stack.placements() == 0, what="everything released")


def test_admission_never_fetches_what_an_instance_registered(stack):
    """Anyone may register an "instance". Its registration names an address and, as an older build
    sends it, a metrics URL (InstanceInfo field 10, now reserved), both at a socket we listen on:
    admission judges it by the load it heartbeats, and nothing ever connects to that socket."""
    gate = stack.router.router.gate
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.05)
    port = srv.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics".encode()
    info = kvstore_pb2.InstanceInfo(instance_id="bogus", role=kvstore_pb2.ROLE_PREFILL, address=f"127.0.0.1:{port}")
    info = kvstore_pb2.InstanceInfo.FromString(info.SerializeToString() + b"\x52" + bytes([len(url)]) + url)
    ch = rpc_client.blocking_channel(stack.kv.address)
    kv = kvstore_pb2_grpc.KVStoreStub(ch)
    try:
        kv.RegisterInstance(kvstore_pb2.RegisterInstanceRequest(instance=info))
        end = time.monotonic() + 8 * stack.router.config.scrape_interval_s
        while time.monotonic() < end:
            kv.Heartbeat(kvstore_pb2.HeartbeatRequest(instance_id="bogus",
                                                      load=kvstore_pb2.InstanceLoad(queued_prefill_tokens=7)))
            try:
                conn, peer = srv.accept()
                conn.close()
                pytest.fail(f"{peer} connected to the address a registration named")
            except socket.timeout:
                pass
        load = gate.snapshot.loads.get("bogus")
        assert load is not None and load.queued_prefill_tokens == 7      # judged by its heartbeats only
    finally:
        kv.DeregisterInstance(kvstore_pb2.DeregisterInstanceRequest(instance_id="bogus"))
        ch.close()
        srv.close()
    stack.loop.run(gate.refresh())


def test_client_cancel_reaches_every_instance(stack, offline):
    ids = prompt(300, 8)
    assert len(offline(ids, LONG_RUN - 300).token_ids) == LONG_RUN - 300
    for when in ("prefill", "decode"):                  # just after Started, and while decoding
        ch = rpc_client.blocking_channel(stack.router.address)
        try:
            call = router_pb2_grpc.RouterStub(ch).Generate(
                RouterClient.request(token_ids=ids, max_tokens=LONG_RUN - 300), timeout=60)
            for ev in call:
                if when == "prefill" and ev.HasField("started"):
                    break
                if when == "decode" and ev.HasField("delta"):
                    break
            call.cancel()
        finally:
            ch.close()
        wait_until(lambda: stack.engines_idle() and stack.placements() == 0, what=f"released after a {when} cancel")


def test_duplicate_running_request_id_is_refused(stack):
    ch, call, _ = _running_request(stack, "dup", prompt(40, 9))
    try:
        with rpc_client.blocking_channel(stack.router.address) as ch2:
            with pytest.raises(grpc.RpcError) as info:
                list(router_pb2_grpc.RouterStub(ch2).Generate(
                    RouterClient.request(token_ids=prompt(10), request_id="dup"), timeout=30))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "already" in info.value.details()
        call.cancel()
    finally:
        ch.close()
    wait_until(lambda: stack.engines_idle() and stack.placements() == 0, what="everything released")


def test_instances_check_their_own_input(stack):
    with rpc_client.blocking_channel(stack.decode.address) as ch:
        stub = decode_pb2_grpc.DecodeStub(ch)
        cases = [
            lambda: list(stub.Decode(decode_pb2.DecodeRequest(request_id="x"), timeout=10)),
            lambda: list(stub.Decode(decode_pb2.DecodeRequest(request_id="x", prompt_token_ids=[1, 2],
                                                              first_token_id=5), timeout=10)),
            lambda: stub.PrepareReceive(decode_pb2.PrepareReceiveRequest(request_id="x")),
            lambda: stub.PrepareReceive(decode_pb2.PrepareReceiveRequest(
                request_id="x", placement=common_pb2.Placement(request_id="x", instance_id="someone-else",
                                                               num_tokens=10)), timeout=10),
        ]
        for case, needle in zip(cases, ["prompt is empty", "was not prepared", "needs the request's placement",
                                        "names decode instance someone-else"]):
            with pytest.raises(grpc.RpcError) as info:
                case()
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert needle in info.value.details()
    with rpc_client.blocking_channel(stack.prefill.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(prefill_pb2_grpc.PrefillStub(ch).Prefill(prefill_pb2.PrefillRequest(
                request_id="x", token_ids=[1, 2, 3]), timeout=10))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "needs a KV destination" in info.value.details()
    assert stack.engines_idle()


def test_without_a_live_prefill_instance_long_prompts_take_the_short_path(stack, offline):
    stack.loop.run(stack.prefill.stop())                 # deregisters: gone once the router's list expires
    time.sleep(0.3)                                      # discovery_ttl_s = 0.1
    try:
        ids = prompt(120, 4)
        seen = []
        with stack.client() as c:
            out = c.complete(token_ids=ids, max_tokens=12, on_progress=lambda done, total: seen.append((done, total)))
        assert out.route == "decode_only" and out.token_ids == offline(ids).token_ids
        # the decode instance prefilled it in chunks and reported each one (DecodeProgress), relayed
        dones = [d for d, _ in seen]
        assert dones and dones == sorted(set(dones)) and dones[-1] < 120 and {t for _, t in seen} == {120}
    finally:
        stack.prefill = stack.start_prefill()


def test_a_request_belongs_to_its_api_key(stack, offline, tmp_path):
    """A router with API keys (alice; bob limited to one request at a time), beside the stack's: no key
    or a wrong key is UNAUTHENTICATED; bob cannot abort alice's running request (PERMISSION_DENIED, and it
    runs on to the offline answer); bob's second concurrent request is RESOURCE_EXHAUSTED; alice aborts her
    own. The request ids are readable by anyone who can read Redis: knowing one is not owning it."""
    from common.auth import add_key, bearer
    keys = tmp_path / "keys.json"
    add_key(keys, "alice", "alice-secret")
    add_key(keys, "bob", "bob-secret", max_concurrent=1)
    router = stack.loop.run(RouterService.start(RouterConfig(
        kvstore=stack.kv.address, port=0, model=stack.model, short_prompt_tokens=SHORT, discovery_ttl_s=0.1,
        grace_s=0.5, api_keys_file=str(keys))))
    alice, bob = bearer("alice-secret"), bearer("bob-secret")
    ids, n = prompt(100, 11), 200
    want = offline(ids, n).token_ids
    try:
        with rpc_client.blocking_channel(router.address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            for metadata in ((), bearer("mallory-guess")):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Abort(common_pb2.AbortRequest(request_id="x"), metadata=metadata, timeout=10)
                assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED, info.value.details()
            call = stub.Generate(RouterClient.request(token_ids=ids, max_tokens=n, request_id="alices"),
                                 metadata=alice, timeout=120)
            seen = []
            for ev in call:                        # past the first tokens: running on the instances
                seen.append(ev)
                if sum(len(e.delta.token_ids) for e in seen if e.HasField("delta")) >= 2:
                    break
            with pytest.raises(grpc.RpcError) as info:
                stub.Abort(common_pb2.AbortRequest(request_id="alices"), metadata=bob, timeout=10)
            assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "another API key" in info.value.details()

            held = stub.Generate(RouterClient.request(token_ids=ids, max_tokens=n, request_id="bob-1"),
                                 metadata=bob, timeout=120)
            assert next(iter(held)).WhichOneof("event") == "started"
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(RouterClient.request(token_ids=ids[:20], max_tokens=2, request_id="bob-2"),
                                   metadata=bob, timeout=60))
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
            held.cancel()

            rest = seen + list(call)
            tokens = [t for e in rest if e.HasField("delta") for t in e.delta.token_ids]
            assert tokens == want and rest[-1].finished.finish_reason == common_pb2.FINISH_REASON_LENGTH

            mine = stub.Generate(RouterClient.request(token_ids=ids, max_tokens=LONG_RUN, request_id="alices-2"),
                                 metadata=alice, timeout=120)
            assert next(iter(mine)).WhichOneof("event") == "started"
            assert stub.Abort(common_pb2.AbortRequest(request_id="alices-2"), metadata=alice, timeout=10).found
            assert list(mine)[-1].finished.finish_reason == common_pb2.FINISH_REASON_ABORTED
    finally:
        stack.loop.run(router.stop())
    wait_until(lambda: stack.engines_idle() and stack.placements() == 0, what="everything released")
