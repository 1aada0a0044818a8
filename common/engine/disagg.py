"""Prefill/decode disaggregation for the single-process engine (the grid has its own, in
common/parallel, built from the same kv_sink parts).

Prefill role: requests added with a KVSink stream every computed chunk to the decode instance.
Decode role: `prepare_receive` reserves blocks and registers the expected token range with the KV
receiver; `add_prefilled` queues the request, which joins the scheduler only once all its KV arrived
(or ends with an error when it fails or times out). Ownership: the blocks reserved by prepare_receive
belong to the request from then on; abort (or a failure) frees them.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from common.engine.kv_sink import GroupSink, KVIntake, KVSink, KVStreamer, gather_chunk, kv_layout
from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams
from common.scheduler.request import FinishReason, Request

if TYPE_CHECKING:
    from common.engine.engine import LLMEngine, StepOutput
    from common.scheduler.scheduler import ScheduledItem


def prefilled_request(engine, prepared: dict[str, int], prompt_ids: list[int], params: SamplingParams, rid: str,
                      first_token: int, first_logprob: float) -> Request:
    """A decode-side request whose prompt KV comes from elsewhere: all prompt tokens computed, the
    first token already sampled (it may already finish the request)."""
    if prepared.get(rid) != len(prompt_ids):
        raise InvalidRequestError(f"request {rid!r} was not prepared to receive {len(prompt_ids)} tokens")
    req = engine.make_request(rid, prompt_ids, params)
    req.num_computed = len(prompt_ids)
    req.append(first_token, first_logprob)
    return req


class Disaggregation:
    def __init__(self, engine: "LLMEngine") -> None:
        self.e = engine
        mc = engine.model_config
        self.layout = kv_layout(mc, engine.cfg.cache, engine.cfg.dtype, mc.num_kv_heads)
        self.sinks: dict[str, KVSink] = {}
        self.streaming: set[str] = set()                        # rids whose KV is being sent
        self.final: dict[str, tuple[str, str | None]] = {}      # terminal kv_status, kept briefly
        self.prepared: dict[str, int] = {}                      # rid -> prompt tokens expected
        self.arrived: dict[str, tuple[str, str | None]] = {}    # rid -> terminal receive state
        self.awaiting: dict[str, tuple[Request, float]] = {}    # rid -> (request, KV deadline)
        self._streamer: KVStreamer | None = None
        self._intake: KVIntake | None = None

    @property
    def streamer(self) -> KVStreamer:
        if self._streamer is None:
            self._streamer = KVStreamer(self.layout)
        return self._streamer

    @property
    def intake(self) -> KVIntake:
        if self._intake is None:
            self._intake = KVIntake(self.e.cfg.kv_backend, self.layout, self.e.cache, self.e.cfg.kv_host)
        return self._intake

    # ---- prefill role ------------------------------------------------------------------------------
    def stream(self, items: list["ScheduledItem"]) -> None:
        """Sends the KV each scheduled item just wrote (called right after the forward pass)."""
        for it in items:
            sink = self.sinks.get(it.request.request_id)
            if sink is None:
                continue
            rid = it.request.request_id
            k, v = gather_chunk(self.e.cache, self.e.pool.table(rid), it.start, it.start + it.num_tokens)
            self.streamer.send(rid, sink, self.e.cache.layers, it.start, k, v, last=it.sample)
            if it.sample:
                del self.sinks[rid]

    def kv_status(self, request_id: str) -> tuple[str, str | None]:
        """pending / done / failed; a terminal answer releases the staged KV copies and is remembered."""
        if request_id in self.final:
            return self.final[request_id]
        if self._streamer is None or request_id not in self.streaming:
            return "failed", f"request {request_id} streams no KV"
        result = self.streamer.status(request_id)
        if result[0] != "pending":
            self.streamer.forget(request_id)
            self.streaming.discard(request_id)
            self.final[request_id] = result
            while len(self.final) > 4096:
                self.final.pop(next(iter(self.final)))
        return result

    # ---- decode role -------------------------------------------------------------------------------
    def prepare_receive(self, rid: str, num_prompt_tokens: int, max_new_tokens: int) -> list[GroupSink]:
        if rid in self.prepared or rid in self.e.scheduler.requests:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        if num_prompt_tokens < 1 or num_prompt_tokens + 1 > self.e.max_model_len:
            raise InvalidRequestError(f"cannot receive {num_prompt_tokens} prompt tokens "
                                      f"(max_model_len {self.e.max_model_len})")
        table = self.e.pool.allocate(rid, num_prompt_tokens)     # CapacityError leaves nothing behind
        try:
            self.intake.expect(rid, list(table), 0, num_prompt_tokens)
        except Exception:
            self.e.pool.free(rid)
            raise
        self.prepared[rid] = num_prompt_tokens
        return [GroupSink(0, 0, list(table), [self.intake.address])]

    def add_prefilled(self, prompt_ids: list[int], params: SamplingParams, rid: str, first_token: int,
                      first_logprob: float, kv_timeout_s: float) -> str:
        self.awaiting[rid] = (prefilled_request(self.e, self.prepared, prompt_ids, params, rid, first_token,
                                                first_logprob), time.monotonic() + kv_timeout_s)
        return rid

    def admit_arrived(self) -> list["StepOutput"]:
        """Moves requests whose KV is complete into the scheduler; fails the others past their deadline."""
        if not self.prepared:
            return []
        self.arrived.update(self.intake.poll())
        outs = []
        now = time.monotonic()
        for rid, (req, deadline) in list(self.awaiting.items()):
            state = self.arrived.get(rid)
            if state is None and now < deadline:
                continue
            del self.awaiting[rid]
            if state is not None and state[0] == "done" and req.finish_reason is None:
                self._forget(rid, free=False)
                self.e.scheduler.add(req)
                continue
            reason = state[1] if state else f"KV of request {rid} did not arrive within the timeout"
            if state is not None and state[0] == "done":       # the first token already ended it
                reason = None
            outs.append(self._end(req, reason))
        return outs

    def _end(self, req: Request, error: str | None) -> "StepOutput":
        from common.engine.engine import StepOutput
        self._forget(req.request_id, free=True)
        reason = req.finish_reason if error is None else FinishReason.ABORT
        return StepOutput(req.request_id, None, None, req.num_computed, req.prompt_len, reason, error)

    def abort(self, rid: str) -> bool:
        found = rid in self.prepared or rid in self.sinks or rid in self.streaming
        self.sinks.pop(rid, None)
        self.streaming.discard(rid)
        self.final.pop(rid, None)
        if self._streamer is not None:
            self._streamer.forget(rid)
        if rid in self.prepared:
            self._forget(rid, free=rid not in self.e.scheduler.requests)
        return found

    def _forget(self, rid: str, free: bool) -> None:
        self.prepared.pop(rid, None)
        self.arrived.pop(rid, None)
        self.awaiting.pop(rid, None)
        if self._intake is not None:
            self._intake.cancel(rid)
        if free:
            self.e.pool.free(rid)
