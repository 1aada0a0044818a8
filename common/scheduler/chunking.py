"""Prefill chunk sizes: adaptive (fill the iteration's time budget) or fixed.

Both chunkers answer `chunk(batch, budget_s, req, max_tokens=None) -> tokens` where `batch` is the
iteration packed so far (decodes first, then earlier prefills) and `budget_s` limits the predicted
time of the *whole* batch once this chunk is added. 0 means "nothing fits": the request stays queued
for the next iteration.

Hard limits, applied by both: a chunk never runs past the prompt's end and never crosses a KVP group
boundary k*M (`req.kvp_tokens` = M), and never exceeds `max_tokens` (what the batch's token budget
has left). A chunk clipped at the prompt end or at a KVP boundary may be off the 32-token grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from common.errors import ConfigError
from common.scheduler.types import BatchShape, ReqView

Predictor = Callable[[BatchShape], float]


@dataclass(frozen=True)
class ChunkingConfig:
    """Adaptive chunk search space (paper: multiples of 32 in [32, 8192], at most 2x the request's
    previous chunk, accept within +-10% of the target).

    `tolerance`: a batch may be predicted up to this fraction over the budget (the model's own error
    is of that order). The search returns the largest chunk within it, never stopping early: an early
    stop anywhere in the +-10% window could hand a later chunk of the same prompt a larger size.
    """
    min_chunk: int = 32
    max_chunk: int = 8192
    multiple: int = 32
    growth: float = 2.0
    tolerance: float = 0.10

    def __post_init__(self) -> None:
        if self.multiple <= 0 or self.min_chunk <= 0:
            raise ConfigError(f"chunking: multiple={self.multiple} and min_chunk={self.min_chunk} "
                              "must be positive")
        if self.min_chunk % self.multiple or self.max_chunk % self.multiple:
            raise ConfigError(f"chunking: min_chunk={self.min_chunk} and max_chunk={self.max_chunk} "
                              f"must be multiples of {self.multiple}")
        if self.max_chunk < self.min_chunk:
            raise ConfigError(f"chunking: max_chunk={self.max_chunk} < min_chunk={self.min_chunk}")
        if self.growth < 1.0:
            raise ConfigError(f"chunking: growth must be >= 1, got {self.growth}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError(f"chunking: tolerance must be in [0, 1), got {self.tolerance}")


def tokens_to_boundary(req: ReqView) -> int:
    """Tokens the next chunk may take before the prompt ends or the current KVP group is full."""
    n = req.remaining_prompt
    if req.kvp_tokens is not None:
        n = min(n, req.kvp_tokens - req.num_computed % req.kvp_tokens)
    return n


class Chunker(Protocol):
    def chunk(self, batch: BatchShape, budget_s: float, req: ReqView,
              max_tokens: int | None = None) -> int: ...


class FixedChunker:
    """Always `chunk_size` tokens (the baseline), clipped at the hard limits; ignores the budget."""

    def __init__(self, chunk_size: int) -> None:
        if chunk_size <= 0:
            raise ConfigError(f"fixed chunk size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size

    def chunk(self, batch: BatchShape, budget_s: float, req: ReqView,
              max_tokens: int | None = None) -> int:
        n = min(self.chunk_size, tokens_to_boundary(req))
        if max_tokens is not None:
            n = min(n, max_tokens)
        return max(n, 0)


class AdaptiveChunker:
    """The largest chunk whose predicted batch time fits the budget (binary search).

    Assumes the predictor is non-decreasing in the chunk length (true of every model here). Candidates
    are min_chunk, min_chunk + multiple, ... up to the cap, where the cap is max_chunk, growth x the
    previous chunk (if any) and `max_tokens`; when the prompt end or KVP boundary comes first, that
    exact length is the last candidate. About log2(max_chunk / multiple) + 1 predictions per call.
    """

    def __init__(self, predict: Predictor, config: ChunkingConfig = ChunkingConfig()) -> None:
        self.predict = predict
        self.config = config

    def candidates(self, req: ReqView, max_tokens: int | None = None) -> tuple[int, int]:
        """(number of grid candidates, tail) — tail is the off-grid end length, 0 if none."""
        cfg = self.config
        cap = cfg.max_chunk
        if req.last_chunk > 0:
            cap = min(cap, max(cfg.min_chunk, int(cfg.growth * req.last_chunk)))
        if max_tokens is not None:
            cap = min(cap, max_tokens)
        end = tokens_to_boundary(req)
        tail = 0
        if end <= cap:
            tail, cap = end, end - 1          # the grid stays strictly below the exact end
        count = (cap - cfg.min_chunk) // cfg.multiple + 1 if cap >= cfg.min_chunk else 0
        return count, tail

    def chunk(self, batch: BatchShape, budget_s: float, req: ReqView,
              max_tokens: int | None = None) -> int:
        cfg = self.config
        count, tail = self.candidates(req, max_tokens)
        total = count + (1 if tail else 0)
        if total == 0:
            return 0

        def size(i: int) -> int:
            return cfg.min_chunk + i * cfg.multiple if i < count else tail

        limit = budget_s * (1.0 + cfg.tolerance)

        def fits(i: int) -> bool:
            return self.predict(batch.with_prefill(size(i), req.num_computed)) <= limit

        if not fits(0):
            return 0
        lo, hi = 0, total - 1                 # invariant: size(lo) fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return size(lo)
