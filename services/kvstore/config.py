"""Configuration of the kvstore service: one frozen dataclass; the CLI is generated from it."""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Mapping, Sequence

from common.errors import ConfigError


def _opt(default: object, help: str, env: str) -> object:
    return field(default=default, metadata={"help": help, "env": env})


@dataclass(frozen=True)
class KVStoreConfig:
    host: str = _opt("127.0.0.1", "address to bind", "MNEMOSYNE_KVSTORE_HOST")
    port: int = _opt(50052, "port to bind (0 = a free one, printed at start)",
                     "MNEMOSYNE_KVSTORE_PORT")
    redis_url: str = _opt("", "Redis URL, e.g. redis://127.0.0.1:6379/0 (empty = start a "
                              "private redis-server)", "MNEMOSYNE_REDIS_URL")
    redis_connect_timeout_s: float = _opt(30.0, "at start, how long to keep trying to reach Redis "
                                                "(it may start after the kvstore)",
                                          "MNEMOSYNE_KVSTORE_REDIS_CONNECT_TIMEOUT_S")
    deployment: str = _opt("default", "key prefix in Redis: deployments sharing a Redis are "
                                      "independent", "MNEMOSYNE_DEPLOYMENT")
    lease_s: float = _opt(10.0, "placement lease; owners renew well within it",
                          "MNEMOSYNE_KVSTORE_LEASE_S")
    instance_ttl_s: float = _opt(10.0, "an instance without a heartbeat for this long is gone",
                                 "MNEMOSYNE_KVSTORE_INSTANCE_TTL_S")
    reap_interval_s: float = _opt(0.5, "how often expired leases are reclaimed",
                                  "MNEMOSYNE_KVSTORE_REAP_INTERVAL_S")
    grace_s: float = _opt(5.0, "shutdown grace period for running RPCs",
                          "MNEMOSYNE_KVSTORE_GRACE_S")
    metrics_port: int = _opt(0, "port of the Prometheus /metrics endpoint (0 = a free one, "
                                "printed at start; -1 = none)", "MNEMOSYNE_KVSTORE_METRICS_PORT")

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"kvstore: port must be in [0, 65535], got {self.port}")
        for name in ("lease_s", "instance_ttl_s", "reap_interval_s", "redis_connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"kvstore: {name} must be positive, got {getattr(self, name)}")
        if not -1 <= self.metrics_port < 65536:
            raise ConfigError(f"kvstore: metrics_port must be in [-1, 65535], got {self.metrics_port}")
        if self.grace_s < 0:
            raise ConfigError(f"kvstore: grace_s must be >= 0, got {self.grace_s}")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None) -> "KVStoreConfig":
        """Flags override environment variables, which override the defaults."""
        env = os.environ if env is None else env
        parser = argparse.ArgumentParser(prog="python -m services.kvstore",
                                         description="Mnemosyne kvstore: KV placement and leases")
        for f in fields(cls):
            default = env.get(f.metadata["env"], f.default if f.default is not MISSING else None)
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_type(f.type),
                                default=default,
                                help=f"{f.metadata['help']} [env {f.metadata['env']}; "
                                     f"default %(default)s]")
        ns = parser.parse_args(argv)
        try:
            return cls(**{f.name: _type(f.type)(getattr(ns, f.name)) for f in fields(cls)})
        except ValueError as e:
            raise ConfigError(f"kvstore: {e}") from e


def _type(annotation: object) -> type:
    return {"str": str, "int": int, "float": float}[str(annotation)]
