"""The KV connector's worker side: what one holder of KV (see types.py) does with its paged cache.

Prefill role: a request carries a `KVSink`. After every step the holder copies the chunk it just
computed out of its cache (`gather_chunk`: its layers, its TP heads) and sends it with a
`KVStreamer`; a chunk crossing a decode group boundary is split there. The staging copy is what the
transfer owns until the receiver confirms, so the prefill cache can be reused at once.

Decode role: a `KVIntake` binds a receiver to the holder's cache; `expect()` registers a request's
token range in blocks the scheduler side reserved; the KV is written there directly.

`KVWorker` ties both to one holder and reports terminal states as `KVEvent`s: polled in-process by
the LocalExecutor, or pushed by a watcher thread over the control socket by a grid worker.
Ownership: the worker side never allocates or frees blocks; it writes only into the block tables it
is given and forgets a request on `cancel` (the scheduler side owns the blocks).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from common.errors import KVTransferError, MnemosyneError
from common.kv_cache.paged import PagedKVCache
from common.kv_connector.types import PROGRESS_PERIOD_S, KVAck, KVEvent, KVSink
from common.kv_transfer import KVChunk, KVDest, KVLayout, TransferState, make_receiver, make_sender

log = logging.getLogger(__name__)

NO_GROUPS = 1 << 62                # kvp_tokens of a holder whose single group holds every token


def gather_chunk(cache: PagedKVCache, table: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [layers, end - start, Hkv, D] of table positions [start, end), copied out of the cache."""
    slots = torch.tensor(cache.slots(table, start, end), dtype=torch.long)
    ks, vs = [], []
    for layer in cache.layers:
        k, v = cache.k(layer), cache.v(layer)
        ks.append(k.view(-1, *k.shape[2:]).index_select(0, slots))
        vs.append(v.view(-1, *v.shape[2:]).index_select(0, slots))
    return torch.stack(ks), torch.stack(vs)


