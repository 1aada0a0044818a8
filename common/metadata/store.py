"""The metadata store: instance membership and KV placements with leases, in Redis.

Keys (all under one hash tag, so a Redis Cluster keeps them in one slot and the Lua scripts may
touch any of them):

    mnemosyne:{<deployment>}:instances          set of instance ids (pruned when read)
    mnemosyne:{<deployment>}:inst:<id>          hash: the registration and the last heartbeat's load;
                                                key TTL = heartbeat TTL
    mnemosyne:{<deployment>}:resv:<id>          hash: group -> blocks held by live placements
    mnemosyne:{<deployment>}:plc:<request_id>   hash: the placement (no TTL, see below)
    mnemosyne:{<deployment>}:deadlines          sorted set: request_id -> lease deadline (ms)
    mnemosyne:{<deployment>}:stats              hash: expired (lease expiries, ever)
    mnemosyne:{<deployment>}:epoch              counter: the last placement epoch given

Epochs. Each recorded placement gets the next value of the `epoch` counter (INCR in the reserve
script), kept in its hash: its identity, never reused. Renew and release with an epoch refuse a
placement of another epoch (the caller holds a stale one). A counter that is missing (a Redis that
restarted without persistence) starts again from the server's clock in microseconds, so epochs keep
growing across such a restart too.

Leases. A key TTL is right for registrations (nothing to undo when one vanishes) and wrong for
placements: a placement that silently disappeared could never give its blocks back to the `resv`
counters. So a placement's lease is its score in `deadlines`, on the Redis server's clock (TIME,
so clients' clocks do not matter): it is live while now <= deadline. Expired placements are found
by `reap()` (a range scan of `deadlines`) and, eagerly, by any call that touches them (reserve of the
same id, renew, release); each is freed and counted exactly once.

Atomicity. Every mutation is one Lua script, so two concurrent reservations can never over-commit
a group: the capacity check and the increment happen in one step. Placement choice (which
instance) is made by the caller from a snapshot; the script re-checks it.

Thread-safe (redis-py's connection pool); blocking calls, so asyncio callers use a thread.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, replace
from typing import Callable, Iterable, ParamSpec, Sequence, TypeVar

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from common.errors import ConfigError, InvalidRequestError, StalePlacementError, WorkerFailedError
from common.metadata.types import GroupRange, Instance, LoadReport, Placement, SchedulingInfo, check_id

P = ParamSpec("P")
R = TypeVar("R")


#: A command that meets a refused or dropped connection (Redis restarting) is retried with backoff for
#: 1.55-3.1 s in all before it is StoreUnavailableError; a timeout is not retried (it already waited).
#: Equal jitter (half of each delay fixed, half random) so the window has a floor: full jitter
#: (ExponentialWithJitterBackoff) could draw a total of a few ms and give up on a Redis restarting
#: in half a second (a CI run failed that way).
STORE_RETRIES = 6
STORE_BACKOFF_BASE_S = 0.05
STORE_BACKOFF_CAP_S = 0.8


def store_retry() -> Retry:
    """redis-py's own retry for the metadata store's connections (Lua scripts are idempotent, and
    redis-py reloads one a restarted Redis no longer has)."""
    return Retry(EqualJitterBackoff(base=STORE_BACKOFF_BASE_S, cap=STORE_BACKOFF_CAP_S), STORE_RETRIES,
                 supported_errors=(redis.exceptions.ConnectionError,))


class StoreUnavailableError(WorkerFailedError):
    """Redis did not answer (connection refused, timeout). Maps to UNAVAILABLE."""


def _unavailable_on_redis_errors(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise StoreUnavailableError(f"metadata store unavailable: {e}") from e
    return wrapper


_LUA_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function fmt(n) return string.format('%.0f', n) end
-- Gives a placement's blocks back to its instance's counters and deletes it.
local function drop(plc, deadlines, resv_prefix, rid)
  local inst = redis.call('HGET', plc, 'instance')
  if inst then
    local resv = resv_prefix .. inst
    for _, g in ipairs(cjson.decode(redis.call('HGET', plc, 'groups'))) do
      redis.call('HINCRBY', resv, tostring(g[1]), -g[4])
    end
    redis.call('DEL', plc)
  end
  redis.call('ZREM', deadlines, rid)
end
-- 1 live, 0 unknown, -1 expired (and then freed and counted here).
local function liveness(plc, deadlines, stats, resv_prefix, rid, now)
  local d = redis.call('ZSCORE', deadlines, rid)
  if not d then return 0 end
  if tonumber(d) >= now then return 1 end
  drop(plc, deadlines, resv_prefix, rid)
  redis.call('HINCRBY', stats, 'expired', 1)
  return -1
end
"""

