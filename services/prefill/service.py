"""Wiring of one prefill instance: common/pool_service.py's PoolService with the prefill logic
(instance.py) and servicer (server.py).

    svc = await PrefillService.start(config)    # svc.address; registered with the kvstore
    ...
    await svc.stop()                            # leave the kvstore, drain, stop the grid
"""
from __future__ import annotations

from common.client import KVStoreClient
from common.engine.async_engine import AsyncEngine
from common.metadata.types import Instance
from common.metrics import Metrics
from common.pool_service import PoolService
from common.rpc import protos
from common.rpc.protos import prefill_pb2_grpc
from common.rpc.server import RpcServer
from services.prefill.config import PrefillConfig
from services.prefill.instance import PrefillInstance
from services.prefill.server import PrefillServicer


class PrefillService(PoolService):
    ROLE = "prefill"

    @classmethod
    def new_instance(cls, instance_id: str, engine: AsyncEngine, kvstore: KVStoreClient,
                     config: PrefillConfig, metrics: Metrics, tracer) -> PrefillInstance:
        return PrefillInstance(instance_id, engine, config.kv_timeout_s, config.engine.parallel.tp, metrics, tracer,
                               kvstore, prefix_caching=config.engine.cache.prefix_caching)

    @classmethod
    def add_servicer(cls, server: RpcServer, instance: PrefillInstance) -> None:
        server.add_service(prefill_pb2_grpc.add_PrefillServicer_to_server, PrefillServicer(instance),
                           protos.PREFILL)

    def info(self) -> Instance:
        return Instance(self.instance.instance_id, "prefill", self.address, self.config.engine.cache.block_size,
                        scheduling=self.scheduling(), engine_epoch=self.engine_epoch)
