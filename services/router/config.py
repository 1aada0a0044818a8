"""Configuration of the router: one frozen dataclass; its flags and environment variables
(MNEMOSYNE_<FLAG>) come from common/flags.py.

One value per setting: the default SLOs are `slo` (common/config.py SLOConfig); the TBT SLO, the
iteration budgets and the performance model belong to the pools (their SchedulerConfig and the
model they publish), so the router does not restate them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

from common.config import ObservabilityConfig, SLOConfig
from common.errors import ConfigError
from common.flags import Flags, parse_config
from common.rpc.tls import TLSConfig


@dataclass(frozen=True)
class RouterConfig:
    kvstore: str                          # the kvstore's address
    host: str = "127.0.0.1"               # address to bind (0.0.0.0 = every interface)
    port: int = 50051                     # port to bind (0 = a free one)
    instance_id: str = ""                 # the metrics' instance label, unique per replica (empty =
                                          # router-<hostname>-<pid>)
    model: str | None = None              # HF directory or .gguf file the instances serve (tokenizer + config;
                                          # none = the built-in model)
    model_name: str = ""                  # served model name, what GenerateRequest.model must match (empty = the
                                          # checkpoint's name)
    max_model_len: int | None = None      # longest sequence (none = the model's)
    max_prompt_tokens: int = 0            # longest prompt (0 = max_model_len - 1)
    short_prompt_tokens: int = 256        # shorter prompts are prefilled by the decode instance itself
    default_max_tokens: int = 64          # max_tokens of a request that does not set it
    kv_backend: Literal["", "tcp", "nixl"] = ""   # KV backend to ask decode instances for (empty = theirs)
    request_timeout_s: float = 3600.0     # deadline of a request's streams to the instances
    progress_timeout_s: float = 120.0     # a prefill that reports nothing (no progress, no first token) for this
                                          # long has stalled: the request fails (0 = wait up to request_timeout_s)
    rpc_timeout_s: float = 10.0           # deadline of every unary call
    retries: int = 1                      # new attempts (a new placement) for a request whose instance failed before
                                          # its first token reached the client (0 = fail it at once)
    retry_wait_s: float = 30.0            # how long a retry waits for an instance to place it on (one restarting)
    prefill_wait_s: float = 3.0           # a retry whose prefill instance failed waits up to this long for a prefill
                                          # instance (it rebuilt, a restarted one, another) before the decode instance
                                          # prefills the prompt itself (0 = at once)
    discovery_ttl_s: float = 0.5          # how long a list of live instances is reused
    grace_s: float = 5.0                  # shutdown grace period
    deployment: str = "default"           # deployment name: the metrics' pool label; the pool admission watches
    metrics_port: int = 0                 # Prometheus /metrics port (0 = a free one, -1 = none)
    http_port: int = -1                   # OpenAI-compatible HTTP API (/v1) port (0 = a free one, -1 = none)
    api_keys_file: str = ""               # clients' API keys (common/auth.py: JSON of SHA-256 hashes and limits);
                                          # empty = no authentication (every caller is served)
    admission: bool = True                # SLO-aware admission (--no-admission lets every request through)
    prometheus_url: str = ""              # read the instances' load from this Prometheus (empty = from the
                                          # kvstore, where their heartbeats carry it)
    scrape_interval_s: float = 0.25       # how often the instances' load is read (the kvstore's listing or
                                          # Prometheus; the pools heartbeat theirs every heartbeat_interval_s)
    max_queue: int = 256                  # admission queue bound
    max_queue_wait_s: float = 30.0        # longest wait in the admission queue
    max_staleness_s: float = 5.0          # load older than this makes an instance unknown
    slo: SLOConfig = field(default_factory=SLOConfig)   # default SLOs: --ttft-short-s ... --slo-objective
                                                        # --slo-factor
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)   # --log-format,
                                                                                      # --otlp-endpoint
    tls: TLSConfig = field(default_factory=TLSConfig)   # mutual TLS: --tls-ca, --tls-cert, --tls-key,
                                                        # --health-port

    def __post_init__(self) -> None:
        if not self.kvstore:
            raise ConfigError("router: --kvstore HOST:PORT is required")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"router: port must be in [0, 65535], got {self.port}")
        for name in ("short_prompt_tokens", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"router: {name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_wait_s < 0:
            raise ConfigError(f"router: prefill_wait_s must be >= 0, got {self.prefill_wait_s}")
        if self.retries < 0:
            raise ConfigError(f"router: retries must be >= 0, got {self.retries}")
        if self.max_prompt_tokens < 0:
            raise ConfigError(f"router: max_prompt_tokens must be >= 0, got {self.max_prompt_tokens}")
        if self.kv_backend not in ("", "tcp", "nixl"):
            raise ConfigError(f"router: kv_backend must be tcp, nixl or empty, got {self.kv_backend!r}")
        for name in ("metrics_port", "http_port"):
            if not -1 <= getattr(self, name) < 65536:
                raise ConfigError(f"router: {name} must be in [-1, 65535], got {getattr(self, name)}")
        if self.prometheus_url and not self.prometheus_url.startswith(("http://", "https://")):
            raise ConfigError(f"router: prometheus_url must be http(s)://..., got {self.prometheus_url!r}")
        for name in ("request_timeout_s", "rpc_timeout_s", "retry_wait_s", "discovery_ttl_s", "scrape_interval_s",
                     "max_queue_wait_s", "max_staleness_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"router: {name} must be positive, got {getattr(self, name)}")
        if self.progress_timeout_s < 0:
            raise ConfigError(f"router: progress_timeout_s must be >= 0, got {self.progress_timeout_s}")
        if self.max_queue < 0:
            raise ConfigError(f"router: max_queue must be >= 0, got {self.max_queue}")

    @classmethod
    def flags(cls) -> Flags:
        return Flags(cls, groups={"": "router", "slo": "slo"})

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None) -> "RouterConfig":
        """Flags > MNEMOSYNE_* environment variables > defaults."""
        return parse_config(cls.flags(), argv, env, prog="python -m services.router",
                            description="Mnemosyne router (public API)")
