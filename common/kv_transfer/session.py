"""The machinery both backends share: the TCP control channel, handshake, handle table, deadlines
and failure propagation (SenderBase), and the listener, per-sender threads and request tracking
(ReceiverBase). A backend adds only its data path (tcp.py: bytes in the frame; nixl.py: a grant
followed by an RDMA WRITE and a NIXL notification).

Threads: a sender has one reader thread (acks/grants); a receiver has one accept thread and one
thread per connected sender. Every blocking read is unblocked by closing the socket; every wait
has a deadline.
"""
from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
import uuid
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from common.errors import KVTransferError
from common.kv_transfer.base import (Caches, KVChunk, KVDest, KVLayout, KVReceiver, KVSender,
                                     TransferHandle, TransferState, blocks_crc, kv_checksum)
from common.kv_transfer.tracker import ChunkRejected, Reservation, RequestTracker
from common.kv_transfer.wire import VERSION, Conn, parse_address

log = logging.getLogger(__name__)


class SenderBase(KVSender):
    def __init__(self, layout: KVLayout, name: str | None = None) -> None:
        self.layout = layout
        self.name = name or f"kv-{self.backend}-sender-{uuid.uuid4().hex[:12]}"
        self._conn: Conn | None = None
        self._lock = threading.Lock()
        self._handles: dict[int, TransferHandle] = {}
        self._seq = itertools.count(1)
        self._failed: str | None = None
        self._closed = False
        self._reader: threading.Thread | None = None

    # ---- backend hooks ------------------------------------------------------------------------
    def _hello_extra(self) -> dict[str, Any]:
        return {}

    def _on_welcome(self, header: dict[str, Any], payload: bytes) -> None:
        pass

    @abstractmethod
    def _start(self, handle: TransferHandle, chunk: KVChunk, header: dict[str, Any],
               runs: list[tuple[int, int, int]]) -> None:
        """Starts moving the chunk; the control frame to send is `header`."""

    def _on_grant(self, seq: int) -> None:
        raise KVTransferError(f"{self.backend} sender got an unexpected grant")

    def _on_failed(self) -> None:
        """Connection is gone: stop every backend operation still using a source buffer."""

    # ---- public -------------------------------------------------------------------------------
    def connect(self, peer_address: str, timeout: float = 10.0) -> None:
        if self._conn is not None:
            raise KVTransferError(f"{self.name} is already connected")
        try:
            sock = socket.create_connection(parse_address(peer_address), timeout=timeout)
        except OSError as e:
            raise KVTransferError(f"cannot connect to KV receiver at {peer_address}: {e}") from e
        conn = Conn(sock)
        try:
            conn.send({"type": "hello", "version": VERSION, "backend": self.backend, "sender": self.name,
                       "layout": self.layout.to_dict(), **self._hello_extra()})
            header, payload = conn.recv_frame()
        except (OSError, KVTransferError) as e:
            conn.close()
            raise KVTransferError(f"handshake with {peer_address} failed: {e}") from e
        if header.get("type") != "welcome" or not header.get("ok"):
            conn.close()
            raise KVTransferError(f"receiver at {peer_address} refused: {header.get('reason', header)}")
        try:
            self.layout.require_compatible(KVLayout.from_dict(header["layout"]), "at the sender",
                                           "at the receiver")
            self._on_welcome(header, payload)
        except BaseException:
            conn.close()
            raise
        sock.settimeout(None)
        self._conn = conn
        self._reader = threading.Thread(target=self._read_loop, name=f"{self.name}-reader", daemon=True)
        self._reader.start()

    def send(self, chunk: KVChunk, dest: KVDest, timeout: float = 30.0) -> TransferHandle:
        chunk.validate(self.layout)
        runs = dest.slot_runs(chunk.tokens, self.layout.block_size)
        with self._lock:
            if self._conn is None or self._closed:
                raise KVTransferError(f"{self.name} is not connected")
            if self._failed:
                raise KVTransferError(f"{self.name} connection failed earlier: {self._failed}")
            handle = TransferHandle(next(self._seq), chunk.request_id, time.monotonic() + timeout, self._expire)
            self._handles[handle.seq] = handle
        header = {"type": "chunk", "seq": handle.seq, "request_id": chunk.request_id,
                  "layers": list(chunk.layers), "tokens": list(chunk.tokens), "group_start": dest.group_start,
                  "blocks_crc": blocks_crc(dest.block_table, self.layout.block_size, dest.group_start,
                                           chunk.tokens),
                  "epoch": chunk.epoch, "xxh3": kv_checksum(chunk.k, chunk.v)}
        try:
            self._start(handle, chunk, header, runs)
        except KVTransferError as e:   # refused before anything moved: the connection stays usable
            self._fail_one(handle.seq, str(e))
            raise
        except OSError as e:
            self._fail(f"starting transfer {handle.seq} failed: {e}")
        return handle

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conn, healthy = self._conn, self._failed is None
        if conn is not None and healthy:
            try:
                conn.send({"type": "bye"})
            except OSError:
                pass
        self._fail("sender closed")
        if self._reader is not None:
            self._reader.join(timeout=5.0)

    # ---- internals ----------------------------------------------------------------------------
    def _read_loop(self) -> None:
        assert self._conn is not None
        try:
            while True:
                header, plen = self._conn.recv_header()
                if plen:
                    self._conn.skip(plen)
                kind = header["type"]
                if kind == "ack":
                    with self._lock:
                        handle = self._handles.pop(int(header["seq"]), None)
                    if handle is not None:
                        ok = bool(header.get("ok"))
                        handle._advance(TransferState.DONE if ok else TransferState.FAILED,
                                        None if ok else f"receiver refused: {header.get('reason')}")
                elif kind == "grant":
                    self._on_grant(int(header["seq"]))
                else:
                    raise KVTransferError(f"unexpected message {kind!r} from the receiver")
        except (OSError, KVTransferError, KeyError, ValueError) as e:
            self._fail("sender closed" if self._closed else f"receiver connection lost: {e}")

    def _expire(self, handle: TransferHandle) -> None:
        # The protocol is ordered: a transfer not confirmed in time means the peer or the path is
        # stuck, so the whole connection is failed (which also stops any write still in flight).
        secs = max(0.0, time.monotonic() - handle.deadline)
        self._fail(f"transfer {handle.seq} of request {handle.request_id} not confirmed before its "
                   f"deadline (expired {secs:.1f} s ago)")

    def _fail(self, reason: str) -> None:
        with self._lock:
            first = self._failed is None
            if first:
                self._failed = reason
            handles, self._handles = list(self._handles.values()), {}
        if first:
            if reason != "sender closed":
                log.warning("%s: %s", self.name, reason)
            self._on_failed()   # first stop every write still reading a source buffer
            if self._conn is not None:
                self._conn.close()
        for h in handles:
            h._advance(TransferState.FAILED, self._failed)

    def _fail_one(self, seq: int, reason: str) -> None:
        with self._lock:
            handle = self._handles.pop(seq, None)
        if handle is not None:
            handle._advance(TransferState.FAILED, reason)


