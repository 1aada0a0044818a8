"""Configuration of a decode instance: the settings every pool instance has (common/pool_config.py)
plus its layout check. `DecodeConfig.from_args` validates once."""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError
from common.pool_config import PoolConfig


@dataclass(frozen=True)
class DecodeConfig(PoolConfig):
    ROLE = "decode"
    DESCRIPTION = "Mnemosyne decode instance (TP x KVP grid)"
    KV_TIMEOUT_HELP = "seconds a prefilled request waits for its KV"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.engine.parallel.spp != 1:
            raise ConfigError(f"decode: an instance that receives KV must have spp = 1, got "
                              f"{self.engine.parallel.spp}")
