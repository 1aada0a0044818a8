"""The kvstore service: placement logic (pure), then a real gRPC server on a free loopback port over
the session's real redis-server, and the `python -m services.kvstore` process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis as redis_py
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import CapacityError, WorkerFailedError
from common.metadata.redis_server import RedisServer
from common.metadata.types import GroupRange, Instance
from common.rpc import client, status
from common.rpc.protos import kvstore_pb2 as pb
from common.rpc.protos import kvstore_pb2_grpc
from services.kvstore.config import KVStoreConfig
from services.kvstore.placement import rank, split_groups
from services.kvstore.service import KVStoreService
from tests.fixtures.loop import Loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ---- placement logic, no gRPC -----------------------------------------------------------------


def test_split_groups():
    assert split_groups(5000, 100, 4096, 16) == (GroupRange(0, 0, 4096, 256),
                                                 GroupRange(1, 4096, 5000, 63))  # 904+100 tokens
    # the decode tokens after a full group go to the next one (no group ever holds more than M)
    assert split_groups(8192, 10, 4096, 16) == (GroupRange(0, 0, 4096, 256), GroupRange(1, 4096, 8192, 256),
                                                GroupRange(2, 8192, 8192, 1))
    assert split_groups(4000, 200, 4096, 16) == (GroupRange(0, 0, 4000, 256), GroupRange(1, 4096, 4096, 7))
    assert split_groups(10, 0, 4096, 16) == (GroupRange(0, 0, 10, 1),)
    assert split_groups(100_000, 7, 0, 16) == (GroupRange(0, 0, 100_000, 6251),)  # M = 0: one group


def _inst(iid, capacity, reserved=None, kvp_tokens=64, block_size=16):
    return Instance(iid, "decode", "h:1", block_size, kvp_tokens, capacity,
                    reserved=reserved or (0,) * len(capacity))


def test_rank_prefers_room_now_then_headroom():
    instances = [_inst("full", (10, 10), (9, 9)), _inst("busy", (10, 10), (5, 5)),
                 _inst("idle", (10, 10)), _inst("one-group", (100,)),
                 Instance("p", "prefill", "h:2")]
    ranked = rank(instances, 100, 0)                  # groups need 4 and 3 blocks
    assert [c.instance.instance_id for c in ranked] == ["idle", "busy", "full"]
    assert [c.fits_now for c in ranked] == [True, True, False]
    assert ranked[0].headroom == 6                    # min(10-4, 10-3)
    assert rank(instances, 10_000, 0) == []           # never fits anywhere


def test_rank_of_a_huge_request_is_quick():
    """Fuzzing found Reserve(max_new_tokens=2^31-2) hung the kvstore: it split the request into
    33 million groups of M = 64 tokens (2.3 GB) before finding it fits on no instance."""
    t0 = time.monotonic()
    assert rank([_inst("two-groups", (10, 10))], 12, 2**31 - 2) == []
    assert time.monotonic() - t0 < 0.1


# ---- the gRPC service -------------------------------------------------------------------------



@pytest.fixture
def kvstore(redis_url):
    """start(**config overrides) -> (service, KVStoreStub); a fresh deployment each."""
    loop, started = Loop(20.0), []

    def start(**overrides):
        cfg = KVStoreConfig(**{"port": 0, "redis_url": redis_url, "lease_s": 30.0,
                               "reap_interval_s": 0.05, "grace_s": 1.0,
                               "deployment": f"t-{uuid.uuid4().hex[:12]}", **overrides})
        svc = loop.run(KVStoreService.start(cfg))
        channel = client.blocking_channel(svc.address)
        started.append((svc, channel))
        return svc, kvstore_pb2_grpc.KVStoreStub(channel)

    yield start
    for svc, channel in started:
        channel.close()
        loop.run(svc.stop())
    loop.close()


def register(stub, iid, capacity=(50, 50), kvp_tokens=64, block_size=16):
    return stub.RegisterInstance(pb.RegisterInstanceRequest(instance=pb.InstanceInfo(
        instance_id=iid, role=pb.ROLE_DECODE, address=f"127.0.0.1:{7000 + len(iid)}",
        block_size=block_size, kvp_tokens=kvp_tokens, capacity_blocks=capacity)))


def reserve(stub, rid, num_tokens=100, max_new_tokens=0, instance_id=""):
    return stub.Reserve(pb.ReserveRequest(request_id=rid, num_tokens=num_tokens,
                                          max_new_tokens=max_new_tokens,
                                          instance_id=instance_id)).placement


def reserved(stub):
    return {i.instance_id: tuple(i.reserved_blocks)
            for i in stub.ListInstances(pb.ListInstancesRequest(role=pb.ROLE_DECODE)).instances}


def rpc_error(fn, *args):
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value


def test_health_serving(kvstore):
    svc, stub = kvstore()
    with client.blocking_channel(svc.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "mnemosyne.v1.KVStore"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_register_list_heartbeat(kvstore):
    _, stub = kvstore(instance_ttl_s=9.0)
    resp = register(stub, "d0")
    assert resp.ttl_s == 9.0 and resp.heartbeat_interval_s == 3.0
    stub.RegisterInstance(pb.RegisterInstanceRequest(instance=pb.InstanceInfo(
        instance_id="p0", role=pb.ROLE_PREFILL, address="127.0.0.1:9")))
    stub.Heartbeat(pb.HeartbeatRequest(instance_id="d0", free_blocks=[40, 50]))
    everyone = stub.ListInstances(pb.ListInstancesRequest()).instances
    assert [i.instance_id for i in everyone] == ["d0", "p0"]
    assert list(everyone[0].free_blocks) == [40, 50]
    assert list(everyone[0].capacity_blocks) == [50, 50] and everyone[0].kvp_tokens == 64
    assert stub.DeregisterInstance(pb.DeregisterInstanceRequest(instance_id="p0")).found
    assert reserved(stub) == {"d0": (0, 0)}


def test_registration_keeps_the_published_scheduling_info(kvstore):
    """What a pool publishes for admission (its model, budget, chunking, TBT SLO) survives the
    kvstore (Redis) and the heartbeats, and reads back equal."""
    from common.metadata.types import Instance
    from common.rpc import convert
    from tests.unit.test_proto_roundtrip import _scheduling
    _, stub = kvstore()
    inst = Instance("p0", "prefill", "127.0.0.1:9", 16, scheduling=_scheduling("analytic"))
    stub.RegisterInstance(pb.RegisterInstanceRequest(instance=convert.instance_to_proto(inst)))
    register(stub, "d0")
    stub.Heartbeat(pb.HeartbeatRequest(instance_id="p0"))
    [p0] = stub.ListInstances(pb.ListInstancesRequest(role=pb.ROLE_PREFILL)).instances
    assert convert.instance_from_proto(p0).scheduling == inst.scheduling
    [d0] = stub.ListInstances(pb.ListInstancesRequest(role=pb.ROLE_DECODE)).instances
    assert not d0.HasField("scheduling")


def test_heartbeat_load_reads_back_in_the_listing(kvstore):
    from common.metadata.types import LoadReport
    from common.rpc import convert
    _, stub = kvstore()
    register(stub, "d0")
    load = LoadReport(active_requests=1, running_decodes=1, kv_free_blocks=(40, 50), kv_used_blocks=(10, 0),
                      kv_block_size=16, kvp_tokens=64, iteration_s=0.05, model_scale=0.625)
    stub.Heartbeat(pb.HeartbeatRequest(instance_id="d0", free_blocks=[40, 50], load=convert.load_to_proto(load)))
    [d0] = stub.ListInstances(pb.ListInstancesRequest()).instances
    inst = convert.instance_from_proto(d0)
    assert inst.load == load and 0 <= inst.load_age_s < 1.0
    err = rpc_error(stub.Heartbeat, pb.HeartbeatRequest(instance_id="d0", load=pb.InstanceLoad(active_requests=-1)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = rpc_error(stub.Heartbeat, pb.HeartbeatRequest(instance_id="d0", load=pb.InstanceLoad(model_scale=-1.0)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "model_scale" in err.details()


def test_reserve_get_renew_release(kvstore):
    _, stub = kvstore()
    register(stub, "d0")
    register(stub, "d1")
    reserve(stub, "warm", instance_id="d0")            # d0 busier: the next goes to d1
    p = reserve(stub, "r1", num_tokens=100, max_new_tokens=20)
    assert p.instance_id == "d1" and p.address == "127.0.0.1:7002"
    assert [(g.group, g.token_start, g.token_end, g.num_blocks) for g in p.groups] == [
        (0, 0, 64, 4), (1, 64, 100, 4)]                 # (36 + 20) tokens -> 4 blocks
    assert p.lease_s == 30.0 and p.lease_deadline_unix_ms > 0
    assert reserved(stub) == {"d0": (4, 3), "d1": (4, 4)}

    got = stub.GetPlacement(pb.GetPlacementRequest(request_id="r1")).placement
    assert got == p
    deadline = stub.Renew(pb.RenewRequest(request_id="r1")).lease_deadline_unix_ms
    assert deadline >= p.lease_deadline_unix_ms
    assert reserve(stub, "r1", num_tokens=100, max_new_tokens=20).instance_id == "d1"  # idempotent
    stub.Release(pb.ReleaseRequest(request_id="r1"))
    stub.Release(pb.ReleaseRequest(request_id="warm"))
    assert reserved(stub) == {"d0": (0, 0), "d1": (0, 0)}


@pytest.mark.parametrize("call, match", [
    (lambda s: reserve(s, ""), "request_id must not be empty"),
    (lambda s: reserve(s, "r", num_tokens=0), "num_tokens must be >= 1, got 0"),
    (lambda s: reserve(s, "r", max_new_tokens=-5), "max_new_tokens must be >= 0, got -5"),
    (lambda s: reserve(s, "x" * 300), "at most 256"),
    (lambda s: reserve(s, "r", num_tokens=64 * 3), "fit on no live decode instance"),
    (lambda s: reserve(s, "r", num_tokens=12, max_new_tokens=2**31 - 2), "fit on no live decode instance"),
    (lambda s: reserve(s, "taken", num_tokens=5), "already has a placement"),
    (lambda s: s.RegisterInstance(pb.RegisterInstanceRequest(instance=pb.InstanceInfo(
        instance_id="x", address="h:1", capacity_blocks=[1]))), "role must be set"),
    (lambda s: s.RegisterInstance(pb.RegisterInstanceRequest(instance=pb.InstanceInfo(
        instance_id="x", role=pb.ROLE_DECODE, address="h:1", block_size=16))), "block capacity"),
    (lambda s: s.Heartbeat(pb.HeartbeatRequest(instance_id="d0", free_blocks=[1, 2, 3])),
     "do not match the registered KVP groups"),
    (lambda s: s.Heartbeat(pb.HeartbeatRequest(instance_id="d0", free_blocks=[-1, 2])),
     "negative free blocks"),
])
def test_bad_input_is_invalid_argument(kvstore, call, match):
    _, stub = kvstore()
    register(stub, "d0")                                # 2 groups of 64 tokens
    reserve(stub, "taken")
    err = rpc_error(call, stub)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert match in err.details()


@pytest.mark.parametrize("call", [
    lambda s: s.Renew(pb.RenewRequest(request_id="nope")),
    lambda s: s.Release(pb.ReleaseRequest(request_id="nope")),
    lambda s: s.GetPlacement(pb.GetPlacementRequest(request_id="nope")),
    lambda s: s.Heartbeat(pb.HeartbeatRequest(instance_id="ghost")),
    lambda s: reserve(s, "r", instance_id="ghost"),
])
def test_unknown_is_not_found(kvstore, call):
    _, stub = kvstore()
    register(stub, "d0")
    err = rpc_error(call, stub)
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert "nope" in err.details() or "ghost" in err.details()


def test_released_twice_is_not_found(kvstore):
    _, stub = kvstore()
    register(stub, "d0")
    reserve(stub, "r")
    stub.Release(pb.ReleaseRequest(request_id="r"))
    assert rpc_error(stub.Release, pb.ReleaseRequest(request_id="r")).code() is grpc.StatusCode.NOT_FOUND


def test_an_id_placed_again_gets_a_new_epoch_and_the_old_holder_is_refused(kvstore):
    """A placement released (or expired) and placed again under the same id has a new, larger epoch;
    a renewal or release with the old one is FAILED_PRECONDITION and changes nothing."""
    _, stub = kvstore()
    register(stub, "d0")
    old = reserve(stub, "r")
    assert old.epoch > 0
    assert reserve(stub, "r").epoch == old.epoch                       # idempotent retry: same placement
    stub.Release(pb.ReleaseRequest(request_id="r", epoch=old.epoch))
    new = reserve(stub, "r")
    assert new.epoch > old.epoch
    for call in (lambda: stub.Renew(pb.RenewRequest(request_id="r", epoch=old.epoch)),
                 lambda: stub.Release(pb.ReleaseRequest(request_id="r", epoch=old.epoch))):
        err = rpc_error(call)
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert f"placement epoch {old.epoch} refused" in err.details()
    got = stub.GetPlacement(pb.GetPlacementRequest(request_id="r")).placement
    assert got.epoch == new.epoch and got.lease_deadline_unix_ms == new.lease_deadline_unix_ms
    assert reserved(stub) == {"d0": (4, 3)}                            # still held, not released
    assert stub.Renew(pb.RenewRequest(request_id="r", epoch=new.epoch)).lease_deadline_unix_ms > 0
    stub.Release(pb.ReleaseRequest(request_id="r", epoch=new.epoch))
    assert reserved(stub) == {"d0": (0, 0)}


def test_epochs_keep_growing_when_redis_loses_its_counter(kvstore, redis_url):
    """A Redis restarted without persistence loses the epoch counter; it starts again from Redis's
    clock (microseconds), above any epoch given before."""
    svc, stub = kvstore()
    register(stub, "d0")
    first = reserve(stub, "a").epoch
    time.sleep(0.002)                                  # the clock moves on (epochs count microseconds)
    r = redis_py.Redis.from_url(redis_url)
    r.delete(f"mnemosyne:{{{svc.config.deployment}}}:epoch")
    r.close()
    assert reserve(stub, "b").epoch > first


def test_no_capacity_is_resource_exhausted(kvstore):
    _, stub = kvstore()
    err = rpc_error(reserve, stub, "r")
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no live decode instance" in err.details()
    register(stub, "d0", capacity=(8, 8))
    reserve(stub, "a")                                  # 4 + 3 blocks
    reserve(stub, "b")                                  # 4 + 3 blocks: group 0 now full
    err = rpc_error(reserve, stub, "c")
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "has room now" in err.details()
    assert isinstance(status.error_from_rpc(err), CapacityError)
    stub.Release(pb.ReleaseRequest(request_id="a"))
    assert reserve(stub, "c").instance_id == "d0"


def test_concurrent_reservations_never_over_commit(kvstore):
    _, stub = kvstore()
    register(stub, "d0", capacity=(50, 50))             # each request: 4 + 3 blocks -> 12 fit
    register(stub, "d1", capacity=(20, 50))             # -> 5 fit
    barrier = threading.Barrier(24)

    def one(n):
        barrier.wait()
        try:
            return reserve(stub, f"r{n}").instance_id
        except grpc.RpcError as e:
            assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
            return None

    with ThreadPoolExecutor(24) as pool:
        placed = list(pool.map(one, range(24)))
    counts = {i: placed.count(i) for i in ("d0", "d1")}
    assert counts == {"d0": 12, "d1": 5}
    assert reserved(stub) == {"d0": (48, 36), "d1": (20, 15)}


def test_lease_expiry_reclaims_capacity_and_renewal_keeps_it(kvstore):
    svc, stub = kvstore(lease_s=0.5)
    register(stub, "d0")
    reserve(stub, "forgotten")
    reserve(stub, "kept")
    assert reserved(stub) == {"d0": (8, 6)}
    end = time.monotonic() + 1.2
    while time.monotonic() < end:                       # the owner renews well within the lease
        stub.Renew(pb.RenewRequest(request_id="kept"))
        time.sleep(0.1)
    assert reserved(stub) == {"d0": (4, 3)}             # the reaper gave "forgotten" back
    assert svc.store.expired_total() == 1
    err = rpc_error(stub.GetPlacement, pb.GetPlacementRequest(request_id="forgotten"))
    assert err.code() is grpc.StatusCode.NOT_FOUND and "expired" in err.details()
    assert stub.GetPlacement(pb.GetPlacementRequest(request_id="kept")).placement.instance_id == "d0"


def test_instance_without_heartbeats_disappears(kvstore):
    _, stub = kvstore(instance_ttl_s=0.6)
    register(stub, "d0")
    register(stub, "d1")
    for _ in range(8):
        time.sleep(0.1)
        stub.Heartbeat(pb.HeartbeatRequest(instance_id="d1", free_blocks=[50, 50]))
    assert list(reserved(stub)) == ["d1"]
    assert rpc_error(stub.Heartbeat, pb.HeartbeatRequest(instance_id="d0")).code() is \
        grpc.StatusCode.NOT_FOUND
    assert reserve(stub, "r").instance_id == "d1"


def test_main_serves_and_stops_on_sigterm(redis_url):
    env = {**os.environ, "PYTHONPATH": ROOT, "MNEMOSYNE_REDIS_URL": redis_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.kvstore", "--port", "0", "--lease-s", "5",
         "--deployment", f"t-{uuid.uuid4().hex[:12]}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("kvstore listening on 127.0.0.1:"), proc.stderr.read()
        address = line.split()[-1]
        with client.blocking_channel(address) as ch:
            stub = kvstore_pb2_grpc.KVStoreStub(ch)
            register(stub, "d0")
            assert reserve(stub, "r").lease_s == 5.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_redis_down_is_unavailable_not_a_hang(kvstore):
    private = RedisServer().start()
    try:
        _, stub = kvstore(redis_url=private.url)
        register(stub, "d0")
        private.stop()
        t0 = time.monotonic()
        err = rpc_error(reserve, stub, "r")
        assert err.code() is grpc.StatusCode.UNAVAILABLE and "unavailable" in err.details()
        assert type(status.error_from_rpc(err)) is WorkerFailedError
        assert time.monotonic() - t0 < 5
    finally:
        private.stop()
