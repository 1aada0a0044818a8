"""Wiring of one decode instance: engine thread + logic + gRPC server + kvstore membership.

    svc = await DecodeService.start(config)     # svc.address; registered with the kvstore
    ...
    await svc.stop()

A supervisor watches the engine: when it fails (a grid worker died), the instance leaves the kvstore
and goes NOT_SERVING (every running request has already failed with UNAVAILABLE), then builds a fresh
engine and registers again (`restart_on_failure`), or stays out.
"""
from __future__ import annotations

import asyncio
import logging
import uuid

from common.client import KVStoreClient, Membership
from common.engine.async_engine import AsyncEngine, keep_alive
from common.metadata.types import Instance
from common.metrics import Metrics, MetricsInterceptor, MetricsServer, new_registry, serve_metrics
from common.rpc import protos
from common.rpc.protos import decode_pb2_grpc
from common.rpc.server import RpcServer
from services.decode.config import DecodeConfig
from services.decode.instance import DecodeInstance
from services.decode.server import DecodeServicer

log = logging.getLogger(__name__)


def build_engine(config: DecodeConfig):
    """The engine of this instance (runs on the engine thread)."""
    ec = config.engine
    if ec.parallel.world_size == 1:
        from common.engine.engine import LLMEngine
        return LLMEngine(ec)
    from common.parallel.driver import ParallelEngine
    return ParallelEngine(ec, threads_per_worker=config.threads)


class DecodeService:
    def __init__(self, config: DecodeConfig, server: RpcServer, instance: DecodeInstance,
                 kvstore: KVStoreClient, metrics_server: MetricsServer | None = None) -> None:
        self.config = config
        self.metrics_server = metrics_server          # /metrics (None: metrics_port = -1)
        self.server = server
        self.instance = instance
        self.kvstore = kvstore
        self.membership = Membership(kvstore, self.info, self.free_blocks)
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.server.address

    def info(self) -> Instance:
        ec = self.config.engine
        kvp_tokens = ec.parallel.kvp_tokens if ec.parallel.kvp > 1 else 0
        return Instance(self.instance.instance_id, "decode", self.address, ec.cache.block_size, kvp_tokens,
                        self.instance.stats().total_blocks, self.free_blocks(),
                        metrics_url=self.metrics_server.url if self.metrics_server else "")

    def free_blocks(self) -> tuple[int, ...]:
        return self.instance.stats().free_blocks

    @classmethod
    async def start(cls, config: DecodeConfig) -> "DecodeService":
        iid = config.instance_id or f"decode-{uuid.uuid4().hex[:8]}"
        ec = config.engine
        metrics = Metrics(new_registry(), role="decode", pool=config.deployment, instance=iid)
        metrics.set_kv_layout(ec.cache.block_size, ec.parallel.kvp_tokens if ec.parallel.kvp > 1 else 0)
        metrics_server = serve_metrics(config.metrics_port, metrics.registry, config.host) \
            if config.metrics_port >= 0 else None
        try:
            engine = await AsyncEngine.start(lambda: build_engine(config), name="decode-engine", metrics=metrics)
        except BaseException:
            if metrics_server is not None:
                metrics_server.close()
            raise
        kvstore = KVStoreClient(config.kvstore)
        instance = DecodeInstance(iid, engine, kvstore, config.kv_timeout_s, metrics)
        server = RpcServer(config.host, config.port, grace_s=config.grace_s,
                           interceptors=[MetricsInterceptor(metrics)])
        server.add_service(decode_pb2_grpc.add_DecodeServicer_to_server, DecodeServicer(instance), protos.DECODE)
        svc = cls(config, server, instance, kvstore, metrics_server)
        try:
            await server.start(serving=False)
            await svc.membership.start()
            instance.start()
            await server.set_serving(True)
        except BaseException:
            await svc.stop()
            raise
        svc._supervisor = asyncio.create_task(keep_alive(
            instance, lambda: build_engine(config), name="decode-engine", on_down=svc._leave, on_up=svc._rejoin,
            restart=config.restart_on_failure), name="decode-supervisor")
        log.info("decode instance %s on %s: %s, KV over %s", instance.instance_id, svc.address,
                 config.engine.parallel, config.engine.kv_backend)
        return svc

    async def _leave(self, err: Exception) -> None:
        await self.server.set_serving(False)
        await self.membership.stop()

    async def _rejoin(self) -> None:
        await self.membership.start()
        await self.server.set_serving(True)

    async def stop(self) -> None:
        """NOT_SERVING and deregistered first, then drain RPCs, then the engine. Idempotent."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        await self.membership.stop()
        await self.server.stop()
        await self.instance.stop()
        await self.instance.engine.shutdown()
        await self.kvstore.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
