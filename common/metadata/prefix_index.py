"""The prefix-cache index of a deployment, in Redis next to its metadata (common/metadata/store.py):
which instance holds which cached prefix, so that the router can send a request where its longest
cached prefix lives.

Names. A full KV block is named by a hash chained over every token before it (common/kv_cache/prefix.py):
hash j names the whole prefix [0, (j+1) B), so "instance I holds hash j" says I holds that prefix.
Instances of different layouts name their blocks under different roots, so their names never meet.

Keys (under the store's hash tag; <h> = a block hash in hex):

    mnemosyne:{<deployment>}:pfx:<h>          set of the instance ids holding block <h>
    mnemosyne:{<deployment>}:pfxi:<id>        set of the hashes instance <id> holds (for cleanup)
    mnemosyne:{<deployment>}:pfxs:<id>        hash: epoch, seq of the last report applied
    mnemosyne:{<deployment>}:pfxinsts         set of the ids with entries (for the sweep)

Reports. Each heartbeat may carry a PrefixReport (common/metadata/types.py): the blocks the instance's
cache added and evicted since its last acknowledged report, numbered (epoch, seq). A delta applies only
on top of the report the index holds (same epoch, seq one more); anything else (a report lost, a reply
lost after the index applied it, a new registration, a Redis that lost its data) answers "resync" and
the instance sends its whole cache, which replaces its entries. Each report is one Lua script: a
concurrent match sees the index before or after it, never half of it.

Cleanup. An instance's entries go when it deregisters or registers again (drop), and when its
registration expires (sweep, run by the kvstore's reaper; meanwhile match ignores holders whose
registration is gone, so no stale holder is ever returned). Eviction removes a block's entry with the
next report. Size: at most one entry per cached block of each live instance (its block pool's size),
twice (per hash and per instance).

Matching. For a prompt's hash chain, the holders of its first block, each with the longest run it
holds, found by binary search (O(log n) lookups per holder). It assumes a holder's cache is
prefix-closed (it holds block j-1 when it holds block j), which the engines' block pools keep up to
the order of one eviction (a prefix is used and freed with every continuation of it, and a table's
tail is freed first); the engine counts its own hit again when the request starts, so an answer that
is off by an evicted block only costs that block's prefill.

Blocking (redis-py); thread-safe.
"""
from __future__ import annotations

from typing import Sequence

from common.metadata.store import MetadataStore, _unavailable_on_redis_errors
from common.metadata.types import HASH_BYTES, PrefixReport, check_id

_HEX = 2 * HASH_BYTES

# KEYS: inst, state, held, tracked. ARGV: id, epoch, seq, full, added_hex, evicted_hex, hash_prefix.
# -> 1 applied, 0 resync needed, -1 unknown instance (registration gone)
_APPLY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local id, hp = ARGV[1], ARGV[7]
if ARGV[4] == '1' then
  for _, h in ipairs(redis.call('SMEMBERS', KEYS[3])) do redis.call('SREM', hp .. h, id) end
  redis.call('DEL', KEYS[3])
else
  local st = redis.call('HMGET', KEYS[2], 'epoch', 'seq')
  if st[1] ~= ARGV[2] or tonumber(st[2]) + 1 ~= tonumber(ARGV[3]) then return 0 end
end
local ev = ARGV[6]
for i = 1, #ev, %(hex)d do
  local h = string.sub(ev, i, i + %(hex)d - 1)
  redis.call('SREM', hp .. h, id)
  redis.call('SREM', KEYS[3], h)
end
local ad = ARGV[5]
for i = 1, #ad, %(hex)d do
  local h = string.sub(ad, i, i + %(hex)d - 1)
  redis.call('SADD', hp .. h, id)
  redis.call('SADD', KEYS[3], h)
end
redis.call('HSET', KEYS[2], 'epoch', ARGV[2], 'seq', ARGV[3])
redis.call('SADD', KEYS[4], id)
return 1
""" % {"hex": _HEX}

_DROP_FN = """
local function drop(id, state, held, tracked, hp)
  for _, h in ipairs(redis.call('SMEMBERS', held)) do redis.call('SREM', hp .. h, id) end
  local n = redis.call('SCARD', held)
  redis.call('DEL', held, state)
  redis.call('SREM', tracked, id)
  return n
