"""Configuration of a prefill instance: the settings every pool instance has (common/pool_config.py)
plus its layout check. `PrefillConfig.from_args` validates once."""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError
from common.pool_config import PoolConfig


@dataclass(frozen=True)
class PrefillConfig(PoolConfig):
    ROLE = "prefill"
    DESCRIPTION = "Mnemosyne prefill instance (TP x SPP grid)"
    KV_TIMEOUT_HELP = "seconds the decode side has to confirm all KV of a request"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.engine.parallel.kvp != 1:
            raise ConfigError(f"prefill: an instance that streams KV out must have kvp = 1, got "
                              f"{self.engine.parallel.kvp}")
