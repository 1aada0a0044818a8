"""`make up`'s supervisor with real processes (scripts/up.py's Cluster, TCP backend, the tiny random
model): a SIGKILLed decode instance, kvstore or redis-server is started again and the deployment
serves again within seconds; the decode instance's dead registration is gone at once; a placement
and the registrations held in Redis survive its SIGKILL (the append-only file). As under make up,
each service has a standby process (common/standby.py) that takes over: the restarted decode
instance and kvstore are the processes that stood by, and new standbys follow."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid

import grpc
import pytest

from common.client import RouterClient
from common.errors import MnemosyneError
from common.metadata.types import GroupRange, Placement
from scripts.supervisor import RestartPolicy, Supervisor
from scripts.up import Cluster, ClusterConfig
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.waiting import wait_until as _wait_until

pytestmark = pytest.mark.timeout(240)

log = logging.getLogger(__name__)
PROMPT = [(7 * i + 3) % 300 + 10 for i in range(20)]       # short: decoded by the decode instance
BACK_WITHIN_S = 45.0                                        # measured on 2 busy cores: see the report lines


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_random_hf_model(tmp_path_factory.mktemp("supervisor-model"), "llama", num_attention_heads=4,
                                     num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=512,
                                     seed=5))


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    cfg = ClusterConfig(model=model, kv_backend="tcp", router_port=0, prefill_spp=1, decode_kvp=1,
                        decode_kv_tokens=2048, prefill_kv_tokens=1024, short_prompt_tokens=64, lease_s=3.0,
                        deployment=f"supervise-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp("supervisor-logs")))
    with Cluster(cfg) as c:
        yield c


@pytest.fixture(scope="module", autouse=True)
def supervisor(cluster):
    """What `make up` runs, in a thread: stopped before the cluster is (it must not restart what
    the teardown stops)."""
    sup = Supervisor(cluster, RestartPolicy(first_backoff_s=0.2), standby=cluster.config.standby)
    stop = threading.Event()
    thread = threading.Thread(target=sup.run, args=(stop, 0.1), name="supervisor", daemon=True)
    thread.start()
    yield sup
    stop.set()
    thread.join(60)


def wait_until(cond, timeout_s: float, what: str):
    return _wait_until(cond, timeout_s, what, poll_s=0.1, tolerate=(grpc.RpcError, MnemosyneError))


def serves(cluster: Cluster) -> bool:
    with RouterClient(cluster.router_address, timeout_s=20) as c:
        return len(c.complete(token_ids=PROMPT, max_tokens=4).token_ids) == 4


def standing_by(cluster: Cluster, name: str) -> int:
    """The pid of `name`'s standby process once it has imported its code and waits."""
    def ready():
        spare = cluster.standbys.get(name)
        return spare is not None and cluster.has_standby(name) and "standing by" in spare.log_tail() and spare.pid
    return wait_until(ready, 60, f"a standby {name} process")


def report(what: str, seconds: float) -> None:
    print(f"\n{what}: {seconds:.1f} s")          # -s shows it; the report quotes these
    log.warning("%s: %.1f s", what, seconds)


def test_a_killed_decode_instance_is_restarted_and_serves(cluster, store):
    assert serves(cluster)
    assert cluster.config.standby                                   # make up's default
    spare = standing_by(cluster, "decode")
    old = cluster.services["decode"]
    (registered,) = store.list_instances("decode")
    os.kill(old.pid, signal.SIGKILL)
    t0 = time.monotonic()
    wait_until(lambda: cluster.services["decode"] is not old and cluster.services["decode"].address, 60,
               "decode restarted")
    new = cluster.services["decode"]
    assert registered.instance_id not in [i.instance_id for i in store.list_instances("decode")]
    wait_until(lambda: [i.address for i in store.list_instances("decode")] == [new.address], 10,
               "only the new decode instance registered")
    wait_until(lambda: serves(cluster), BACK_WITHIN_S, "served again")
    report("decode SIGKILL -> serving again", time.monotonic() - t0)
    assert new.pid == spare                                             # the standby took over
    assert "decode taking over" in new.log_tail() and new.log_path == cluster.log_dir / "decode.log"
    assert (cluster.log_dir / f"decode.{old.pid}.log").exists()        # the dead one's log is kept
    assert standing_by(cluster, "decode") not in (spare, old.pid)        # and a new standby follows


def test_a_killed_kvstore_comes_back_on_its_port(cluster, store):
    spare = standing_by(cluster, "kvstore")
    old = cluster.services["kvstore"]
    os.kill(old.pid, signal.SIGKILL)
    t0 = time.monotonic()
    wait_until(lambda: cluster.services["kvstore"] is not old and cluster.services["kvstore"].address, 30,
               "kvstore restarted")
    assert cluster.services["kvstore"].address == old.address          # the pools and router know it
    assert cluster.services["kvstore"].pid == spare
    wait_until(lambda: serves(cluster), BACK_WITHIN_S, "served again")
    report("kvstore SIGKILL -> serving again", time.monotonic() - t0)


def test_a_killed_redis_comes_back_with_its_placements_and_registrations(cluster, store, supervisor):
    (decode,) = store.list_instances("decode")
    rid = f"kept-{uuid.uuid4().hex[:8]}"
    assert store.try_reserve(Placement(rid, decode.instance_id, decode.address, (GroupRange(0, 0, 16, 1),),
                                       16, 4, lease_s=60.0)).ok
    old_pid, url = cluster.redis.pid, cluster.redis_url
    os.kill(old_pid, signal.SIGKILL)
    t0 = time.monotonic()
    wait_until(lambda: cluster.redis.pid != old_pid and cluster.redis.running, 30, "redis restarted")
    assert cluster.redis.url == url                                   # every service's --redis-url holds
    assert store.get_placement(rid) is not None, "the placement was lost"
    # Reloaded from the append-only file, or (a TTL that lapsed meanwhile) registered again on the
    # heartbeat's NOT_FOUND.
    wait_until(lambda: {i.role for i in store.list_instances()} == {"prefill", "decode"}, 10,
               "both pools registered")
    wait_until(lambda: serves(cluster), BACK_WITHIN_S, "served again")
    report("redis SIGKILL -> serving again", time.monotonic() - t0)
    assert store.release(rid)
    assert supervisor.gave_up is None and supervisor.restarts["redis"] == 1
