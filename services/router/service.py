"""Wiring of the router: tokenizer + frontend + router logic + public gRPC server.

    svc = await RouterService.start(config)     # svc.address
    ...
    await svc.stop()
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket

from common.client import KVStoreClient
from common.metrics import Metrics, MetricsInterceptor, MetricsServer, new_registry, serve_metrics
from common.rpc import protos
from common.rpc.protos import router_pb2_grpc
from common.rpc.server import RpcServer
from common.tracing import NOOP
from common.config import SchedulerConfig
from services.router.admission import AdmissionGate
from services.router.config import RouterConfig
from services.router.discovery import Discovery
from services.router.auth import KeyRing
from services.router.frontend import Frontend
from services.router.http_api import HttpServer, OpenAIApi
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
    def __init__(self, config: RouterConfig, server: RpcServer, router: Router, kvstore: KVStoreClient,
                 metrics_server: MetricsServer | None = None, http: HttpServer | None = None) -> None:
        self.config = config
        self.metrics_server = metrics_server          # /metrics (None: metrics_port = -1)
        self.http = http                              # the OpenAI-compatible API (None: http_port = -1)
        self.server = server
        self.router = router
        self.kvstore = kvstore

    @property
    def address(self) -> str:
        return self.server.address

    @classmethod
    async def start(cls, config: RouterConfig, tracer=NOOP, frontend: Frontend | None = None) -> "RouterService":
        """Serving on return; `tracer` receives the requests' spans (common/tracing.py); `frontend`:
        load_frontend(config) done already (a standby process loads it while it waits)."""
        keys = KeyRing.from_file(config.api_keys_file)         # a bad keys file fails before any loading
        if not keys.required:
            log.warning("no --api-keys-file: the router serves every caller without authentication")
        tls = config.tls.load()               # our certificate towards the internal services
        if frontend is None:
            frontend = await asyncio.to_thread(load_frontend, config)
        kvstore = KVStoreClient(config.kvstore, timeout_s=config.rpc_timeout_s, tls=tls)
        metrics = Metrics(new_registry(), role="router", pool=config.deployment,
                          instance=config.instance_id or f"router-{socket.gethostname()}-{os.getpid()}",
                          model_name=frontend.name)
        slo = config.slo      # TBT: the scheduler's default until the decode pool's is known
        metrics.set_slo_targets(dict(slo.ttft_s), SchedulerConfig().tbt_slo_s, slo.objective)
        discovery = Discovery(kvstore, config.discovery_ttl_s)
        gate = AdmissionGate(config, metrics, discovery) if config.admission else None
        router = Router(config, frontend, kvstore, metrics, discovery, gate, tracer, keys, tls)
        server = RpcServer(config.host, config.port, grace_s=config.grace_s,
                           interceptors=[MetricsInterceptor(metrics)])
        server.add_service(router_pb2_grpc.add_RouterServicer_to_server, RouterServicer(frontend, router),
                           protos.ROUTER)
        metrics_server = http = None
        started = False
        try:
            if config.http_port >= 0:         # bound first: a port in use fails before anything serves
                http = HttpServer(OpenAIApi(frontend, router, discovery), config.host, config.http_port,
                                  config.grace_s)
            if config.metrics_port >= 0:
                metrics_server = serve_metrics(config.metrics_port, metrics.registry, config.host)
            svc = cls(config, server, router, kvstore, metrics_server, http)
            await server.start()
            started = True
            if http is not None:
                await http.start()
        except BaseException:
            if started:
                await server.stop()
            if http is not None:
                await http.stop()
            await kvstore.close()
            if metrics_server is not None:
                metrics_server.close()
            raise
        if gate is not None:
            gate.start()
        log.info("router on %s serving %s (max prompt %d tokens, prompts >= %d tokens go to a prefill instance)",
                 svc.address, frontend.name, frontend.max_prompt_tokens, config.short_prompt_tokens)
        return svc

    async def stop(self) -> None:
        """Drains running requests (grace period), then finishes their cleanups. Idempotent."""
        if self.http is not None:
            await self.http.stop()
            self.http = None
        await self.server.stop()
        if self.router.gate is not None:
            await self.router.gate.stop()
        await self.router.close()
        await self.kvstore.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
