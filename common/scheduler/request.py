"""A request's state as the scheduler and engine see it (torch-free).

Tokens = prompt + generated. `num_computed` tokens already have their KV in the cache and
`num_inflight` more are in steps still running (a sequence pipeline keeps several chunks of one request
in flight); the next step processes tokens [next_pos, next_pos + n). A step that reaches the last known
token samples the next one. Prefill, chunked prefill, decode and recompute after preemption are the same path.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from common.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"            # an end-of-sequence or stop token
    LENGTH = "length"        # max_tokens or the model's maximum length
    ABORT = "abort"          # cancelled by the client or failed elsewhere


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_s: float
    eos_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 62
    ttft_deadline_s: float | None = None     # absolute time by which the first token is due
    tbt_slo_s: float | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    num_computed: int = 0
    num_inflight: int = 0                    # scheduled tokens whose step has not completed (SPP)
    last_chunk: int = 0
    num_preemptions: int = 0
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0               # prompt tokens whose KV came from the prefix cache
    block_hashes: list[bytes] = field(default_factory=list, repr=False)   # names of its full blocks

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def remaining(self) -> int:
        """Known tokens not yet in the KV cache."""
        return self.num_tokens - self.num_computed

    @property
    def next_pos(self) -> int:
        """First token not yet scheduled: chunks of one request may be in flight back to back."""
        return self.num_computed + self.num_inflight

    @property
    def unscheduled(self) -> int:
        return self.num_tokens - self.next_pos

    @property
    def in_prefill(self) -> bool:
        return self.remaining > 1 or not self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence (a decode step
        asks for one token of a request whose prompt may hold millions)."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    def append(self, token: int, logprob: float) -> None:
        """Records a sampled token and decides whether the request is done."""
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        if (token in self.eos_ids and not self.params.ignore_eos) or token in self.params.stop_token_ids:
            self.finish_reason = FinishReason.STOP
        elif len(self.output_ids) >= self.params.max_tokens or self.num_tokens >= self.max_model_len:
            self.finish_reason = FinishReason.LENGTH
