"""Configuration of the router: one frozen dataclass; the CLI is generated from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from common.cli import ArgumentParser, add_config_flags, config_from_args
from common.config import SLOConfig
from common.errors import ConfigError


@dataclass(frozen=True)
class RouterConfig:
    kvstore: str                          # the kvstore's "host:port"
    host: str = "127.0.0.1"
    port: int = 50051
    instance_id: str = ""                 # the metrics' instance label; "" = router-<hostname>-<pid>
    model: str | None = None              # tokenizer + config source; None = the built-in model
    model_name: str = ""                  # what ModelInfo reports and GenerateRequest.model must match
    max_model_len: int | None = None      # None = the model's
    max_prompt_tokens: int = 0            # 0 = max_model_len - 1
    short_prompt_tokens: int = 256        # shorter prompts are prefilled by the decode instance itself
    default_max_tokens: int = 64
    kv_backend: str = ""                  # requested KV backend; "" = the decode instance's own
    request_timeout_s: float = 3600.0     # deadline of the streams to the instances
    rpc_timeout_s: float = 10.0           # deadline of every unary call
    discovery_ttl_s: float = 0.5          # how long a list of live instances is reused
    grace_s: float = 5.0
    deployment: str = "default"           # the metrics' pool label; the pool admission watches
    metrics_port: int = 0                 # /metrics HTTP port; 0 = a free one, -1 = none
    admission: bool = True                # SLO-aware admission (off: every request goes through)
    prometheus_url: str = ""              # read load from this Prometheus; "" = scrape the instances
    scrape_interval_s: float = 0.25       # how often the instances' load is read
    slo: SLOConfig = field(default_factory=SLOConfig)   # default TTFT SLOs (TBT: the decode pool's)
    max_queue: int = 256                  # admission queue bound
    max_queue_wait_s: float = 30.0
    max_staleness_s: float = 5.0          # older load = instance unknown

    def __post_init__(self) -> None:
        if not self.kvstore:
            raise ConfigError("router: --kvstore HOST:PORT is required")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"router: port must be in [0, 65535], got {self.port}")
        for name in ("short_prompt_tokens", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"router: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens < 0:
            raise ConfigError(f"router: max_prompt_tokens must be >= 0, got {self.max_prompt_tokens}")
        if self.kv_backend not in ("", "tcp", "nixl"):
            raise ConfigError(f"router: kv_backend must be tcp, nixl or empty, got {self.kv_backend!r}")
        if not -1 <= self.metrics_port < 65536:
            raise ConfigError(f"router: metrics_port must be in [-1, 65535], got {self.metrics_port}")
        if self.prometheus_url and not self.prometheus_url.startswith(("http://", "https://")):
            raise ConfigError(f"router: prometheus_url must be http(s)://..., got {self.prometheus_url!r}")
        for name in ("request_timeout_s", "rpc_timeout_s", "discovery_ttl_s", "scrape_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"router: {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> "RouterConfig":
        p = ArgumentParser(prog="python -m services.router", description="Mnemosyne router (public API)")
        add_config_flags(p.add_argument_group("router"), cls, {
            "kvstore": "kvstore address HOST:PORT", "host": "address to bind (0.0.0.0 = every interface)",
            "port": "port to bind (0 = free)",
            "instance_id": "the metrics' instance label, unique per replica (default: router-<hostname>-<pid>)",
            "model": "HF directory or .gguf file the instances serve (default: the built-in model)",
            "model_name": "served model name (default: the checkpoint's file or directory name)",
            "max_model_len": "longest sequence", "max_prompt_tokens": "longest prompt (0 = max_model_len - 1)",
            "short_prompt_tokens": "prompts shorter than this skip the prefill pool",
            "default_max_tokens": "max_tokens of a request that does not set it",
            "kv_backend": "KV transfer backend to ask decode instances for (default: theirs)",
            "request_timeout_s": "deadline of a request's streams to the instances",
            "rpc_timeout_s": "deadline of unary calls", "discovery_ttl_s": "instance list cache",
            "grace_s": "shutdown grace period",
            "deployment": "deployment name (the metrics' pool label)",
            "metrics_port": "Prometheus /metrics port (0 = free, -1 = none)",
            "admission": "SLO-aware admission (--no-admission lets every request through)",
            "prometheus_url": "read the instances' load from this Prometheus (default: scrape them)",
            "scrape_interval_s": "seconds between load reads",
            "max_queue": "admission queue bound", "max_queue_wait_s": "longest wait in the admission queue",
            "max_staleness_s": "load older than this makes an instance unknown"}, dest_prefix="r_")
        add_config_flags(p.add_argument_group("slo"), SLOConfig, {
            "ttft_short_s": "default TTFT SLO, short prompts", "ttft_medium_s": "... medium prompts",
            "ttft_long_s": "... long prompts", "ttft_xlong_s": "... extra-long prompts",
            "objective": "fraction of requests that must meet their SLOs",
            "slo_factor": "default TTFT deadline >= this x the prompt's predicted prefill time alone"},
            dest_prefix="slo_")
        args = p.parse_args(argv)
        return config_from_args(cls, args, "r_", slo=config_from_args(SLOConfig, args, "slo_"))
