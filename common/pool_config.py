"""Configuration of a prefill or decode instance: the engine's config tree plus the service's own
settings, which the two roles share. Each role subclasses PoolConfig with its layout check.

The flags come from the config dataclasses (common/cli.py's generators), so they never drift from
the config; `from_args` validates once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from common.cli import ArgumentParser, add_config_flags, config_from_args
from common.config import EngineConfig
from common.engine_flags import add_engine_flags, engine_config
from common.errors import ConfigError
from common.rpc.server import WILDCARD_HOSTS


@dataclass(frozen=True)
class PoolConfig:
    ROLE: ClassVar[str] = ""                      # "prefill" | "decode" (the subclass)
    DESCRIPTION: ClassVar[str] = ""               # --help
    KV_TIMEOUT_HELP: ClassVar[str] = ""

    kvstore: str                                  # the kvstore's "host:port"
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"                       # bind address; 0.0.0.0 = every interface
    advertise_host: str = ""                      # "" = host, or this machine's IP for 0.0.0.0
    port: int = 0                                 # 0 = a free one (printed at start)
    instance_id: str = ""                         # "" = <role>-<random>
    kv_timeout_s: float = 60.0
    threads: int = 1                              # torch threads of the engine (and of each worker)
    restart_on_failure: bool = True               # rebuild the engine after a worker died
    deployment: str = "default"                   # the metrics' pool label (as the kvstore's)
    metrics_port: int = 0                         # /metrics HTTP port; 0 = a free one, -1 = none
    grace_s: float = 5.0                          # after SIGTERM: time for the requests in flight

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
        for name in ("kv_timeout_s", "threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{role}: {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None):
        p = ArgumentParser(prog=f"python -m services.{cls.ROLE}", description=cls.DESCRIPTION)
        add_engine_flags(p, cls.ROLE)
        g = p.add_argument_group("service")
        add_config_flags(g, cls, {
            "kvstore": "kvstore address HOST:PORT",
            "host": "address to bind (0.0.0.0 = every interface)",
            "advertise_host": "address registered with the kvstore and in the metrics URL; empty = "
                              "--host, or this machine's IP when --host is 0.0.0.0",
            "port": "port to bind", "instance_id": f"instance id (default: {cls.ROLE}-<random>)",
            "kv_timeout_s": cls.KV_TIMEOUT_HELP,
            "threads": "torch threads of the engine and of each grid worker",
            "restart_on_failure": "rebuild the engine when a worker process dies",
            "deployment": "deployment name (the pool label of the metrics)",
            "metrics_port": "Prometheus /metrics port (0 = free, -1 = none)",
            "grace_s": "after SIGTERM: seconds the requests in flight get to finish (the instance "
                       "has left the kvstore by then)"}, dest_prefix="svc_")
        args = p.parse_args(argv)
        return config_from_args(cls, args, "svc_", engine=engine_config(args))
