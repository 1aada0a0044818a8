"""Configuration of a prefill or decode instance: the engine's config tree plus the service's own
settings, which the two roles share. Each role subclasses PoolConfig with its layout check and its
scheduler defaults (ROLE_DEFAULTS, below the flags and environment variables).

Every field of the tree is a flag and an environment variable (common/flags.py: --policy,
MNEMOSYNE_POLICY, ...); `from_args` validates once.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

from common.config import EngineConfig, ObservabilityConfig
from common.errors import ConfigError, MnemosyneError
from common.flags import Flags, parse_config
from common.rpc.server import WILDCARD_HOSTS
from common.rpc.tls import TLSConfig

# The paper's scheduler in both pools (budgets: common/config.py SchedulerConfig.iteration_budget).
POOL_DEFAULTS: dict[str, Any] = {"engine.scheduler.policy": "lars", "engine.scheduler.chunking": "adaptive",
                                 "engine.perf_model": "calibrate", "engine.weight_cache": True}


@dataclass(frozen=True)
class PoolConfig:
    ROLE: ClassVar[str] = ""                      # "prefill" | "decode" (the subclass)
    DESCRIPTION: ClassVar[str] = ""               # --help
    ROLE_DEFAULTS: ClassVar[Mapping[str, Any]] = {}   # key -> default of this role's flags
    HELPS: ClassVar[Mapping[str, str]] = {}       # flag help specific to the role

    kvstore: str                                  # the kvstore's address
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"                       # address to bind (0.0.0.0 = every interface)
    advertise_host: str = ""                      # address registered with the kvstore and in the metrics URL;
                                                  # empty = --host, or this machine's IP when --host is 0.0.0.0
    port: int = 0                                 # port to bind (0 = a free one, printed at start)
    instance_id: str = ""                         # instance id (empty = <role>-<random>)
    model_name: str = ""                          # served model name, the metrics' model_name label (empty = the
                                                  # checkpoint's name, as the router's)
    kv_timeout_s: float = 60.0                    # seconds a request's KV transfer may make no progress (after its
                                                  # first token; a long transfer that keeps moving is waited for)
    threads: int = 1                              # torch threads of the engine and of each grid worker
    restart_on_failure: bool = True               # rebuild the engine when a worker process dies
    deployment: str = "default"                   # deployment name (the metrics' pool label, as the kvstore's)
    metrics_port: int = 0                         # Prometheus /metrics port (0 = a free one, -1 = none)
    heartbeat_interval_s: float = 0.25            # seconds between kvstore heartbeats, which carry the load the
                                                  # router's admission reads (at most a third of the registration TTL)
    grace_s: float = 5.0                          # after SIGTERM: seconds the requests in flight get to finish
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)   # --log-format,
                                                                                      # --otlp-endpoint
    tls: TLSConfig = field(default_factory=TLSConfig)   # mutual TLS: --tls-ca, --tls-cert, --tls-key,
                                                        # --health-port

    def __post_init__(self) -> None:
        role = self.ROLE
        if not self.kvstore:
            raise ConfigError(f"{role}: --kvstore HOST:PORT is required")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"{role}: port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port < 65536:
            raise ConfigError(f"{role}: metrics_port must be in [-1, 65535], got {self.metrics_port}")
        if self.advertise_host in WILDCARD_HOSTS[1:]:
            raise ConfigError(f"{role}: advertise_host must be an address peers can dial, got "
                              f"{self.advertise_host!r}")
        for name in ("kv_timeout_s", "threads", "heartbeat_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{role}: {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def flags(cls) -> Flags:
        """The role's flags: every field of the tree, with the role's defaults."""
        return Flags(cls, defaults=cls.ROLE_DEFAULTS, helps=cls.HELPS, groups={"": "service"})

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None):
        """Flags > MNEMOSYNE_* environment variables > the role's defaults > the dataclass's."""
        return parse_config(cls.flags(), argv, env, prog=f"python -m services.{cls.ROLE}",
                            description=cls.DESCRIPTION)


def start_worker_server(config_type: type[PoolConfig], argv: Sequence[str] | None = None) -> bool:
    """A pool's main, first thing: when its flags ask for a grid of worker processes (on CPU), starts
    the forkserver its workers will be forked from (common/parallel/forkserver.py) before this process
    imports torch, so the forkserver's imports run beside the main's imports and model load (a
    restarted kvp-2 decode instance had its engine 5.4-5.8 s after its process started instead of
    7.8-8.2 s here, measured before the model build lost its compiler imports).
    Returns whether it started one; the flags are only peeked at (any error in them is the real
    parse's to report, in run_pool_main)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            config = config_type.from_args(argv)
    except (MnemosyneError, SystemExit):
        return False
    if config.engine.parallel.world_size == 1 or config.engine.device != "cpu":
        return False
    from common.parallel.forkserver import start_worker_server as start
    start()
    return True
