"""Per-request sampling settings (torch-free: the scheduler and the RPC layer use them too)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20     # the most alternatives a request may ask for per token (as OpenAI's API)
TopLogprobs = tuple[tuple[int, float], ...]     # (token id, logprob) of one position, most likely first


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0             # also report the k most likely tokens per position (0 = none)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        # NaN passes every comparison: a NaN temperature reached the sampler and took the engine down
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        check_top_logprobs(self.top_logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def check_top_logprobs(k: int) -> None:
    """Raises InvalidRequestError unless 0 <= k <= MAX_TOP_LOGPROBS (the one message for every entry point)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k!r}")
