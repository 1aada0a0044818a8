"""`make up`: the whole disaggregated deployment on loopback, one process per service.

    make up ARGS="--model DIR --max-model-len N --decode-kvp K --kvp-tokens M"
    .venv/bin/mnemosyne serve --model DIR ...                 # the same (make up runs it)
    .venv/bin/python scripts/up.py [--kv-backend tcp|nixl] [--port 50051] [--policy fcfs] ...

Starts, in order: Redis (a private redis-server unless --redis-url), the kvstore, one prefill instance
(spp = 2) and one decode instance (kvp = 2) side by side, and the router on 127.0.0.1:50051, serving
the built-in model unless --model says otherwise. Prints where each service listens and where its
log is, then waits, restarting a service that exits (scripts/supervisor.py: backoff, gives up after
five failures in a row; --no-supervise: stop everything instead). Ctrl-C (SIGINT) or SIGTERM stops
them all, router first, Redis last; a second one SIGKILLs what is left.

Flags (common/flags.py; each also read from MNEMOSYNE_<FLAG>): the cluster's own (ClusterConfig:
layout, sizes, ports), then the pools' engine and scheduler flags (--policy, --chunking, --perf-model,
--tbt-slo-s, ...) and the router's SLO and admission flags (--ttft-short-s, --slo-factor, ...), passed
on to those services when given. Sizing: with --max-model-len N, the deployment is sized so that an
idle one serves a prompt of up to N tokens: M = --kvp-tokens defaults to ceil(N / K) rounded up to
the block size, each decode KVP group holds M plus headroom, the prefill instance N, and the router's
deadline on a request's streams grows with the attention work, N squared (ClusterConfig.sized). The
KV timeout (--kv-timeout-s) needs no sizing: it counts from a transfer's last progress, so it bounds
a stall, not a transfer; the router's --progress-timeout-s bounds a prefill that stops reporting.

The `Cluster` class is also what the end-to-end tests start (tests/integration/test_services_e2e.py).
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import errno
import importlib.util
import ipaddress
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import redis

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.auth import SECRETS_DIR, bearer, default_key_path, ensure_local_key, ensure_secret  # noqa: E402
from common.config import DType, EngineConfig, KVBackend, ObservabilityConfig  # noqa: E402
from common.errors import ConfigError, MnemosyneError  # noqa: E402
from common.flags import ENV_PREFIX, RESERVED_ENV, Flags, HelpFormatter  # noqa: E402
from common.metadata.redis_server import RedisServer  # noqa: E402
from common.metadata.store import MetadataStore  # noqa: E402
from common.pool_config import POOL_DEFAULTS  # noqa: E402
from common.standby import STANDBY_ENV  # noqa: E402
from scripts.certs import ensure_certs  # noqa: E402
from scripts.supervisor import Supervisor  # noqa: E402
from services.router.config import RouterConfig  # noqa: E402

log = logging.getLogger("up")
LISTENING = re.compile(r"^(\w+) listening on (\S+)", re.M)
METRICS = re.compile(r"^(\w+) metrics on (\S+)", re.M)
HTTP = re.compile(r"^(\w+) http on (\S+)", re.M)
TARGETS_DIR = ROOT / "deploy" / "prometheus" / "targets"


def default_kv_backend() -> str:
    """NIXL when its wheel is installed (it runs over UCX on loopback too), else TCP."""
    return "nixl" if importlib.util.find_spec("nixl_cu12") or importlib.util.find_spec("nixl") else "tcp"


DEFAULT_KV_TOKENS = 8192                     # KV capacity of an instance (per KVP group) when not sized
DEFAULT_KVP_TOKENS = 4096                    # M when neither --kvp-tokens nor --max-model-len is given
DEFAULT_KV_TIMEOUT_S = 60.0                  # a stall: the timeout counts from the transfer's last progress
DEFAULT_REQUEST_TIMEOUT_S = 3600.0           # the router's deadline on a request's streams, up to 128K tokens
REQUEST_TIMEOUT_TOKENS = 131072              # past this, the deadline grows as (N / this)^2: the attention work


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class ClusterConfig:
    """One loopback deployment. None sizes are derived by `sized()` (from --max-model-len)."""
    model: str | None = None                 # Hugging Face directory or .gguf file (none: the built-in model)
    model_name: str = ""                     # served model name: what requests' `model` must match and every
                                             # service's model_name metrics label (empty = the checkpoint's name)
    max_model_len: int | None = None         # N: longest sequence; sizes KV capacity and timeouts (none: the
                                             # model's)
    kv_backend: KVBackend = field(default_factory=default_kv_backend, metadata={
        "help": "KV transfer backend (nixl when its wheel is installed, else tcp)"})
    host: str = "127.0.0.1"                  # address every service binds
    router_port: int = field(default=50051, metadata={"flag": "port", "help": "router port (0 = a free one)"})
    http_port: int | None = field(default=None, metadata={"help": "port of the OpenAI-compatible HTTP API (none: "
                                  "8000, or a free one when --port is 0; 0 = a free one; -1 = no HTTP API)"})
    redis_url: str = ""                      # use this Redis instead of starting one
    deployment: str = "default"              # key prefix in Redis and the metrics' pool label
    prefill_tp: int = 1                      # tensor-parallel ranks of the prefill instance
    prefill_spp: int = 2                     # sequence-pipeline stages of the prefill instance
    decode_tp: int = 1                       # tensor-parallel ranks of the decode instance
    decode_kvp: int = 2                      # K: KV-parallel groups of the decode instance
    kvp_tokens: int | None = None            # M: tokens per decode KVP group (none: ceil(N / K) rounded up to the
                                             # block size, else 4096)
    block_size: int = 16                     # tokens per KV block
    decode_kv_tokens: int | None = None      # KV capacity of each decode KVP group, tokens (none: M plus
                                             # headroom, at least 8192)
    prefill_kv_tokens: int | None = None     # KV capacity of the prefill instance, tokens (none: N plus a block,
                                             # at least 8192)
    chunk_size: int = 512                    # prefill chunk in tokens (--chunking fixed)
    short_prompt_tokens: int = 256           # shorter prompts are prefilled by the decode instance
    dtype: DType = "float32"                 # weights, activations and KV cache type
    threads: int = 1                         # torch threads per process
    lease_s: float = 10.0                    # the kvstore's placement lease
    kv_timeout_s: float | None = None        # seconds a KV transfer may make no progress, in the pools (none: 60)
    request_timeout_s: float | None = None   # the router's deadline on a request's streams (none: 3600 s, times
                                             # (N / 131072)^2 when N is longer)
    start_timeout_s: float = 300.0           # how long each service may take to start
    supervise: bool = True                   # restart a service that exits (scripts/supervisor.py; no: stop
                                             # everything when one exits)
    standby: bool = True                     # the supervisor keeps one imported spare process per service and
                                             # starts it in place of one that exits (common/standby.py): a
                                             # restart skips the interpreter's imports (~2-4 s); costs the
                                             # spares' memory (no: a restart starts a new process)
    log_dir: str = ""                        # where the services' logs go (empty = a new temporary directory)
    admission: bool = True                   # the router's SLO-aware admission
    auth: bool = True                        # clients need an API key: one is generated for this checkout
                                             # (common/auth.py) unless --api-keys-file names the router's keys
    api_keys_file: str = ""                  # the router's keys file (empty: a local key, see --auth)
    insecure: bool = False                   # no mutual TLS between the services and no Redis password (for
                                             # debugging; by default both are on, their secrets in .mnemosyne/)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)  # every service's
                                             # --log-format (text here) and --otlp-endpoint
    pool_flags: tuple[str, ...] = field(default=(), metadata={"flag": None})     # engine flags for both pools
    router_flags: tuple[str, ...] = field(default=(), metadata={"flag": None})   # more router flags
    extra: dict = field(default_factory=dict, metadata={"flag": None})  # service name -> extra flags

    def __post_init__(self) -> None:
        for name in ("prefill_tp", "prefill_spp", "decode_tp", "decode_kvp", "block_size", "chunk_size",
                     "threads", "short_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"up: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_model_len", "kvp_tokens", "decode_kv_tokens", "prefill_kv_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"up: {name} must be >= 1, got {getattr(self, name)}")
        n, k, m = self.max_model_len, self.decode_kvp, self.kvp_tokens
        if n is not None and k > 1 and m is not None and k * m < n:
            raise ConfigError(f"up: decode_kvp x kvp_tokens = {k} x {m} = {k * m} tokens < max_model_len {n}")

    def sized(self) -> "ClusterConfig":
        """This config with every None size derived (a new config; the one `Cluster` runs)."""
        n, k, bs = self.max_model_len, self.decode_kvp, self.block_size
        m = self.kvp_tokens or (_round_up(-(-n // k), bs) if n else DEFAULT_KVP_TOKENS)
        need = m if k > 1 else (n or 0)                  # tokens of one longest request per group
        headroom = max(1024, need // 4)                  # short requests beside the longest one
        decode = self.decode_kv_tokens or max(DEFAULT_KV_TOKENS, _round_up(need + headroom, bs) if need else 0)
        prefill = self.prefill_kv_tokens or max(DEFAULT_KV_TOKENS, _round_up(n, bs) + bs if n else 0)
        timeout = self.kv_timeout_s or DEFAULT_KV_TIMEOUT_S
        request = self.request_timeout_s or DEFAULT_REQUEST_TIMEOUT_S * max(1.0, (n or 0) / REQUEST_TIMEOUT_TOKENS) ** 2
        if k > 1 and decode < m:
            raise ConfigError(f"up: decode_kv_tokens {decode} < kvp_tokens {m}: a KVP group could not "
                              "hold its share of one request")
        return dataclasses.replace(self, kvp_tokens=m, decode_kv_tokens=decode, prefill_kv_tokens=prefill,
                                   kv_timeout_s=timeout, request_timeout_s=request)


# The pools' engine settings that `make up` passes on when given (the cluster sets the others).
CLUSTER_ENGINE_KEYS = ("model", "max_model_len", "kv_backend", "kv_host", "dtype", "cache", "parallel",
                       "scheduler.chunk_size", "scheduler.role")
ROUTER_CLUSTER_KEYS = ("kvstore", "host", "port", "instance_id", "model", "model_name", "max_model_len", "kv_backend",
                       "short_prompt_tokens", "grace_s", "deployment", "metrics_port", "admission", "http_port",
                       "observability", "api_keys_file", "tls", "request_timeout_s")
DEFAULT_HTTP_PORT = 8000


def cluster_flags() -> Flags:
    return Flags(ClusterConfig, groups={"": "cluster"})


def pool_flags() -> Flags:
    """The pools' engine and scheduler flags (relative to EngineConfig) that `make up` passes on."""
    defaults = {k.removeprefix("engine."): v for k, v in POOL_DEFAULTS.items()}    # for --help; given
    return Flags(EngineConfig, exclude=CLUSTER_ENGINE_KEYS, dest_prefix="pool_", defaults=defaults,  # ones pass
                 groups={"": "pools (prefill and decode)", "scheduler": "pools: scheduler"})


