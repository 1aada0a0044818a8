"""C[l]: predicted seconds to prefill l tokens alone with adaptive chunking under a budget.

Built by walking one prompt through the chunker (each chunk's batch is predicted alone) and
interpolated linearly between chunk boundaries; it grows on demand when asked past its end. LARS
uses remaining(total, done) = C[total] - C[done] and total work C[total].

A scaled model (an engine's OnlineCorrection, a published model's scale: `base` and `scale`) is walked
unscaled and its *current* scale multiplies every answer. The table grows lazily, so walking the
scaled model froze each stretch of it at the scale of the moment it was first asked for: a decode
pool whose warm-up ran beside a long prefill kept its short prompts' work 1.7x too long for the rest
of its life, its LARS saw a 117-token prompt miss behind a 192-token one that it would have met, and
moved it ahead, against what admission (on the pool's corrected level) had predicted.
"""
from __future__ import annotations

import bisect

from common.perf_model.base import PerfModel
from common.scheduler.chunking import AdaptiveChunker, ChunkingConfig, FixedChunker, tokens_to_boundary
from common.scheduler.types import BatchShape, ReqView

_UNBOUNDED = 1 << 62


class PrefillTable:
    def __init__(self, model: PerfModel, budget_s: float, max_len: int = 0,
                 chunking: ChunkingConfig = ChunkingConfig(), kvp_tokens: int | None = None,
                 fixed_chunk: int | None = None) -> None:
        """`fixed_chunk`: chunks of this many tokens (fixed chunking) instead of adaptive ones."""
        if not budget_s > 0:
            raise ValueError(f"prefill table: budget_s must be positive, got {budget_s}")
        self.scaled = model                      # read for its scale at every answer (see above)
        base = getattr(model, "base", None)
        if base is not None and hasattr(model, "scale"):
            model = base
        else:
            self.scaled = None
        self.model = model
        self.budget_s = budget_s
        self.chunker = (FixedChunker(fixed_chunk) if fixed_chunk
                        else AdaptiveChunker(model.predict, chunking))
        self.min_chunk = chunking.min_chunk
        # one prompt that never ends: chunks are never clipped at a prompt end
        self._req = ReqView("prefill-table", 0.0, _UNBOUNDED, kvp_tokens=kvp_tokens)
        self.tokens: list[int] = [0]
        self.times: list[float] = [0.0]
        self.extend(max_len)

    def extend(self, max_len: int) -> None:
        """Walks the prompt until the table covers `max_len` tokens."""
        req = self._req
        while self.tokens[-1] < max_len:
            n = self.chunker.chunk(BatchShape(), self.budget_s, req)
            if n == 0:       # not even the smallest chunk fits alone: the scheduler forces it anyway
                n = min(self.min_chunk, tokens_to_boundary(req))
            t = self.model.predict(BatchShape(((n, req.num_computed),)))
            req = req.advanced(n)
            self.tokens.append(req.num_computed)
            self.times.append(self.times[-1] + t)
        self._req = req

    @property
    def scale(self) -> float:
        """The scaled model's scale now (1.0 for an unscaled one)."""
        return 1.0 if self.scaled is None else float(self.scaled.scale)

    def _time(self, num_tokens: int) -> float:
        """C[num_tokens] of the unscaled model."""
        if num_tokens <= 0:
            return 0.0
        self.extend(num_tokens)
        i = bisect.bisect_left(self.tokens, num_tokens)
        if self.tokens[i] == num_tokens:
            return self.times[i]
        l0, l1 = self.tokens[i - 1], self.tokens[i]
        t0, t1 = self.times[i - 1], self.times[i]
        return t0 + (t1 - t0) * (num_tokens - l0) / (l1 - l0)

    def time(self, num_tokens: int) -> float:
        """C[num_tokens] at the model's current scale."""
        return self.scale * self._time(num_tokens)

    def remaining(self, total: int, done: int) -> float:
        return self.scale * max(self._time(total) - self._time(done), 0.0)

    def work(self, req: ReqView) -> tuple[float, float]:
        """(remaining, total) predicted prefill seconds at one scale: the `work` callback of the planner."""
        total = self._time(req.prompt_len)
        scale = self.scale
        return scale * max(total - self._time(req.num_computed), 0.0), scale * total
