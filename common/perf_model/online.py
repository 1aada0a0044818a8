"""A performance model corrected online by the iterations the engine actually runs (torch-free).

A profile is taken once; the machine's speed is not constant afterwards (other processes on a shared
host, frequency scaling, a different thread count). `OnlineCorrection` multiplies the base model by a
scale, the exponential moving average of log(measured / predicted) over the recent iterations, so the
adaptive chunker keeps sizing batches for the machine as it is now. The shape of the model (which
batches cost more than others) stays the profiled one; only its level moves. The engine calls
`observe(batch, seconds)` after every step of a batch it predicted.
"""
from __future__ import annotations

import math

from common.errors import ConfigError
from common.perf_model.base import PerfModel
from common.scheduler.types import BatchShape


class OnlineCorrection:
    """predict(batch) = scale * base.predict(batch); `observe` updates the scale.

    alpha: weight of the newest iteration in the moving average of log ratios (0.1: about the last
    ten iterations). The scale is clipped to [min_scale, max_scale] so that one stalled iteration (the
    process descheduled for a second) cannot wreck the next batches.
    """

    def __init__(self, base: PerfModel, alpha: float = 0.1, min_scale: float = 0.5,
                 max_scale: float = 4.0) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(f"online correction: alpha must be in (0, 1], got {alpha}")
        if not 0.0 < min_scale <= 1.0 <= max_scale:
            raise ConfigError(f"online correction: need 0 < min_scale <= 1 <= max_scale, got "
                              f"{min_scale}, {max_scale}")
        self.base = base
        self.alpha = alpha
        self.min_scale, self.max_scale = min_scale, max_scale
        self.log_scale = 0.0
        self.observations = 0

    @property
    def scale(self) -> float:
        return math.exp(self.log_scale)

    def predict(self, batch: BatchShape) -> float:
        return self.scale * self.base.predict(batch)

    def observe(self, batch: BatchShape, measured_s: float) -> None:
        """Feeds one iteration's measured time (seconds) for `batch`."""
        predicted = self.base.predict(batch)
        if predicted <= 0 or measured_s <= 0:
            return
        ratio = math.log(measured_s / predicted)
        self.log_scale += self.alpha * (ratio - self.log_scale)
        self.log_scale = min(max(self.log_scale, math.log(self.min_scale)), math.log(self.max_scale))
        self.observations += 1

    def start_at(self, scale: float) -> None:
        """Start from `scale` instead of 1 (a start-up spot check measured the machine that far from
        the saved profile); the clip bounds widen to keep it and half / twice it reachable."""
        if not scale > 0 or not math.isfinite(scale):
            raise ConfigError(f"online correction: a starting scale must be positive, got {scale}")
        self.min_scale = min(self.min_scale, scale / 2)
        self.max_scale = max(self.max_scale, scale * 2)
        self.log_scale = math.log(scale)