# KEYS: inst, instances. ARGV: id, ttl_ms, field, value, ...
_REGISTER = _LUA_PRELUDE + """
local now = now_ms()
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'heartbeat_ms', fmt(now), unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return fmt(now)
"""

# KEYS: inst. ARGV: ttl_ms, free_csv, num_groups, load_json ('' = none: the last one keeps aging).
# -> 1 ok, 0 unknown, -1 wrong number of groups. The load's time is Redis's (load_ms), like the
# heartbeat's, so readers get its age without comparing hosts' clocks.
_HEARTBEAT = _LUA_PRELUDE + """
local groups = redis.call('HGET', KEYS[1], 'num_groups')
if not groups then return 0 end
if ARGV[2] ~= '' and tonumber(groups) ~= tonumber(ARGV[3]) then return -1 end
local now = fmt(now_ms())
redis.call('HSET', KEYS[1], 'heartbeat_ms', now, 'free', ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'load', ARGV[4], 'load_ms', now) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: inst, resv, plc, deadlines, stats, epoch. ARGV: rid, lease_ms, groups_json, resv_prefix,
# field, value, ... -> {'ok', deadline, epoch} | {'exists'} | {'gone'} | {'full', group, available}
_RESERVE = _LUA_PRELUDE + """
local rid, lease_ms = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
if liveness(KEYS[3], KEYS[4], KEYS[5], ARGV[4], rid, now) == 1 then return {'exists'} end
local cap_csv = redis.call('HGET', KEYS[1], 'capacity')
if not cap_csv then return {'gone'} end
local caps = {}
for c in string.gmatch(cap_csv, '[^,]+') do caps[#caps + 1] = tonumber(c) end
local groups = cjson.decode(ARGV[3])
for _, g in ipairs(groups) do
  local k, need = g[1], g[4]
  local cap = caps[k + 1] or 0
  local used = tonumber(redis.call('HGET', KEYS[2], tostring(k)) or '0')
  if used + need > cap then return {'full', tostring(k), tostring(cap - used)} end
end
for _, g in ipairs(groups) do redis.call('HINCRBY', KEYS[2], tostring(g[1]), g[4]) end
local deadline = now + lease_ms
if redis.call('EXISTS', KEYS[6]) == 0 then redis.call('SET', KEYS[6], fmt(now * 1000)) end
local epoch = fmt(redis.call('INCR', KEYS[6]))
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'groups', ARGV[3], 'lease_ms', ARGV[2], 'deadline_ms', fmt(deadline),
           'epoch', epoch, unpack(ARGV, 5))
redis.call('ZADD', KEYS[4], fmt(deadline), rid)
return {'ok', fmt(deadline), epoch}
"""

# KEYS: plc, deadlines, stats. ARGV: rid, resv_prefix, epoch ('0' = any).
# -> new deadline | 0 unknown | -1 expired | -2 another epoch
_RENEW = _LUA_PRELUDE + """
local now = now_ms()
local live = liveness(KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[1], now)
if live ~= 1 then return live end
if ARGV[3] ~= '0' and redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[3] then return -2 end
local deadline = now + tonumber(redis.call('HGET', KEYS[1], 'lease_ms'))
redis.call('ZADD', KEYS[2], fmt(deadline), ARGV[1])
redis.call('HSET', KEYS[1], 'deadline_ms', fmt(deadline))
return fmt(deadline)
"""

# KEYS: plc, deadlines, stats. ARGV: rid, resv_prefix, epoch ('0' = any).
# -> 1 released | 0 unknown | -1 expired | -2 another epoch (kept)
_RELEASE = _LUA_PRELUDE + """
local live = liveness(KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[1], now_ms())
if live ~= 1 then return live end
if ARGV[3] ~= '0' and redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[3] then return -2 end
drop(KEYS[1], KEYS[2], ARGV[2], ARGV[1])
return 1
"""

# KEYS: plc, deadlines. ARGV: rid. -> the placement hash as a flat list, or {} (unknown/expired)
_GET = _LUA_PRELUDE + """
local d = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not d or tonumber(d) < now_ms() then return {} end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: deadlines, stats. ARGV: plc_prefix, resv_prefix, limit. -> expired request ids
_REAP = _LUA_PRELUDE + """
local now = now_ms()
local rids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. fmt(now), 'LIMIT', 0, ARGV[3])
for _, rid in ipairs(rids) do drop(ARGV[1] .. rid, KEYS[1], ARGV[2], rid) end
if #rids > 0 then redis.call('HINCRBY', KEYS[2], 'expired', #rids) end
return rids
"""

