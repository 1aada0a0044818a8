"""Wiring of one running kvstore: store + placement logic + gRPC server + lease reaper.

    svc = await KVStoreService.start(config)    # svc.port, svc.address
    ...
    await svc.stop()

Used by __main__ (until SIGTERM/SIGINT) and by the integration tests (in-process).
"""
from __future__ import annotations

import asyncio
import logging

from common.errors import MnemosyneError
from common.metadata.redis_server import RedisServer
from common.metadata.store import MetadataStore
from common.rpc import protos
from common.rpc.protos import kvstore_pb2_grpc
from common.rpc.server import RpcServer
from services.kvstore.config import KVStoreConfig
from services.kvstore.placement import PlacementService
from services.kvstore.server import KVStoreServicer

log = logging.getLogger(__name__)


class KVStoreService:
    def __init__(self, config: KVStoreConfig, store: MetadataStore, server: RpcServer,
                 logic: PlacementService, redis_server: RedisServer | None) -> None:
        self.config = config
        self.store = store
        self.server = server
        self.logic = logic
        self._redis_server = redis_server      # owned: started here when no URL was configured
        self._reaper: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    @classmethod
    async def start(cls, config: KVStoreConfig) -> "KVStoreService":
        redis_server = None
        url = config.redis_url
        if not url:
            redis_server = await asyncio.to_thread(RedisServer().start)
            url = redis_server.url
            log.warning("no Redis URL configured: started a private redis-server at %s", url)
        store = MetadataStore(url, deployment=config.deployment)
        try:
            await asyncio.to_thread(store.redis.ping)
            logic = PlacementService(store, lease_s=config.lease_s,
                                     instance_ttl_s=config.instance_ttl_s)
            server = RpcServer(config.host, config.port, grace_s=config.grace_s)
            server.add_service(kvstore_pb2_grpc.add_KVStoreServicer_to_server,
                               KVStoreServicer(logic), protos.KVSTORE)
            svc = cls(config, store, server, logic, redis_server)
            await server.start()
        except BaseException:
            store.close()
            if redis_server is not None:
                redis_server.stop()
            raise
        svc._reaper = asyncio.create_task(svc._reap_forever(), name="kvstore-reaper")
        log.info("kvstore on %s (redis %s, deployment %s, lease %.1fs)", svc.address, url,
                 config.deployment, config.lease_s)
        return svc

    async def _reap_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.logic.expire)
            except MnemosyneError as e:            # Redis down: keep trying
                log.warning("lease reaper: %s", e)
            except Exception:                       # noqa: BLE001 - a bug; keep reclaiming
                log.exception("lease reaper failed")
            await asyncio.sleep(self.config.reap_interval_s)

    async def stop(self) -> None:
        """Stops serving (graceful), then the reaper, then closes the store. Idempotent."""
        await self.server.stop()
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        self.store.close()
        if self._redis_server is not None:
            await asyncio.to_thread(self._redis_server.stop)
            self._redis_server = None
