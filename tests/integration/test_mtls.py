"""Mutual TLS and the Redis password with real servers (common/rpc/tls.py, scripts/certs.py,
services/kvstore/identity.py): a kvstore, a prefill and a decode instance in this process over TLS on
loopback (the tiny random model), certificates made by scripts/certs.py, the session's Redis (which
requires a password, tests/conftest.py).

- each internal service refuses a caller without a certificate or with one from another CA (the
  handshake fails: UNAVAILABLE), serves one of ours, and lets only the roles that use it call it;
- a registration must name the caller's role and an address of the caller's;
- prefill sends KV only to the decode instance the kvstore placed the request on;
- Redis refuses a client without the password, and a kvstore with a wrong one fails at start.

The whole deployment over mutual TLS (make up's default) is tests/integration/test_services_e2e.py's
test_make_up_script_serves_the_cli_and_stops_on_ctrl_c.
"""
from __future__ import annotations

import asyncio
import os
import stat
import uuid

import grpc
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.client import KVStoreClient
from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.errors import ConfigError, PermissionDeniedError
from common.metadata.types import Instance
from common.rpc import client as rpc_client
from common.rpc.protos import common_pb2, decode_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from common.rpc.tls import TLSConfig
from scripts.certs import ensure_certs, generate
from services.decode.config import DecodeConfig
from services.decode.service import DecodeService
from services.kvstore.config import KVStoreConfig
from services.kvstore.service import KVStoreService
from services.prefill.config import PrefillConfig
from services.prefill.service import PrefillService
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.loop import Loop

pytestmark = pytest.mark.timeout(180)

UNAVAILABLE, DENIED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED


def tls(d, role: str, health_port: int = -1) -> TLSConfig:
    return TLSConfig(str(d / "ca.pem"), str(d / f"{role}.pem"), str(d / f"{role}-key.pem"), health_port)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """The same roles, signed by another CA."""
    return generate(tmp_path_factory.mktemp("tls-other"), ca_name="someone else's CA")


@pytest.fixture(scope="module")
def stack(certs, redis_url, tmp_path_factory):
    model = str(write_random_hf_model(tmp_path_factory.mktemp("mtls-model"), "llama", num_hidden_layers=2,
                                      max_position_embeddings=512, seed=5))
    engine = EngineConfig(model=model, cache=CacheConfig(block_size=16, num_blocks=32),
                          scheduler=SchedulerConfig(chunk_size=32))
    loop = Loop()
    kv = loop.run(KVStoreService.start(KVStoreConfig(port=0, redis_url=redis_url, metrics_port=-1, grace_s=0,
                                                     deployment=f"mtls-{uuid.uuid4().hex[:8]}",
                                                     tls=tls(certs, "kvstore", health_port=0))))
    services = {"kvstore": kv}
    try:
        for role, svc_type, cfg_type in (("prefill", PrefillService, PrefillConfig),
                                         ("decode", DecodeService, DecodeConfig)):
            services[role] = loop.run(svc_type.start(cfg_type(kvstore=kv.address, grace_s=0, metrics_port=-1,
                                                              engine=engine, tls=tls(certs, role))))
        yield loop, services
    finally:
        for name in ("decode", "prefill", "kvstore"):
            if name in services:
                loop.run(services[name].stop())
        loop.close()


def health(address: str, **kw) -> str:
    with rpc_client.blocking_channel(address, **kw) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def creds(d, role: str):
    return tls(d, role).load()


@pytest.mark.parametrize("name", ["kvstore", "prefill", "decode"])
def test_each_internal_service_serves_only_certificates_of_its_ca(stack, certs, other_ca, name):
    _, services = stack
    address = services[name].server.address
    assert code_of(lambda: health(address)) is UNAVAILABLE                      # plaintext
    assert code_of(lambda: health(address, tls=creds(other_ca, "router"), peer=name)) is UNAVAILABLE
    assert health(address, tls=creds(certs, "router"), peer=name) == "SERVING"
    # The client checks the server's role: a decode instance is not a prefill instance.
    wrong = "prefill" if name != "prefill" else "decode"
    assert code_of(lambda: health(address, tls=creds(certs, "router"), peer=wrong)) is UNAVAILABLE


def test_only_the_router_calls_the_instances(stack, certs):
    _, services = stack
    for name, stub_type in (("prefill", prefill_pb2_grpc.PrefillStub), ("decode", decode_pb2_grpc.DecodeStub)):
        address = services[name].server.address
        for role in ("prefill", "decode", "kvstore"):
            with rpc_client.blocking_channel(address, tls=creds(certs, role), peer=name) as ch:
                with pytest.raises(grpc.RpcError) as info:
                    stub_type(ch).Abort(common_pb2.AbortRequest(request_id="r"))
                assert info.value.code() is DENIED and f"role {role!r}" in info.value.details()
        with rpc_client.blocking_channel(address, tls=creds(certs, "router"), peer=name) as ch:
            assert stub_type(ch).Abort(common_pb2.AbortRequest(request_id="r")).found is False


def test_probes_without_a_certificate_get_the_plaintext_health_port(stack):
    _, services = stack
    kv = services["kvstore"]
    assert kv.server.health_port > 0
    assert health(f"127.0.0.1:{kv.server.health_port}") == "SERVING"
    with rpc_client.blocking_channel(f"127.0.0.1:{kv.server.health_port}") as ch:   # health only
        assert code_of(lambda: kvstore_pb2_grpc.KVStoreStub(ch).ListInstances(
            kvstore_pb2.ListInstancesRequest())) is grpc.StatusCode.UNIMPLEMENTED


