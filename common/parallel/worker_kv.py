"""A grid worker's side of disaggregation: stream the KV its stage computes to a decode instance
(prefill grids), and receive a request's KV for its group's token range (decode grids).

A watcher thread reports terminal transfer states to the driver over the control socket:
{"type": "kv_sent" | "kv_recv", "rid", "state": "done" | "failed", "reason"}.
"""
from __future__ import annotations

import json
import logging
import threading

from common.engine.kv_sink import KVIntake, KVSink, KVStreamer, gather_chunk
from common.errors import MnemosyneError
from common.kv_cache.paged import PagedKVCache
from common.kv_transfer import KVLayout
from common.parallel import comm

log = logging.getLogger(__name__)


class WorkerKV:
    def __init__(self, layout: KVLayout, cache: PagedKVCache, backend: str, host: str, tp_rank: int,
                 group: int, kvp_tokens: int, receive: bool) -> None:
        self.cache = cache
        self.group = group
        self.kvp_tokens = kvp_tokens
        self.streamer = KVStreamer(layout, tp_rank)
        self.intake = KVIntake(backend, layout, cache, host) if receive else None
        self.sinks: dict[str, KVSink] = {}
        self.sealed: set[str] = set()
        self.lock = threading.Lock()
        self.ctl = None
        self.send_lock: threading.Lock | None = None
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def address(self) -> str | None:
        return self.intake.address if self.intake else None

    def start(self, ctl, send_lock: threading.Lock) -> None:
        self.ctl, self.send_lock = ctl, send_lock
        self.thread = threading.Thread(target=self._watch, name="kv-watch", daemon=True)
        self.thread.start()

    # ---- prefill side --------------------------------------------------------------------------------
    def stream(self, rid: str, start: int, n: int, table: list[int], last: bool) -> None:
        sink = self.sinks.get(rid)
        if sink is None:
            return
        k, v = gather_chunk(self.cache, table, start, start + n)
        with self.lock:
            self.streamer.send(rid, sink, self.cache.layers, start, k, v, last)
            if last:
                self.sinks.pop(rid, None)
                self.sealed.add(rid)

    # ---- decode side ---------------------------------------------------------------------------------
    def expect(self, rid: str, tables: list[list[int]], num_tokens: int) -> bool:
        """Registers this group's part of a request; False when the group holds none of its tokens."""
        g0 = self.group * self.kvp_tokens
        n = max(0, min(num_tokens - g0, self.kvp_tokens))
        if n == 0 or self.intake is None:
            return False
        with self.lock:
            self.intake.expect(rid, tables[self.group], g0, n)
        return True

    def cancel(self, rid: str) -> None:
        with self.lock:
            self.sinks.pop(rid, None)
            self.sealed.discard(rid)
            self.streamer.forget(rid)
            if self.intake is not None:
                self.intake.cancel(rid)

    # ---- reporting -------------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self.stopped.wait(0.002):
            events = []
            with self.lock:
                for rid in list(self.sealed):
                    state, reason = self.streamer.status(rid)
                    if state != "pending":
                        events.append({"type": "kv_sent", "rid": rid, "state": state, "reason": reason})
                        self.sealed.discard(rid)
                        self.streamer.forget(rid)
                if self.intake is not None and self.intake.expected:
                    for rid, (state, reason) in self.intake.poll().items():
                        events.append({"type": "kv_recv", "rid": rid, "state": state, "reason": reason})
            for ev in events:
                self.notify(ev)

    def notify(self, event: dict) -> None:
        try:
            with self.send_lock:
                comm.send_msg(self.ctl, json.dumps(event).encode())
        except OSError:
            log.warning("cannot tell the driver about %s", event)

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(2.0)
        try:
            self.streamer.close()
            if self.intake is not None:
                self.intake.close()
        except MnemosyneError:
            log.exception("closing KV transfer")