# KEYS: deadlines. ARGV: plc_prefix, min_ms. -> how many leases were extended. Every live placement's
# lease runs at least max(its lease_ms, min_ms) from now (the kvstore or Redis was away: nobody could renew).
_GRACE = _LUA_PRELUDE + """
local now = now_ms()
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local n = 0
for i = 1, #entries, 2 do
  local rid, d = entries[i], tonumber(entries[i + 1])
  local lease = math.max(tonumber(redis.call('HGET', ARGV[1] .. rid, 'lease_ms') or '0'), tonumber(ARGV[2]))
  if now + lease > d then
    redis.call('ZADD', KEYS[1], fmt(now + lease), rid)
    redis.call('HSET', ARGV[1] .. rid, 'deadline_ms', fmt(now + lease))
    n = n + 1
  end
end
return n
"""

_DEPLOYMENT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class ReserveResult:
    """Outcome of one atomic reservation attempt.

    reason: "" (ok: `placement` is the recorded one, with its deadline), "exists" (the request id
    already has a live placement), "gone" (the instance's registration expired), "full" (`group`
    had only `available` blocks left).
    """
    placement: Placement | None = None
    reason: str = ""
    group: int = -1
    available: int = 0

    @property
    def ok(self) -> bool:
        return self.placement is not None


