"""NIXL backend (UCX): the sender WRITEs straight into the receiver's registered cache blocks.

Bootstrap (explicit, over the TCP control channel of session.py): the receiver registers its cache
tensors once; in the welcome it returns its `get_agent_metadata()` (payload bytes) and, as JSON, the
base address of every layer's K and V cache. The sender loads the metadata (`add_remote_agent`).

Per chunk: the sender registers the source K/V, sends a `chunk` frame without payload; the receiver
validates and reserves the cells (tracker.begin) and answers `grant` - so nothing is ever written
into blocks the receiver did not agree to; the sender builds the two descriptor lists in the same
order (layer, then K/V, then contiguous slot run), `initialize_xfer("WRITE", local, remote, peer,
notif=str(seq))` and `transfer`; the receiver learns completion from `get_new_notifs()` (keyed by the
sender's agent name as str), computes the checksum (XXH3-64) of the cells as they landed in its cache (K then V,
layer by layer, in token order: the order of the sender's contiguous chunk) and commits the cells and
acks on the control channel only if it matches the chunk frame's; the handle is DONE only on that ack. A local transfer error is reported with an `abort` frame (the request fails).

NIXL quirks handled here: `add_remote_agent()` returns the peer name as bytes while notification
dicts are keyed by str; the default progress thread busy-polls (pthrDelay 0), costly on small
machines, so both agents run without it and progress UCX from their own threads, which poll only
while a transfer is in flight and sleep `poll_interval` between polls. Without progress on BOTH
sides a transfer never completes (UCX wire-up and the notification need the target to progress).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.errors import KVTransferError
from common.errors import CHECKSUM_MISMATCH
from common.kv_transfer.base import Caches, KVChunk, KVDest, KVLayout, TransferHandle, TransferState, byte_view, kv_hasher
from common.kv_transfer.session import ReceiverBase, SenderBase
from common.kv_transfer.tracker import Reservation
from common.kv_transfer.wire import Conn

try:  # the package is `nixl` upstream, `nixl_cu12` in the CUDA 12 wheel
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError:  # pragma: no cover - depends on the wheel installed
    from nixl_cu12._api import nixl_agent, nixl_agent_config

log = logging.getLogger(__name__)


def _agent(name: str) -> Any:
    return nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))


@dataclass(eq=False)
class _Xfer:
    handle: TransferHandle
    local: np.ndarray                   # [n, 3] (address, bytes, device id), same order as remote
    remote: np.ndarray
    regs: list[tuple[int, int]]         # registration keys of the source tensors
    xh: Any = None                      # nixl_xfer_handle once granted
    sources: tuple[torch.Tensor, ...] = field(default=())


class NixlSender(SenderBase):
    backend = "nixl"

    def __init__(self, layout: KVLayout, name: str | None = None, poll_interval: float = 2e-4) -> None:
        super().__init__(layout, name or f"kv-nixl-sender-{uuid.uuid4().hex[:12]}")
        self._agent = _agent(self.name)
        self._alock = threading.Lock()          # the agent is not thread-safe (sync mode NONE)
        self._poll_interval = poll_interval
        self._peer: Any = None
        self._regions: dict[str, dict[int, int]] = {}
        self._num_blocks = 0
        self._regs: dict[tuple[int, int], list[Any]] = {}   # (ptr, bytes) -> [descs, refcount]
        self._xfers: dict[int, _Xfer] = {}                  # by seq, until the local side is done
        self._leaked: list[_Xfer] = []                      # could not be aborted: keep buffers alive
        self._cond = threading.Condition()
        self._progress = threading.Thread(target=self._progress_loop, name=f"{self.name}-progress", daemon=True)
        self._progress.start()

    # ---- bootstrap ----------------------------------------------------------------------------
    def _hello_extra(self) -> dict[str, Any]:
        return {"agent": self.name}

    def _on_welcome(self, header: dict[str, Any], payload: bytes) -> None:
        try:
            regions = header["regions"]
            self._regions = {kv: {int(l): int(a) for l, a in regions[kv].items()} for kv in ("k", "v")}
            self._num_blocks = int(regions["num_blocks"])
            with self._alock:
                peer = self._agent.add_remote_agent(payload)
        except Exception as e:  # nixl raises its own binding errors
            raise KVTransferError(f"NIXL bootstrap failed: {e!r}") from e
        # Quirk: the peer name comes back as bytes; initialize_xfer accepts it as returned.
        name = peer.decode() if isinstance(peer, bytes) else str(peer)
        if name != header.get("agent"):
            raise KVTransferError(f"NIXL peer announced agent {header.get('agent')!r}, metadata says {name!r}")
        self._peer = peer

    # ---- per chunk ----------------------------------------------------------------------------
    def _start(self, handle: TransferHandle, chunk: KVChunk, header: dict[str, Any],
               runs: list[tuple[int, int, int]]) -> None:
        (l0, l1), (t0, t1) = chunk.layers, chunk.tokens
        missing = [l for l in range(l0, l1) if l not in self._regions["k"]]
        if missing:
            raise KVTransferError(f"receiver does not hold layers {missing}")
        sb = self.layout.slot_bytes
        r = np.asarray(runs, dtype=np.int64)                                  # [R, 3] slot, offset, n
        if int(((r[:, 0] + r[:, 2] - 1) // self.layout.block_size).max()) >= self._num_blocks:
            raise KVTransferError(f"block table names blocks beyond the receiver's {self._num_blocks}")
        k, v = chunk.k.contiguous(), chunk.v.contiguous()
        L, T = l1 - l0, t1 - t0
        layer = np.arange(L, dtype=np.int64)[:, None, None]                  # [L, 1, 1]
        src = np.array([k.data_ptr(), v.data_ptr()], dtype=np.int64)[None, :, None]
        dst = np.array([[self._regions[kv][l0 + i] for kv in ("k", "v")] for i in range(L)],
                       dtype=np.int64)[:, :, None]                             # [L, 2, 1]
        local = src + (layer * T + r[None, None, :, 1]) * sb                   # [L, 2, R]
        remote = dst + r[None, None, :, 0] * sb
        nbytes = np.broadcast_to(r[None, None, :, 2] * sb, local.shape)
        xfer = _Xfer(handle, _descs(local, nbytes), _descs(remote, nbytes), [], sources=(k, v))
        handle.keepalive = (k, v)
        with self._alock:
            try:
                for t in (k, v):
                    xfer.regs.append(self._register(t))
            except Exception as e:  # nixl binding errors
                self._release(xfer)
                raise KVTransferError(f"NIXL could not register the chunk's memory: {e!r}") from e
        with self._cond:
            self._xfers[handle.seq] = xfer
        assert self._conn is not None
        self._conn.send(header)

    def _register(self, t: torch.Tensor) -> tuple[int, int]:
        key = (t.data_ptr(), t.numel() * t.element_size())
        entry = self._regs.get(key)
        if entry is None:
            entry = self._regs[key] = [self._agent.register_memory(t), 0]
        entry[1] += 1
        return key

    def _release(self, xfer: _Xfer) -> bool:
        """Releases the NIXL handle (aborting it if still running) and the registrations. Call with
        the agent lock held. False if NIXL could not abort: then the buffers stay registered and alive."""
        if xfer.xh is not None:
            try:
                xfer.xh.release()
            except Exception as e:
                log.error("%s: could not abort NIXL transfer %d (%r); keeping its buffers", self.name,
                          xfer.handle.seq, e)
                self._leaked.append(xfer)
                return False
        for key in xfer.regs:
            entry = self._regs[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._regs[key]
                self._agent.deregister_memory(entry[0])
        xfer.regs = []
        return True

    def _on_grant(self, seq: int) -> None:
        with self._cond:
            xfer = self._xfers.get(seq)
        if xfer is None or xfer.handle.state.terminal:
            return
        error = None
        with self._alock:
            with self._cond:   # failed meanwhile? then its registrations are gone: never post
                if self._xfers.get(seq) is not xfer:
                    return
            try:
                xfer.xh = self._agent.initialize_xfer(
                    "WRITE", self._agent.get_xfer_descs(xfer.local, "DRAM"),
                    self._agent.get_xfer_descs(xfer.remote, "DRAM"), self._peer, str(seq).encode())
                if self._agent.transfer(xfer.xh) == "ERR":
                    error = "NIXL transfer could not be posted"
            except Exception as e:
                error = f"NIXL transfer failed to start: {e!r}"
        if error:
            self._local_failure(xfer, error)
            return
        xfer.handle._advance(TransferState.TRANSFERRING)
        with self._cond:
            self._cond.notify_all()

    def _local_failure(self, xfer: _Xfer, reason: str) -> None:
        with self._cond:
            self._xfers.pop(xfer.handle.seq, None)
        with self._alock:
            self._release(xfer)
        self._fail_one(xfer.handle.seq, reason)
        try:
            assert self._conn is not None
            self._conn.send({"type": "abort", "seq": xfer.handle.seq, "reason": reason})
        except OSError as e:
            self._fail(f"receiver connection lost: {e}")

    def _progress_loop(self) -> None:
        """Progresses UCX while a granted transfer is unconfirmed; sleeps otherwise. Progress must go
        on after the local side is DONE: the notification is an active message that leaves only
        when the worker is progressed, and without it the receiver never learns of the write."""
        while True:
            with self._cond:
                while not self._failed and not self._granted_unacked():
                    self._cond.wait(0.05)
                if self._failed:
                    return
                active = [x for x in self._xfers.values() if x.xh is not None]
            for x in active:
                with self._alock:
                    try:
                        st = self._agent.check_xfer_state(x.xh)
                    except Exception as e:
                        st, err = "ERR", repr(e)
                    else:
                        err = "NIXL reported a transfer error"
                    if st == "DONE":
                        with self._cond:
                            self._xfers.pop(x.handle.seq, None)
                        self._release(x)
                if st == "ERR":
                    self._local_failure(x, err)
            if not active:
                with self._alock:
                    self._agent.get_new_notifs()   # progresses the worker; the sender gets no notifs
            time.sleep(self._poll_interval)

    def _granted_unacked(self) -> bool:
        with self._lock:
            return any(h._state is TransferState.TRANSFERRING for h in self._handles.values())

    def _on_failed(self) -> None:
        with self._cond:
            xfers, self._xfers = list(self._xfers.values()), {}
            self._cond.notify_all()
        with self._alock:
            for x in xfers:
                self._release(x)

    def close(self) -> None:
        super().close()
        self._progress.join(timeout=5.0)
        with self._alock:
            if self._peer is not None:
                try:
                    self._agent.remove_remote_agent(self._peer)
                except Exception as e:
                    log.debug("%s: remove_remote_agent: %r", self.name, e)
                self._peer = None


def _descs(addr: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """[n, 3] uint64 rows (address, bytes, device 0) in C order of the [L, 2, R] inputs."""
    out = np.zeros((addr.size, 3), dtype=np.uint64)
    out[:, 0] = addr.reshape(-1)
    out[:, 1] = nbytes.reshape(-1)
    return out


class NixlReceiver(ReceiverBase):
    backend = "nixl"

    def __init__(self, layout: KVLayout, caches: Caches, address: str = "127.0.0.1:0",
                 name: str | None = None, poll_interval: float = 2e-4, cancel_timeout: float = 5.0) -> None:
        self.name = name or f"kv-nixl-receiver-{uuid.uuid4().hex[:12]}"
        self._agent = _agent(self.name)
        self._alock = threading.Lock()
        self._poll_interval = poll_interval
        self._cancel_timeout = cancel_timeout
        self._inflight: dict[tuple[str, int], tuple[Conn, Reservation, int]] = {}   # (agent, seq) -> crc sent
        self._agents: dict[int, str] = {}                                        # conn id -> agent
        self._cond = threading.Condition()
        self._stopping = False
        num_blocks = ReceiverBase._check_caches(layout, caches)
        self._reg = self._agent.register_memory([t for l in sorted(caches) for t in caches[l]])  # once
        self._metadata = self._agent.get_agent_metadata()
        self._regions = {"k": {str(l): caches[l][0].data_ptr() for l in caches},
                         "v": {str(l): caches[l][1].data_ptr() for l in caches}, "num_blocks": num_blocks}
        super().__init__(layout, caches, address)
        self._poller = threading.Thread(target=self._poll_loop, name=f"{self.name}-notifs", daemon=True)
        self._poller.start()

    def _welcome_extra(self, conn: Conn, hello: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        agent = str(hello.get("agent", ""))
        with self._cond:
            if not agent or agent in self._agents.values():
                raise KVTransferError(f"NIXL sender agent name {agent!r} missing or already connected")
            self._agents[conn.id] = agent
        return {"agent": self.name, "regions": self._regions}, self._metadata

    def _on_chunk(self, conn: Conn, header: dict[str, Any], plen: int, res: Reservation | None,
                  rejected: str | None) -> None:
        seq = int(header["seq"])
        if plen:
            raise KVTransferError("NIXL chunk frames carry no payload")
        if res is not None and not isinstance(header.get("xxh3"), int):
            rejected = "chunk without its checksum (xxh3): refused"
            self._tracker.abort(res, rejected)
            res = None
        if res is None:
            conn.send({"type": "ack", "seq": seq, "ok": False, "reason": rejected})
            return
        with self._cond:
            self._inflight[(self._agents[conn.id], seq)] = (conn, res, header["xxh3"])
            self._cond.notify_all()
        conn.send({"type": "grant", "seq": seq})

    def _on_frame(self, conn: Conn, header: dict[str, Any], plen: int) -> None:
        if header["type"] != "abort":
            super()._on_frame(conn, header, plen)
        with self._cond:
            entry = self._inflight.pop((self._agents[conn.id], int(header["seq"])), None)
        if entry is not None:
            self._tracker.abort(entry[1], f"sender aborted its write: {header.get('reason')}")

    def _poll_loop(self) -> None:
        """Progresses UCX and collects notifications while granted writes are outstanding."""
        while True:
            with self._cond:
                while not self._stopping and not self._inflight:
                    self._cond.wait()
                if self._stopping:
                    return
            with self._alock:
                notifs = self._agent.get_new_notifs()
            for agent, msgs in notifs.items():      # keys are str (agent names), values bytes
                for msg in msgs:
                    try:
                        key = (agent, int(msg))
                    except ValueError:
                        log.warning("%s: stray NIXL notification %r from %s", self.name, msg, agent)
                        continue
                    with self._cond:
                        entry = self._inflight.pop(key, None)
                    if entry is None:
                        log.warning("%s: notification for unknown transfer %s", self.name, key)
                        continue
                    conn, res, sent = entry
                    landed = self._landed_checksum(res)
                    if landed != sent:
                        ok, reason = False, (f"{CHECKSUM_MISMATCH} in chunk {key[1]} of {res.request_id} (layers "
                                             f"{list(res.layers)}, tokens {list(res.tokens)}): sent {sent:#018x}, "
                                             f"landed {landed:#018x}")
                        self._tracker.abort(res, reason)
                    else:
                        ok, reason = self._tracker.commit(res)
                    try:
                        conn.send({"type": "ack", "seq": key[1], "ok": ok, "reason": reason})
                    except OSError:
                        pass   # the sender is gone; its connection thread cleans up
            time.sleep(self._poll_interval)

    def _landed_checksum(self, res: Reservation) -> int:
        """The checksum of the reservation's cells in the cache: K then V, each layer by layer, token order."""
        lay = self.layout
        runs = KVDest(res.block_table, res.group_start).slot_runs(res.tokens, lay.block_size)
        h = kv_hasher()
        for kv in range(2):
            for layer in range(*res.layers):
                flat = self.caches[layer][kv].view(-1, lay.num_kv_heads, lay.head_dim)   # [slots, Hkv, D]
                for slot, _, n in runs:
                    h.update(byte_view(flat[slot:slot + n]))
        return h.intdigest()

    def cancel(self, request_id: str) -> set[int]:
        """Forgets the request. A write already granted may still be landing in its blocks (RDMA
        cannot be recalled), so this waits up to `cancel_timeout` for those to finish; if one does
        not, its sender's connection is closed, an error is logged, and its blocks are returned:
        the owner withholds them for good (a late write must never land in another request's KV)."""
        poisoned: set[int] = set()
        deadline = time.monotonic() + self._cancel_timeout
        for res in self._tracker.cancel(request_id):
            if not res.resolved.wait(max(0.0, deadline - time.monotonic())):
                blocks = res.blocks(self.layout.block_size)
                poisoned.update(blocks)
                log.error("%s: granted write for cancelled %s (tokens %s) did not finish in %.1f s; dropping "
                          "its sender and withholding blocks %s for good", self.name, request_id,
                          list(res.tokens), self._cancel_timeout, blocks)
                with self._conns_lock:
                    conn = self._conns.get(res.conn_id)
                if conn is not None:
                    conn.close()
        return poisoned

    def _on_conn_closed(self, conn: Conn) -> None:
        with self._cond:
            agent = self._agents.pop(conn.id, None)
            for key in [k for k in self._inflight if k[0] == agent]:
                del self._inflight[key]

    def close(self) -> None:
        super().close()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._poller.join(timeout=5.0)
        with self._alock:
            try:
                self._agent.deregister_memory(self._reg)
            except Exception as e:
                log.debug("%s: deregister: %r", self.name, e)
