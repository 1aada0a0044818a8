"""Configuration of the kvstore service: one frozen dataclass. Its flags and environment variables
(MNEMOSYNE_<FLAG>: MNEMOSYNE_REDIS_URL, MNEMOSYNE_LEASE_S, ...) come from common/flags.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from common.config import ObservabilityConfig
from common.errors import ConfigError
from common.flags import Flags, parse_config
from common.rpc.tls import TLSConfig


@dataclass(frozen=True)
class KVStoreConfig:
    host: str = "127.0.0.1"                    # address to bind
    port: int = 50052                          # port to bind (0 = a free one, printed at start)
    redis_url: str = ""                        # Redis URL, e.g. redis://127.0.0.1:6379/0 (empty = start a private
                                               # redis-server)
    redis_password_file: str = ""              # file holding the Redis password (empty = the URL's, if any); a private
                                               # redis-server gets a random one
    redis_connect_timeout_s: float = 30.0      # at start, how long to keep trying to reach Redis (it may start
                                               # after the kvstore)
    deployment: str = "default"                # key prefix in Redis: deployments sharing a Redis are independent
    lease_s: float = 10.0                      # placement lease; owners renew well within it
    instance_ttl_s: float = 10.0               # an instance without a heartbeat for this long is gone
    reap_interval_s: float = 0.5               # how often expired leases are reclaimed
    grace_s: float = 5.0                       # shutdown grace period for running RPCs
    metrics_port: int = 0                      # port of the Prometheus /metrics endpoint (0 = a free one, printed
                                               # at start; -1 = none)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)   # --log-format,
                                                                                      # --otlp-endpoint
    tls: TLSConfig = field(default_factory=TLSConfig)   # mutual TLS: --tls-ca, --tls-cert, --tls-key,
                                                        # --health-port

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
    def flags(cls) -> Flags:
        return Flags(cls)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None) -> "KVStoreConfig":
        """Flags override MNEMOSYNE_* environment variables, which override the defaults."""
        return parse_config(cls.flags(), argv, env, prog="python -m services.kvstore",
                            description="Mnemosyne kvstore: KV placement and leases")
