"""KV transfer contract: a prefill stage streams a chunk's KV into a decode worker's paged cache.

Shapes and placement
  - Sender side, one `KVChunk`: K and V each [layers, tokens, Hkv, D] for layers [l0, l1) and absolute
    token positions [t0, t1) of one request.
  - Receiver side, per layer it holds: K and V caches each [num_blocks, block_size, Hkv, D].
  - A decode KVP group owns the contiguous token range [g0, g1); its block table lists the blocks for
    that range only: token t lands in slot s = t - g0, i.e. block_table[s // block_size] at offset
    s % block_size.

Protocol (both backends): connect() handshakes KVLayouts and refuses a mismatch; send() returns a
`TransferHandle` whose state goes PENDING -> TRANSFERRING -> DONE | FAILED. DONE means the receiver
has written the bytes into its cache and said so; FAILED is terminal and carries a reason.

Ownership: the handle keeps the chunk's tensors alive until it is terminal. The caller may free or
reuse the source KV only after DONE; after FAILED it must recompute or fail the request, never assume
the receiver holds the data. The receiver side never exposes a request as complete unless every token
of every expected layer arrived exactly once; a failed or timed-out request stays FAILED until the
caller `cancel()`s it (which also forgets a DONE one).

Integrity (fail closed): every chunk carries the XXH3-64 hash of its bytes (`kv_checksum`: K then V,
C order), computed by the sender; the receiver computes it again over the bytes it received (TCP) or
that landed in its cache (NIXL) and commits the chunk only when they agree; a mismatch fails the
request with a reason that starts with common.errors.CHECKSUM_MISMATCH (KVCorruptedError, DATA_LOSS,
once typed again). Every chunk also carries its placement's epoch; the receiver refuses a chunk whose
epoch is not the one the request was registered (`expect`) with.
"""
from __future__ import annotations

import enum
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from common.errors import ConfigError, KVTransferError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("tcp", "nixl")