class MetadataStore:
    """Instances and placements of one deployment (a key prefix) in one Redis database."""

    def __init__(self, url: str, *, deployment: str = "default", timeout_s: float = 5.0,
                 password: str | None = None) -> None:
        """`password`: Redis' (AUTH) when the URL has none."""
        if not _DEPLOYMENT.match(deployment):
            raise ConfigError(f"metadata store: deployment {deployment!r} must match "
                              f"{_DEPLOYMENT.pattern}")
        try:
            self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                              socket_connect_timeout=timeout_s, retry=store_retry(),
                                              **({"password": password} if password else {}))
        except ValueError as e:
            raise ConfigError(f"metadata store: bad Redis URL {url!r}: {e}") from e
        self.deployment = deployment
        self.prefix = f"mnemosyne:{{{deployment}}}:"
        self._instances = self.prefix + "instances"
        self._deadlines = self.prefix + "deadlines"
        self._stats = self.prefix + "stats"
        self._epoch = self.prefix + "epoch"
        self._resv_prefix = self.prefix + "resv:"
        self._plc_prefix = self.prefix + "plc:"
        s = self.redis.register_script
        self._register, self._heartbeat = s(_REGISTER), s(_HEARTBEAT)
        self._reserve, self._renew, self._release = s(_RESERVE), s(_RENEW), s(_RELEASE)
        self._get, self._reap, self._grace = s(_GET), s(_REAP), s(_GRACE)

    def close(self) -> None:
        self.redis.close()

    def _inst(self, instance_id: str) -> str:
        return f"{self.prefix}inst:{instance_id}"

    def _plc(self, request_id: str) -> str:
        return self._plc_prefix + request_id

    # ---- instances -------------------------------------------------------------------------

    @_unavailable_on_redis_errors
    def register_instance(self, inst: Instance, ttl_s: float) -> None:
        """Adds or replaces a registration, alive for ttl_s without a heartbeat."""
        fields = {"role": inst.role, "address": inst.address, "block_size": inst.block_size,
                  "kvp_tokens": inst.kvp_tokens, "num_groups": inst.num_groups,
                  "capacity": _csv(inst.capacity), "free": _csv(inst.free),
                  "scheduling": "" if inst.scheduling is None else json.dumps(inst.scheduling.to_dict()),
                  "engine_epoch": inst.engine_epoch}
        flat = [str(x) for kv in fields.items() for x in kv]
        self._register(keys=[self._inst(inst.instance_id), self._instances],
                       args=[inst.instance_id, _ms(ttl_s), *flat])

    @_unavailable_on_redis_errors
    def heartbeat(self, instance_id: str, free: Sequence[int], ttl_s: float,
                  load: LoadReport | None = None) -> bool:
        """Refreshes a registration and stores `load` (None keeps the last one, which ages); False
        when it is unknown or expired (register again)."""
        rc = self._heartbeat(keys=[self._inst(instance_id)],
                             args=[_ms(ttl_s), _csv(free), len(free),
                                   "" if load is None else json.dumps(load.to_dict())])
        if rc == -1:
            raise InvalidRequestError(f"heartbeat of {instance_id}: {len(free)} free-block counts do not "
                          "match the registered KVP groups")
        return rc == 1

    @_unavailable_on_redis_errors
    def deregister_instance(self, instance_id: str) -> bool:
        pipe = self.redis.pipeline()
        pipe.delete(self._inst(instance_id))
        pipe.srem(self._instances, instance_id)
        return bool(pipe.execute()[0])

    @_unavailable_on_redis_errors
    def list_instances(self, role: str | None = None) -> list[Instance]:
        """Live instances (registration not expired), with `reserved`, `heartbeat_age_s`, and
        `load` with `load_age_s` (ages on Redis's clock), sorted by id. Ids whose registration expired are pruned from the set."""
        ids = sorted(self.redis.smembers(self._instances))
        return [i for i in self._read_instances(ids) if role is None or i.role == role]

    @_unavailable_on_redis_errors
    def get_instance(self, instance_id: str) -> Instance | None:
        found = self._read_instances([instance_id])
        return found[0] if found else None

    def _read_instances(self, ids: Iterable[str]) -> list[Instance]:
        ids = list(ids)
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        for i in ids:
            pipe.hgetall(self._inst(i))
            pipe.hgetall(self._resv_prefix + i)
        res = pipe.execute()
        sec, usec = res[0]
        now_ms = sec * 1000 + usec // 1000
        out, dead = [], []
        for n, i in enumerate(ids):
            h, resv = res[1 + 2 * n], res[2 + 2 * n]
            if not h:
                dead.append(i)
                continue
            groups = int(h["num_groups"])
            load = LoadReport.from_dict(json.loads(h["load"])) if h.get("load") else None
            out.append(Instance(
                instance_id=i, role=h["role"], address=h["address"],
                block_size=int(h["block_size"]), kvp_tokens=int(h["kvp_tokens"]),
                capacity=_ints(h["capacity"]), free=_ints(h.get("free", "")),
                reserved=tuple(int(resv.get(str(g), 0)) for g in range(groups)),
                heartbeat_age_s=max(0, now_ms - int(h["heartbeat_ms"])) / 1000,
                scheduling=SchedulingInfo.from_dict(json.loads(h["scheduling"])) if h.get("scheduling") else None,
                load=load, load_age_s=max(0, now_ms - int(h["load_ms"])) / 1000 if load is not None else 0.0,
                engine_epoch=int(h.get("engine_epoch", 0))))
        if dead:
            self.redis.srem(self._instances, *dead)
        return out

    # ---- placements ------------------------------------------------------------------------

    @_unavailable_on_redis_errors
    def try_reserve(self, placement: Placement) -> ReserveResult:
        """Records `placement` (its lease_deadline_ms is ignored) if its instance is alive and every
        group has room; atomic. See ReserveResult."""
        check_id("request_id", placement.request_id)
        groups = json.dumps([[g.group, g.token_start, g.token_end, g.num_blocks]
                             for g in placement.groups])
        fields = {"request_id": placement.request_id, "instance": placement.instance_id,
                  "address": placement.address, "num_tokens": placement.num_tokens,
                  "max_new_tokens": placement.max_new_tokens}
        flat = [str(x) for kv in fields.items() for x in kv]
        res = self._reserve(
            keys=[self._inst(placement.instance_id), self._resv_prefix + placement.instance_id,
                  self._plc(placement.request_id), self._deadlines, self._stats, self._epoch],
            args=[placement.request_id, _ms(placement.lease_s), groups, self._resv_prefix, *flat])
        if res[0] == "ok":
            return ReserveResult(placement=replace(placement, lease_deadline_ms=int(res[1]), epoch=int(res[2])))
        if res[0] == "full":
            return ReserveResult(reason="full", group=int(res[1]), available=int(res[2]))
        return ReserveResult(reason=res[0])

    @_unavailable_on_redis_errors
    def renew(self, request_id: str, epoch: int = 0) -> int | None:
        """Extends the lease by the placement's lease_s; the new deadline (ms, store clock), or
        None when the placement is unknown or had already expired (then it is freed now).
        `epoch` (0 = any): StalePlacementError when the live placement has another."""
        rc = int(self._renew(keys=[self._plc(request_id), self._deadlines, self._stats],
                             args=[request_id, self._resv_prefix, _epoch_arg(epoch)]))
        if rc == -2:
            raise _stale(request_id, epoch, "renew")
        return rc if rc > 0 else None

    @_unavailable_on_redis_errors
    def release(self, request_id: str, epoch: int = 0) -> bool:
        """Frees a live placement; False when unknown or expired (an expired one is freed and
        counted as an expiry, not as a release). `epoch` (0 = any): StalePlacementError when the live
        placement has another (it is kept)."""
        rc = int(self._release(keys=[self._plc(request_id), self._deadlines, self._stats],
                               args=[request_id, self._resv_prefix, _epoch_arg(epoch)]))
        if rc == -2:
            raise _stale(request_id, epoch, "release")
        return rc == 1

    @_unavailable_on_redis_errors
    def get_placement(self, request_id: str) -> Placement | None:
        """The live placement of a request, or None (unknown, released or expired)."""
        flat = self._get(keys=[self._plc(request_id), self._deadlines], args=[request_id])
        if not flat:
            return None
        h = dict(zip(flat[0::2], flat[1::2]))
        return Placement(
            request_id=h["request_id"], instance_id=h["instance"], address=h["address"],
            groups=tuple(GroupRange(*g) for g in json.loads(h["groups"])),
            num_tokens=int(h["num_tokens"]), max_new_tokens=int(h["max_new_tokens"]),
            lease_s=int(h["lease_ms"]) / 1000, lease_deadline_ms=int(h["deadline_ms"]),
            epoch=int(h.get("epoch", 0)))

    @_unavailable_on_redis_errors
    def reap(self, limit: int = 256) -> list[str]:
        """Frees up to `limit` placements whose lease expired; returns their request ids. Safe to
        run from several processes at once (each expiry is freed and counted once)."""
        return list(self._reap(keys=[self._deadlines, self._stats],
                               args=[self._plc_prefix, self._resv_prefix, limit]))

    @_unavailable_on_redis_errors
    def grace(self, min_s: float = 0.0) -> int:
        """Gives every live placement a full lease (at least `min_s`) from now (none is shortened);
        returns how many were extended. For the kvstore after it or Redis was away, when nobody could
        renew."""
        return int(self._grace(keys=[self._deadlines], args=[self._plc_prefix, _ms(min_s)]))

    @_unavailable_on_redis_errors
    def expired_total(self) -> int:
        """Leases that ever expired in this deployment."""
        return int(self.redis.hget(self._stats, "expired") or 0)

    @_unavailable_on_redis_errors
    def placement_ids(self) -> list[str]:
        """Ids of the placements held now (expired ones included until they are reaped)."""
        return list(self.redis.zrange(self._deadlines, 0, -1))

    @_unavailable_on_redis_errors
    def num_placements(self) -> int:
        """Placements not yet released or reaped (expired ones included until reaped)."""
        return int(self.redis.zcard(self._deadlines))


def _epoch_arg(epoch: int) -> str:
    if epoch < 0:
        raise InvalidRequestError(f"placement epoch must be >= 0 (0 = unchecked), got {epoch}")
    return str(int(epoch))


def _stale(request_id: str, epoch: int, what: str) -> StalePlacementError:
    return StalePlacementError(f"{what} of request {request_id} with placement epoch {epoch} refused: the live "
                               "placement has another epoch (this one was released or expired and the id "
                               "placed again)")


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _csv(values: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in values)


def _ints(csv: str) -> tuple[int, ...]:
    return tuple(int(v) for v in csv.split(",")) if csv else ()
