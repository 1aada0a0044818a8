"""Per-request streaming over the engine's step loop: callbacks and iterators of new tokens.

The engine publishes every step's outputs to its `StreamHub`; a request with subscribers gets one
`TokenEvent` per sampled token, in order, and a last event when it finishes (its finish reason, or
"abort" with the error when it is cancelled or fails). Nothing here runs the model: a `RequestStream`
(an iterator) drives the engine by calling `step()` whenever it has nothing buffered, so many streams
consumed in turn share one continuous batch. Single-threaded, like the engine.

Ownership: cancelling (`RequestStream.cancel()` or `engine.abort(id)`) frees the request's KV blocks
at once; a step already running for it is discarded by the scheduler's postprocess.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from common.errors import CapacityError
from common.sampling_params import TopLogprobs
from common.scheduler.request import FinishReason

if TYPE_CHECKING:
    from common.engine.engine import LLMEngine, StepOutput


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    index: int                     # position in the output (0 = first token); -1 on a bare finish
    token_id: int | None           # None only on a finish event without a token (abort, failure)
    logprob: float | None
    finish_reason: str | None      # set on the request's last event
    error: str | None = None
    top_logprobs: TopLogprobs = ()  # (token id, logprob) most likely first, when the request asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


Callback = Callable[[TokenEvent], None]


class StreamHub:
    """Routes step outputs to per-request callbacks; forgets a request after its last event."""

    def __init__(self) -> None:
        self.subscribers: dict[str, list[Callback]] = {}
        self.counts: dict[str, int] = {}

    def subscribe(self, request_id: str, callback: Callback) -> None:
        self.subscribers.setdefault(request_id, []).append(callback)
        self.counts.setdefault(request_id, 0)

    def publish(self, outs: list["StepOutput"]) -> None:
        for o in outs:
            if o.request_id not in self.subscribers or (o.token_id is None and o.finish_reason is None
                                                       and o.error is None):
                continue                                  # no listener, or a prefill-only step
            index = -1
            if o.token_id is not None:
                index = self.counts[o.request_id]
                self.counts[o.request_id] = index + 1
            reason = o.finish_reason.value if o.finish_reason is not None else None
            if o.error is not None and reason is None:
                reason = FinishReason.ABORT.value
            self._emit(TokenEvent(o.request_id, index, o.token_id, o.logprob, reason, o.error, o.top_logprobs))

    def aborted(self, request_id: str, error: str | None = None) -> None:
        """The request was cancelled: its subscribers get a final event."""
        if request_id in self.subscribers:
            self._emit(TokenEvent(request_id, -1, None, None, FinishReason.ABORT.value, error))

    def _emit(self, ev: TokenEvent) -> None:
        callbacks = self.subscribers.get(ev.request_id, ())
        if ev.finished:
            self.subscribers.pop(ev.request_id, None)
            self.counts.pop(ev.request_id, None)
        for cb in list(callbacks):
            cb(ev)


class RequestStream:
    """Iterator over one request's TokenEvents; each `next()` steps the engine until one is ready.

    Iteration ends after the finishing event. `cancel()` aborts the request (blocks freed now).
    Raises CapacityError if the engine can make no progress at all (nothing schedulable, nothing
    in flight), as `LLMEngine.generate` does.
    """

    def __init__(self, engine: "LLMEngine", request_id: str) -> None:
        self.engine = engine
        self.request_id = request_id
        self.buffer: deque[TokenEvent] = deque()
        self.done = False
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        engine.streams.subscribe(request_id, self._push)

    def _push(self, ev: TokenEvent) -> None:
        self.buffer.append(ev)

    def __iter__(self) -> Iterator[TokenEvent]:
        return self

    def __next__(self) -> TokenEvent:
        while not self.buffer:
            if self.done:
                raise StopIteration
            outs = self.engine.step()
            if not outs and not self.buffer and not self.engine.kv.awaiting:
                # nothing could be scheduled and nothing is in flight: no later step will differ
                self.engine.abort(self.request_id)
                raise CapacityError(f"request {self.request_id} cannot make progress: the KV cache "
                                    f"({self.engine.blocks.num_blocks} blocks) is too small")
        ev = self.buffer.popleft()
        if ev.token_id is not None:
            self.token_ids.append(ev.token_id)
        if ev.finished:
            self.done = True
            self.finish_reason = ev.finish_reason
        return ev

    def tokens(self) -> Iterator[int]:
        """Just the token ids, in order."""
        for ev in self:
            if ev.token_id is not None:
                yield ev.token_id

    def cancel(self) -> bool:
        """Aborts the request (frees its KV blocks now); the iterator then yields a final abort event."""
        if self.done:
            return False
        return self.engine.abort(self.request_id)