class KVStreamer:
    """Sends chunks of requests to their sinks from one holder of KV (one TP rank of one stage)."""

    def __init__(self, layout: KVLayout, tp_rank: int = 0, connect_timeout_s: float = 10.0,
                 send_timeout_s: float = 60.0) -> None:
        self.layout = layout
        self.tp_rank = tp_rank
        self.connect_timeout_s = connect_timeout_s
        self.send_timeout_s = send_timeout_s
        self.senders: dict[tuple[str, str], object] = {}
        # Each request's sends not yet confirmed, and how many were: status() is polled every few ms
        # by a grid worker's watcher, under the lock its streaming thread takes after every chunk, so
        # it looks only at the sends in flight (scanning every handle, ~25,000 of them late in a
        # 1M-token prefill, made each poll tens of ms and the whole prefill O(chunks^2)).
        self.pending: dict[str, list] = {}
        self.done: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        self.sealed: set[str] = set()          # requests whose last chunk has been sent
        self.sent_upto: dict[tuple[str, int, int], int] = {}   # (request, layers) -> tokens sent

    def send(self, request_id: str, sink: KVSink, layers: range, start: int, k: torch.Tensor,
             v: torch.Tensor, last: bool) -> None:
        """k, v [len(layers), n, Hkv, D]: tokens [start, start + n) of `request_id`.

        Tokens below what was already sent for these layers are skipped: a request preempted and
        recomputed (after its blocks were freed) passes the same positions again, and the receiver takes
        each cell exactly once. What it has is the KV of the same tokens at the same positions. So are
        the tokens each decode group holds already (its prefix cache: GroupSink.cached)."""
        key = (request_id, layers.start, layers.stop)
        m, end = sink.kvp_tokens, start + k.shape[1]
        pos = sink.skip_cached(max(start, self.sent_upto.get(key, 0)))
        self.sent_upto[key] = max(end, self.sent_upto.get(key, 0))
        handles = self.pending.setdefault(request_id, [])
        try:
            while pos < end:
                g = pos // m
                stop = min(end, (g + 1) * m)
                if g >= len(sink.groups):
                    raise KVTransferError(f"{request_id}: token {pos} is beyond the decode placement "
                                          f"({len(sink.groups)} groups of {m})")
                gs = sink.groups[g]
                sender = self._sender(sink.backend, gs.addresses[self.tp_rank])
                chunk = KVChunk(request_id, (layers.start, layers.stop), (pos, stop),
                                k[:, pos - start:stop - start].contiguous(), v[:, pos - start:stop - start].contiguous(),
                                epoch=sink.epoch)
                handles.append(sender.send(chunk, KVDest(gs.block_table, gs.token_start), self.send_timeout_s))
                pos = sink.skip_cached(stop)
        except KVTransferError as e:
            self.errors[request_id] = str(e)
        if last:
            self.sealed.add(request_id)

    def _sender(self, backend: str, address: str):
        key = (backend, address)
        sender = self.senders.get(key)
        if sender is None:
            sender = make_sender(backend, self.layout)
            sender.connect(address, self.connect_timeout_s)
            self.senders[key] = sender
        return sender

    def _sweep(self, request_id: str) -> None:
        """Takes the request's terminal sends out of its pending list: DONE ones are counted, the
        first FAILED one's reason fails the request."""
        pending = self.pending.get(request_id)
        if not pending:
            return
        keep = []
        for h in pending:
            state = h.state                      # (a send past its deadline fails here)
            if state is TransferState.DONE:
                self.done[request_id] = self.done.get(request_id, 0) + 1
            elif state is TransferState.FAILED:
                self.errors.setdefault(request_id, h.reason or "KV transfer failed")
            else:
                keep.append(h)
        self.pending[request_id] = keep

    def status(self, request_id: str) -> tuple[str, str | None]:
        """("pending" | "done" | "failed", reason). Done needs the last chunk sent and every send DONE."""
        self._sweep(request_id)
        if request_id in self.errors:
            return "failed", self.errors[request_id]
        if request_id in self.sealed and not self.pending.get(request_id):
            return "done", None
        return "pending", None

    def confirmed(self, request_id: str) -> int:
        """Chunks of the request the receivers have confirmed so far."""
        self._sweep(request_id)
        return self.done.get(request_id, 0)

    def forget(self, request_id: str) -> None:
        self.pending.pop(request_id, None)
        self.done.pop(request_id, None)
        self.errors.pop(request_id, None)
        self.sealed.discard(request_id)
        for key in [k for k in self.sent_upto if k[0] == request_id]:
            del self.sent_upto[key]

    def close(self) -> None:
        for s in self.senders.values():
            try:
                s.close()
            except Exception:  # noqa: BLE001 - closing a broken connection must not mask the shutdown
                log.exception("closing a KV sender")
        self.senders.clear()


