"""Receiver-side bookkeeping: which (layer, token) cells of each expected request have arrived.

Pure Python and thread-safe. A chunk goes through begin() (validated and its cells reserved, so a
duplicate or overlapping chunk is refused before any byte is written), then write() for each piece
the backend copies into the cache itself (run under the lock, only while the reservation is live, so
cancel() never races a write into blocks it has just given up), then commit() or abort(). A request is DONE when every expected layer has exactly `num_tokens` cells; since reserved
ranges never overlap, the count proves every cell arrived exactly once.

Epochs: a request is registered with its placement's epoch; a chunk with another is refused (the
request is left as it is: the stale sender is told, the live one goes on).

Failure rules: a chunk that contradicts the registration (unknown layers, tokens outside the group's
range, different block table or group start, duplicate cells) fails its request; so does a sender
connection that breaks with a chunk of the request in flight, or that vanishes without saying bye
after feeding an incomplete request. FAILED and DONE are terminal.
"""
from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from common.errors import KVTransferError
from common.kv_transfer.base import TransferState, blocks_crc


#: How the refusal of a chunk of another placement epoch starts.
STALE_EPOCH = "stale placement epoch"


class ChunkRejected(Exception):
    """The chunk was refused before anything was written; the message says why."""


@dataclass(eq=False)
class Reservation:
    id: int
    conn_id: int
    request_id: str
    layers: tuple[int, int]
    tokens: tuple[int, int]
    block_table: tuple[int, ...]
    group_start: int
    resolved: threading.Event = field(default_factory=threading.Event)

    def blocks(self, block_size: int) -> list[int]:
        """The blocks of the table its cells lie in."""
        lo, hi = self.tokens[0] - self.group_start, self.tokens[1] - self.group_start
        return list(self.block_table[lo // block_size:-(-hi // block_size)])


class _Request:
    def __init__(self, block_table: Sequence[int], group_start: int, layers: Sequence[int],
                 num_tokens: int, epoch: int = 0, have: int = 0) -> None:
        self.epoch = epoch
        self.block_table = tuple(int(b) for b in block_table)
        self.group_start = group_start
        self.num_tokens = num_tokens
        held = [(group_start, group_start + have)] if have else []       # a cached prefix, never sent
        self.arrived: dict[int, list[tuple[int, int]]] = {l: list(held) for l in layers}  # merged intervals
        self.counts = dict.fromkeys(layers, have)
        self.layers_left = len(self.counts)
        self.open: dict[int, Reservation] = {}
        self.feeders: set[int] = set()
        self.state = TransferState.PENDING
        self.reason: str | None = None


def _overlaps(intervals: list[tuple[int, int]], a: int, b: int) -> bool:
    i = bisect.bisect_right(intervals, (a, float("inf")))
    return (i > 0 and intervals[i - 1][1] > a) or (i < len(intervals) and intervals[i][0] < b)


def _insert(intervals: list[tuple[int, int]], a: int, b: int) -> None:
    i = bisect.bisect_left(intervals, (a, b))
    if i > 0 and intervals[i - 1][1] == a:
        i -= 1
        a = intervals.pop(i)[0]
    if i < len(intervals) and intervals[i][0] == b:
        b = intervals.pop(i)[1]
    intervals.insert(i, (a, b))


class RequestTracker:
    def __init__(self, block_size: int, num_blocks: int, layers: Sequence[int]) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.held_layers = frozenset(layers)
        self._requests: dict[str, _Request] = {}
        self._cond = threading.Condition()
        self._ids = itertools.count(1)

    # ---- registration -------------------------------------------------------------------------
    def expect(self, request_id: str, block_table: Sequence[int], group_start: int,
               layers: Sequence[int], num_tokens: int, epoch: int = 0, have: int = 0) -> None:
        """See KVReceiver.expect: `have` leading tokens are in the cache already (never sent)."""
        layers = sorted(set(int(l) for l in layers))
        if num_tokens <= 0 or group_start < 0:
            raise KVTransferError(f"expect {request_id}: need num_tokens > 0 and group_token_start >= 0, "
                                  f"got {num_tokens}, {group_start}")
        if not 0 <= have < num_tokens:
            raise KVTransferError(f"expect {request_id}: need 0 <= have < num_tokens, got have={have} "
                                  f"of {num_tokens}")
        if not layers or not self.held_layers.issuperset(layers):
            raise KVTransferError(f"expect {request_id}: layers {layers} not all held here "
                                  f"({sorted(self.held_layers)})")
        need = -(-num_tokens // self.block_size)
        if len(block_table) < need:
            raise KVTransferError(f"expect {request_id}: {num_tokens} tokens need {need} blocks, the "
                                  f"table has {len(block_table)}")
        bad = [b for b in block_table if not 0 <= b < self.num_blocks]
        if bad:
            raise KVTransferError(f"expect {request_id}: block ids {bad[:4]} outside [0, {self.num_blocks})")
        with self._cond:
            if request_id in self._requests:
                raise KVTransferError(f"expect {request_id}: already registered")
            self._requests[request_id] = _Request(block_table[:need], group_start, layers, num_tokens, epoch, have)

    def cancel(self, request_id: str) -> list[Reservation]:
        """Forgets the request; returns its reservations still in flight (they will be refused)."""
        with self._cond:
            req = self._requests.pop(request_id, None)
            self._cond.notify_all()
            return list(req.open.values()) if req else []

    # ---- chunks -------------------------------------------------------------------------------
    def begin(self, conn_id: int, request_id: str, layers: tuple[int, int], tokens: tuple[int, int],
              group_start: int, crc: int, epoch: int = 0) -> Reservation:
        """Reserves a chunk's cells. A chunk of another placement epoch is refused without failing
        the request (a stale sender must not end the live one)."""
        with self._cond:
            req = self._requests.get(request_id)
            if req is None:
                raise ChunkRejected(f"request {request_id} is not expected here (never registered or "
                                    "cancelled)")
            if epoch != req.epoch:
                raise ChunkRejected(f"{STALE_EPOCH}: chunk of {request_id} carries placement epoch {epoch}, "
                                    f"its blocks here were prepared for epoch {req.epoch}")
            if req.state.terminal:
                raise ChunkRejected(f"request {request_id} is already {req.state.value}"
                                    + (f": {req.reason}" if req.reason else ""))
            why = self._check(req, layers, tokens, group_start, crc)
            if why:
                self._fail(req, f"refused chunk layers {list(layers)} tokens {list(tokens)}: {why}")
                raise ChunkRejected(req.reason)
            res = Reservation(next(self._ids), conn_id, request_id, layers, tokens, req.block_table,
                              req.group_start)
            req.open[res.id] = res
            req.feeders.add(conn_id)
            return res

    def _check(self, req: _Request, layers: tuple[int, int], tokens: tuple[int, int], group_start: int,
               crc: int) -> str | None:
        (l0, l1), (t0, t1) = layers, tokens
        g0 = req.group_start
        if group_start != g0:
            return f"sender's group start {group_start} != {g0} registered here"
        if not (l0 < l1 and all(l in req.counts for l in range(l0, l1))):
            return f"layers outside the expected set {sorted(req.counts)}"
        if not (g0 <= t0 < t1 <= g0 + req.num_tokens):
            return f"tokens outside the group's range [{g0}, {g0 + req.num_tokens})"
        if crc != blocks_crc(req.block_table, self.block_size, g0, tokens):
            return "sender's block table differs from the one registered here"
        for l in range(l0, l1):
            if _overlaps(req.arrived[l], t0, t1) or any(
                    r.layers[0] <= l < r.layers[1] and r.tokens[0] < t1 and t0 < r.tokens[1]
                    for r in req.open.values()):
                return f"layer {l} tokens already arrived or in flight (duplicate)"
        return None

    def write(self, res: Reservation, fn: Callable[[], None]) -> bool:
        """Runs `fn` (a write into the reservation's cells) under the lock iff the reservation is still
        live, so a cancel() never races a write into blocks it has just given up. An exception from
        `fn` fails the request. Returns whether it ran and succeeded."""
        with self._cond:
            req = self._requests.get(res.request_id)
            if req is None or res.id not in req.open or req.state is TransferState.FAILED:
                return False
            try:
                fn()
            except Exception as e:  # a failed scatter must fail the request, not kill the server
                self._fail(req, f"writing chunk into the cache failed: {e!r}")
                return False
            return True

    def commit(self, res: Reservation) -> tuple[bool, str | None]:
        """Records the reservation's cells as arrived (the bytes are in the cache by now), unless the
        request was cancelled or failed meanwhile. Returns (ok, reason)."""
        with self._cond:
            res.resolved.set()
            req = self._requests.get(res.request_id)
            if req is None or req.open.pop(res.id, None) is None:
                return False, f"request {res.request_id} was cancelled"
            if req.state is TransferState.FAILED:
                return False, f"request {res.request_id} failed: {req.reason}"
            (l0, l1), (t0, t1) = res.layers, res.tokens
            for l in range(l0, l1):
                _insert(req.arrived[l], t0, t1)
                req.counts[l] += t1 - t0
                if req.counts[l] == req.num_tokens:
                    req.layers_left -= 1
            req.state = TransferState.DONE if req.layers_left == 0 else TransferState.TRANSFERRING
            self._cond.notify_all()
            return True, None

    def abort(self, res: Reservation, reason: str) -> None:
        with self._cond:
            res.resolved.set()
            req = self._requests.get(res.request_id)
            if req is not None and req.open.pop(res.id, None) is not None:
                self._fail(req, reason)

    def conn_lost(self, conn_id: int, said_bye: bool) -> None:
        with self._cond:
            for rid, req in self._requests.items():
                inflight = [r for r in req.open.values() if r.conn_id == conn_id]
                for r in inflight:
                    del req.open[r.id]
                    r.resolved.set()
                if inflight:
                    self._fail(req, "sender connection lost with a chunk in flight")
                elif not said_bye and conn_id in req.feeders:
                    self._fail(req, "sender disconnected without closing before the request completed")

    def fail_all(self, reason: str) -> None:
        with self._cond:
            for req in self._requests.values():
                for r in req.open.values():
                    r.resolved.set()
                req.open.clear()
                self._fail(req, reason)

    def _fail(self, req: _Request, reason: str) -> None:
        if not req.state.terminal:
            req.state, req.reason = TransferState.FAILED, reason
            self._cond.notify_all()

    # ---- queries ------------------------------------------------------------------------------
    def states(self) -> dict[str, TransferState]:
        with self._cond:
            return {rid: req.state for rid, req in self._requests.items()}

    def state(self, request_id: str) -> tuple[TransferState, str | None]:
        with self._cond:
            req = self._requests.get(request_id)
            if req is None:
                raise KVTransferError(f"request {request_id} is not registered here")
            return req.state, req.reason

    def arrived(self, request_id: str) -> int:
        """(layer, token) cells of the request committed so far (0 when it is not registered): grows
        while its KV streams in, so a waiter can tell a slow transfer from a stalled one."""
        with self._cond:
            req = self._requests.get(request_id)
            return sum(req.counts.values()) if req is not None else 0

    def wait(self, request_id: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                req = self._requests.get(request_id)
                if req is None:
                    raise KVTransferError(f"request {request_id} is not registered here (or was cancelled)")
                if req.state is TransferState.DONE:
                    return True
                if req.state is TransferState.FAILED:
                    raise KVTransferError(f"KV of request {request_id} failed: {req.reason}")
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