def router_flags() -> Flags:
    return Flags(RouterConfig, exclude=ROUTER_CLUSTER_KEYS, dest_prefix="router_",
                 groups={"": "router", "slo": "router: default SLOs"})


def fixed_ports(config: ClusterConfig) -> list[tuple[str, int]]:
    """(flag, port) of every fixed port the cluster binds: the router's --port and, when the config
    has one, --http-port (0 = a free one, not listed). Every other port is a free one."""
    ports = [("--port", config.router_port), ("--http-port", getattr(config, "http_port", None))]
    return [(flag, port) for flag, port in ports if type(port) is int and port > 0]


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on host:port now (binding it as the services will fails)."""
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)      # as gRPC: TIME_WAIT is no clash
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


def busy_port(config: ClusterConfig) -> str | None:
    """The error line for the first fixed port already taken, before anything starts (a router
    that fails to bind would otherwise say so only after the models have loaded)."""
    for flag, port in fixed_ports(config):
        if port_in_use(config.host, port):
            return f"port {port} on {config.host} is in use (another `make up`?); choose another with {flag}"
    return None


# How long after both pools registered the router's views of them have refreshed (its discovery_ttl_s,
# 0.5 s, and admission's scrape_interval_s, 0.25 s, by default).
ROUTER_REFRESH_S = 1.0


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log_path: pathlib.Path
    args: list[str] = field(default_factory=list)   # what it was started with (before the cluster-wide flags)
    address: str = ""
    metrics_url: str = ""                    # its /metrics endpoint (printed at start)
    http_url: str = ""                       # the router's OpenAI-compatible API, http://HOST:PORT/v1

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Cluster:
    """The processes of one deployment. Not thread-safe; start and stop from one thread.

        with Cluster(ClusterConfig(router_port=0)) as c:
            c.router_address, c.services["decode"].pid, ...
    """

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config.sized()
        self.redis: RedisServer | None = None
        self.redis_url = config.redis_url
        self.api_key: str | None = None                 # the generated key clients present (auth, no keys file)
        self.services: dict[str, Service] = {}
        self.standbys: dict[str, Service] = {}          # spare processes by service (spawn_standby)
        self.stopping = False                           # stop() began: nothing is restarted any more
        self.log_dir = pathlib.Path(config.log_dir or tempfile.mkdtemp(prefix="mnemosyne-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis_dir = self.log_dir / "redis"         # the private Redis' append-only file
        # Mutual TLS and the private Redis' password (common/rpc/tls.py), unless --insecure.
        self.tls_dir = None if config.insecure else SECRETS_DIR / "tls"
        self.redis_password_file = None if config.insecure or config.redis_url else SECRETS_DIR / "redis-password"
        self.redis_password: str | None = None

    @property
    def router_address(self) -> str:
        return self.services["router"].address

    @property
    def auth_metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata presenting the generated API key (none without one)."""
        return bearer(self.api_key)

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (empty with --http-port -1)."""
        return self.services["router"].http_url

    @property
    def kvstore_address(self) -> str:
        return self.services["kvstore"].address

    @property
    def metrics_urls(self) -> dict[str, str]:
        """Service name -> its /metrics URL."""
        return {n: s.metrics_url for n, s in self.services.items() if s.metrics_url}

    def write_targets(self, directory: pathlib.Path = TARGETS_DIR) -> pathlib.Path:
        """Writes <deployment>.json (Prometheus file_sd) listing every service's /metrics, for a
        local Prometheus run with deploy/prometheus/prometheus.yml."""
        targets = [u.removeprefix("http://").removesuffix("/metrics") for u in self.metrics_urls.values()]
        path = directory / f"{self.config.deployment}.json"
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([{"targets": targets, "labels": {"deployment": self.config.deployment}}],
                                   indent=2) + "\n")
        return path

    # ---- start -------------------------------------------------------------------------------
    def start(self) -> "Cluster":
        self.stopping = False
        try:
            if self.tls_dir is not None:
                ensure_certs(self.tls_dir)
            if self.redis_password_file is not None:
                self.redis_password = ensure_secret(self.redis_password_file)
            if not self.redis_url:
                shutil.rmtree(self.redis_dir, ignore_errors=True)    # a new deployment starts empty
                self.redis = RedisServer(host=self.config.host, data_dir=self.redis_dir,
                                         password=self.redis_password)
                self.redis_url = self.redis.start().url     # (assigned first: kill() finds it if interrupted)
            self._wait(self._spawn("kvstore", self._kvstore_args()))
            # The two engines and the router load side by side (the router needs only the kvstore: it asks
            # it for a placement per request); start() returns when all three listen.
            started = [self._spawn("prefill", self._engine_args("prefill")),
                       self._spawn("decode", self._engine_args("decode")),
                       self._spawn("router", self._router_args())]
            for svc in started:
                self._wait(svc)
            self._wait_routable()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_routable(self) -> None:
        """Until the kvstore lists both pools and the router's views of them (its instance list,
        discovery_ttl_s; admission's load, scrape_interval_s) have refreshed since: the router may
        have looked before the pools registered, and a long prompt it places on that view is
        prefilled by the decode instance itself (the route of a deployment without a prefill pool)."""
        deadline = time.monotonic() + self.config.start_timeout_s
        while self.registered_roles() < {"prefill", "decode"}:
            if time.monotonic() > deadline:
                raise ConfigError(f"the pools did not register within {self.config.start_timeout_s:.0f} s")
            time.sleep(0.1)
        time.sleep(ROUTER_REFRESH_S)

    def restart(self, name: str) -> Service | RedisServer:
        """Starts service `name` ("redis" too) again after it died or was killed, with the same
        arguments. The kvstore and the router keep their ports (the pools and clients know them),
        Redis its port and its append-only file; a pool's dead registration is removed first (no
        router picks it while the new instance loads). ConfigError when it fails to start."""
        if name == "redis":
            return self._restart_redis()
        old = self.services[name]
        if old.proc.poll() is None:
            raise RuntimeError(f"{name} (pid {old.pid}) is still running")
        self._kill_group(old)                            # grid workers left behind by a killed driver
        if name in ("prefill", "decode"):
            self._forget(old)
        args = self._restart_args(name, old)
        old.log_path.rename(old.log_path.with_suffix(f".{old.pid}.log"))
        spare = self.standbys.pop(name, None)
        svc = self._take_over(spare, args, old.log_path) if spare is not None else None
        if svc is None:
            svc = self._spawn(name, args)
        try:
            self._wait(svc)
        except ConfigError:
            self._kill_group(svc)                        # timed out: the next poll sees it exited
            svc.proc.wait(5)
            raise
        return svc

    def _restart_args(self, name: str, old: Service) -> list[str]:
        """The arguments a service started in place of `old` gets: the kvstore and the router keep
        their ports (the pools and the clients know them); a pool instance takes new ones."""
        port = old.address.rpartition(":")[2] if old.address else "0"
        if name == "kvstore":
            return self._kvstore_args(port)
        if name == "router":
            http = old.http_url.removesuffix("/v1").rpartition(":")[2] if old.http_url else None
            return self._router_args(port if self.config.router_port == 0 else None, http)
        return self._engine_args(name)

    # ---- standbys (common/standby.py) ----------------------------------------------------------
    def spawn_standby(self, name: str) -> Service:
        """Starts a spare process for service `name` ("redis" has none): it imports the service's
        code, then waits for restart() to start it in place of the running one once that exits."""
        if self.stopping:
            raise ConfigError(f"{name}: no standby process while the cluster stops")
        old = self.services[name]
        if name in self.standbys:
            self._end_standby(self.standbys.pop(name))
        spare = self._spawn(name, self._restart_args(name, old), standby=True)
        self.standbys[name] = spare
        return spare

    def has_standby(self, name: str) -> bool:
        spare = self.standbys.get(name)
        return spare is not None and spare.proc.poll() is None

    def _take_over(self, spare: Service, args: list[str], log_path: pathlib.Path) -> Service | None:
        """The spare becomes the service, started with `args`: told to start, its log becomes the
        service's. None (the spare ended) when it is gone or was started with other arguments."""
        try:
            if spare.proc.poll() is not None or spare.args != args:
                raise OSError("gone" if spare.proc.poll() is not None else "started with other arguments")
            spare.proc.stdin.write(b"go\n")
            spare.proc.stdin.close()
        except OSError as e:
            log.warning("%s: standby process %d not used (%s); starting a new one", spare.name, spare.pid, e)
            self._end_standby(spare)
            return None
        spare.log_path.rename(log_path)
        spare.log_path = log_path
        self.services[spare.name] = spare
        log.info("%s: standby process %d takes over", spare.name, spare.pid)
        return spare

    def _end_standby(self, spare: Service, timeout_s: float = 5.0) -> None:
        """A spare told to exit (the end of its stdin), killed if it does not."""
        try:
            if spare.proc.stdin is not None and not spare.proc.stdin.closed:
                spare.proc.stdin.close()
        except OSError:
            pass
        try:
            spare.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._kill_group(spare)
            spare.proc.wait(5)
        if spare.proc.returncode == 0:                   # it ended as told: its log says nothing more
            spare.log_path.unlink(missing_ok=True)

    def _restart_redis(self) -> RedisServer:
        if self.redis is None:
            raise RuntimeError("redis: not started by this cluster (--redis-url)")
        if self.redis.running:
            raise RuntimeError("redis is still running")
        port = self.redis.port
        self.redis.stop()
        self.redis = RedisServer(host=self.config.host, port=port, data_dir=self.redis_dir,
                                 password=self.redis_password)
        return self.redis.start()

    def registered_roles(self, timeout_s: float = 2.0) -> set[str]:
        """The roles with an instance registered in the deployment now (a rebuilding instance leaves
        until it serves again); empty while Redis cannot answer."""
        store = None
        try:
            store = MetadataStore(self.redis_url, deployment=self.config.deployment, timeout_s=timeout_s,
                                  password=self.redis_password)
            return {i.role for i in store.list_instances()}
        except (MnemosyneError, redis.exceptions.RedisError):
            return set()
        finally:
            if store is not None:
                store.close()

    def _forget(self, dead: Service) -> None:
        """Removes the registrations of a dead pool process (its address) from the deployment, as
        its TTL would some seconds later. Best effort: Redis may be down too."""
        if not dead.address:
            return
        store = None
        try:
            store = MetadataStore(self.redis_url, deployment=self.config.deployment, timeout_s=1.0,
                                  password=self.redis_password)
            for inst in store.list_instances(dead.name):
                if inst.address == dead.address:
                    store.deregister_instance(inst.instance_id)
        except (MnemosyneError, redis.exceptions.RedisError) as e:
            log.warning("could not remove %s's registration: %s", dead.name, e)
        finally:
            if store is not None:
                store.close()

    def tls_args(self, role: str) -> list[str]:
        """The TLS flags of service `role` (none with --insecure): scripts/certs.py's files."""
        d = self.tls_dir
        if d is None:
            return []
        return ["--tls-ca", str(d / "ca.pem"), "--tls-cert", str(d / f"{role}.pem"),
                "--tls-key", str(d / f"{role}-key.pem")]

    def _kvstore_args(self, port: str = "0") -> list[str]:
        c = self.config
        password = ["--redis-password-file", str(self.redis_password_file)] if self.redis_password_file else []
        return ["--host", c.host, "--port", port, "--redis-url", self.redis_url, "--deployment", c.deployment,
                "--lease-s", str(c.lease_s), "--instance-ttl-s", str(max(3.0, c.lease_s)),
                "--reap-interval-s", "0.2", "--grace-s", "2", *password, *self.tls_args("kvstore")]

    def _engine_args(self, role: str) -> list[str]:
        c = self.config
        args = ["--kvstore", self.kvstore_address, "--host", c.host, "--port", "0", "--dtype", c.dtype,
                "--block-size", str(c.block_size), "--chunk-size", str(c.chunk_size), "--kv-backend", c.kv_backend,
                "--kv-host", c.host, "--threads", str(c.threads), "--kv-timeout-s", str(c.kv_timeout_s),
                "--grace-s", "2", "--deployment", c.deployment, *self.tls_args(role)]
        if c.model:
            args += ["--model", c.model]
        if c.model_name:
            args += ["--model-name", c.model_name]
        if c.max_model_len:
            args += ["--max-model-len", str(c.max_model_len)]
        if role == "prefill":
            args += ["--tp", str(c.prefill_tp), "--spp", str(c.prefill_spp),
                     "--max-kv-tokens", str(c.prefill_kv_tokens)]
        else:
            args += ["--tp", str(c.decode_tp), "--max-kv-tokens", str(c.decode_kv_tokens)]
            if c.decode_kvp > 1:
                args += ["--kvp", str(c.decode_kvp), "--kvp-tokens", str(c.kvp_tokens)]
        return args + list(c.pool_flags)

    def _api_keys_file(self) -> str:
        """The router's keys file: --api-keys-file, else one accepting this checkout's generated key."""
        c = self.config
        if c.api_keys_file or not c.auth:
            return c.api_keys_file
        path = self.log_dir / "api-keys.json"
        self.api_key = ensure_local_key(path)
        return str(path)

    def _router_args(self, port: str | None = None, http_port: str | None = None) -> list[str]:
        """The router's flags; `port`, `http_port`: the ones it had (a restart), else the config's."""
        c = self.config
        if http_port is None:
            http_port = c.http_port if c.http_port is not None else (0 if c.router_port == 0 else DEFAULT_HTTP_PORT)
        args = ["--kvstore", self.kvstore_address, "--host", c.host, "--port", port or str(c.router_port),
                "--short-prompt-tokens", str(c.short_prompt_tokens), "--grace-s", "2",
                "--deployment", c.deployment, "--http-port", str(http_port), *self.tls_args("router"),
                "--request-timeout-s", str(c.request_timeout_s)]
        if not c.admission:
            args.append("--no-admission")
        if c.model:
            args += ["--model", c.model]
        if c.model_name:
            args += ["--model-name", c.model_name]
        if c.max_model_len:
            args += ["--max-model-len", str(c.max_model_len)]
        keys = self._api_keys_file()
        if keys:
            args += ["--api-keys-file", keys]
        return args + list(c.router_flags)

    def _observability_args(self) -> list[str]:
        """Every service logs and traces alike."""
        o = self.config.observability
        return ["--log-format", o.log_format] + (["--otlp-endpoint", o.otlp_endpoint] if o.otlp_endpoint else [])

    def _spawn(self, name: str, args: list[str], standby: bool = False) -> Service:
        given = args
        args = args + self._observability_args() + list(self.config.extra.get(name, ()))
        log_path = self.log_dir / (f"{name}.standby.log" if standby else f"{name}.log")
        # Settings reach the services as flags only: MNEMOSYNE_* settings of this shell stay here.
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) or k in RESERVED_ENV}
        env.update(PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(self.config.threads),
                   MNEMOSYNE_LAUNCHER_PID=str(os.getpid()))     # it stops when this process is gone
        if loopback(self.config.host):
            # NIXL's UCX would also listen on every network device's address; a loopback deployment
            # keeps it on lo (an operator's own UCX_NET_DEVICES wins).
            env.setdefault("UCX_NET_DEVICES", "lo")
        # The KV of make up's pools is host memory that NIXL registers explicitly, so UCX's mmap hooks
        # (which keep its registration cache coherent) buy nothing here; installing them cost ~0.4 s of
        # every process' first NIXL agent, a grid worker's included (0.025 s without; measured, see
        # bench/results/faults.md). An operator's own setting wins.
        env.setdefault("UCX_MEM_MMAP_HOOK_MODE", "none")
        if standby:
            env[STANDBY_ENV] = "1"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", f"services.{name}", *args], cwd=ROOT, env=env,
                                    stdin=subprocess.PIPE if standby else subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT,
                                    start_new_session=True)    # Ctrl-C reaches up.py only; it stops them in order
        svc = Service(name, proc, log_path, args=given)
        if not standby:
            self.services[name] = svc
        return svc

    def _wait(self, svc: Service) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            text = svc.log_path.read_text(errors="replace")
            m = LISTENING.search(text)
            if m:
                svc.address = m.group(2)
                metrics = METRICS.search(text)      # printed right after (unless --metrics-port -1)
                for _ in range(20):
                    if metrics is not None or "--metrics-port" in self.config.extra.get(svc.name, ()):
                        break
                    time.sleep(0.1)
                    metrics = METRICS.search(svc.log_path.read_text(errors="replace"))
                svc.metrics_url = metrics.group(2) if metrics else ""
                http = HTTP.search(svc.log_path.read_text(errors="replace"))    # printed before the metrics
                svc.http_url = http.group(2) if http else ""
                return
            if svc.proc.poll() is not None:
                raise ConfigError(f"{svc.name} exited with code {svc.proc.returncode} while starting:\n"
                                  f"{svc.log_tail()}")
            time.sleep(0.1)
        raise ConfigError(f"{svc.name} did not start within {self.config.start_timeout_s:.0f} s:\n{svc.log_tail()}")

    # ---- stop --------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the router, then to both engines, then to the kvstore (an engine leaves the
        kvstore first, then drains), SIGKILL after timeout_s; then Redis. Idempotent; interrupted
        (KeyboardInterrupt, any error), it still SIGKILLs whatever is left before it raises."""
        self.stopping = True
        try:
            self._stop_in_order(timeout_s)
        finally:
            self.kill()

    def _stop_in_order(self, timeout_s: float) -> None:
        for spare in self.standbys.values():
            self._end_standby(spare)
        self.standbys.clear()
        for stage in (("router",), ("prefill", "decode"), ("kvstore",)):
            running = [self.services[n] for n in stage if n in self.services
                       and self.services[n].proc.poll() is None]
            for svc in running:
                svc.proc.terminate()
            for svc in running:
                try:
                    svc.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored SIGTERM; killing it", svc.name, svc.pid)
                    self._kill_group(svc)
                    svc.proc.wait(5)
        if self.redis is not None:
            self.redis.stop()

    def kill(self, wait: bool = True) -> None:
        """SIGKILL to every service's process group (grid workers too) and to Redis: what is left
        after stop(), or at once on a second Ctrl-C. Idempotent. wait=False only signals (safe in
        a signal handler); with wait it also reaps them."""
        self.stopping = True
        for svc in [*self.services.values(), *self.standbys.values()]:
            self._kill_group(svc)
        if self.redis is not None:
            self.redis.kill()
        if not wait:
            return
        for svc in [*self.services.values(), *self.standbys.values()]:
            try:
                svc.proc.wait(5)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) survived SIGKILL", svc.name, svc.pid)
        self.standbys.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    @staticmethod
    def _kill_group(svc: Service) -> None:
        try:
            os.killpg(svc.pid, signal.SIGKILL)    # its own session (start_new_session): only its group
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "Cluster":
        return self if self.services else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- make up ----------------------------------------------------------------------------------------
def build_parser(prog: str = "make up") -> tuple[argparse.ArgumentParser, Flags, Flags, Flags]:
    cluster, pools, router = cluster_flags(), pool_flags(), router_flags()
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog='make up ARGS="--model DIR --max-model-len N --decode-kvp K --kvp-tokens M"')
    for flags in (cluster, pools, router):
        flags.add_to(p)
    return p, cluster, pools, router


def parse_args(argv: list[str] | None, env: dict[str, str] | None = None, prog: str = "make up") -> ClusterConfig:
    """The ClusterConfig of `make up`'s flags (flag > MNEMOSYNE_<FLAG> > default). The pools' and
    the router's flags that were given are checked here and passed on as flags."""
    p, cluster, pools, router = build_parser(prog)
    args = p.parse_args(argv)
    try:
        pool_given, router_given = pools.given(args, env), router.given(args, env)
        pools.build(args, env)                       # a bad --policy value fails here, not in a pool
        router.build(args, env, fixed={"kvstore": "-"})
        return cluster.build(args, env, fixed={"pool_flags": tuple(pools.argv(pool_given)),
                                               "router_flags": tuple(router.argv(router_given))})
    except ConfigError as e:
        p.error(str(e))