class KVIntake:
    """Decode side: a receiver bound to this holder's cache."""

    def __init__(self, backend: str, layout: KVLayout, cache: PagedKVCache, host: str = "127.0.0.1") -> None:
        caches = {layer: (cache.k(layer), cache.v(layer)) for layer in cache.layers}
        self.receiver = make_receiver(backend, layout, caches, address=f"{host}:0")
        self.layers = cache.layers
        self.expected: set[str] = set()
        self.poisoned: dict[str, set[int]] = {}   # rid -> blocks a late write may land in (take_poisoned)

    @property
    def address(self) -> str:
        return self.receiver.address

    def expect(self, request_id: str, table: list[int], token_start: int, num_tokens: int, epoch: int = 0,
               have: int = 0) -> None:
        self.receiver.expect(request_id, table, token_start, self.layers, num_tokens, epoch=epoch, have=have)
        self.expected.add(request_id)

    def arrived(self) -> dict[str, int]:
        """Cells written so far of every expected request."""
        return {rid: self.receiver.arrived(rid) for rid in list(self.expected)}

    def poll(self) -> dict[str, tuple[str, str | None]]:
        """Expected requests that reached a terminal state: {rid: ("done"|"failed", reason)}."""
        out = {}
        for rid in list(self.expected):
            state = self.receiver.state(rid)
            if state is TransferState.DONE:
                out[rid] = ("done", None)
            elif state is TransferState.FAILED:
                out[rid] = ("failed", self.receiver.reason(rid) or "KV transfer failed")
            else:
                continue
            self.cancel(rid)                     # the KV stays in the cache; only tracking is dropped
        return out

    def cancel(self, request_id: str) -> None:
        self.expected.discard(request_id)
        try:
            blocks = self.receiver.cancel(request_id)
        except KVTransferError:
            return                               # never registered, or already forgotten
        if blocks:
            self.poisoned.setdefault(request_id, set()).update(blocks)

    def take_poisoned(self, request_id: str) -> set[int]:
        """The request's blocks a granted write may still land in, found by its cancels (here, or
        when it failed): the scheduler side withholds them for good."""
        return self.poisoned.pop(request_id, set())

    def close(self) -> None:
        self.receiver.close()


