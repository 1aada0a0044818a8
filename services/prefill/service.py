"""Wiring of one prefill instance: engine thread + logic + gRPC server + kvstore membership.

    svc = await PrefillService.start(config)    # svc.address; registered with the kvstore
    ...
    await svc.stop()

As for a decode instance, a supervisor takes the instance out of the pool when its engine fails (a
grid worker died) and builds a fresh one (`restart_on_failure`).
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
from common.rpc.protos import prefill_pb2_grpc
from common.rpc.server import RpcServer
from services.prefill.config import PrefillConfig
from services.prefill.instance import PrefillInstance
from services.prefill.server import PrefillServicer

log = logging.getLogger(__name__)


def build_engine(config: PrefillConfig):
    """The engine of this instance (runs on the engine thread)."""
    ec = config.engine
    if ec.parallel.world_size == 1:
        from common.engine.engine import LLMEngine
        return LLMEngine(ec)
    from common.parallel.driver import ParallelEngine
    return ParallelEngine(ec, threads_per_worker=config.threads)


class PrefillService:
    def __init__(self, config: PrefillConfig, server: RpcServer, instance: PrefillInstance,
                 kvstore: KVStoreClient, metrics_server: MetricsServer | None = None) -> None:
        self.config = config
        self.metrics_server = metrics_server          # /metrics (None: metrics_port = -1)
        self.server = server
        self.instance = instance
        self.kvstore = kvstore
        self.membership = Membership(kvstore, self.info)
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.server.address

    def info(self) -> Instance:
        return Instance(self.instance.instance_id, "prefill", self.address, self.config.engine.cache.block_size,
                        metrics_url=self.metrics_server.url if self.metrics_server else "")

    @classmethod
    async def start(cls, config: PrefillConfig) -> "PrefillService":
        iid = config.instance_id or f"prefill-{uuid.uuid4().hex[:8]}"
        metrics = Metrics(new_registry(), role="prefill", pool=config.deployment, instance=iid)
        metrics.set_kv_layout(config.engine.cache.block_size)
        metrics_server = serve_metrics(config.metrics_port, metrics.registry, config.host) \
            if config.metrics_port >= 0 else None
        try:
            engine = await AsyncEngine.start(lambda: build_engine(config), name="prefill-engine", metrics=metrics)
        except BaseException:
            if metrics_server is not None:
                metrics_server.close()
            raise
        kvstore = KVStoreClient(config.kvstore)
        instance = PrefillInstance(iid, engine, config.kv_timeout_s, config.engine.parallel.tp, metrics)
        server = RpcServer(config.host, config.port, grace_s=config.grace_s,
                           interceptors=[MetricsInterceptor(metrics)])
        server.add_service(prefill_pb2_grpc.add_PrefillServicer_to_server, PrefillServicer(instance),
                           protos.PREFILL)
        svc = cls(config, server, instance, kvstore, metrics_server)
        try:
            await server.start(serving=False)
            await svc.membership.start()
            await server.set_serving(True)
        except BaseException:
            await svc.stop()
            raise
        svc._supervisor = asyncio.create_task(keep_alive(
            instance, lambda: build_engine(config), name="prefill-engine", on_down=svc._leave, on_up=svc._rejoin,
            restart=config.restart_on_failure), name="prefill-supervisor")
        log.info("prefill instance %s on %s: %s", instance.instance_id, svc.address, config.engine.parallel)
        return svc

    async def _leave(self, err: Exception) -> None:
        await self.server.set_serving(False)
        await self.membership.stop()

    async def _rejoin(self) -> None:
        await self.membership.start()
        await self.server.set_serving(True)

    async def stop(self) -> None:
        """Deregistered first, then drain RPCs, then the engine. Idempotent."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        await self.membership.stop()
        await self.server.stop()
        await self.instance.engine.shutdown()
        await self.kvstore.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
