"""Framing for the KV transfer control channel (and the TCP backend's data).

A frame is  magic "MKV1" | u32 header length | u64 payload length | JSON header | raw payload bytes.
No pickle: headers are JSON objects with a "type"; payloads are raw tensor bytes.

Messages (sender -> receiver): hello {backend, version, layout, sender, ...}, chunk {seq, request_id,
layers, tokens, group_start, blocks_crc} (+ K bytes then V bytes for TCP; none for NIXL, whose data
goes by RDMA WRITE after a grant), abort {seq, reason}, bye.
(receiver -> sender): welcome {ok, reason, layout, ...} (+ NIXL agent metadata), grant {seq},
ack {seq, ok, reason}.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any

from common.errors import KVTransferError

MAGIC = b"MKV1"
VERSION = 1
_PREFIX = struct.Struct("!4sIQ")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 34


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise KVTransferError(f"bad address {address!r}; expected host:port")
    return host.strip("[]"), int(port)


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fills `view` from the socket; ConnectionError on EOF."""
    got, n = 0, view.nbytes
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"peer closed the connection ({got} of {n} bytes read)")
        got += k


class Conn:
    """A framed socket. Writes are serialized by a lock (several threads may send); reads belong to
    the one thread that owns the connection."""

    _ids = iter(range(1, 1 << 62))

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.id = next(Conn._ids)
        self._wlock = threading.Lock()
        self._prefix = bytearray(_PREFIX.size)

    def send(self, header: dict[str, Any], payload: Sequence[Any] = ()) -> None:
        """payload: objects with the buffer protocol (bytes, 1-D uint8 numpy views of tensors)."""
        hdr = json.dumps(header, separators=(",", ":")).encode()
        views = [memoryview(p).cast("B") for p in payload]
        total = sum(v.nbytes for v in views)
        with self._wlock:
            self.sock.sendall(_PREFIX.pack(MAGIC, len(hdr), total) + hdr)
            for v in views:
                self.sock.sendall(v)

    def recv_header(self) -> tuple[dict[str, Any], int]:
        """The next frame's header and how many payload bytes follow (read them with recv_payload)."""
        recv_exact(self.sock, memoryview(self._prefix))
        magic, hlen, plen = _PREFIX.unpack(self._prefix)
        if magic != MAGIC:
            raise KVTransferError(f"not a KV transfer peer (magic {bytes(magic)!r})")
        if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
            raise KVTransferError(f"frame too large (header {hlen} B, payload {plen} B)")
        raw = bytearray(hlen)
        recv_exact(self.sock, memoryview(raw))
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise KVTransferError(f"malformed frame header: {e}") from e
        if not isinstance(header, dict) or "type" not in header:
            raise KVTransferError("malformed frame header: no type")
        return header, plen

    def recv_payload(self, view: memoryview) -> None:
        recv_exact(self.sock, view)

    def recv_frame(self) -> tuple[dict[str, Any], bytes]:
        """A whole (small) frame: header and payload bytes."""
        header, plen = self.recv_header()
        payload = bytearray(plen)
        self.recv_payload(memoryview(payload))
        return header, bytes(payload)

    def skip(self, n: int) -> None:
        scratch = bytearray(min(n, 1 << 20))
        while n:
            k = min(n, len(scratch))
            recv_exact(self.sock, memoryview(scratch)[:k])
            n -= k

    def close(self) -> None:
        """Unblocks any thread reading or writing this socket, then closes it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
