"""Wiring of one running kvstore: store + placement logic + gRPC server + lease reaper.

    svc = await KVStoreService.start(config)    # svc.port, svc.address
    ...
    await svc.stop()

Used by __main__ (until SIGTERM/SIGINT) and by the integration tests (in-process).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import time

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from common.errors import ConfigError, MnemosyneError
from common.metadata.redis_server import RedisServer
from common.metadata.store import MetadataStore, StoreUnavailableError
from common.metrics import Metrics, MetricsInterceptor, MetricsServer, new_registry, serve_metrics
from common.rpc import protos
from common.rpc.protos import kvstore_pb2_grpc
from common.rpc.server import RpcServer
from services.kvstore.config import KVStoreConfig
from services.kvstore.placement import PlacementService
from services.kvstore.server import KVStoreServicer

log = logging.getLogger(__name__)

METRICS_REFRESH_S = 1.0       # placements, live instances and lease expiries are read from Redis
REDIS_RETRY_FIRST_S = 0.2     # first wait for a Redis that does not answer yet, doubling up to
REDIS_RETRY_MAX_S = 2.0


async def wait_for_redis(store: MetadataStore, timeout_s: float) -> None:
    """Returns once Redis answers PING; retries with backoff (one log line per failed attempt) for
    up to `timeout_s`, then raises StoreUnavailableError. A rejected password is a ConfigError at
    once (retrying cannot fix it)."""
    pool = store.redis.connection_pool
    kw = pool.connection_kwargs
    where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"     # no credentials in logs
    # One PING per attempt, logged: this loop is the backoff (the store's own retry would hide attempts).
    probe = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class,
                                                             **{**kw, "retry": Retry(NoBackoff(), 0)}))
    try:
        await _ping_until(probe, where, timeout_s)
    finally:
        probe.close()


async def _ping_until(probe: redis.Redis, where: str, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    backoff = ExponentialBackoff(cap=REDIS_RETRY_MAX_S, base=REDIS_RETRY_FIRST_S)
    for attempt in itertools.count(1):
        try:
            await asyncio.to_thread(probe.ping)
            return
        except redis.exceptions.AuthenticationError as e:
            raise ConfigError(f"kvstore: Redis at {where} refused our credentials: {e}") from e
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            left = deadline - loop.time()
            if left <= 0:
                raise StoreUnavailableError(
                    f"kvstore: Redis at {where} did not answer within {timeout_s:g} s "
                    f"({attempt} attempts): {e}") from None
            wait = min(backoff.compute(attempt - 1), left)
            log.warning("Redis at %s not reachable (attempt %d, next in %.1f s): %s", where, attempt, wait, e)
            await asyncio.sleep(wait)


def read_password(path: str) -> str | None:
    """The Redis password in file `path` (its first line; None for no file); ConfigError when unreadable
    or empty."""
    if not path:
        return None
    try:
        text = open(path).read().strip()
    except OSError as e:
        raise ConfigError(f"kvstore: cannot read --redis-password-file {path}: {e.strerror}") from None
    if not text:
        raise ConfigError(f"kvstore: --redis-password-file {path} is empty")
    return text


class KVStoreService:
    def __init__(self, config: KVStoreConfig, store: MetadataStore, server: RpcServer,
                 logic: PlacementService, redis_server: RedisServer | None,
                 metrics: Metrics, metrics_server: MetricsServer | None = None) -> None:
        self.config = config
        self.store = store
        self.server = server
        self.logic = logic
        self.metrics = metrics
        self.metrics_server = metrics_server    # /metrics endpoint (None: metrics_port = -1)
        self._redis_server = redis_server      # owned: started here when no URL was configured
        self._reaper: asyncio.Task[None] | None = None
        self._expired_seen: int | None = None   # the store's expiry count at the last refresh
        self._metrics_at = -1e9

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    @classmethod
    async def start(cls, config: KVStoreConfig) -> "KVStoreService":
        tls = config.tls.load()
        password = read_password(config.redis_password_file)
        redis_server = None
        url = config.redis_url
        if not url:
            password = secrets.token_urlsafe(24)
            redis_server = await asyncio.to_thread(RedisServer(password=password).start)
            url = redis_server.url
            log.warning("no Redis URL configured: started a private redis-server at %s", url)
        store = MetadataStore(url, deployment=config.deployment, password=password)
        metrics_server: MetricsServer | None = None
        try:
            await wait_for_redis(store, config.redis_connect_timeout_s)
            logic = PlacementService(store, lease_s=config.lease_s,
                                     instance_ttl_s=config.instance_ttl_s)
            metrics = Metrics(new_registry(), role="kvstore", pool=config.deployment,
                              instance=f"kvstore-{socket.gethostname()}-{os.getpid()}")
            if config.metrics_port >= 0:
                metrics_server = serve_metrics(config.metrics_port, metrics.registry, config.host)
            # Over TLS: the router and the instances; registrations are bound to the caller's
            # certificate (KVStoreServicer, check_identity).
            server = RpcServer(config.host, config.port, grace_s=config.grace_s,
                               interceptors=[MetricsInterceptor(metrics)], tls=tls,
                               roles=("router", "prefill", "decode"), health_port=config.tls.health_port)
            server.add_service(kvstore_pb2_grpc.add_KVStoreServicer_to_server,
                               KVStoreServicer(logic, metrics, check_identity=tls is not None), protos.KVSTORE)
            svc = cls(config, store, server, logic, redis_server, metrics, metrics_server)
            svc._expired_seen = await asyncio.to_thread(store.expired_total)
            await server.start()
        except BaseException:
            if metrics_server is not None:
                metrics_server.close()
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
                if time.monotonic() - self._metrics_at >= METRICS_REFRESH_S:
                    self._metrics_at = time.monotonic()
                    await asyncio.to_thread(self._refresh_metrics)
            except MnemosyneError as e:            # Redis down: keep trying
                log.warning("lease reaper: %s", e)
            except Exception:                       # noqa: BLE001 - a bug; keep reclaiming
                log.exception("lease reaper failed")
            await asyncio.sleep(self.config.reap_interval_s)

    def _refresh_metrics(self) -> None:
        """Live placements and instances, and lease expiries: the count in Redis is deployment-wide
        (expiries found by any kvstore or by an eager renew/release), so this counter grows by its
        increase since the last refresh; aggregate it with max, not sum, over kvstore replicas."""
        expired = self.store.expired_total()
        if self._expired_seen is not None:
            self.metrics.add_lease_expiries(expired - self._expired_seen)
        self._expired_seen = expired
        self.metrics.set_placements(self.store.num_placements())
        instances = self.store.list_instances()
        for role in ("prefill", "decode"):
            self.metrics.set_live_instances(role, sum(i.role == role for i in instances))

    async def stop(self) -> None:
        """Stops serving (graceful), then the reaper, then closes the store. Idempotent."""
        await self.server.stop()
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        self.store.close()
        if self._redis_server is not None:
            await asyncio.to_thread(self._redis_server.stop)
            self._redis_server = None
