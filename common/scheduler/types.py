"""What the scheduling logic sees of a request and of a batch. Plain frozen dataclasses, no torch.

The engine scheduler builds one `ReqView` per request each iteration (cheap: a handful of ints), and
grows a `BatchShape` as it packs the batch; the performance model predicts a batch's time from its
shape alone.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable


@dataclass(frozen=True)
class ReqView:
    """A request as the policy and the chunker see it.

    `num_computed` counts prompt tokens whose KV exists (a preempted request that dropped its KV has
    0 again; one resumed by recomputation should present prompt + generated tokens as its prompt).
    `ttft_deadline_s` is absolute (same clock as `arrival_s` and `now`); None means no deadline.
    `last_chunk` is the size of the request's previous prefill chunk, 0 if none (the adaptive chunker
    grows a chunk at most 2x per step). `kvp_tokens` is M, the tokens one KVP group holds (None: no
    KVP): a chunk never crosses a multiple of M. `started`: a prefill chunk of it has run (or is
    running) since it was last queued, cached prefix tokens aside (LARS finishes those first when no
    deadline is lost, policy.finish_started).
    """
    request_id: str
    arrival_s: float
    prompt_len: int
    num_computed: int = 0
    num_generated: int = 0
    ttft_deadline_s: float | None = None
    tbt_slo_s: float | None = None
    last_chunk: int = 0
    kvp_tokens: int | None = None
    started: bool = False

    def __post_init__(self) -> None:
        if self.prompt_len <= 0:
            raise ValueError(f"request {self.request_id}: prompt_len must be positive, "
                             f"got {self.prompt_len}")
        if not 0 <= self.num_computed <= self.prompt_len:
            raise ValueError(f"request {self.request_id}: num_computed={self.num_computed} outside "
                             f"[0, prompt_len={self.prompt_len}]")
        if self.num_generated < 0 or self.last_chunk < 0:
            raise ValueError(f"request {self.request_id}: num_generated and last_chunk must be >= 0")
        if self.kvp_tokens is not None and self.kvp_tokens <= 0:
            raise ValueError(f"request {self.request_id}: kvp_tokens must be positive, "
                             f"got {self.kvp_tokens}")

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def remaining_prompt(self) -> int:
        return self.prompt_len - self.num_computed

    @property
    def decode_context_len(self) -> int:
        """KV tokens cached before this request's next decode step (the newest token is the input)."""
        return self.prompt_len + max(self.num_generated - 1, 0)

    def advanced(self, num_tokens: int) -> "ReqView":
        """The view after a prefill chunk of `num_tokens` ran (used by the simulator and the table)."""
        return replace(self, num_computed=self.num_computed + num_tokens, last_chunk=num_tokens, started=True)


@dataclass(frozen=True)
class BatchShape:
    """The shape of one iteration: what the performance model needs, nothing more.

    prefills: (chunk_len, context_len_before_chunk) per prefill chunk.
    decodes:  context length (KV tokens cached before the step) per decoding request.
    """
    prefills: tuple[tuple[int, int], ...] = ()
    decodes: tuple[int, ...] = ()

    def with_prefill(self, chunk_len: int, context_len: int) -> "BatchShape":
        if chunk_len <= 0 or context_len < 0:
            raise ValueError(f"bad prefill entry: chunk_len={chunk_len}, context_len={context_len}")
        return BatchShape(self.prefills + ((chunk_len, context_len),), self.decodes)

    def with_decode(self, context_len: int) -> "BatchShape":
        if context_len < 0:
            raise ValueError(f"bad decode entry: context_len={context_len}")
        return BatchShape(self.prefills, self.decodes + (context_len,))

    def with_decodes(self, context_lens: Iterable[int]) -> "BatchShape":
        out = self
        for c in context_lens:
            out = out.with_decode(c)
        return out

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for n, _ in self.prefills)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + len(self.decodes)

    @property
    def num_seqs(self) -> int:
        return len(self.prefills) + len(self.decodes)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes
