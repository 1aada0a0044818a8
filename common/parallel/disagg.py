"""Disaggregation for a grid driver: the same contract as common/engine/disagg.py, with the KV held by
worker processes. Prefill grids (kvp = 1) stream each stage's KV from its workers; decode grids
(spp = 1) receive into each KVP group's workers. Workers report terminal transfer states over the
control plane; this object aggregates them per request.
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from common.engine.disagg import prefilled_request
from common.engine.kv_sink import GroupSink, KVSink, kv_layout
from common.errors import ConfigError, InvalidRequestError, KVTransferError, WorkerFailedError
from common.parallel.groups import Coord, worker_rank
from common.sampling_params import SamplingParams
from common.scheduler.request import FinishReason, Request

if TYPE_CHECKING:
    from common.engine.engine import StepOutput
    from common.parallel.driver import ParallelEngine


class GridDisaggregation:
    def __init__(self, engine: "ParallelEngine") -> None:
        self.e = engine
        self.sinks: dict[str, KVSink] = {}
        self.streaming: set[str] = set()                                  # attached, not yet all reported
        self.final: dict[str, tuple[str, str | None]] = {}                # terminal kv_status, kept briefly
        self.sent: dict[str, dict[int, tuple[str, str | None]]] = {}     # rid -> rank -> state
        self.recv: dict[str, dict[int, tuple[str, str | None]]] = {}
        self.acks: dict[str, dict[int, dict]] = {}
        self.expecting: dict[str, set[int]] = {}                         # rid -> ranks receiving
        self.prepared: dict[str, int] = {}
        self.awaiting: dict[str, tuple[Request, float]] = {}

    @property
    def layout(self):
        e = self.e
        from common.parallel.tp import tp_shard
        shard = tp_shard(e.model_config, 0, e.pcfg.tp)
        return kv_layout(e.model_config, e.cfg.cache, e.cfg.dtype, shard.num_kv_heads)

    def on_message(self, rank: int, msg: dict) -> None:
        kind = msg["type"]
        if kind == "kv_sent":
            self.sent.setdefault(msg["rid"], {})[rank] = (msg["state"], msg["reason"])
        elif kind == "kv_recv":
            self.recv.setdefault(msg["rid"], {})[rank] = (msg["state"], msg["reason"])
        elif kind == "ack":
            self.acks.setdefault(msg["rid"], {})[rank] = msg

    # ---- prefill role --------------------------------------------------------------------------------
    def attach(self, rid: str, sink: KVSink) -> None:
        if self.e.pcfg.kvp > 1:
            raise ConfigError("a prefill grid that streams KV must have kvp = 1")
        self.sinks[rid] = sink
        self.streaming.add(rid)

    def sink_for(self, rid: str, start: int) -> dict | None:
        sink = self.sinks.get(rid)
        return sink.to_dict() if sink is not None and start == 0 else None

    def kv_status(self, rid: str) -> tuple[str, str | None]:
        """pending until every worker reported its part; then done, or failed with the first reason.
        A terminal answer is remembered (bounded) so that repeated queries agree."""
        self.e.drain()
        if rid in self.final:
            return self.final[rid]
        if rid not in self.streaming:
            return "failed", f"request {rid} streams no KV"
        states = self.sent.get(rid, {})
        failed = [reason for state, reason in states.values() if state == "failed"]
        if failed:
            result = ("failed", failed[0])
        elif len(states) == self.e.pcfg.world_size:
            result = ("done", None)
        else:
            return "pending", None
        self.streaming.discard(rid)
        self.sent.pop(rid, None)
        self.final[rid] = result
        while len(self.final) > 4096:
            self.final.pop(next(iter(self.final)))
        return result

    # ---- decode role -----------------------------------------------------------------------------------
    def prepare_receive(self, rid: str, num_tokens: int, max_new_tokens: int, timeout_s: float = 30.0
                        ) -> list[GroupSink]:
        e = self.e
        if e.pcfg.spp != 1:
            raise ConfigError("a decode grid that receives KV must have spp = 1")
        if rid in self.prepared or rid in e.scheduler.requests:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        if num_tokens < 1 or num_tokens + 1 > e.max_model_len:
            raise InvalidRequestError(f"cannot receive {num_tokens} prompt tokens (max_model_len {e.max_model_len})")
        tables = e.blocks.allocate(rid, num_tokens)
        e.control.broadcast(json.dumps({"cmd": "expect", "rid": rid, "tables": tables,
                                        "num_tokens": num_tokens}).encode())
        deadline = time.monotonic() + timeout_s
        while len(self.acks.get(rid, {})) < e.pcfg.world_size:
            if time.monotonic() > deadline:
                self._undo(rid)
                raise WorkerFailedError(f"workers did not register request {rid} within {timeout_s:.0f} s")
            e.pump(min(0.5, max(0.0, deadline - time.monotonic())))
        acks = self.acks.pop(rid)
        errors = [a["error"] for a in acks.values() if a.get("error")]
        if errors:
            self._undo(rid)
            raise KVTransferError(f"cannot receive request {rid}: {errors[0]}")
        self.expecting[rid] = {r for r, a in acks.items() if a["ok"]}
        self.prepared[rid] = num_tokens
        m = e.blocks.kvp_tokens
        sinks = []
        for g, n in enumerate(e.blocks.split(num_tokens)):
            if n:
                addrs = [e.control.hello[worker_rank(e.pcfg, Coord(g, 0, t))]["kv_address"] for t in range(e.pcfg.tp)]
                sinks.append(GroupSink(g, g * m, tables[g], addrs))
        return sinks

    def add_prefilled(self, prompt_ids: list[int], params: SamplingParams, rid: str, first_token: int,
                      first_logprob: float, kv_timeout_s: float) -> str:
        self.awaiting[rid] = (prefilled_request(self.e, self.prepared, prompt_ids, params, rid, first_token,
                                                first_logprob), time.monotonic() + kv_timeout_s)
        return rid

    def admit_arrived(self) -> list["StepOutput"]:
        if not self.awaiting:
            return []
        self.e.drain()
        outs, now = [], time.monotonic()
        for rid, (req, deadline) in list(self.awaiting.items()):
            states = self.recv.get(rid, {})
            failed = [r for s, r in states.values() if s == "failed"]
            done = not failed and set(states) >= self.expecting.get(rid, set())
            if not (failed or done or now >= deadline):
                continue
            del self.awaiting[rid]
            if done and req.finish_reason is None:
                self._forget(rid)
                self.e.scheduler.add(req)
                continue
            error = failed[0] if failed else (None if done else
                                              f"KV of request {rid} did not arrive within the timeout")
            outs.append(self._end(req, error))
        return outs

    def _end(self, req: Request, error: str | None) -> "StepOutput":
        from common.engine.engine import StepOutput
        self._undo(req.request_id)
        reason = req.finish_reason if error is None else FinishReason.ABORT
        return StepOutput(req.request_id, None, None, req.num_computed, req.prompt_len, reason, error)

    def abort(self, rid: str) -> bool:
        found = rid in self.prepared or rid in self.sinks or rid in self.streaming
        self.sinks.pop(rid, None)
        self.sent.pop(rid, None)
        self.streaming.discard(rid)
        self.final.pop(rid, None)
        if found:
            self.e.control.broadcast(json.dumps({"cmd": "cancel", "rid": rid}).encode())
        if rid in self.prepared and rid not in self.e.scheduler.requests:
            self.e.blocks.free(rid)
        self._forget(rid)
        return found

    def _undo(self, rid: str) -> None:
        self.e.control.broadcast(json.dumps({"cmd": "cancel", "rid": rid}).encode())
        self.e.blocks.free(rid)
        self._forget(rid)

    def _forget(self, rid: str) -> None:
        for d in (self.recv, self.acks, self.expecting, self.prepared, self.awaiting):
            d.pop(rid, None)

    def finished(self, rid: str) -> None:
        """The prefill request has sampled its first token: its sink is no longer needed for planning."""
        self.sinks.pop(rid, None)
