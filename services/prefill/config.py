"""Configuration of a prefill instance: the settings every pool instance has (common/pool_config.py)
plus its layout check and its scheduler defaults. `PrefillConfig.from_args` validates once."""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError
from common.pool_config import POOL_DEFAULTS, PoolConfig


@dataclass(frozen=True)
class PrefillConfig(PoolConfig):
    ROLE = "prefill"
    DESCRIPTION = "Mnemosyne prefill instance (TP x SPP grid)"
    # LARS with slack stealing, adaptive chunks; budget = preempt_interval_s / pipeline depth (SPP).
    ROLE_DEFAULTS = {**POOL_DEFAULTS, "engine.scheduler.role": "prefill"}
    HELPS = {"kv_timeout_s": "seconds the decode side may go without confirming more of a request's KV (counted from its first token or the last confirmation)",
             "kv_host": "address of this host for KV transfers",
             "chunk_size": "prefill chunk in tokens (--chunking fixed)"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.engine.parallel.kvp != 1:
            raise ConfigError(f"prefill: an instance that streams KV out must have kvp = 1, got "
                              f"{self.engine.parallel.kvp}")
