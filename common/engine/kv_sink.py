"""Disaggregation glue between an engine's paged KV cache and the KV transfer backends.

Prefill side: a request carries a `KVSink` (where its tokens must go: the decode instance's KVP groups,
their block tables and the receivers of each TP rank). After every step, whoever holds the new KV (the
single-process engine, or each pipeline stage's worker for its layers) copies the chunk out of its cache
and sends it with a `KVStreamer`; a chunk crossing a decode group boundary is split there. The staging
copy is what the transfer owns until the receiver confirms, so the prefill cache can be reused at once.

Decode side: a `KVIntake` binds a receiver to the local cache; `expect()` registers a request's token
range; `poll()` reports requests whose KV is complete or failed.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass

import torch

from common.config import CacheConfig, ModelConfig
from common.errors import KVTransferError
from common.kv_cache.paged import PagedKVCache
from common.kv_transfer import KVChunk, KVDest, KVLayout, TransferState, make_receiver, make_sender
from common.perf_model.calibrated import model_fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupSink:
    group: int                 # decode KVP group index
    token_start: int           # first token the group holds (group * kvp_tokens)
    block_table: list[int]     # the group's blocks for this request, in token order
    addresses: list[str]       # one KV receiver "host:port" per decode TP rank


@dataclass(frozen=True)
class KVSink:
    backend: str               # "tcp" | "nixl"
    kvp_tokens: int            # tokens per decode KVP group (M)
    groups: list[GroupSink]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KVSink":
        return cls(d["backend"], d["kvp_tokens"], [GroupSink(**g) for g in d["groups"]])


def kv_layout(mc: ModelConfig, cache: CacheConfig, dtype: str, kv_heads: int) -> KVLayout:
    return KVLayout(dtype=dtype, block_size=cache.block_size, num_kv_heads=kv_heads, head_dim=mc.head_dim,
                    num_layers=mc.num_layers, model=model_fingerprint(mc))


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
        self.handles: dict[str, list] = {}
        self.errors: dict[str, str] = {}
        self.sealed: set[str] = set()          # requests whose last chunk has been sent
        self.sent_upto: dict[tuple[str, int, int], int] = {}   # (request, layers) -> tokens sent
        self.lock = threading.Lock()

    def send(self, request_id: str, sink: KVSink, layers: range, start: int, k: torch.Tensor,
             v: torch.Tensor, last: bool) -> None:
        """k, v [len(layers), n, Hkv, D]: tokens [start, start + n) of `request_id`.

        Tokens below what was already sent for these layers are skipped: a request preempted and
        recomputed (after its blocks were freed) passes the same positions again, and the receiver takes
        each cell exactly once. What it has is the KV of the same tokens at the same positions."""
        key = (request_id, layers.start, layers.stop)
        m, end = sink.kvp_tokens, start + k.shape[1]
        pos = max(start, self.sent_upto.get(key, 0))
        self.sent_upto[key] = max(end, self.sent_upto.get(key, 0))
        handles = self.handles.setdefault(request_id, [])
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
                                k[:, pos - start:stop - start].contiguous(), v[:, pos - start:stop - start].contiguous())
                handles.append(sender.send(chunk, KVDest(gs.block_table, gs.token_start), self.send_timeout_s))
                pos = stop
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

    def status(self, request_id: str) -> tuple[str, str | None]:
        """("pending" | "done" | "failed", reason). Done needs the last chunk sent and every handle DONE."""
        if request_id in self.errors:
            return "failed", self.errors[request_id]
        handles = self.handles.get(request_id, [])
        for h in handles:
            if h.state is TransferState.FAILED:
                return "failed", h.reason or "KV transfer failed"
        if request_id in self.sealed and all(h.state is TransferState.DONE for h in handles):
            return "done", None
        return "pending", None

    def forget(self, request_id: str) -> None:
        self.handles.pop(request_id, None)
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

    @property
    def address(self) -> str:
        return self.receiver.address

    def expect(self, request_id: str, table: list[int], token_start: int, num_tokens: int) -> None:
        self.receiver.expect(request_id, table, token_start, self.layers, num_tokens)
        self.expected.add(request_id)

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
            self.receiver.cancel(request_id)
        except KVTransferError:
            pass                                 # never registered, or already forgotten

    def close(self) -> None:
        self.receiver.close()
