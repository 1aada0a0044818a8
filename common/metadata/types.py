"""Domain types of the metadata layer: instances, their load reports and placements. Plain frozen
dataclasses; the proto <-> domain conversions are in common/rpc/convert.py."""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Mapping

from common.errors import ConfigError, InvalidRequestError
from common.perf_model.published import PublishedModel

ROLES = ("prefill", "decode")
MAX_ID_LEN = 256


def check_id(kind: str, value: str) -> str:
    """Request and instance ids: non-empty, at most MAX_ID_LEN characters, printable."""
    if not value:
        raise InvalidRequestError(f"{kind} must not be empty")
    if len(value) > MAX_ID_LEN:
        raise InvalidRequestError(f"{kind} is {len(value)} characters long (at most {MAX_ID_LEN})")
    if not value.isprintable():
        raise InvalidRequestError(f"{kind} {value!r} has non-printable characters")
    return value


INSTANCE_ID_SEP = "~"


def instance_request_id(client_id: str) -> str:
    """The id the router gives a request on the instances and the kvstore: the client's id plus a
    random suffix, unique per attempt, so a client that reuses an id (after a cancel, a retry) never
    meets what its predecessor left behind (KV, a placement, a stream being aborted)."""
    return f"{client_id[:MAX_ID_LEN - 13]}{INSTANCE_ID_SEP}{uuid.uuid4().hex[:12]}"


def client_request_id(instance_id: str) -> str:
    """The client's id of an instance-side id (cut to MAX_ID_LEN - 13 characters)."""
    return instance_id.rsplit(INSTANCE_ID_SEP, 1)[0]


@dataclass(frozen=True)
class SchedulingInfo:
    """What admission needs to predict an instance's TTFT with the instance's own numbers: the
    performance model its scheduler predicts with (None = it has none), its iteration budget and
    pipeline depth (SPP stages), the chunking it runs (adaptive chunk bounds, or fixed chunks of
    chunk_size), its policy, its TBT SLO (SchedulerConfig.tbt_slo_s, the one home of the default TBT
    SLO) and max_model_len. KVP group size: Instance.kvp_tokens.

    Prefix caching: `prefix_hash_root` (hex; "" = off) and `prefix_block_size` are the root and block
    size of the chain the instance names its cached blocks by (common/kv_cache/prefix.py), so the
    router can hash a prompt exactly as the instance does and ask the kvstore's index."""
    perf_model: PublishedModel | None = None
    iteration_budget_s: float = 0.04
    pipeline_depth: int = 1
    policy: str = "fcfs"
    chunking: str = "fixed"
    chunk_size: int = 512
    min_chunk: int = 32
    max_chunk: int = 8192
    tbt_slo_s: float = 0.05
    max_model_len: int = 0
    prefix_hash_root: str = ""
    prefix_block_size: int = 0

    def __post_init__(self) -> None:
        if self.prefix_hash_root and (self.prefix_block_size < 1 or len(self.prefix_hash_root) != 32
                                      or any(c not in "0123456789abcdef" for c in self.prefix_hash_root)):
            raise InvalidRequestError(f"scheduling info: prefix_hash_root {self.prefix_hash_root!r} must be 16 "
                                      f"bytes in hex with prefix_block_size >= 1 (got {self.prefix_block_size})")
        if not self.iteration_budget_s > 0 or not self.tbt_slo_s > 0:
            raise InvalidRequestError(f"scheduling info: iteration_budget_s={self.iteration_budget_s} and "
                                      f"tbt_slo_s={self.tbt_slo_s} must be positive")
        if self.pipeline_depth < 1 or min(self.chunk_size, self.min_chunk, self.max_chunk) < 1 \
                or self.max_model_len < 0:
            raise InvalidRequestError(f"scheduling info: bad sizes {self}")
        if self.chunking not in ("fixed", "adaptive"):
            raise InvalidRequestError(f"scheduling info: chunking {self.chunking!r}")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "perf_model"}
        d["perf_model"] = None if self.perf_model is None else self.perf_model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "SchedulingInfo":
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "perf_model"}
        try:
            pm = d.get("perf_model")
            return cls(perf_model=None if pm is None else PublishedModel.from_dict(pm), **kw)
        except (ConfigError, KeyError, TypeError, ValueError) as e:
            raise InvalidRequestError(f"scheduling info: {e}") from None


