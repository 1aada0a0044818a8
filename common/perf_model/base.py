"""The interface every performance model offers (torch-free)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from common.scheduler.types import BatchShape


@runtime_checkable
class PerfModel(Protocol):
    def predict(self, batch: BatchShape) -> float:
        """Predicted seconds of one iteration running `batch` (the slowest pipeline stage and the
        slowest KVP group; a token's latency through an spp-stage pipeline is spp times this).
        Non-decreasing in every chunk length and context length; 0.0 for an empty batch."""
        ...