end
"""

# KEYS: state, held, tracked. ARGV: id, hash_prefix. -> entries dropped
_DROP = _DROP_FN + """
return drop(ARGV[1], KEYS[1], KEYS[2], KEYS[3], ARGV[2])
"""

# KEYS: tracked. ARGV: inst_prefix, state_prefix, held_prefix, hash_prefix. -> ids dropped
_SWEEP = _DROP_FN + """
local gone = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. id) == 0 then
    drop(id, ARGV[2] .. id, ARGV[3] .. id, KEYS[1], ARGV[4])
    gone[#gone + 1] = id
  end
end
return gone
"""

# ARGV: inst_prefix, hash_prefix, hashes_hex. -> {id, matched_blocks, ...}
_MATCH = """
local hs, hp = ARGV[3], ARGV[2]
local n = #hs / %(hex)d
if n < 1 then return {} end
local function key(j) return hp .. string.sub(hs, (j - 1) * %(hex)d + 1, j * %(hex)d) end
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', key(1))) do
  if redis.call('EXISTS', ARGV[1] .. id) == 1 then
    local lo, hi = 1, n
    while lo < hi do
      local mid = math.floor((lo + hi + 1) / 2)
      if redis.call('SISMEMBER', key(mid), id) == 1 then lo = mid else hi = mid - 1 end
    end
    out[#out + 1] = id
    out[#out + 1] = lo
  end
end
return out
""" % {"hex": _HEX}


class PrefixIndex:
    """The index over a MetadataStore's Redis and key prefix. Raises StoreUnavailableError when Redis
    does not answer."""

    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self.redis = store.redis
        p = store.prefix
        self._hash_prefix, self._held_prefix, self._state_prefix = p + "pfx:", p + "pfxi:", p + "pfxs:"
        self._tracked = p + "pfxinsts"
        s = self.redis.register_script
        self._apply, self._drop, self._sweep, self._match = s(_APPLY), s(_DROP), s(_SWEEP), s(_MATCH)

    def _keys(self, instance_id: str) -> list[str]:
        return [self._state_prefix + instance_id, self._held_prefix + instance_id, self._tracked]

    @_unavailable_on_redis_errors
    def apply(self, instance_id: str, report: PrefixReport) -> bool | None:
        """Applies `report` atomically: True; False when it cannot (a delta not on top of what the
        index holds: the instance must send a full report); None when the instance is not registered."""
        check_id("instance_id", instance_id)
        rc = int(self._apply(keys=[self.store._inst(instance_id), *self._keys(instance_id)],
                             args=[instance_id, report.epoch, report.seq, "1" if report.full else "0",
                                   b"".join(report.added).hex(), b"".join(report.evicted).hex(),
                                   self._hash_prefix]))
        return None if rc < 0 else rc == 1

    @_unavailable_on_redis_errors
    def drop(self, instance_id: str) -> int:
        """Forgets everything instance `instance_id` held (it left, or registers afresh); returns how
        many entries went."""
        check_id("instance_id", instance_id)
        return int(self._drop(keys=self._keys(instance_id), args=[instance_id, self._hash_prefix]))

    @_unavailable_on_redis_errors
    def sweep(self) -> list[str]:
        """Drops the entries of every instance whose registration is gone (expired); returns their ids."""
        return list(self._sweep(keys=[self._tracked], args=[self.store._inst(""), self._state_prefix,
                                                            self._held_prefix, self._hash_prefix]))

    @_unavailable_on_redis_errors
    def match(self, hashes: Sequence[bytes]) -> dict[str, int]:
        """Live instance id -> how many leading blocks of the chain `hashes` it holds (those holding
        at least the first; see the module docstring)."""
        if any(len(h) != HASH_BYTES for h in hashes):
            raise ValueError(f"block hashes must be {HASH_BYTES} bytes long")
        flat = self._match(keys=[], args=[self.store._inst(""), self._hash_prefix, b"".join(hashes).hex()])
        return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}

    @_unavailable_on_redis_errors
    def held(self, instance_id: str) -> set[bytes]:
        """The blocks the index says `instance_id` holds (tests, debugging)."""
        return {bytes.fromhex(h) for h in self.redis.smembers(self._held_prefix + instance_id)}

    @_unavailable_on_redis_errors
    def holders(self, block: bytes) -> set[str]:
        """The ids the index lists for one block, live or not (tests, debugging)."""
        return set(self.redis.smembers(self._hash_prefix + block.hex()))

    @_unavailable_on_redis_errors
    def num_entries(self) -> int:
        """Block-holder entries in the index (the size of the per-hash sets, summed)."""
        pipe = self.redis.pipeline(transaction=False)
        ids = list(self.redis.smembers(self._tracked))
        for i in ids:
            pipe.scard(self._held_prefix + i)
        return sum(pipe.execute()) if ids else 0