@dataclass(frozen=True)
class LoadReport:
    """An instance's live load, sampled when it sends a heartbeat (common/client.py Membership): what
    the router's admission judges it by (common.admission.InstanceLoad adds who and when).

    KV lists are per KVP group (SPP stage on a prefill instance); `kv_used_blocks` is empty or as
    long as `kv_free_blocks`. `iteration_s`: the mean time of the engine iterations since the
    previous report (None = idle or unknown). `model_scale`: the scale its scheduler's performance
    model runs at now (the online correction; None = none), the level its LARS weighs work at."""
    active_requests: int = 0
    queued_prefill_tokens: int = 0
    running_decodes: int = 0
    kv_free_blocks: tuple[int, ...] = ()
    kv_used_blocks: tuple[int, ...] = ()
    kv_block_size: int = 0
    kvp_tokens: int = 0
    iteration_s: float | None = None
    model_scale: float | None = None

    def __post_init__(self) -> None:
        counts = (self.active_requests, self.queued_prefill_tokens, self.running_decodes,
                  self.kv_block_size, self.kvp_tokens, *self.kv_free_blocks, *self.kv_used_blocks)
        if any(c < 0 for c in counts):
            raise InvalidRequestError(f"load report: negative count in {self}")
        if self.kv_used_blocks and len(self.kv_used_blocks) != len(self.kv_free_blocks):
            raise InvalidRequestError(f"load report: {len(self.kv_used_blocks)} used-block counts for "
                                      f"{len(self.kv_free_blocks)} KVP groups")
        if self.iteration_s is not None and not (math.isfinite(self.iteration_s) and self.iteration_s >= 0):
            raise InvalidRequestError(f"load report: iteration_s must be >= 0, got {self.iteration_s}")
        if self.model_scale is not None and not (math.isfinite(self.model_scale) and self.model_scale > 0):
            raise InvalidRequestError(f"load report: model_scale must be > 0, got {self.model_scale}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in ((k, getattr(self, k)) for k in self.__dataclass_fields__)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LoadReport":
        kw = {k: tuple(d[k]) if k.startswith("kv_") and k.endswith("_blocks") else d[k]
              for k in cls.__dataclass_fields__ if k in d}
        return cls(**kw)


@dataclass(frozen=True)
class Instance:
    """A prefill or decode instance as registered with the kvstore.

    `capacity` has one entry per KVP group (blocks); its length is the number of groups (empty for
    a prefill instance). `free` is what the instance last reported (informational). `reserved` is
    the kvstore's accounting of live placements (filled when read back from the store). `load` is
    the load the instance sent with its last heartbeat and `load_age_s` its age on the store's clock
    (both filled when read back; None = no heartbeat with a load since it registered).
    """
    instance_id: str
    role: str
    address: str
    block_size: int = 16                     # tokens per block (decode; 0 allowed for prefill)
    kvp_tokens: int = 0                      # M; 0 = one group holds any length
    capacity: tuple[int, ...] = ()
    free: tuple[int, ...] = ()
    reserved: tuple[int, ...] = ()
    heartbeat_age_s: float = 0.0
    scheduling: SchedulingInfo | None = None # its performance model and scheduler (None = unknown)
    load: LoadReport | None = None
    load_age_s: float = 0.0
    engine_epoch: int = 0                    # engines built before the current one (rebuilt after a lost worker)

    def __post_init__(self) -> None:
        check_id("instance_id", self.instance_id)
        if self.role not in ROLES:
            raise InvalidRequestError(f"instance {self.instance_id}: role must be one of {ROLES}, "
                                      f"got {self.role!r}")
        if not self.address:
            raise InvalidRequestError(f"instance {self.instance_id}: address must not be empty")
        if self.block_size < 0 or (self.role == "decode" and self.block_size == 0):
            raise InvalidRequestError(f"instance {self.instance_id}: block_size must be positive, "
                                      f"got {self.block_size}")
        if self.kvp_tokens < 0:
            raise InvalidRequestError(f"instance {self.instance_id}: kvp_tokens must be >= 0, "
                                      f"got {self.kvp_tokens}")
        if self.role == "decode" and not self.capacity:
            raise InvalidRequestError(f"instance {self.instance_id}: a decode instance needs the "
                                      "block capacity of each KVP group")
        if len(self.capacity) > 1 and self.kvp_tokens == 0:
            raise InvalidRequestError(f"instance {self.instance_id}: {len(self.capacity)} KVP groups "
                                      "need kvp_tokens > 0")
        if any(c < 0 for c in self.capacity):
            raise InvalidRequestError(f"instance {self.instance_id}: negative capacity {self.capacity}")
        for name in ("free", "reserved"):
            v = getattr(self, name)
            if v and len(v) != len(self.capacity):
                raise InvalidRequestError(f"instance {self.instance_id}: {name} has {len(v)} groups, "
                                          f"capacity has {len(self.capacity)}")
            if any(x < 0 for x in v):
                raise InvalidRequestError(f"instance {self.instance_id}: negative {name} {v}")

    @property
    def num_groups(self) -> int:
        return len(self.capacity)

    def available(self, group: int) -> int:
        """Blocks of `group` not held by a live placement."""
        return self.capacity[group] - (self.reserved[group] if self.reserved else 0)


@dataclass(frozen=True)
class GroupRange:
    """One KVP group's share: prompt tokens [token_start, token_end) and the blocks reserved."""
    group: int
    token_start: int
    token_end: int
    num_blocks: int


@dataclass(frozen=True)
class Placement:
    """A request's decode-side placement. `lease_deadline_ms` is on the store's clock (0 until the
    placement is recorded). `epoch`: given by the store when it records the placement (0 until then),
    never reused; every call acting on the placement carries it and a stale one is refused."""
    request_id: str
    instance_id: str
    address: str
    groups: tuple[GroupRange, ...]
    num_tokens: int
    max_new_tokens: int
    lease_s: float
    lease_deadline_ms: int = 0
    epoch: int = 0

    @property
    def num_blocks(self) -> int:
        return sum(g.num_blocks for g in self.groups)


HASH_BYTES = 16          # a block's name (common/kv_cache/prefix.py: BLAKE2b-128)


@dataclass(frozen=True)
class PrefixReport:
    """What changed in an instance's prefix cache since its last acknowledged report (sent with its
    heartbeats; the kvstore's index, common/metadata/prefix_index.py, applies it). `epoch`: the
    reporter's, random per reporter; `seq`: 1 for an epoch's first report, then one more each; `full`:
    `added` replaces what the index held (the whole cache, or its first part when that is larger than
    one report: deltas send the rest), else a delta that applies only on top of report seq - 1 of the
    same epoch. Hashes: 16-byte block names."""
    epoch: int
    seq: int
    full: bool
    added: tuple[bytes, ...] = ()
    evicted: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.epoch < 0 or self.seq < 1:
            raise InvalidRequestError(f"prefix report: epoch {self.epoch} must be >= 0 and seq {self.seq} >= 1")
        if self.full and self.evicted:
            raise InvalidRequestError("prefix report: a full report has no evicted blocks")
        bad = [h for h in (*self.added, *self.evicted) if len(h) != HASH_BYTES]
        if bad:
            raise InvalidRequestError(f"prefix report: {len(bad)} block hash(es) are not {HASH_BYTES} bytes long")
