"""KV intake progress: a decode holder reports that more of a request's KV arrived (at most every
PROGRESS_PERIOD_S), and the decode side's KV timeout counts from the last progress. So a long
transfer tail that keeps moving is never cut off by a fixed kv_timeout_s, and a stalled one still
fails kv_timeout_s after it stalled. Real TCP transfer between two KVWorkers on loopback."""
from __future__ import annotations

import time

import torch

from common.kv_cache.paged import PagedKVCache
from common.kv_connector import scheduler as kv_scheduler
from common.kv_connector.types import PROGRESS_PERIOD_S, GroupSink, KVEvent, KVSink
from common.kv_connector.worker import KVWorker
from common.kv_transfer import KVLayout
from tests.unit.test_engine_kv_connector import connector, prefilled

LAYOUT = KVLayout(dtype="float32", block_size=16, num_kv_heads=1, head_dim=16, num_layers=2, model="progress-test")


def _events(worker: KVWorker, want: str, timeout_s: float = 10.0) -> list[KVEvent]:
    end = time.monotonic() + timeout_s
    got: list[KVEvent] = []
    while time.monotonic() < end:
        got += worker.poll_events()
        if any(e.state == want for e in got):
            return got
        time.sleep(0.01)
    raise AssertionError(f"no {want!r} event within {timeout_s} s; got {got}")


def test_a_decode_holder_reports_intake_progress_until_done():
    n, table = 64, [0, 1, 2, 3]
    src = PagedKVCache(range(2), 8, 16, 1, 16, torch.float32)
    src.data.normal_()
    dst = PagedKVCache(range(2), 8, 16, 1, 16, torch.float32)
    tx = KVWorker(0, LAYOUT, src, "tcp", "127.0.0.1", receive=False)
    rx = KVWorker(1, LAYOUT, dst, "tcp", "127.0.0.1")
    try:
        assert rx.expect("r", [table], n).ok
        sink = KVSink("tcp", 1 << 62, [GroupSink(0, 0, table, [rx.address])])
        assert [e.state for e in rx.poll_events()] == []                    # nothing arrived: no progress
        tx.stream("r", 0, 32, table, last=False, sink=sink)
        evs = _events(rx, "progress")
        assert [(e.holder, e.kind, e.request_id) for e in evs] == [(1, "recv", "r")]
        sent = _events(tx, "progress")                                      # the sender's side: confirmed
        assert [(e.holder, e.kind, e.request_id) for e in sent] == [(0, "sent", "r")]
        time.sleep(PROGRESS_PERIOD_S * 1.2)
        assert rx.poll_events() == [] and tx.poll_events() == []            # no news, no progress
        tx.stream("r", 32, 32, table, last=True)
        assert [e.state for e in _events(rx, "done")][-1] == "done"
        assert [(e.kind, e.state) for e in _events(tx, "done")][-1] == ("sent", "done")
        assert torch.equal(dst.data[:, :, :4], src.data[:, :, :4])
    finally:
        tx.close()
        rx.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_the_kv_timeout_counts_from_the_last_progress(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(kv_scheduler, "time", clock)
    kv, blocks, sched, ex, ended = connector()
    kv.prepare_receive("r", 40, 4)
    kv.add_prefilled(prefilled("r", 40), 5.0)
    for _ in range(10):                                   # 40 s of tail, progress every 4 s: waited for
        clock.now += 4.0
        ex.events.append(KVEvent(0, "recv", "r", "progress"))
        assert kv.admit_arrived() == [] and "r" in kv.awaiting
    clock.now += 4.9                                      # stalled, but not for 5 s yet
    assert kv.admit_arrived() == []
    ex.events += [KVEvent(0, "recv", "r", "done"), KVEvent(1, "recv", "r", "done")]
    assert kv.admit_arrived() == [] and "r" in sched.requests and not kv.progress
    sched.abort("r")

    kv.prepare_receive("s", 40, 4)
    kv.add_prefilled(prefilled("s", 40), 5.0)
    clock.now += 3.0
    ex.events.append(KVEvent(1, "recv", "s", "progress"))
    assert kv.admit_arrived() == []
    clock.now += 5.0                                      # 5 s without progress: fails now
    [error] = kv.admit_arrived()
    assert "stopped arriving" in error and "5 s" in error
    assert blocks.num_used == 0 and "s" in ex.cancelled and not kv.progress
    blocks.check()


def test_a_poll_reads_only_the_sends_still_in_flight(monkeypatch):
    """The sender's status is polled every few ms (a grid worker's watcher, under the lock its
    streaming thread takes after each chunk): it must not re-read every send of the request. With
    every read counted, after 40 chunks were confirmed a poll reads none of them; the count of
    confirmed chunks and the final state are still right. (Re-reading all of them, ~25,000 sends late
    in a 1M-token prefill, made each poll tens of ms.)"""
    from common.kv_transfer import base
    reads = [0]
    state = base.TransferHandle.state

    def counted(self):
        reads[0] += 1
        return state.fget(self)
    monkeypatch.setattr(base.TransferHandle, "state", property(counted))
    n, chunks = 16, 40
    table = list(range(chunks))
    src = PagedKVCache(range(2), chunks, 16, 1, 16, torch.float32)
    src.data.normal_()
    dst = PagedKVCache(range(2), chunks, 16, 1, 16, torch.float32)
    tx = KVWorker(0, LAYOUT, src, "tcp", "127.0.0.1", receive=False)
    rx = KVWorker(1, LAYOUT, dst, "tcp", "127.0.0.1")
    try:
        assert rx.expect("r", [table], n * chunks).ok
        sink = KVSink("tcp", 1 << 62, [GroupSink(0, 0, table, [rx.address])])
        for c in range(chunks - 1):
            tx.stream("r", c * n, n, table, last=False, sink=sink if c == 0 else None)
        end = time.monotonic() + 10
        while tx.streamer.confirmed("r") < chunks - 1 and time.monotonic() < end:
            time.sleep(0.01)
        assert tx.streamer.confirmed("r") == chunks - 1
        reads[0] = 0
        assert tx.streamer.status("r") == ("pending", None) and tx.streamer.confirmed("r") == chunks - 1
        assert reads[0] == 0                                    # nothing in flight: nothing read
        tx.stream("r", (chunks - 1) * n, n, table, last=True)
        assert [(e.kind, e.state) for e in _events(tx, "done")][-1] == ("sent", "done")
        assert torch.equal(dst.data[:, :, :chunks], src.data[:, :, :chunks])
    finally:
        tx.close()
        rx.close()