class ReceiverBase(KVReceiver):
    def __init__(self, layout: KVLayout, caches: Caches, address: str = "127.0.0.1:0") -> None:
        self.layout = layout
        self.caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = dict(caches)
        self.num_blocks = self._check_caches(layout, self.caches)
        self._tracker = RequestTracker(layout.block_size, self.num_blocks, list(self.caches))
        self._closing = False
        self._conns: dict[int, Conn] = {}
        self._conns_lock = threading.Lock()
        host, port = parse_address(address)
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.settimeout(0.25)
        self._address = f"{host}:{self._listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name=f"kv-recv-{self._address}", daemon=True)
        self._accept.start()

    @staticmethod
    def _check_caches(layout: KVLayout, caches: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> int:
        if not caches:
            raise KVTransferError("receiver needs the cache tensors of at least one layer")
        nb = None
        for l, (k, v) in caches.items():
            if not 0 <= l < layout.num_layers:
                raise KVTransferError(f"cache layer {l} outside [0, {layout.num_layers})")
            for name, t in (("K", k), ("V", v)):
                ok = (t.dim() == 4 and tuple(t.shape[1:]) == (layout.block_size, layout.num_kv_heads,
                                                              layout.head_dim)
                      and t.dtype == layout.torch_dtype and t.is_contiguous() and t.device.type == "cpu")
                if not ok:
                    raise KVTransferError(f"layer {l} {name} cache {tuple(t.shape)} {t.dtype} {t.device} "
                                          f"does not match the layout [num_blocks, {layout.block_size}, "
                                          f"{layout.num_kv_heads}, {layout.head_dim}] {layout.dtype}, "
                                          "contiguous, cpu")
                if nb is None:
                    nb = t.shape[0]
                elif t.shape[0] != nb:
                    raise KVTransferError(f"layer {l} {name} cache has {t.shape[0]} blocks, others {nb}")
        assert nb is not None
        return nb

    # ---- backend hooks ------------------------------------------------------------------------
    def _welcome_extra(self, conn: Conn, hello: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """Backend fields for the welcome header, and its payload; raise KVTransferError to refuse."""
        return {}, b""

    @abstractmethod
    def _on_chunk(self, conn: Conn, header: dict[str, Any], plen: int, res: Reservation | None,
                  rejected: str | None) -> None:
        """Handles a chunk frame whose cells were reserved (`res`) or refused (`rejected`)."""

    def _on_frame(self, conn: Conn, header: dict[str, Any], plen: int) -> None:
        raise KVTransferError(f"unexpected message {header['type']!r} from the sender")

    def _on_conn_closed(self, conn: Conn) -> None:
        pass

    # ---- public -------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return self._address

    def expect(self, request_id: str, block_table, group_token_start: int, layers, num_tokens: int,
               epoch: int = 0, have: int = 0) -> None:
        self._tracker.expect(request_id, list(block_table), group_token_start, list(layers), num_tokens, epoch,
                             have)

    def poll(self) -> dict[str, TransferState]:
        return self._tracker.states()

    def state(self, request_id: str) -> TransferState:
        return self._tracker.state(request_id)[0]

    def reason(self, request_id: str) -> str | None:
        return self._tracker.state(request_id)[1]

    def arrived(self, request_id: str) -> int:
        return self._tracker.arrived(request_id)

    def wait_complete(self, request_id: str, timeout: float) -> bool:
        return self._tracker.wait(request_id, timeout)

    def cancel(self, request_id: str) -> set[int]:
        """(TCP: a chunk's bytes are written under the tracker's lock, checked live, so once the
        request is forgotten nothing more lands: no block to withhold.)"""
        self._tracker.cancel(request_id)
        return set()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._accept.join(timeout=5.0)
        self._listener.close()
        with self._conns_lock:
            conns = list(self._conns.values())
        for c in conns:
            c.close()
        for t in self._threads:
            t.join(timeout=5.0)
        self._tracker.fail_all("receiver closed")

    # ---- internals ----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(sock,), name=f"kv-conn-{self._address}", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _handshake(self, conn: Conn) -> bool:
        conn.sock.settimeout(10.0)
        hello, _ = conn.recv_frame()
        reason = None
        if hello.get("type") != "hello" or hello.get("version") != VERSION:
            reason = f"expected hello version {VERSION}, got {hello.get('type')} {hello.get('version')}"
        elif hello.get("backend") != self.backend:
            reason = f"backend: {self.backend!r} here, {hello.get('backend')!r} at the sender"
        else:
            try:
                self.layout.require_compatible(KVLayout.from_dict(hello.get("layout", {})),
                                               "at the receiver", "at the sender")
            except KVTransferError as e:
                reason = str(e)
        if reason:
            log.warning("refusing KV sender %s: %s", hello.get("sender"), reason)
            conn.send({"type": "welcome", "ok": False, "reason": reason, "layout": self.layout.to_dict()})
            return False
        try:
            extra, payload = self._welcome_extra(conn, hello)
        except KVTransferError as e:
            conn.send({"type": "welcome", "ok": False, "reason": str(e), "layout": self.layout.to_dict()})
            return False
        conn.send({"type": "welcome", "ok": True, "layout": self.layout.to_dict(), **extra}, [payload])
        conn.sock.settimeout(None)
        return True

    def _serve(self, sock: socket.socket) -> None:
        conn = Conn(sock)
        with self._conns_lock:
            self._conns[conn.id] = conn
        said_bye = False
        try:
            if not self._handshake(conn):
                return
            while True:
                header, plen = conn.recv_header()
                kind = header["type"]
                if kind == "bye":
                    said_bye = True
                    return
                if kind == "chunk":
                    res, rejected = None, None
                    try:
                        res = self._tracker.begin(conn.id, str(header["request_id"]), _pair(header["layers"]),
                                                  _pair(header["tokens"]), int(header["group_start"]),
                                                  int(header["blocks_crc"]), int(header.get("epoch", 0)))
                    except ChunkRejected as e:
                        rejected = str(e)
                    self._on_chunk(conn, header, plen, res, rejected)
                else:
                    self._on_frame(conn, header, plen)
        except (OSError, KVTransferError, KeyError, ValueError, TypeError) as e:
            if not self._closing:
                log.info("KV sender connection %d closed: %s", conn.id, e)
        finally:
            with self._conns_lock:
                self._conns.pop(conn.id, None)
            self._on_conn_closed(conn)
            self._tracker.conn_lost(conn.id, said_bye)
            conn.close()


def _pair(x: Any) -> tuple[int, int]:
    a, b = x
    return int(a), int(b)