class KVWorker:
    """One holder's KV connector. `group`: its KVP group, which holds the request tokens
    [group * kvp_tokens, (group + 1) * kvp_tokens); `tp_rank`: which receiver of a decode group its
    heads go to. The receiver is bound on first use (`address`, `expect`); `receive=False` refuses
    to receive (a grid with spp > 1 cannot). Thread-safe: a grid worker's watcher thread polls
    events while its main thread streams."""

    def __init__(self, holder: int, layout: KVLayout, cache: PagedKVCache, backend: str, host: str,
                 tp_rank: int = 0, group: int = 0, kvp_tokens: int = NO_GROUPS, receive: bool = True) -> None:
        self.holder = holder
        self.layout = layout
        self.cache = cache
        self.backend, self.host = backend, host
        self.group = group
        self.kvp_tokens = kvp_tokens
        self.receive = receive
        self.streamer = KVStreamer(layout, tp_rank)
        self._intake: KVIntake | None = None
        self.sinks: dict[str, KVSink] = {}
        self.sealed: set[str] = set()          # last chunk sent, terminal state not yet reported
        self.reported: dict[tuple[str, str], int] = {}   # (kind, request) -> its count at the last progress event
        self.next_progress = 0.0               # time.monotonic() of the next progress report
        self.lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def intake(self) -> KVIntake | None:
        if self._intake is None and self.receive:
            self._intake = KVIntake(self.backend, self.layout, self.cache, self.host)
        return self._intake

    @property
    def address(self) -> str | None:
        """This holder's KV receiver "host:port" (None when it cannot receive)."""
        intake = self.intake
        return intake.address if intake is not None else None

    # ---- prefill role --------------------------------------------------------------------------
    def stream(self, rid: str, start: int, n: int, table: list[int], last: bool, sink: KVSink | None = None) -> None:
        """After the forward pass wrote tokens [start, start + n) of `rid` at `table` (this group's
        table): sends them if the request has a sink (`sink` registers one; the scheduler side
        passes it with the request's first chunk). `last`: the chunk ends the prompt."""
        if sink is not None:
            self.sinks[rid] = sink
        sink = self.sinks.get(rid)
        if sink is None:
            return
        # Tokens before `start` never sent were not computed here: their KV came from the prefix
        # cache (blocks of `table` too). They go first; the streamer skips whatever was sent already.
        layers = self.cache.layers
        with self.lock:
            lo = min(start, self.streamer.sent_upto.get((rid, layers.start, layers.stop), 0))
            lo = min(sink.skip_cached(lo), start + n)                 # never gather what is not sent
            k, v = gather_chunk(self.cache, table, lo, start + n)     # [layers, n', Hkv, D] each
            self.streamer.send(rid, sink, layers, lo, k, v, last)
            if last:
                self.sinks.pop(rid, None)
                self.sealed.add(rid)

    # ---- decode role ---------------------------------------------------------------------------
    def expect(self, rid: str, tables: list[list[int]], num_tokens: int, epoch: int = 0,
               cached: int | list[int] = 0) -> KVAck:
        """Registers this group's part of a request whose prompt has `num_tokens` tokens (`tables`:
        one block table per KVP group), to be sent under placement `epoch`; tokens in the tables
        already (the prefix cache) will not be sent: `cached` is the prompt's first `cached` tokens,
        or per group its leading tokens held. Never raises: a failure is the ack's error; a group
        with nothing to receive acks not ok, without an error."""
        g0 = self.group * self.kvp_tokens
        n = max(0, min(num_tokens - g0, self.kvp_tokens))
        if isinstance(cached, list):
            have = max(0, min(cached[self.group] if self.group < len(cached) else 0, n))
        else:
            have = max(0, min(cached - g0, n))
        if n == have:
            return KVAck(self.holder, rid, False)
        try:
            intake = self.intake
            if intake is None:
                return KVAck(self.holder, rid, False, "this layout cannot receive KV (spp > 1)")
            with self.lock:
                intake.expect(rid, tables[self.group], g0, n, epoch, have)
        except MnemosyneError as e:
            return KVAck(self.holder, rid, False, str(e))
        return KVAck(self.holder, rid, True)

    def cancel(self, rid: str) -> list[int]:
        """Forgets the request; returns the blocks of this holder's table a late write may still land
        in (KVIntake.take_poisoned; sorted)."""
        with self.lock:
            self.sinks.pop(rid, None)
            self.sealed.discard(rid)
            self.streamer.forget(rid)
            self.reported.pop(("sent", rid), None)
            self.reported.pop(("recv", rid), None)
            if self._intake is None:
                return []
            self._intake.cancel(rid)
            return sorted(self._intake.take_poisoned(rid))

    # ---- reporting -----------------------------------------------------------------------------
    def poll_events(self) -> list[KVEvent]:
        """Terminal states reached since the last call; each request is reported once per kind."""
        events = []
        with self.lock:
            now = time.monotonic()
            report = now >= self.next_progress           # progress: at most every PROGRESS_PERIOD_S
            if report:
                self.next_progress = now + PROGRESS_PERIOD_S
            for rid in self.sealed | self.sinks.keys():     # a failure ends a stream at once
                state, reason = self.streamer.status(rid)
                if state != "pending":
                    events.append(KVEvent(self.holder, "sent", rid, state, reason))
                    self.sealed.discard(rid)
                    self.sinks.pop(rid, None)
                    self.streamer.forget(rid)
                    self.reported.pop(("sent", rid), None)
                elif report:
                    self._progress(events, "sent", rid, self.streamer.confirmed(rid))
            if self._intake is not None and self._intake.expected:
                if report:
                    for rid, cells in self._intake.arrived().items():
                        self._progress(events, "recv", rid, cells)
                for rid, (state, reason) in self._intake.poll().items():
                    self.reported.pop(("recv", rid), None)
                    events.append(KVEvent(self.holder, "recv", rid, state, reason))
        return events

    def _progress(self, events: list[KVEvent], kind: str, rid: str, count: int) -> None:
        if count > self.reported.get((kind, rid), 0):
            self.reported[(kind, rid)] = count
            events.append(KVEvent(self.holder, kind, rid, "progress"))

    def report_to(self, notify: Callable[[KVEvent], None], period_s: float = 0.002) -> None:
        """Starts a thread that passes every event to `notify` (a grid worker: to its driver)."""
        def watch() -> None:
            while not self._stopped.wait(period_s):
                for ev in self.poll_events():
                    notify(ev)
        self._thread = threading.Thread(target=watch, name="kv-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(2.0)
        try:
            self.streamer.close()
            if self._intake is not None:
                self._intake.close()
        except MnemosyneError:
            log.exception("closing KV transfer")