@dataclass(frozen=True)
class KVLayout:
    """What both peers must agree on before a single byte moves. `num_kv_heads` is the heads one
    worker holds (after any TP split); `model` names the weights (name or fingerprint)."""
    dtype: str
    block_size: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    model: str

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise ConfigError(f"kv layout: unknown dtype {self.dtype!r} ({', '.join(TORCH_DTYPES)})")
        for name in ("block_size", "num_kv_heads", "head_dim", "num_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"kv layout: {name} must be positive, got {getattr(self, name)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def slot_bytes(self) -> int:
        """Bytes of one token of one layer of K (or V): Hkv * D * element size."""
        return self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    def mismatches(self, other: "KVLayout", mine: str = "here", theirs: str = "at the peer") -> list[str]:
        """One line per differing field, e.g. "dtype: 'float32' here, 'bfloat16' at the peer"."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: {a[k]!r} {mine}, {b[k]!r} {theirs}" for k in a if a[k] != b[k]]

    def compatible_with(self, other: "KVLayout") -> bool:
        return not self.mismatches(other)

    def require_compatible(self, other: "KVLayout", mine: str = "here", theirs: str = "at the peer") -> None:
        """Raises KVTransferError naming every mismatched field."""
        bad = self.mismatches(other, mine, theirs)
        if bad:
            raise KVTransferError("KV layout mismatch: " + "; ".join(bad))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KVLayout":
        try:
            return cls(dtype=str(d["dtype"]), block_size=int(d["block_size"]),
                       num_kv_heads=int(d["num_kv_heads"]), head_dim=int(d["head_dim"]),
                       num_layers=int(d["num_layers"]), model=str(d["model"]))
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise KVTransferError(f"malformed KV layout from the peer: {e}") from e

    @classmethod
    def from_config(cls, model_cfg: Any, cache_cfg: Any, dtype: str, model: str, tp: int = 1) -> "KVLayout":
        """From common.config.ModelConfig / CacheConfig; heads are split over `tp` ranks."""
        if model_cfg.num_kv_heads % tp:
            raise ConfigError(f"kv layout: num_kv_heads={model_cfg.num_kv_heads} not divisible by tp={tp}")
        return cls(dtype=dtype, block_size=cache_cfg.block_size, num_kv_heads=model_cfg.num_kv_heads // tp,
                   head_dim=model_cfg.head_dim, num_layers=model_cfg.num_layers, model=model)


class TransferState(enum.Enum):
    PENDING = "pending"            # registered / queued, no byte written yet
    TRANSFERRING = "transferring"  # bytes on their way (or some of a request's chunks arrived)
    DONE = "done"                  # written at the receiver and confirmed (terminal)
    FAILED = "failed"              # never to be used; see the reason (terminal)

    @property
    def terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


def byte_view(t: torch.Tensor) -> np.ndarray:
    """A zero-copy 1-D uint8 numpy view of a contiguous CPU tensor (works for bfloat16 too)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def kv_hasher() -> "xxhash.xxh3_64":
    """A streaming XXH3-64 (update(buffer)...; intdigest()): the checksum KV chunks carry. Chosen
    for speed: about 15 GiB/s on data in the CPU cache on a small CPU where CRC-32C (hardware
    instruction, one stream) does 5.7; a 64-bit hash also misses less than a 32-bit CRC."""
    return xxhash.xxh3_64()


def kv_checksum(k: torch.Tensor, v: torch.Tensor) -> int:
    """The checksum a chunk travels with: XXH3-64 of K's bytes then V's, each contiguous in C order
    ([layers, tokens, Hkv, D]), which is the order the TCP payload has."""
    h = kv_hasher()
    h.update(byte_view(k.contiguous()))
    h.update(byte_view(v.contiguous()))
    return h.intdigest()


@dataclass(frozen=True)
class KVChunk:
    """KV of one request for layers [l0, l1) and absolute tokens [t0, t1).
    k, v: [l1 - l0, t1 - t0, Hkv, D] on the CPU (contiguous is best: no copy).
    `epoch`: the decode placement's (0 = none; must equal what the receiver registered)."""
    request_id: str
    layers: tuple[int, int]
    tokens: tuple[int, int]
    k: torch.Tensor
    v: torch.Tensor
    epoch: int = 0

    def validate(self, layout: KVLayout) -> None:
        (l0, l1), (t0, t1) = self.layers, self.tokens
        if not (0 <= l0 < l1 <= layout.num_layers):
            raise KVTransferError(f"chunk of {self.request_id}: layers [{l0}, {l1}) outside "
                                  f"[0, {layout.num_layers})")
        if not (0 <= t0 < t1):
            raise KVTransferError(f"chunk of {self.request_id}: empty or negative tokens [{t0}, {t1})")
        want = (l1 - l0, t1 - t0, layout.num_kv_heads, layout.head_dim)
        for name, t in (("k", self.k), ("v", self.v)):
            if tuple(t.shape) != want:
                raise KVTransferError(f"chunk of {self.request_id}: {name} has shape {tuple(t.shape)}, "
                                      f"expected [layers, tokens, Hkv, D] = {list(want)}")
            if t.dtype != layout.torch_dtype:
                raise KVTransferError(f"chunk of {self.request_id}: {name} is {t.dtype}, layout says "
                                      f"{layout.dtype}")
            if t.device.type != "cpu":
                raise KVTransferError(f"chunk of {self.request_id}: {name} is on {t.device}; only host "
                                      "memory is supported by these backends")


@dataclass(frozen=True)
class KVDest:
    """Where a chunk goes at the receiver: the block table of the group's token range [g0, ...)."""
    block_table: Sequence[int]
    group_start: int

    def slot_runs(self, tokens: tuple[int, int], block_size: int) -> list[tuple[int, int, int]]:
        """Contiguous runs (first cache slot, offset within the chunk, length) covering tokens
        [t0, t1); a cache slot is block_id * block_size + offset in a layer's flattened cache.
        Consecutive block ids merge into one run."""
        t0, t1 = tokens
        s0, s1 = t0 - self.group_start, t1 - self.group_start
        if s0 < 0 or s1 > len(self.block_table) * block_size:
            raise KVTransferError(f"tokens [{t0}, {t1}) not covered by the block table "
                                  f"({len(self.block_table)} blocks of {block_size} from token "
                                  f"{self.group_start})")
        runs: list[tuple[int, int, int]] = []
        s = s0
        while s < s1:
            n = min(block_size - s % block_size, s1 - s)
            slot = self.block_table[s // block_size] * block_size + s % block_size
            if runs and runs[-1][0] + runs[-1][2] == slot:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + n)
            else:
                runs.append((slot, s - s0, n))
            s += n
        return runs


def blocks_crc(block_table: Sequence[int], block_size: int, group_start: int, tokens: tuple[int, int]) -> int:
    """CRC32 of the block ids that tokens [t0, t1) land in. Sender and receiver compute it from their
    own tables; a difference means they disagree on the placement and the chunk is refused."""
    s0, s1 = tokens[0] - group_start, tokens[1] - group_start
    ids = block_table[s0 // block_size:(s1 - 1) // block_size + 1]
    return zlib.crc32(",".join(str(int(b)) for b in ids).encode())


class TransferHandle:
    """One send. `state` is polled; `wait(timeout)` blocks at most `timeout` seconds and never past
    the transfer's own deadline (set by send()), after which the transfer is FAILED."""

    def __init__(self, seq: int, request_id: str, deadline: float,
                 on_expire: Callable[["TransferHandle"], None]) -> None:
        self.seq = seq
        self.request_id = request_id
        self.deadline = deadline
        self._on_expire = on_expire
        self._state = TransferState.PENDING
        self._reason: str | None = None
        self._lock = threading.Lock()
        self._terminal = threading.Event()
        self.keepalive: tuple[Any, ...] = ()   # source tensors, dropped only when terminal

    @property
    def state(self) -> TransferState:
        if not self._terminal.is_set() and time.monotonic() >= self.deadline:
            self._on_expire(self)
        return self._state

    @property
    def reason(self) -> str | None:
        return self._reason

    def wait(self, timeout: float | None = None) -> bool:
        """True once DONE; False if `timeout` passed first; raises KVTransferError once FAILED."""
        end = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        if not self._terminal.wait(max(0.0, end - time.monotonic())):
            if time.monotonic() < self.deadline:
                return False
            self._on_expire(self)  # fails the transfer (and its connection): now terminal
            self._advance(TransferState.FAILED, "not confirmed before the deadline")
        if self._state is TransferState.DONE:
            return True
        raise KVTransferError(f"transfer {self.seq} of request {self.request_id} failed: {self._reason}")

    # ---- backend side ------------------------------------------------------------------------
    def _advance(self, state: TransferState, reason: str | None = None) -> bool:
        """Moves forward only (PENDING -> TRANSFERRING -> DONE | FAILED); terminal states stay."""
        with self._lock:
            if self._state.terminal or (state is TransferState.PENDING):
                return False
            self._state = state
            if state.terminal:
                self._reason = reason
                self.keepalive = ()
                self._terminal.set()
            return True


class KVSender(ABC):
    """Prefill side: one sender talks to one receiver (one decode worker)."""
    backend: str = "base"

    @abstractmethod
    def connect(self, peer_address: str, timeout: float = 10.0) -> None:
        """Connects to a receiver's `address` ("host:port"), exchanges KVLayouts (and, for NIXL, agent
        metadata and memory regions) and raises KVTransferError naming any mismatch."""

    @abstractmethod
    def send(self, chunk: KVChunk, dest: KVDest, timeout: float = 30.0) -> TransferHandle:
        """Starts sending; returns at once. The handle FAILS if the receiver has not confirmed within
        `timeout` seconds (and then the connection is closed: a stuck peer is a dead peer). Raises
        KVTransferError for a chunk that does not fit the layout or the receiver, or when the
        connection has already failed (then connect a new sender)."""

    @abstractmethod
    def close(self) -> None:
        """Says goodbye and disconnects; handles not yet terminal become FAILED."""

    def __enter__(self) -> "KVSender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KVReceiver(ABC):
    """Decode side: bound to the local cache tensors, listens at `address` for senders."""
    backend: str = "base"

    @property
    @abstractmethod
    def address(self) -> str:
        """"host:port" that senders connect() to (the bootstrap endpoint for NIXL too)."""

    @abstractmethod
    def expect(self, request_id: str, block_table: Sequence[int], group_token_start: int,
               layers: Sequence[int], num_tokens: int, epoch: int = 0, have: int = 0) -> None:
        """Registers a request: tokens [group_token_start, group_token_start + num_tokens) of the given
        layers will arrive into the blocks of `block_table`, in chunks of placement `epoch` (others
        are refused). The first `have` of them (0 <= have < num_tokens) are in the blocks already
        (a cached prefix): they count as arrived, and a chunk that resends one is refused as a
        duplicate. Must precede the first chunk."""

    @abstractmethod
    def poll(self) -> dict[str, TransferState]:
        """The state of every registered request (PENDING, TRANSFERRING, DONE or FAILED)."""

    @abstractmethod
    def state(self, request_id: str) -> TransferState:
        """One request's state; raises KVTransferError if it is not registered."""

    @abstractmethod
    def arrived(self, request_id: str) -> int:
        """(layer, token) cells of the request written so far (0 if it is not registered)."""

    @abstractmethod
    def wait_complete(self, request_id: str, timeout: float) -> bool:
        """True once every token of every expected layer has arrived exactly once; False if `timeout`
        passed first; raises KVTransferError (with the reason) if the request FAILED."""

    @abstractmethod
    def cancel(self, request_id: str) -> set[int]:
        """Forgets the request (any state); later chunks for it are refused. Returns the blocks of
        its table a write may still land in (a one-sided write granted before the cancel that
        neither finished nor could be recalled): their owner must never reuse them. Empty for a
        receiver that writes its cache itself (TCP): no write lands after cancel returns."""

    @abstractmethod
    def close(self) -> None:
        """Stops listening, disconnects senders, fails every incomplete request."""

    def __enter__(self) -> "KVReceiver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Caches = Mapping[int, tuple[torch.Tensor, torch.Tensor]]


def make_sender(backend: str, layout: KVLayout, **kwargs: Any) -> KVSender:
    """backend "tcp" or "nixl"; kwargs go to the backend (e.g. name=)."""
    if backend == "tcp":
        from common.kv_transfer.tcp import TCPSender
        return TCPSender(layout, **kwargs)
    if backend == "nixl":
        from common.kv_transfer.nixl import NixlSender
        return NixlSender(layout, **kwargs)
    raise ConfigError(f"unknown KV transfer backend {backend!r} ({', '.join(BACKENDS)})")


def make_receiver(backend: str, layout: KVLayout, caches: Caches | Sequence[tuple[torch.Tensor, torch.Tensor]],
                  address: str = "127.0.0.1:0", **kwargs: Any) -> KVReceiver:
    """caches: {layer: (K, V)} (or a list indexed by layer), each [num_blocks, block_size, Hkv, D]."""
    if not isinstance(caches, Mapping):
        caches = dict(enumerate(caches))
    if backend == "tcp":
        from common.kv_transfer.tcp import TCPReceiver
        return TCPReceiver(layout, caches, address, **kwargs)
    if backend == "nixl":
        from common.kv_transfer.nixl import NixlReceiver
        return NixlReceiver(layout, caches, address, **kwargs)
    raise ConfigError(f"unknown KV transfer backend {backend!r} ({', '.join(BACKENDS)})")
