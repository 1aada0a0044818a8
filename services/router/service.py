"""Wiring of the router: tokenizer + frontend + router logic + public gRPC server.

    svc = await RouterService.start(config)     # svc.address
    ...
    await svc.stop()
"""
from __future__ import annotations

import asyncio
import logging

from common.client import KVStoreClient
from common.rpc import protos
from common.rpc.protos import router_pb2_grpc
from common.rpc.server import RpcServer
from services.router.config import RouterConfig
from services.router.frontend import Frontend
from services.router.router import Router
from services.router.server import RouterServicer

log = logging.getLogger(__name__)


def load_frontend(config: RouterConfig) -> Frontend:
    """Reads the checkpoint's config and tokenizer (never its weights)."""
    from common.model.loader import load_checkpoint
    from common.model.tokenizer import load_tokenizer
    checkpoint = load_checkpoint(config.model, max_model_len=config.max_model_len)
    tokenizer = load_tokenizer(config.model, checkpoint.config)
    mc = checkpoint.config
    return Frontend(tokenizer, mc, config.model_name, checkpoint.source, mc.max_position,
                    config.max_prompt_tokens, config.default_max_tokens)


class RouterService:
    def __init__(self, config: RouterConfig, server: RpcServer, router: Router, kvstore: KVStoreClient) -> None:
        self.config = config
        self.server = server
        self.router = router
        self.kvstore = kvstore

    @property
    def address(self) -> str:
        return self.server.address

    @classmethod
    async def start(cls, config: RouterConfig) -> "RouterService":
        frontend = await asyncio.to_thread(load_frontend, config)
        kvstore = KVStoreClient(config.kvstore, timeout_s=config.rpc_timeout_s)
        router = Router(config, frontend, kvstore)
        server = RpcServer(config.host, config.port, grace_s=config.grace_s)
        server.add_service(router_pb2_grpc.add_RouterServicer_to_server, RouterServicer(frontend, router),
                           protos.ROUTER)
        svc = cls(config, server, router, kvstore)
        try:
            await server.start()
        except BaseException:
            await kvstore.close()
            raise
        log.info("router on %s serving %s (max prompt %d tokens, prompts >= %d tokens go to a prefill instance)",
                 svc.address, frontend.name, frontend.max_prompt_tokens, config.short_prompt_tokens)
        return svc

    async def stop(self) -> None:
        """Drains running requests (grace period), then finishes their cleanups. Idempotent."""
        await self.server.stop()
        await self.router.close()
        await self.kvstore.close()
