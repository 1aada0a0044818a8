"""Wiring of one decode instance: common/pool_service.py's PoolService with the decode logic
(instance.py: KV intake, decoding, lease renewal) and servicer (server.py).

    svc = await DecodeService.start(config)     # svc.address; registered with the kvstore
    ...
    await svc.stop()                            # leave the kvstore, drain, stop the grid
"""
from __future__ import annotations

from common.client import KVStoreClient
from common.engine.async_engine import AsyncEngine
from common.metadata.types import Instance
from common.metrics import Metrics
from common.pool_service import PoolService, kv_layout
from common.rpc import protos
from common.rpc.protos import decode_pb2_grpc
from common.rpc.server import RpcServer
from services.decode.config import DecodeConfig
from services.decode.instance import DecodeInstance
from services.decode.server import DecodeServicer


class DecodeService(PoolService):
    ROLE = "decode"

    @classmethod
    def new_instance(cls, instance_id: str, engine: AsyncEngine, kvstore: KVStoreClient,
                     config: DecodeConfig, metrics: Metrics, tracer) -> DecodeInstance:
        return DecodeInstance(instance_id, engine, kvstore, config.kv_timeout_s, metrics, tracer)

    @classmethod
    def add_servicer(cls, server: RpcServer, instance: DecodeInstance) -> None:
        server.add_service(decode_pb2_grpc.add_DecodeServicer_to_server, DecodeServicer(instance), protos.DECODE)

    def info(self) -> Instance:
        block_size, kvp_tokens = kv_layout(self.config)
        return Instance(self.instance.instance_id, "decode", self.address, block_size, kvp_tokens,
                        self.instance.stats().total_blocks, self.free_blocks(),
                        scheduling=self.scheduling(), engine_epoch=self.engine_epoch)

    def free_blocks(self) -> tuple[int, ...]:
        return self.instance.stats().free_blocks
