"""Wiring of one prefill or decode instance: engine thread + instance logic + gRPC server + kvstore
membership. The two roles differ only in their instance, servicer and registration; each
subclasses PoolService with those.

    svc = await DecodeService.start(config)     # registered with the kvstore, health SERVING
    ...
    await svc.stop()                            # leave, drain, stop (also what SIGTERM runs)

A supervisor watches the engine: when it fails (a grid worker died), the instance leaves the kvstore
and goes NOT_SERVING (every running request has already failed with UNAVAILABLE), then builds a fresh
engine and registers again (`restart_on_failure`), or stays out.

The instance a subclass builds has `instance_id`, `engine` (an AsyncEngine, replaced by the
supervisor), `active` (its open request streams), `busy` (requests in flight), `start()` and
`async stop()` (its background tasks). Its heartbeats carry its load (`load`, common/pool_load.py)
every config.heartbeat_interval_s, and what changed in its prefix cache (common/prefix_report.py).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, ClassVar

from common.client import KVStoreClient, Membership
from common.engine.async_engine import AsyncEngine, keep_alive
from common.errors import ConfigError, MnemosyneError
from common.logs import setup_logging
from common.tracing import NOOP, setup_tracing, shutdown_tracing, tracer
from common.metadata.types import Instance, LoadReport, SchedulingInfo
from common.perf_model.published import publish
from common.metrics import Metrics, MetricsInterceptor, MetricsServer, new_registry, serve_metrics
from common.model.loader import served_model_name
from common.pool_config import PoolConfig
from common.pool_load import LoadSampler
from common.prefix_report import PrefixReporter
from common.rpc.server import RpcServer, advertised_host, host_port, serve_until_signal
from common.standby import hold

log = logging.getLogger(__name__)

# After leaving the kvstore, how long a draining instance still expects new RPCs: routers reuse
# their list of instances for discovery_ttl_s (0.5 s by default), and a placement reserved just
# before the deregistration is still on its way. Capped by grace_s.
LEAVE_SETTLE_S = 1.0
DRAIN_POLL_S = 0.05


def kv_layout(config: PoolConfig) -> tuple[int, int]:
    """(tokens per KV block, tokens per KVP group or 0 for one group) of an instance."""
    ec = config.engine
    return ec.cache.block_size, ec.parallel.kvp_tokens if ec.parallel.kvp > 1 else 0


def prefix_chain(engine: Any) -> tuple[str, int]:
    """(hash root in hex, block size) its cached blocks are named under (common/kv_cache/prefix.py),
    or ("", 0) when its prefix caching is off."""
    blocks = getattr(engine, "blocks", None)
    if blocks is None or not getattr(blocks, "prefix_caching", False):
        return "", 0
    return blocks.hash_root.hex(), int(blocks.block_size)


def cached_blocks(engine: Any) -> set[bytes] | None:
    """The names of every block the engine's pools hold (in use or cached), for the kvstore's prefix
    index (common/prefix_report.py); None without an engine or with prefix caching off. Read on the
    event loop while the engine thread changes the pools: each pool's dict is copied in one C call
    under the GIL (its keys are bytes: no Python code runs), so every copy is consistent."""
    blocks = getattr(engine, "blocks", None)
    if blocks is None or not getattr(blocks, "prefix_caching", False):
        return None
    out: set[bytes] = set()
    for pool in blocks.pools:
        out.update(pool.by_hash)
    return out


def cache_version(engine: Any) -> object:
    """A fingerprint of the engine's block names (PrefixReporter's `version`): the block manager, how
    many names its pools hold and how many they ever evicted (names change by nothing else)."""
    blocks = getattr(engine, "blocks", None)
    if blocks is None:
        return None
    return id(blocks), sum(len(p.by_hash) for p in blocks.pools), sum(p.evictions for p in blocks.pools)


def scheduling_info(engine: Any) -> SchedulingInfo:
    """What this instance publishes for admission (its registration's `scheduling`): the performance
    model its scheduler predicts with (when it schedules without one, FCFS with fixed chunks, the
    model it would load: the saved profile else the analytic roofline), budget, pipeline depth,
    chunking, TBT SLO and max_model_len, and the chain its prefix cache names blocks by (prefix_chain).
    Read-only attributes of the engine's interface."""
    cfg = engine.cfg
    sc = cfg.scheduler
    model = engine.perf_model
    published = None
    try:
        if model is None:
            from common.engine.profile import load_perf_model
            model = load_perf_model(engine, online=False)
        published = publish(model)
    except (ConfigError, AttributeError) as e:
        log.warning("no performance model to publish (%s); admission will use its default", e)
    root, block_size = prefix_chain(engine)
    return SchedulingInfo(published, float(engine.iteration_budget_s), int(engine.pipeline_depth), sc.policy,
                          sc.chunking, sc.chunk_size, sc.min_chunk, sc.max_chunk, sc.tbt_slo_s,
                          int(engine.max_model_len), prefix_hash_root=root, prefix_block_size=block_size)


def build_engine(config: PoolConfig, perf_model: Any = None) -> Any:
    """The engine of this instance (runs on the engine thread). `perf_model`: one an earlier engine of
    the same config built (a restart reuses it instead of calibrating again, seconds saved)."""
    from common.engine.engine import make_engine
    return make_engine(config.engine, threads_per_worker=config.threads, perf_model=perf_model)


class PoolService:
    ROLE: ClassVar[str] = ""

    def __init__(self, config: PoolConfig, server: RpcServer, instance: Any, kvstore: KVStoreClient,
                 metrics_server: MetricsServer | None = None) -> None:
        self.config = config
        self.metrics_server = metrics_server          # /metrics (None: metrics_port = -1)
        self.server = server
        self.instance = instance
        self.kvstore = kvstore
        self.advertise_host = advertised_host(config.host, config.advertise_host)
        self._load = LoadSampler(*kv_layout(config))
        self.membership = Membership(kvstore, self.info, self.free_blocks, self.load, config.heartbeat_interval_s,
                                     prefix=PrefixReporter(lambda: cached_blocks(self.instance.engine.engine),
                                                           version=lambda: cache_version(self.instance.engine.engine)))
        instance.on_request_end = self.membership.beat_now  # freed load and cached blocks: reported at once
        self._supervisor: asyncio.Task[None] | None = None
        self._joined = False                          # registered with the kvstore
        self.engine_epoch = 0                         # engines built before this one (registered: Instance)
        self._scheduling: tuple[Any, SchedulingInfo] | None = None

    # ---- what a role defines -----------------------------------------------------------------
    @classmethod
    def new_instance(cls, instance_id: str, engine: AsyncEngine, kvstore: KVStoreClient,
                     config: PoolConfig, metrics: Metrics, tracer: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def add_servicer(cls, server: RpcServer, instance: Any) -> None:
        raise NotImplementedError

    def info(self) -> Instance:
        """The registration with the kvstore."""
        raise NotImplementedError

    def free_blocks(self) -> tuple[int, ...]:
        """Free KV blocks per KVP group, sent with each heartbeat."""
        return ()

    def load(self) -> LoadReport:
        """The load sent with each heartbeat, what the router's admission reads (common/pool_load.py):
        cheap, the engine's last stats and the instance's counters."""
        engine = self.instance.engine
        return self._load.sample(self.instance.active, engine.stats, engine.iteration_totals)

    def scheduling(self) -> SchedulingInfo | None:
        """The registration's `scheduling` (scheduling_info of the current engine, computed once per
        engine: a rebuilt engine is published again when the instance rejoins)."""
        engine = self.instance.engine.engine
        if engine is None:
            return None
        if self._scheduling is None or self._scheduling[0] is not engine:
            self._scheduling = (engine, scheduling_info(engine))
        return self._scheduling[1]

    # ---- shared ------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """Where peers reach this instance (registered with the kvstore): the advertised host and
        the bound port."""
        return host_port(self.advertise_host, self.server.port)

    @property
    def metrics_url(self) -> str:
        """The /metrics endpoint as peers reach it ("" = none); printed at start for Prometheus'
        targets (scripts/up.py), not registered: the router's admission reads the heartbeats' load."""
        if self.metrics_server is None:
            return ""
        return f"http://{host_port(self.advertise_host, self.metrics_server.port)}/metrics"

    @classmethod
    async def start(cls, config: PoolConfig, tracer: Any = NOOP) -> "PoolService":
        """Registered and serving on return; `tracer` receives the requests' spans (common/tracing.py)."""
        iid = config.instance_id or f"{cls.ROLE}-{uuid.uuid4().hex[:8]}"
        tls = config.tls.load()                       # a bad file fails before the engine loads
        ec = config.engine
        metrics = Metrics(new_registry(), role=cls.ROLE, pool=config.deployment, instance=iid,
                          model_name=config.model_name or served_model_name(ec.model))
        metrics.set_kv_layout(*kv_layout(config))
        metrics_server = serve_metrics(config.metrics_port, metrics.registry, config.host) \
            if config.metrics_port >= 0 else None
        try:
            engine = await AsyncEngine.start(lambda: build_engine(config), name=f"{cls.ROLE}-engine",
                                             metrics=metrics)
        except BaseException:
            if metrics_server is not None:
                metrics_server.close()
            raise
        kvstore = KVStoreClient(config.kvstore, tls=tls)
        instance = cls.new_instance(iid, engine, kvstore, config, metrics, tracer)
        # Over TLS only the router calls an instance (Prefill, Decode, Abort...).
        server = RpcServer(config.host, config.port, grace_s=config.grace_s,
                           interceptors=[MetricsInterceptor(metrics)], tls=tls, roles=("router",),
                           health_port=config.tls.health_port)
        cls.add_servicer(server, instance)
        svc = cls(config, server, instance, kvstore, metrics_server)
        try:
            await server.start(serving=False)
            await svc._join()
            instance.start()
            await server.set_serving(True)
        except BaseException:
            await svc.stop()
            raise
        svc._supervisor = asyncio.create_task(keep_alive(
            instance, lambda old: build_engine(config, old.perf_model),
            name=f"{cls.ROLE}-engine", on_down=svc._leave,
            on_up=svc._rejoin, restart=config.restart_on_failure), name=f"{cls.ROLE}-supervisor")
        log.info("%s instance %s on %s (bound %s): %s, KV over %s", cls.ROLE, iid, svc.address,
                 server.address, ec.parallel, ec.kv_backend)
        return svc

    async def _join(self) -> None:
        await self.membership.start()
        self._joined = True

    async def _leave(self, err: Exception | None = None) -> None:
        """Out of the pool: NOT_SERVING, then deregistered (routers stop choosing it)."""
        await self.server.set_serving(False)
        self._joined = False
        await self.membership.stop()

    async def _rejoin(self) -> None:
        self.engine_epoch += 1                        # a rebuilt engine: routers retrying on it see it is new
        await self._join()
        await self.server.set_serving(True)

    async def stop(self) -> None:
        """Leave, drain, stop; what SIGTERM runs. Health NOT_SERVING and deregistered from the
        kvstore first, so no router picks this instance any more; then up to grace_s for the
        requests in flight, with the server still accepting their RPCs (a disaggregated request
        calls its decode instance twice, and a router may have picked this instance just before it
        left); then the server stops (cancelling what still runs), the instance's background tasks
        and the engine with its workers. Idempotent."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.grace_s
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        was_joined = self._joined
        await self._leave()
        if was_joined:
            await asyncio.sleep(min(LEAVE_SETTLE_S, max(0.0, deadline - loop.time())))
        if self.instance.busy and loop.time() < deadline:
            log.info("%s %s left the kvstore; draining its requests for up to %.1f s", self.ROLE,
                     self.instance.instance_id, deadline - loop.time())
        while self.instance.busy and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        await self.server.stop(max(0.0, deadline - loop.time()))
        await self.instance.stop()
        await self.instance.engine.shutdown()
        await self.kvstore.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None


def preload() -> None:
    """What building an engine imports on first use: a standby process imports it before it waits."""
    import common.kv_transfer.tcp  # noqa: F401
    import common.model.gguf_loader  # noqa: F401
    import common.parallel.driver  # noqa: F401
    try:
        import common.kv_transfer.nixl  # noqa: F401
    except ImportError:                    # the nixl wheel is optional
        pass


def run_pool_main(service: type[PoolService], config_type: type[PoolConfig],
                  argv: list[str] | None = None) -> int:
    """`python -m services.<role>`: parse, start, print "<role> listening on HOST:PORT" (the line
    scripts/up.py and the tests wait for) once registered and serving, run until SIGTERM or SIGINT
    and stop in order (PoolService.stop). Returns the exit status: 2 on a MnemosyneError."""
    role = service.ROLE

    async def serve(config: PoolConfig, tracer: Any) -> None:
        svc = await service.start(config, tracer)
        bound = "" if svc.address == svc.server.address else f"bound {svc.server.address}, "
        print(f"{role} listening on {svc.address} ({bound}instance {svc.instance.instance_id})", flush=True)
        if svc.metrics_server is not None:
            print(f"{role} metrics on {svc.metrics_url}", flush=True)
        await serve_until_signal(svc.server, shutdown=svc.stop)

    try:
        config = config_type.from_args(argv)
    except MnemosyneError as e:
        setup_logging(role)
        logging.getLogger(role).error("%s", e)
        return 2
    setup_logging(role, config.observability.log_format)
    hold(preload, role)                    # a standby process (make up's supervisor) waits here
    provider = setup_tracing(role, config.observability)
    try:
        import torch
        torch.set_num_threads(config.threads)
        asyncio.run(serve(config, tracer(provider)))
    except MnemosyneError as e:
        logging.getLogger(role).error("%s", e)
        return 2
    finally:
        shutdown_tracing(provider)
    return 0
