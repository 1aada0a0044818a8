"""The load a prefill or decode instance sends with each kvstore heartbeat (common/client.py
Membership), which the router's admission judges it by (common/admission.py InstanceLoad). The same
numbers as its /metrics gauges (common/metrics.py: active requests, queued prefill tokens, running
decodes, KV blocks free / used per group, KV layout, iteration time, the performance model's online
scale), read from the engine's last stats and the instance's counters: no Prometheus text is
rendered on the heartbeat's path.
"""
from __future__ import annotations

from typing import Protocol

from common.metadata.types import LoadReport


class Stats(Protocol):
    """What is read of common.engine.engine.EngineStats (the engine's load after its last step)."""
    running: int
    waiting: int
    total_blocks: tuple[int, ...]
    free_blocks: tuple[int, ...]
    queued_prefill_tokens: int
    running_decodes: int
    model_scale: float | None


class LoadSampler:
    """One per instance; `sample` at each heartbeat (on the event loop).

    iteration_s: the mean time of the engine iterations completed since the previous sample (the
    deltas of AsyncEngine.iteration_totals, the iterations mnemosyne_iteration_seconds observes);
    when none completed but the instance is still busy (one iteration longer than the heartbeat
    interval is under way), the previous mean; None once it is idle with none completed, or before
    any was measured. Totals that went back (a rebuilt engine) start over.
    """

    def __init__(self, block_size: int, kvp_tokens: int) -> None:
        self.block_size, self.kvp_tokens = block_size, kvp_tokens
        self._last: tuple[float, int] = (0.0, 0)
        self._mean: float | None = None

    def sample(self, active: int, stats: Stats, iterations: tuple[float, int]) -> LoadReport:
        """`active`: requests in flight on the instance (its open streams, the active-requests
        gauge); `iterations`: (seconds, count) of the engine's iterations so far."""
        total, count = iterations
        last_total, last_count = self._last if count >= self._last[1] else (0.0, 0)
        busy = bool(active or stats.running or stats.waiting)
        if count > last_count:
            self._mean = (total - last_total) / (count - last_count)
        elif not busy:
            self._mean = None
        self._last = iterations
        return LoadReport(
            active_requests=active, queued_prefill_tokens=stats.queued_prefill_tokens,
            running_decodes=stats.running_decodes, kv_free_blocks=tuple(stats.free_blocks),
            kv_used_blocks=tuple(t - f for t, f in zip(stats.total_blocks, stats.free_blocks)),
            kv_block_size=self.block_size, kvp_tokens=self.kvp_tokens, iteration_s=self._mean,
            model_scale=stats.model_scale)
