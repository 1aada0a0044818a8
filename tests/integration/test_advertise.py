"""Bind address vs the address a service is known by (real gRPC servers on loopback, real Redis):

- a prefill or decode instance bound to 0.0.0.0 registers --advertise-host (a pod's IP in
  Kubernetes; 127.0.0.2 here, which loopback also answers) with the kvstore for its gRPC port, prints
  its /metrics URL with that host, and is reachable there;
- without --advertise-host, a 0.0.0.0 bind advertises this machine's address, never 0.0.0.0.
"""
from __future__ import annotations

import asyncio
import socket
import urllib.request
import uuid

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.errors import ConfigError
from common.rpc import client as rpc_client
from common.rpc.server import advertised_host, host_port
from services.decode.config import DecodeConfig
from services.decode.service import DecodeService
from services.kvstore.config import KVStoreConfig
from services.kvstore.service import KVStoreService
from services.prefill.config import PrefillConfig
from services.prefill.service import PrefillService
from tests.fixtures.hf_models import write_random_hf_model

pytestmark = pytest.mark.timeout(120)

ROLES = {"prefill": (PrefillService, PrefillConfig), "decode": (DecodeService, DecodeConfig)}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_random_hf_model(tmp_path_factory.mktemp("advertise-model"), "llama", num_hidden_layers=2,
                                     max_position_embeddings=512, seed=5))


def engine_config(model: str) -> EngineConfig:
    return EngineConfig(model=model, cache=CacheConfig(block_size=16, num_blocks=32),
                        scheduler=SchedulerConfig(chunk_size=32))


def serving(address: str) -> bool:
    with rpc_client.blocking_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def test_advertised_host_defaults():
    assert advertised_host("10.1.2.3") == "10.1.2.3"
    assert advertised_host("0.0.0.0", "10.1.2.3") == "10.1.2.3"
    for wildcard in ("0.0.0.0", "::", ""):
        host = advertised_host(wildcard)
        assert host not in ("0.0.0.0", "::", "")
        socket.getaddrinfo(host, 50053)                 # peers can resolve it
    assert host_port("10.1.2.3", 50053) == "10.1.2.3:50053"
    assert host_port("fd00::7", 50053) == "[fd00::7]:50053"
    with pytest.raises(ConfigError, match="advertise_host"):
        DecodeConfig(kvstore="kv:50052", host="0.0.0.0", advertise_host="0.0.0.0")


@pytest.mark.parametrize("role", ROLES)
def test_instance_bound_to_every_interface_registers_its_advertised_address(role, model, redis_url):
    service, config_type = ROLES[role]

    async def run():
        kv = await KVStoreService.start(KVStoreConfig(port=0, redis_url=redis_url, metrics_port=-1,
                                                      deployment=f"adv-{uuid.uuid4().hex[:8]}", grace_s=0))
        try:
            svc = await service.start(config_type.from_args([
                "--kvstore", kv.address, "--host", "0.0.0.0", "--advertise-host", "127.0.0.2",
                "--instance-id", f"{role}-adv", "--grace-s", "0", "--model", model,
                "--block-size", "16", "--max-kv-tokens", "512", "--chunk-size", "32"]))
            try:
                [inst] = await asyncio.to_thread(kv.logic.list_instances, role)
                assert svc.server.address.startswith("0.0.0.0:")
                assert inst.address == svc.address == f"127.0.0.2:{svc.server.port}"
                # The printed metrics URL (what Prometheus' targets use) names the advertised host too.
                assert svc.metrics_url == f"http://127.0.0.2:{svc.metrics_server.port}/metrics"
                assert await asyncio.to_thread(serving, inst.address)
                text = await asyncio.to_thread(scrape, svc.metrics_url)
                assert f'instance="{role}-adv"' in text
            finally:
                await svc.stop()
            assert await asyncio.to_thread(kv.logic.list_instances, role) == []
        finally:
            await kv.stop()

    asyncio.run(run())


def test_instance_bound_to_every_interface_never_advertises_the_wildcard(model, redis_url):
    async def run():
        kv = await KVStoreService.start(KVStoreConfig(port=0, redis_url=redis_url, metrics_port=-1,
                                                      deployment=f"adv-{uuid.uuid4().hex[:8]}", grace_s=0))
        try:
            svc = await DecodeService.start(DecodeConfig(kvstore=kv.address, host="0.0.0.0", grace_s=0,
                                                         engine=engine_config(model)))
            try:
                [inst] = await asyncio.to_thread(kv.logic.list_instances, "decode")
                host = advertised_host("0.0.0.0")
                assert inst.address == f"{host}:{svc.server.port}" and "0.0.0.0" not in svc.metrics_url
            finally:
                await svc.stop()
        finally:
            await kv.stop()

    asyncio.run(run())
