"""The control plane of a grid: length-prefixed messages over plain TCP between the driver and every
worker (plans out, results back). Sockets can be waited on with a timeout and a liveness check, which
gloo's point-to-point receives cannot (their completion is only observable by a blocking wait).
Bulk tensors (hidden states) go over gloo, always posted right after the plan that announces them.
"""
from __future__ import annotations

import json
import select
import socket
import struct
import time
from typing import Callable

from common.errors import WorkerFailedError

_LEN = struct.Struct("!I")


def send_msg(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_msg(sock: socket.socket, timeout_s: float, alive: Callable[[], str | None] | None = None,
             what: str = "peer") -> bytes:
    """Reads one message; raises WorkerFailedError on timeout, closed peer, or when alive() reports."""
    deadline = time.monotonic() + timeout_s
    header = _read(sock, _LEN.size, deadline, alive, what)
    return _read(sock, _LEN.unpack(header)[0], deadline, alive, what)


def _read(sock, n: int, deadline: float, alive, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WorkerFailedError(f"no message from {what} within the timeout")
        ready, _, _ = select.select([sock], [], [], min(left, 0.5))
        if not ready:
            err = alive() if alive else None
            if err:
                raise WorkerFailedError(err)
            continue
        try:
            chunk = sock.recv(n - len(buf))
        except OSError as e:
            raise WorkerFailedError(f"{what}: connection lost ({e.strerror or e})") from e
        if not chunk:
            raise WorkerFailedError(f"{what} closed the connection")
        buf += chunk
    return bytes(buf)


class ControlServer:
    """Driver side: accepts one connection per worker rank."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self.peers: dict[int, socket.socket] = {}
        self.hello: dict[int, dict] = {}           # what each worker said when it connected

    def accept(self, ranks: list[int], timeout_s: float, alive=None) -> None:
        deadline = time.monotonic() + timeout_s
        self.sock.settimeout(0.5)
        while len(self.peers) < len(ranks):
            if time.monotonic() > deadline:
                raise WorkerFailedError(f"only {len(self.peers)} of {len(ranks)} workers connected "
                                        f"within {timeout_s:.0f} s")
            err = alive() if alive else None
            if err:
                raise WorkerFailedError(err)
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = json.loads(recv_msg(conn, timeout_s, what="a connecting worker"))
            self.peers[hello["rank"]] = conn
            self.hello[hello["rank"]] = hello

    def serve_joins(self, ranks: list[int], payload: dict, timeout_s: float) -> None:
        """Remote workers first connect to fetch their configuration (`payload` plus their rank)."""
        deadline = time.monotonic() + timeout_s
        self.sock.settimeout(0.5)
        joined: set[int] = set()
        while joined != set(ranks):
            if time.monotonic() > deadline:
                missing = sorted(set(ranks) - joined)
                raise WorkerFailedError(f"workers {missing} did not join within {timeout_s:.0f} s")
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            with conn:
                hello = json.loads(recv_msg(conn, 30.0, what="a joining worker"))
                rank = hello.get("rank")
                if rank not in ranks or rank in joined:
                    send_msg(conn, json.dumps({"error": f"rank {rank} is not expected"}).encode())
                    continue
                send_msg(conn, json.dumps({**payload, "rank": rank}).encode())
                joined.add(rank)

    def recv_any(self, timeout_s: float, alive=None) -> tuple[int, bytes] | None:
        """One message from whichever worker has one (None after `timeout_s` with none)."""
        socks = {conn: rank for rank, conn in self.peers.items()}
        ready, _, _ = select.select(list(socks), [], [], timeout_s)
        if not ready:
            err = alive() if alive else None
            if err:
                raise WorkerFailedError(err)
            return None
        # A dead worker's connection reads as ready (closed): the live ones' messages are read first,
        # so that what a survivor reported (a KV intake done) is not lost behind the failure.
        error = None
        for sock in sorted(ready, key=lambda c: socks[c]):
            try:
                return socks[sock], recv_msg(sock, 30.0, alive, f"worker rank {socks[sock]}")
            except WorkerFailedError as e:
                error = error or e
        raise error

    def broadcast(self, data: bytes) -> None:
        for rank, conn in self.peers.items():
            try:
                send_msg(conn, data)
            except OSError as e:
                raise WorkerFailedError(f"worker rank {rank}: connection lost ({e.strerror or e})") from e

    def close(self) -> None:
        for conn in self.peers.values():
            conn.close()
        self.sock.close()


def connect(host: str, port: int, rank: int, timeout_s: float, **hello) -> socket.socket:
    """Worker side: connects to the driver's control server, retrying until it listens."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise WorkerFailedError(f"cannot reach the driver at {host}:{port}")
            time.sleep(0.1)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    send_msg(sock, json.dumps({"rank": rank, **hello}).encode())
    return sock
