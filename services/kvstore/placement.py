"""Placement and capacity accounting of the kvstore: the logic, testable without gRPC.

A request of `num_tokens` prompt tokens that may generate `max_new_tokens` is placed on one decode
instance. Its prompt is split by KVP group: group k holds tokens [k*M, (k+1)*M) (M = the
instance's kvp_tokens; M = 0 means one group holds everything). Generated tokens are appended to
the last group until it holds M tokens, then to the next (as the decode engine's KVP block manager
does), so a group never holds more than M. Each group needs ceil(tokens / block_size) blocks.

The kvstore owns capacity accounting (capacity minus live placements, per group); the decode
instance owns its block pool and assigns concrete block ids (decode.PrepareReceive). Every request
that will hold KV on a decode instance is reserved here first.

Cached prefixes are reclaimable: an instance's cached blocks belong to no placement (a placement is
released when its request ends, and the blocks it leaves cached count as free in the instance's pool,
which evicts them on demand), so they never count against `capacity - reserved` here. The prefix index
(common/metadata/prefix_index.py) says where they are, for the router's MatchPrefix.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from common.errors import CapacityError, ConfigError, InvalidRequestError, PlacementError
from common.kv_cache.kvp_blocks import kvp_split
from common.metadata.prefix_index import PrefixIndex
from common.metadata.store import MetadataStore, StoreUnavailableError
from common.metadata.types import GroupRange, Instance, LoadReport, Placement, PrefixReport, check_id

log = logging.getLogger(__name__)

REAP_BATCH = 256        # expired placements freed per Redis script call
MAX_MATCH_BLOCKS = 1 << 20   # block hashes in one MatchPrefix (16M tokens at 16 per block)


def split_groups(num_tokens: int, max_new_tokens: int, kvp_tokens: int,
                 block_size: int) -> tuple[GroupRange, ...]:
    """Per-group prompt ranges and block counts of a request on an instance with the given M and
    block size (common.kv_cache.kvp_blocks.kvp_split: no group holds more than M tokens; a group
    past the prompt has token_start == token_end)."""
    return tuple(GroupRange(k, start, end, blocks)
                 for k, (start, end, blocks) in enumerate(kvp_split(num_tokens, max_new_tokens, kvp_tokens,
                                                                    block_size)))


@dataclass(frozen=True)
class Candidate:
    instance: Instance
    groups: tuple[GroupRange, ...]
    headroom: int          # min over the used groups of blocks left after placing

    @property
    def fits_now(self) -> bool:
        return self.headroom >= 0


def rank(instances: list[Instance], num_tokens: int, max_new_tokens: int) -> list[Candidate]:
    """The decode instances that could ever hold the request (enough groups, enough capacity in
    each when empty), best first: those with room now before the others, then the largest
    headroom (spreads load, keeps the fullest instances for small requests), then by id."""
    out = []
    for inst in instances:
        if inst.role != "decode":
            continue
        if inst.kvp_tokens > 0 and -(-(num_tokens + max_new_tokens) // inst.kvp_tokens) > inst.num_groups:
            continue        # needs more groups than it has (counted first: max_new_tokens may be 2^31)
        groups = split_groups(num_tokens, max_new_tokens, inst.kvp_tokens, inst.block_size)
        if len(groups) > inst.num_groups:
            continue
        if any(g.num_blocks > inst.capacity[g.group] for g in groups):
            continue
        headroom = min(inst.available(g.group) - g.num_blocks for g in groups)
        out.append(Candidate(inst, groups, headroom))
    out.sort(key=lambda c: (not c.fits_now, -c.headroom, c.instance.instance_id))
    return out


#: After an outage a lease runs at least this long: its holders' channels may need a moment to reach
#: the kvstore again (and a short lease would be lost on the first renewal that comes late).
OUTAGE_GRACE_S = 5.0


class _AfterOutage:
    """The store, as the placement service uses it: after the kvstore (re)starts and after Redis
    did not answer, the first call gives every live placement a full lease again, at least
    OUTAGE_GRACE_S (store.grace)
    before anything else touches it, so that neither outage makes a lease expire that its holders
    would have renewed (they could not reach the kvstore or it could not reach Redis)."""

    def __init__(self, store: MetadataStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._outage = True                       # starting: maybe after a crash

    def __getattr__(self, name: str):
        fn = getattr(self._store, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            try:
                if self._outage:
                    with self._lock:
                        if self._outage:
                            n = self._store.grace(OUTAGE_GRACE_S)
                            self._outage = False
                            if n:
                                log.warning("after an outage: %d lease(s) extended by a full lease", n)
                return fn(*args, **kwargs)
            except StoreUnavailableError:
                self._outage = True
                raise
        return call


class PlacementService:
    """Reserve / renew / release / expire placements, and instance membership, over the store.

    Blocking (Redis round trips); thread-safe. Raises InvalidRequestError (bad input, or a request
    no live instance could ever hold), CapacityError (no room now), PlacementError (unknown or
    expired placement or instance).
    """

    def __init__(self, store: MetadataStore, *, lease_s: float, instance_ttl_s: float,
                 max_attempts: int = 8) -> None:
        if lease_s <= 0 or instance_ttl_s <= 0 or max_attempts < 1:
            raise ConfigError(
                f"placement: lease_s={lease_s} and instance_ttl_s={instance_ttl_s} must be "
                f"positive, max_attempts={max_attempts} >= 1")
        self.store = _AfterOutage(store)
        self.prefixes = PrefixIndex(store)
        self.lease_s = lease_s
        self.instance_ttl_s = instance_ttl_s
        self.max_attempts = max_attempts

    # ---- membership ------------------------------------------------------------------------

    def register(self, inst: Instance) -> float:
        """Registers (or replaces) an instance; returns the heartbeat interval it should use."""
        self.store.register_instance(inst, self.instance_ttl_s)
        self.prefixes.drop(inst.instance_id)         # a new registration reports its cache afresh
        log.info("registered %s %s at %s, capacity %s", inst.role, inst.instance_id, inst.address,
                 inst.capacity)
        return self.instance_ttl_s / 3

    def heartbeat(self, instance_id: str, free: tuple[int, ...], load: LoadReport | None = None,
                  prefix: PrefixReport | None = None) -> bool:
        """Keeps a registration alive; stores the instance's `load` (None: the last one ages) and
        applies its `prefix` report to the index. Returns whether the instance must send a full
        prefix report next (its delta did not follow what the index holds)."""
        check_id("instance_id", instance_id)
        if any(f < 0 for f in free):
            raise InvalidRequestError(f"heartbeat of {instance_id}: negative free blocks {free}")
        if not self.store.heartbeat(instance_id, free, self.instance_ttl_s, load):
            raise PlacementError(f"instance {instance_id} is not registered (or its registration "
                                 "expired); register again")
        if prefix is None:
            return False
        return not self.prefixes.apply(instance_id, prefix)

    def deregister(self, instance_id: str) -> bool:
        check_id("instance_id", instance_id)
        found = self.store.deregister_instance(instance_id)
        self.prefixes.drop(instance_id)
        return found

    def match_prefix(self, hashes: list[bytes]) -> dict[str, int]:
        """Live instance id -> leading blocks of the chain `hashes` in its prefix cache (PrefixIndex.match)."""
        if len(hashes) > MAX_MATCH_BLOCKS:
            raise InvalidRequestError(f"match prefix: {len(hashes)} block hashes (at most {MAX_MATCH_BLOCKS})")
        try:
            return self.prefixes.match(hashes)
        except ValueError as e:
            raise InvalidRequestError(f"match prefix: {e}") from None

    def list_instances(self, role: str | None = None) -> list[Instance]:
        return self.store.list_instances(role)

    # ---- placements ------------------------------------------------------------------------

    def reserve(self, request_id: str, num_tokens: int, max_new_tokens: int,
                instance_id: str | None = None) -> Placement:
        """Places a request (on `instance_id` only, when given). Idempotent: a retry with the same
        arguments returns the existing placement."""
        check_id("request_id", request_id)
        if num_tokens < 1:
            raise InvalidRequestError(f"request {request_id}: num_tokens must be >= 1, got {num_tokens}")
        if max_new_tokens < 0:
            raise InvalidRequestError(f"request {request_id}: max_new_tokens must be >= 0, "
                                      f"got {max_new_tokens}")
        if instance_id:
            check_id("instance_id", instance_id)
        for _ in range(self.max_attempts):
            for cand in self._candidates(request_id, num_tokens, max_new_tokens, instance_id):
                p = Placement(request_id, cand.instance.instance_id, cand.instance.address,
                              cand.groups, num_tokens, max_new_tokens, self.lease_s)
                res = self.store.try_reserve(p)
                if res.ok:
                    return res.placement
                if res.reason == "exists":
                    existing = self.store.get_placement(request_id)
                    if existing is None:            # released meanwhile: start over
                        break
                    return self._same_request(existing, num_tokens, max_new_tokens, instance_id)
                # "full" / "gone": another reservation or an expiry got there first.
        raise CapacityError(f"request {request_id}: no decode instance had room for "
                            f"{num_tokens}+{max_new_tokens} tokens after {self.max_attempts} "
                            "attempts (contention)")

    def _candidates(self, request_id: str, num_tokens: int, max_new_tokens: int,
                    instance_id: str | None) -> list[Candidate]:
        """Those with room now, best first; raises when there are none."""
        if instance_id:
            inst = self.store.get_instance(instance_id)
            if inst is None:
                raise PlacementError(f"decode instance {instance_id} is not registered (or its "
                                     "registration expired)")
            instances = [inst]
        else:
            instances = self.store.list_instances("decode")
            if not instances:
                raise CapacityError("no live decode instance")
        ranked = rank(instances, num_tokens, max_new_tokens)
        if not ranked:
            largest = max(instances, key=lambda i: (i.num_groups, sum(i.capacity)))
            raise InvalidRequestError(
                f"request {request_id}: {num_tokens} prompt + {max_new_tokens} new tokens fit on no "
                f"live decode instance (largest: {largest.instance_id}, {largest.num_groups} KVP "
                f"groups of {largest.kvp_tokens or 'any number of'} tokens, capacity "
                f"{list(largest.capacity)} blocks of {largest.block_size} tokens)")
        now = [c for c in ranked if c.fits_now]
        if not now:
            best = ranked[0]
            raise CapacityError(
                f"request {request_id}: no decode instance has room now for {num_tokens}+"
                f"{max_new_tokens} tokens (needs {[g.num_blocks for g in best.groups]} blocks on "
                f"{best.instance.instance_id}, free {[best.instance.available(g.group) for g in best.groups]})")
        return now

    @staticmethod
    def _same_request(p: Placement, num_tokens: int, max_new_tokens: int,
                      instance_id: str | None) -> Placement:
        if (p.num_tokens, p.max_new_tokens) != (num_tokens, max_new_tokens) or (
                instance_id and p.instance_id != instance_id):
            raise InvalidRequestError(
                f"request {p.request_id} already has a placement for {p.num_tokens}+"
                f"{p.max_new_tokens} tokens on {p.instance_id}; request ids must be unique")
        return p

    def renew(self, request_id: str, epoch: int = 0) -> int:
        """Extends the lease; returns the new deadline (ms, store clock). `epoch` (0 = unchecked): the
        caller's placement epoch; StalePlacementError when the live placement has another."""
        check_id("request_id", request_id)
        deadline = self.store.renew(request_id, epoch)
        if deadline is None:
            raise PlacementError(f"no placement for request {request_id} (unknown, released, or "
                                 "its lease expired)")
        return deadline

    def release(self, request_id: str, epoch: int = 0) -> None:
        """As renew for `epoch`: a stale caller cannot free another's placement."""
        check_id("request_id", request_id)
        if not self.store.release(request_id, epoch):
            raise PlacementError(f"no placement for request {request_id} (unknown, released, or "
                                 "its lease expired)")

    def get(self, request_id: str) -> Placement:
        check_id("request_id", request_id)
        p = self.store.get_placement(request_id)
        if p is None:
            raise PlacementError(f"no placement for request {request_id} (unknown, released, or "
                                 "its lease expired)")
        return p

    def expire(self) -> list[str]:
        """Reclaims every placement whose lease expired, and drops the prefix-index entries of
        instances whose registration expired; returns the placements' request ids."""
        gone = self.prefixes.sweep()
        if gone:
            log.info("prefix index: dropped the entries of expired instance(s) %s", ", ".join(gone[:20]))
        expired: list[str] = []
        while True:
            batch = self.store.reap(limit=REAP_BATCH)
            expired += batch
            if len(batch) < REAP_BATCH:
                break
        if expired:
            log.warning("leases expired, capacity reclaimed: %s", ", ".join(expired[:20]) +
                        (f" (+{len(expired) - 20})" if len(expired) > 20 else ""))
        return expired