def main(argv: list[str] | None = None, prog: str = "make up") -> int:
    """`make up`, `mnemosyne serve` (`prog`: the name its usage line shows)."""
    logging.basicConfig(level=logging.INFO, format="up: %(message)s")
    config = parse_args(argv, prog=prog)
    busy = busy_port(config)
    if busy is not None:
        print(f"up: {busy}", file=sys.stderr)
        return 2
    try:
        cluster = Cluster(config)
    except ConfigError as e:
        print(f"up: {e}", file=sys.stderr)
        return 2
    atexit.register(cluster.kill)               # whatever way this process ends, no child outlives it

    def on_signal(signum, frame):
        """The first Ctrl-C or SIGTERM stops the cluster in order (the KeyboardInterrupt unwinds to
        a cluster.stop()); one during the stop SIGKILLs what is left (the stop then ends at once)."""
        if cluster.stopping:
            print("\nup: signalled again; killing what is left", file=sys.stderr, flush=True)
            cluster.kill(wait=False)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    config = cluster.config                     # sized
    print(f"Starting Mnemosyne on loopback (KV over {config.kv_backend}; logs in {cluster.log_dir}) ...",
          flush=True)
    try:
        cluster.start()                         # stops what it started when interrupted
    except ConfigError as e:
        print(f"up: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        cluster.stop()
        print("Interrupted while starting; all stopped.", flush=True)
        return 130
    try:
        print(f"  redis    {cluster.redis_url}" + (f" (password in {cluster.redis_password_file})"
                                                     if cluster.redis_password_file else ""))
        if cluster.tls_dir is not None:
            print(f"  mTLS     between the services: CA and certificates in {cluster.tls_dir} "
                  "(clients of the public API present API keys)")
        else:
            print("  mTLS     off: --insecure (plaintext between the services, Redis without a password)")
        if cluster.api_key:
            print(f"  api key  {default_key_path()} (the CLI and client read it; others send "
                  f"`Authorization: Bearer $(cat {default_key_path()})`)")
        elif not config.auth and not config.api_keys_file:
            print("  api key  none: --no-auth serves every caller")
        for name, what in (("kvstore", "placement + leases"),
                           ("prefill", f"spp={config.prefill_spp} tp={config.prefill_tp}, "
                                       f"{config.prefill_kv_tokens} KV tokens"),
                           ("decode", f"kvp={config.decode_kvp} tp={config.decode_tp}, "
                                      f"{config.kvp_tokens} tokens per group, {config.decode_kv_tokens} KV "
                                      f"tokens per group"),
                           ("router", "the public API")):
            svc = cluster.services[name]
            print(f"  {name:<8} {svc.address:<22} pid {svc.pid:<7} {what}")
        if cluster.http_url:
            print(f"  {'http':<8} {cluster.http_url:<22} OpenAI-compatible API (router)")
        for name, url in cluster.metrics_urls.items():
            print(f"  {name:<8} metrics {url}")
        try:
            print(f"  Prometheus targets: {cluster.write_targets()} (prometheus "
                  f"--config.file=deploy/prometheus/prometheus.yml)")
        except OSError as e:
            print(f"up: cannot write the Prometheus targets: {e}", file=sys.stderr)
        print(f"\nReady. Try:\n  .venv/bin/mnemosyne generate --server {cluster.router_address} "
              f"--prompt 'What is the capital of France?' --chat" + (
                  f"\n  curl {cluster.http_url}/chat/completions -H 'Content-Type: application/json' "
                  + (f"-H \"Authorization: Bearer $(cat {default_key_path()})\" " if cluster.api_key else "") + "-d "
                  f"'{{\"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}]}}'"
                  if cluster.http_url else "") + "\nCtrl-C stops everything.", flush=True)
        return watch(cluster)
    except KeyboardInterrupt:
        return 0
    finally:
        print("\nStopping ...", flush=True)
        cluster.stop()
        print("All stopped.", flush=True)


def watch(cluster: Cluster, interval_s: float = 0.3) -> int:
    """Until a service exits for good: restarting the ones that exit (--supervise), or returning
    when the first one does (--no-supervise). 1 then; the caller stops the cluster."""
    supervisor = Supervisor(cluster, standby=cluster.config.standby) if cluster.config.supervise else None
    while True:
        if supervisor is not None:
            if not supervisor.poll():
                print("up: stopping everything", file=sys.stderr)
                return 1
        else:
            for svc in [*cluster.services.values()]:
                if svc.proc.poll() is not None:
                    print(f"up: {svc.name} exited with code {svc.proc.returncode}; stopping "
                          f"(log: {svc.log_path})", file=sys.stderr)
                    return 1
            if cluster.redis is not None and not cluster.redis.running:
                print(f"up: redis exited with code {cluster.redis.returncode}; stopping", file=sys.stderr)
                return 1
        time.sleep(interval_s)


if __name__ == "__main__":
    sys.exit(main())
