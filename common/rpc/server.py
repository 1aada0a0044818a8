"""The gRPC server bootstrap every service uses (grpc.aio).

    server = RpcServer(host="127.0.0.1", port=0)
    server.add_service(kvstore_pb2_grpc.add_KVStoreServicer_to_server, servicer, protos.KVSTORE)
    port = await server.start()          # bound port (a free one for port=0); health SERVING
    await serve_until_signal(server, shutdown=svc.stop)   # SIGINT/SIGTERM -> the service's ordered stop

Every server also runs the standard health service (grpc.health.v1.Health: "" and each added
service; NOT_SERVING until start() and again from the beginning of shutdown) and the reflection
service, so `grpcurl` and load balancers work against any of them.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
from typing import Any, Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.errors import ConfigError
from common.rpc.client import MESSAGE_OPTIONS
from common.rpc.decoding import checked
from common.rpc.tls import Credentials, RoleGate

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 5.0
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RpcServer:
    """One grpc.aio server: services, health, reflection, graceful stop.

    Lifecycle: construct, add_service() for each servicer, `await start()`, later `await stop()`.
    Must be constructed and used inside the running event loop that serves it.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 grace_s: float = DEFAULT_GRACE_S,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 tls: Credentials | None = None, roles: Sequence[str] = (), health_port: int = -1) -> None:
        """`interceptors` wrap every RPC (e.g. common.metrics.MetricsInterceptor). `tls`: serve over
        mutual TLS (common/rpc/tls.py), callers need a certificate of the CA, and of one of `roles`
        when given (RoleGate); None = plaintext. `health_port` (with `tls`, >= 0): the health service
        alone, in plaintext, on that port of `host` (0 = a free one), for probes without a certificate."""
        if not 0 <= port < 65536:
            raise ConfigError(f"rpc server: port must be in [0, 65535], got {port}")
        if grace_s < 0:
            raise ConfigError(f"rpc server: grace_s must be >= 0, got {grace_s}")
        self.host = host
        self.port = port
        self.grace_s = grace_s
        self.tls = tls
        if tls is not None and roles:
            interceptors = (RoleGate(roles), *interceptors)
        # so_reuseport off: a port that is already taken must fail to bind, not be shared.
        self._server = grpc.aio.server(options=MESSAGE_OPTIONS + (("grpc.so_reuseport", 0),),
                                       interceptors=tuple(interceptors))
        self._health = health.aio.HealthServicer()
        self.health_port = health_port if tls is not None else -1
        self._health_server: grpc.aio.Server | None = None
        self._services: list[str] = []
        self._started = False
        self._stopped = False

    @property
    def address(self) -> str:
        """"host:port" once started (the bound port)."""
        return f"{self.host}:{self.port}"

    def add_service(self, add_to_server: Callable[[Any, grpc.aio.Server], None], servicer: Any,
                    full_name: str) -> None:
        """Registers a servicer, e.g. (add_KVStoreServicer_to_server, servicer, "mnemosyne.v1.KVStore")."""
        if self._started:
            raise RuntimeError("add_service after start")
        add_to_server(servicer, checked(self._server))      # undecodable bytes: INVALID_ARGUMENT
        self._services.append(full_name)

    async def start(self, serving: bool = True) -> int:
        """Binds, starts and returns the bound port. `serving=False` leaves health NOT_SERVING
        until set_serving(True) (for services that warm up after binding)."""
        if self._started:
            raise RuntimeError("server already started")
        target = f"{self.host}:{self.port}"
        bound = _bind(self._server, target, self.tls)
        self.port = bound
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        if self.health_port >= 0:
            self._health_server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            self.health_port = _bind(self._health_server, host_port(self.host, self.health_port), None)
            await self._health_server.start()
        reflection.enable_server_reflection(
            (*self._services, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        await self.set_serving(False)
        await self._server.start()
        self._started = True
        if serving:
            await self.set_serving(True)
        log.info("gRPC server on %s (%s): %s", self.address, "mutual TLS" if self.tls else "plaintext",
                 ", ".join(self._services) or "(no services)")
        if self._health_server is not None:
            log.info("gRPC health (plaintext) on %s", host_port(self.host, self.health_port))
        return bound

    async def set_serving(self, serving: bool) -> None:
        """Health status of the server ("") and every added service."""
        status = _SERVING if serving else _NOT_SERVING
        for name in ("", *self._services):
            await self._health.set(name, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING at once, then refuses new RPCs and lets running ones finish for up
        to `grace_s` (default: the constructor's) before cancelling them. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.grace_s if grace_s is None else grace_s)
        if self._health_server is not None:
            await self._health_server.stop(0)
        log.info("gRPC server on %s stopped", self.address)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _bind(server: grpc.aio.Server, target: str, tls: Credentials | None) -> int:
    try:
        bound = (server.add_secure_port(target, tls.server()) if tls is not None
                 else server.add_insecure_port(target))
    except RuntimeError as e:
        raise ConfigError(f"rpc server: cannot bind {target}: {e}") from e
    if bound == 0:
        raise ConfigError(f"rpc server: cannot bind {target}")
    return bound


async def serve_until_signal(server: RpcServer, *,
                             shutdown: Callable[[], Awaitable[None]] | None = None,
                             signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Runs until one of `signals` arrives (or the server terminates), then awaits `shutdown()`:
    the service's own ordered stop, which owns the order of health NOT_SERVING, leaving any
    registry, draining `server` and stopping its workers (e.g. common.pool_service.PoolService.stop).
    `server` is stopped afterwards in any case (a no-op when `shutdown` did it)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.create_task(stop.wait())
    terminated = asyncio.create_task(server.wait_for_termination())
    orphaned = asyncio.create_task(_launcher_gone())
    try:
        await asyncio.wait((stopped, terminated, orphaned), return_when=asyncio.FIRST_COMPLETED)
        if orphaned.done() and orphaned.result():
            log.warning("the process that launched this service (pid %s) is gone: stopping as on SIGTERM",
                        os.environ.get(LAUNCHER_PID_ENV))
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        log.info("shutting down %s", server.address)
        try:
            if shutdown is not None:
                await shutdown()
        finally:
            try:
                await server.stop()
            finally:
                for task in (stopped, terminated, orphaned):
                    task.cancel()
                await asyncio.gather(stopped, terminated, orphaned, return_exceptions=True)


#: set by scripts/up.py's Cluster to its own pid: a service it launched stops (as on SIGTERM) when that
#: process is gone, however it ended (a benchmark or test killed by a signal does not run its clean-up,
#: and the services run in sessions of their own). Unset (Kubernetes, a hand-started service): no watch.
LAUNCHER_PID_ENV = "MNEMOSYNE_LAUNCHER_PID"
LAUNCHER_POLL_S = 1.0


async def _launcher_gone() -> bool:
    """Returns True once the launcher named by LAUNCHER_PID_ENV is no longer this process's parent
    (it died and the process was re-parented); never returns when there is none to watch."""
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if not launcher.isdigit() or os.getppid() != int(launcher):
        await asyncio.Event().wait()           # nothing to watch (or not launched by it): forever
    while os.getppid() == int(launcher):
        await asyncio.sleep(LAUNCHER_POLL_S)
    return True


def advertised_host(bind_host: str, advertise_host: str = "") -> str:
    """The host peers should dial to reach a server bound to `bind_host`: `advertise_host` when
    given, else `bind_host` unless it is a wildcard (0.0.0.0, ::), else this machine's IP address
    as its hostname resolves (a pod's hostname resolves to the pod IP), or the hostname itself when
    it resolves to nothing or to loopback only (peers on other machines may resolve it by DNS)."""
    if advertise_host:
        return advertise_host
    if bind_host not in WILDCARD_HOSTS:
        return bind_host
    name = socket.gethostname()
    try:
        ip = socket.gethostbyname(name)
    except OSError:
        return name
    return name if ipaddress.ip_address(ip).is_loopback else ip


def address_host(address: str) -> str:
    """The host of "host:port" or "[v6]:port" (brackets removed)."""
    return address.rpartition(":")[0].strip("[]") if ":" in address else address


def host_port(host: str, port: int) -> str:
    """"host:port", with an IPv6 address in brackets ("[fd00::1]:50053")."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
