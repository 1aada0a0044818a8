"""Configuration of a prefill instance: the engine's config tree plus the service's own settings.

The flags come from the config dataclasses (common/cli.py's generators), so they never drift from
the config; `PrefillConfig.from_args` validates once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from common.cli import ArgumentParser, add_config_flags, config_from_args
from common.config import EngineConfig
from common.engine_flags import add_engine_flags, engine_config
from common.errors import ConfigError


@dataclass(frozen=True)
class PrefillConfig:
    kvstore: str                                  # the kvstore's "host:port"
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 0                                 # 0 = a free one (printed at start)
    instance_id: str = ""                         # "" = prefill-<random>
    kv_timeout_s: float = 60.0                    # every KV chunk must be confirmed within this
    threads: int = 1                              # torch threads of the engine (and of each worker)
    restart_on_failure: bool = True               # rebuild the engine after a worker died
    deployment: str = "default"                   # the metrics' pool label (as the kvstore's)
    metrics_port: int = 0                         # /metrics HTTP port; 0 = a free one, -1 = none
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.kvstore:
            raise ConfigError("prefill: --kvstore HOST:PORT is required")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"prefill: port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port < 65536:
            raise ConfigError(f"prefill: metrics_port must be in [-1, 65535], got {self.metrics_port}")
        for name in ("kv_timeout_s", "threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"prefill: {name} must be positive, got {getattr(self, name)}")
        if self.engine.parallel.kvp != 1:
            raise ConfigError(f"prefill: an instance that streams KV out must have kvp = 1, got "
                              f"{self.engine.parallel.kvp}")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> "PrefillConfig":
        p = ArgumentParser(prog="python -m services.prefill",
                           description="Mnemosyne prefill instance (TP x SPP grid)")
        add_engine_flags(p, "prefill")
        g = p.add_argument_group("service")
        add_config_flags(g, cls, {
            "kvstore": "kvstore address HOST:PORT", "host": "address to bind and advertise",
            "port": "port to bind", "instance_id": "instance id (default: prefill-<random>)",
            "kv_timeout_s": "seconds the decode side has to confirm all KV of a request",
            "threads": "torch threads of the engine and of each grid worker",
            "restart_on_failure": "rebuild the engine when a worker process dies",
            "deployment": "deployment name (the pool label of the metrics)",
            "metrics_port": "Prometheus /metrics port (0 = free, -1 = none)",
            "grace_s": "shutdown grace period for running RPCs"}, dest_prefix="svc_")
        args = p.parse_args(argv)
        return config_from_args(cls, args, "svc_", engine=engine_config(args))
