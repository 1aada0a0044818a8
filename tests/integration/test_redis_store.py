"""The metadata store and the redis-server launcher, against a real redis-server."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from common.errors import ConfigError, InvalidRequestError
from common.metadata.redis_server import RedisServer
from common.metadata.store import STORE_RETRIES, MetadataStore, StoreUnavailableError, store_retry
from common.metadata.types import GroupRange, Instance, LoadReport, Placement


@pytest.fixture
def store(redis_url):
    s = MetadataStore(redis_url, deployment=f"t-{uuid.uuid4().hex[:12]}")
    yield s
    s.close()


def decode(instance_id="d0", capacity=(10, 10), kvp_tokens=64, block_size=16):
    return Instance(instance_id, "decode", f"127.0.0.1:{1000 + len(instance_id)}", block_size,
                    kvp_tokens, capacity)


def placement(rid, instance_id="d0", blocks=(4, 2), lease_s=30.0):
    groups = tuple(GroupRange(g, 64 * g, 64 * (g + 1), n) for g, n in enumerate(blocks))
    return Placement(rid, instance_id, "127.0.0.1:1", groups, 64 * len(blocks), 8, lease_s)


def reserved(store, instance_id="d0"):
    return store.get_instance(instance_id).reserved


# ---- launcher ---------------------------------------------------------------------------------

def test_launcher_starts_answers_and_stops():
    server = RedisServer().start()
    client = redis.Redis.from_url(server.url)
    assert client.ping()
    assert client.config_get("save") == {"save": ""}
    client.close()
    proc = server._proc
    server.stop()
    assert proc.poll() is not None and not server.running
    server.stop()                                  # idempotent


def test_launcher_refuses_a_taken_port(redis_server):
    with pytest.raises(ConfigError, match="could not start"):
        RedisServer(port=redis_server.port).start(timeout_s=3)


def test_unreachable_redis_is_unavailable(free_port):
    s = MetadataStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    with pytest.raises(StoreUnavailableError, match="unavailable"):
        s.list_instances()


def test_bad_deployment_name(redis_url):
    with pytest.raises(ConfigError, match="deployment"):
        MetadataStore(redis_url, deployment="a:b")


# ---- instances --------------------------------------------------------------------------------

def test_register_list_heartbeat_deregister(store):
    store.register_instance(decode("d0"), ttl_s=30)
    store.register_instance(Instance("p0", "prefill", "127.0.0.1:2"), ttl_s=30)
    assert [i.instance_id for i in store.list_instances()] == ["d0", "p0"]
    [d] = store.list_instances("decode")
    assert d.capacity == (10, 10) and d.reserved == (0, 0) and d.kvp_tokens == 64
    assert store.heartbeat("d0", (7, 9), ttl_s=30)
    assert store.get_instance("d0").free == (7, 9)
    with pytest.raises(InvalidRequestError, match="KVP groups"):
        store.heartbeat("d0", (7,), ttl_s=30)
    assert not store.heartbeat("nope", (1,), ttl_s=30)
    assert store.deregister_instance("p0")
    assert [i.instance_id for i in store.list_instances()] == ["d0"]
    assert store.get_instance("d0").engine_epoch == 0
    store.register_instance(Instance("p0", "prefill", "127.0.0.1:2", engine_epoch=2), ttl_s=30)   # rebuilt twice
    assert store.get_instance("p0").engine_epoch == 2


def test_heartbeat_load_is_stored_with_its_age_on_the_redis_clock(store):
    store.register_instance(decode("d0"), ttl_s=30)
    assert store.get_instance("d0").load is None                  # none until a heartbeat carries one
    load = LoadReport(active_requests=2, queued_prefill_tokens=300, running_decodes=1, kv_free_blocks=(7, 9),
                      kv_used_blocks=(3, 1), kv_block_size=16, kvp_tokens=64, iteration_s=0.02, model_scale=1.25)
    assert store.heartbeat("d0", (7, 9), ttl_s=30, load=load)
    got = store.get_instance("d0")
    assert got.load == load and 0 <= got.load_age_s < 0.5
    time.sleep(0.3)
    assert store.heartbeat("d0", (7, 9), ttl_s=30)                # no load: the last one ages
    got = store.get_instance("d0")
    assert got.load == load and got.load_age_s >= 0.3 and got.heartbeat_age_s < got.load_age_s
    store.register_instance(decode("d0"), ttl_s=30)              # a new registration starts clean
    assert store.get_instance("d0").load is None


def test_registration_expires_without_heartbeats(store):
    store.register_instance(decode("d0"), ttl_s=0.5)
    store.register_instance(decode("d1"), ttl_s=0.5)
    for _ in range(7):
        time.sleep(0.1)
        assert store.heartbeat("d1", (), ttl_s=0.5)
    assert [i.instance_id for i in store.list_instances()] == ["d1"]
    assert not store.heartbeat("d0", (), ttl_s=0.5)


# ---- placements -------------------------------------------------------------------------------

def test_reserve_get_renew_release(store):
    store.register_instance(decode(), ttl_s=30)
    res = store.try_reserve(placement("r1"))
    assert res.ok and res.placement.lease_deadline_ms > 0
    assert reserved(store) == (4, 2)
    got = store.get_placement("r1")
    assert got == res.placement
    deadline = store.renew("r1")
    assert deadline >= got.lease_deadline_ms
    assert store.get_placement("r1").lease_deadline_ms == deadline
    assert store.try_reserve(placement("r1")).reason == "exists"
    assert store.release("r1")
    assert reserved(store) == (0, 0)
    assert not store.release("r1") and store.renew("r1") is None
    assert store.get_placement("r1") is None and store.num_placements() == 0


def test_reserve_checks_capacity_per_group_and_liveness(store):
    store.register_instance(decode(capacity=(10, 3)), ttl_s=30)
    res = store.try_reserve(placement("r1", blocks=(4, 4)))
    assert (res.ok, res.reason, res.group, res.available) == (False, "full", 1, 3)
    assert reserved(store) == (0, 0)                   # nothing half-applied
    assert store.try_reserve(placement("r2", instance_id="ghost")).reason == "gone"


def test_concurrent_reservations_never_over_commit(store):
    store.register_instance(decode(capacity=(40, 40)), ttl_s=30)
    granted, barrier = [], threading.Barrier(16)

    def worker(n):
        barrier.wait()
        for k in range(5):
            if store.try_reserve(placement(f"r{n}-{k}", blocks=(3, 2))).ok:
                granted.append(f"r{n}-{k}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 13                          # floor(40 / 3): group 0 is the limit
    assert reserved(store) == (39, 26)
    for rid in granted:
        assert store.release(rid)
    assert reserved(store) == (0, 0)


def test_expired_lease_is_reclaimed_once_and_counted(store):
    store.register_instance(decode(), ttl_s=30)
    assert store.try_reserve(placement("short", lease_s=0.5)).ok
    assert store.try_reserve(placement("kept", lease_s=0.5, blocks=(1, 1))).ok
    for _ in range(7):                                 # 0.7 s > lease, kept alive by renewals
        time.sleep(0.1)
        assert store.renew("kept") is not None
    assert store.get_placement("short") is None        # dead once past its deadline
    assert reserved(store) == (5, 3)                   # ...but not reclaimed until reaped
    assert store.reap() == ["short"]
    assert store.reap() == []
    assert reserved(store) == (1, 1) and store.expired_total() == 1
    assert not store.release("short")


def test_expired_lease_is_reclaimed_by_renew_and_release_too(store):
    store.register_instance(decode(), ttl_s=30)
    assert store.try_reserve(placement("a", lease_s=0.1)).ok
    assert store.try_reserve(placement("b", lease_s=0.1)).ok
    time.sleep(0.2)
    assert store.renew("a") is None
    assert not store.release("b")
    assert reserved(store) == (0, 0) and store.expired_total() == 2
    assert store.reap() == []                          # nothing counted twice


def test_request_id_is_reusable_after_expiry(store):
    store.register_instance(decode(), ttl_s=30)
    assert store.try_reserve(placement("r", lease_s=0.1)).ok
    time.sleep(0.2)
    assert store.try_reserve(placement("r")).ok        # the stale one is freed first
    assert reserved(store) == (4, 2) and store.expired_total() == 1


def test_deployments_are_isolated(redis_url, store):
    other = MetadataStore(redis_url, deployment=store.deployment + "-other")
    try:
        store.register_instance(decode(), ttl_s=30)
        assert other.list_instances() == []
        assert other.try_reserve(placement("r")).reason == "gone"
    finally:
        other.close()


def test_the_store_retry_window_has_a_floor(monkeypatch):
    """However the jitter falls, a refused command is retried for at least 1.5 s (a Redis restart
    takes a few hundred ms) and at most ~3 s: full jitter once drew a total of a few ms in CI."""
    import random
    for draw in (0.0, 1.0):
        monkeypatch.setattr(random, "uniform", lambda a, b, draw=draw: a + draw * (b - a))
        backoff = store_retry()._backoff
        total = sum(backoff.compute(f) for f in range(1, STORE_RETRIES + 1))
        assert (1.5 <= total <= 1.6) if draw == 0.0 else (3.0 <= total <= 3.2), (draw, total)


def test_a_command_outlives_a_redis_restart(tmp_path):
    """redis-py's retry (store_retry) carries a command across a restart of Redis on the same port;
    the Lua scripts a restarted Redis forgot are loaded again."""
    server = RedisServer().start()
    port = server.port
    store = MetadataStore(server.url, deployment="restart")
    try:
        store.register_instance(Instance("d0", "decode", "127.0.0.1:1", block_size=16, capacity=(4,)), ttl_s=30)
        server.stop()
        restarted = []
        timer = threading.Timer(0.4, lambda: restarted.append(RedisServer(port=port).start()))
        timer.start()
        t0 = time.monotonic()
        assert store.list_instances() == []          # the new Redis is empty, and the call succeeded
        assert 0.3 < time.monotonic() - t0 < 5
        timer.join()
        store.register_instance(Instance("d0", "decode", "127.0.0.1:1", block_size=16, capacity=(4,)), ttl_s=30)
        assert [i.instance_id for i in store.list_instances()] == ["d0"]
    finally:
        store.close()
        for s in (server, *restarted):
            s.stop()
    down = MetadataStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError):       # gone for good: unavailable after the retries
        down.list_instances()
    assert time.monotonic() - t0 < 5
    down.close()