def test_registration_is_bound_to_the_callers_certificate(stack, certs):
    loop, services = stack
    address = services["kvstore"].address

    async def run():
        clients = {r: KVStoreClient(address, tls=creds(certs, r)) for r in ("router", "prefill", "decode")}
        try:
            ok = Instance("decode-mine", "decode", "127.0.0.1:7001", 16, capacity=(8,))
            await clients["decode"].register(ok)
            await clients["decode"].register(Instance("decode-named", "decode", "mnemosyne-decode:7002", 16,
                                                      capacity=(8,)))             # a name in its certificate
            refused = {
                "role": (clients["decode"], Instance("prefill-x", "prefill", "127.0.0.1:7003", 16)),
                "host": (clients["decode"], Instance("decode-x", "decode", "10.9.9.9:7004", 16, capacity=(8,))),
                "router": (clients["router"], Instance("decode-y", "decode", "127.0.0.1:7005", 16, capacity=(8,))),
                "takeover": (clients["prefill"], Instance("decode-mine", "prefill", "127.0.0.1:7006", 16)),
            }
            for what, (client, inst) in refused.items():
                with pytest.raises(PermissionDeniedError):
                    await client.register(inst)
            with pytest.raises(PermissionDeniedError, match="cannot register"):
                await clients["prefill"].heartbeat("decode-mine", (8,))
            with pytest.raises(PermissionDeniedError):
                await clients["router"].deregister("decode-mine")
            listed = {i.instance_id: i.address for i in await clients["router"].list_instances("decode")}
            assert listed["decode-mine"] == "127.0.0.1:7001" and "decode-x" not in listed
            await clients["decode"].heartbeat("decode-mine", (8,))
            for iid in ("decode-mine", "decode-named"):
                await clients["decode"].deregister(iid)
        finally:
            for c in clients.values():
                await c.close()

    loop.run(run())


def test_prefill_sends_kv_only_to_the_decode_instance_of_the_placement(stack, certs):
    loop, services = stack
    decode = services["decode"]
    rid = f"dest-{uuid.uuid4().hex[:6]}"

    async def kvstore(method: str, *args):
        kv = KVStoreClient(services["kvstore"].address, tls=creds(certs, "router"))
        try:
            return await getattr(kv, method)(*args)
        finally:
            await kv.close()

    try:
        placement = loop.run(kvstore("reserve", rid, 40, 4, decode.instance.instance_id))

        def prefill(request_id: str, receiver: str):
            dest = common_pb2.KVDestination(request_id=request_id, backend="tcp", groups=[common_pb2.GroupReceiver(
                group=0, token_start=0, token_end=40, block_ids=[0, 1, 2],
                workers=[common_pb2.WorkerEndpoint(tp_rank=0, address=receiver)])])
            with rpc_client.blocking_channel(services["prefill"].server.address, tls=creds(certs, "router"),
                                             peer="prefill") as ch:
                return list(prefill_pb2_grpc.PrefillStub(ch).Prefill(prefill_pb2.PrefillRequest(
                    request_id=request_id, token_ids=list(range(1, 41)), destination=dest), timeout=10))

        with pytest.raises(grpc.RpcError) as info:
            prefill(rid, "10.9.9.9:6000")
        assert info.value.code() is DENIED and placement.address in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            prefill("never-reserved", "127.0.0.1:6000")
        assert info.value.code() is grpc.StatusCode.NOT_FOUND and "no placement" in info.value.details()
    finally:
        loop.run(kvstore("release", rid))


def test_redis_refuses_clients_without_the_password(redis_server):
    assert redis_server.password and redis_server.password not in redis_server.url
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=2,
                    retry=Retry(NoBackoff(), 0)).ping()
    assert redis.Redis.from_url(redis_server.auth_url, socket_timeout=2).ping()


def test_kvstore_with_a_wrong_redis_password_fails_at_start(redis_server, tmp_path):
    wrong = tmp_path / "password"
    wrong.write_text("not-it\n")
    for cfg in (KVStoreConfig(port=0, redis_url=redis_server.url, metrics_port=-1, redis_connect_timeout_s=5),
                KVStoreConfig(port=0, redis_url=redis_server.url, metrics_port=-1, redis_connect_timeout_s=5,
                              redis_password_file=str(wrong))):
        with pytest.raises(ConfigError, match="refused our credentials"):
            asyncio.run(KVStoreService.start(cfg))


def test_certs_are_made_once_private_and_bad_tls_flags_are_refused(tmp_path):
    d = ensure_certs(tmp_path / "tls")
    first = (d / "ca.pem").read_bytes()
    assert ensure_certs(d) == d and (d / "ca.pem").read_bytes() == first          # reused
    assert stat.S_IMODE(os.stat(d / "decode-key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d / "ca-key.pem").st_mode) == 0o600
    with pytest.raises(ConfigError, match="go together"):
        TLSConfig(ca=str(d / "ca.pem"))
    with pytest.raises(ConfigError, match="--tls-cert"):
        TLSConfig(str(d / "ca.pem"), str(d / "missing.pem"), str(d / "decode-key.pem")).load()


def test_a_kvstore_without_a_redis_url_starts_its_own_redis_with_a_random_password():
    async def run():
        svc = await KVStoreService.start(KVStoreConfig(port=0, metrics_port=-1, grace_s=0))
        try:
            private = svc._redis_server
            assert private.password and private.password not in private.url
            with pytest.raises(redis.exceptions.AuthenticationError):
                redis.Redis(host=private.host, port=private.port, socket_timeout=2,
                            retry=Retry(NoBackoff(), 0)).ping()
            assert await asyncio.to_thread(svc.logic.list_instances) == []       # the kvstore gets in
        finally:
            await svc.stop()

    asyncio.run(run())
