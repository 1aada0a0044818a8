"""Configuration of a decode instance: the settings every pool instance has (common/pool_config.py)
plus its layout check and its scheduler defaults. `DecodeConfig.from_args` validates once."""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError
from common.pool_config import POOL_DEFAULTS, PoolConfig


@dataclass(frozen=True)
class DecodeConfig(PoolConfig):
    ROLE = "decode"
    DESCRIPTION = "Mnemosyne decode instance (TP x KVP grid)"
    # Decodes first, budget = tbt_headroom x the TBT SLO; short prompts prefilled here in adaptive chunks.
    ROLE_DEFAULTS = {**POOL_DEFAULTS, "engine.scheduler.role": "decode"}
    HELPS = {"kv_timeout_s": "seconds a prefilled request's KV may stop arriving (counted from its first token or the last KV that arrived)",
             "kv_host": "address the KV receivers listen on",
             "chunk_size": "prefill chunk of short prompts (--chunking fixed)"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.engine.parallel.spp != 1:
            raise ConfigError(f"decode: an instance that receives KV must have spp = 1, got "
                              f"{self.engine.parallel.spp}")
