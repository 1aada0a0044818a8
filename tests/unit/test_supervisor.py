"""scripts/supervisor.py with a fake cluster and a fake clock: restart on exit, exponential backoff
between consecutive failures, forgiveness after healthy_s, giving up, nothing while stopping."""
from __future__ import annotations

import pathlib

import pytest

from common.errors import ConfigError
from scripts.supervisor import STANDBY_AFTER_S, STANDBY_RETRY_S, RestartPolicy, Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Proc:
    def __init__(self) -> None:
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code


class Svc:
    def __init__(self, name: str) -> None:
        self.name, self.proc, self.log_path = name, Proc(), pathlib.Path(f"/logs/{name}.log")


class Redis:
    def __init__(self, started: bool = True) -> None:
        self.returncode: int | None = None
        self.started = started                 # False: start() failed (no process, no exit status)
        self.log_path = pathlib.Path("/logs/redis/redis.log")

    @property
    def running(self) -> bool:
        return self.started and self.returncode is None


class FakeCluster:
    def __init__(self, fail_starts: int = 0) -> None:
        self.services = {n: Svc(n) for n in ("kvstore", "prefill", "decode", "router")}
        self.redis = Redis()
        self.stopping = False
        self.restarted: list[str] = []
        self.fail_starts = fail_starts         # this many restarts exit while starting
        self.spares: dict[str, Svc] = {}
        self.spawned: list[str] = []           # standby processes started, in order

    def restart(self, name: str) -> None:
        self.restarted.append(name)
        if name == "redis":
            self.redis = Redis()
            return
        spare = self.spares.pop(name, None)             # the real cluster starts its spare, if it lives
        self.services[name] = spare if spare is not None and spare.proc.code is None else Svc(name)
        if self.fail_starts:
            self.fail_starts -= 1
            self.services[name].proc.code = 1
            raise ConfigError(f"{name} exited with code 1 while starting")

    def has_standby(self, name: str) -> bool:
        return name in self.spares and self.spares[name].proc.code is None

    def spawn_standby(self, name: str) -> None:
        self.spawned.append(name)
        self.spares[name] = Svc(name)

    def kill(self, name: str, code: int = -9) -> None:
        if name == "redis":
            self.redis.returncode = code
        else:
            self.services[name].proc.code = code


POLICY = RestartPolicy(first_backoff_s=0.5, max_backoff_s=4.0, healthy_s=60.0, max_failures=5)


def make(fail_starts: int = 0) -> tuple[FakeCluster, Clock, Supervisor]:
    cluster, clock = FakeCluster(fail_starts), Clock()
    return cluster, clock, Supervisor(cluster, POLICY, clock=clock)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [POLICY.backoff_s(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_nothing_happens_while_everything_runs() -> None:
    cluster, clock, sup = make()
    for _ in range(3):
        assert sup.poll()
        clock.now += 100
    assert cluster.restarted == []


def test_an_exited_service_is_restarted_after_the_first_backoff(caplog) -> None:
    cluster, clock, sup = make()
    cluster.kill("decode")
    with caplog.at_level("WARNING", logger="up"):
        assert sup.poll()
    assert cluster.restarted == []                       # waits 0.5 s first
    assert "decode exited with code -9; restarting in 0.5 s (log: /logs/decode.log)" in caplog.text
    clock.now += 0.4
    assert sup.poll() and cluster.restarted == []
    clock.now += 0.1
    assert sup.poll() and cluster.restarted == ["decode"]
    assert sup.poll() and cluster.restarted == ["decode"]  # running again: once only


def test_redis_is_restarted_first() -> None:
    cluster, clock, sup = make()
    cluster.kill("router")
    cluster.kill("redis")
    sup.poll()
    clock.now += 0.5
    sup.poll()
    assert cluster.restarted == ["redis", "router"]


def test_consecutive_failures_back_off_then_give_up(caplog) -> None:
    cluster, clock, sup = make()
    waits = []
    for failure in range(1, 5):
        cluster.kill("kvstore", code=1)
        clock.now += 1.0                                 # it ran 1 s: a failure in a row
        assert sup.poll()
        t0 = clock.now
        while cluster.restarted.count("kvstore") < failure:
            clock.now += 0.25
            assert sup.poll()
        waits.append(clock.now - t0)
    assert waits == [0.5, 1.0, 2.0, 4.0]
    cluster.kill("kvstore", code=1)
    with caplog.at_level("ERROR", logger="up"):
        assert not sup.poll()                            # the 5th failure in a row
    assert sup.gave_up == "kvstore" and "giving up" in caplog.text
    assert not sup.poll() and cluster.restarted.count("kvstore") == 4


def test_a_service_up_for_healthy_s_is_forgiven() -> None:
    cluster, clock, sup = make()
    for _ in range(10):                                  # more failures than max_failures, spread out
        clock.now += POLICY.healthy_s
        cluster.kill("prefill")
        assert sup.poll()
        clock.now += POLICY.first_backoff_s              # always the first backoff
        assert sup.poll()
    assert cluster.restarted == ["prefill"] * 10 and sup.gave_up is None


def test_a_restart_that_fails_while_starting_counts_as_a_failure() -> None:
    cluster, clock, sup = make(fail_starts=10)
    cluster.kill("decode")
    for _ in range(200):
        if not sup.poll():
            break
        clock.now += 0.25
    assert sup.gave_up == "decode" and cluster.restarted == ["decode"] * 4


def test_a_redis_that_failed_to_start_again_is_retried() -> None:
    cluster, clock, sup = make()
    cluster.redis = Redis(started=False)                  # RedisServer.start() raised ConfigError
    assert sup.poll() and cluster.restarted == []
    clock.now += 0.5
    assert sup.poll() and cluster.restarted == ["redis"]
    assert cluster.redis.running


def test_nothing_is_restarted_while_the_cluster_stops() -> None:
    cluster, clock, sup = make()
    cluster.stopping = True
    for name in ("redis", "kvstore", "decode"):
        cluster.kill(name, code=0)
    for _ in range(5):
        assert sup.poll()
        clock.now += 10
    assert cluster.restarted == []


@pytest.mark.parametrize("bad", [dict(first_backoff_s=0), dict(max_backoff_s=0.1), dict(max_failures=0)])
def test_a_bad_policy_is_refused(bad) -> None:
    with pytest.raises(ConfigError):
        RestartPolicy(**bad)


def test_standbys_follow_their_services() -> None:
    """A spare per Python service (not Redis), STANDBY_AFTER_S after the service started; a restart
    uses it up and a new one follows as late again; a spare that dies is replaced at most every
    STANDBY_RETRY_S; none without standby."""
    cluster, clock = FakeCluster(), Clock()
    sup = Supervisor(cluster, POLICY, clock=clock, standby=True)
    sup.poll()
    assert cluster.spawned == []                        # not while the services start
    clock.now += STANDBY_AFTER_S
    sup.poll()
    assert sorted(cluster.spawned) == ["decode", "kvstore", "prefill", "router"]
    spare = cluster.spares["decode"]
    cluster.kill("decode")
    sup.poll()
    clock.now += POLICY.backoff_s(1)
    sup.poll()
    assert cluster.services["decode"] is spare and "decode" not in cluster.spares   # it took over
    sup.poll()
    assert cluster.spawned.count("decode") == 1          # the next one waits for the new one's start
    clock.now += STANDBY_AFTER_S
    sup.poll()
    assert cluster.spawned.count("decode") == 2
    cluster.spares["decode"].proc.code = 1               # a spare that dies
    clock.now += STANDBY_RETRY_S / 2
    sup.poll()
    assert cluster.spawned.count("decode") == 2
    clock.now += STANDBY_RETRY_S / 2
    sup.poll()
    assert cluster.spawned.count("decode") == 3 and cluster.has_standby("decode")
    assert sup.standbys == {"kvstore": 1, "prefill": 1, "decode": 3, "router": 1}

    cluster, clock = FakeCluster(), Clock()
    sup = Supervisor(cluster, POLICY, clock=clock)      # standby off (the default of the class)
    clock.now += 10 * STANDBY_RETRY_S
    sup.poll()
    assert cluster.spawned == []
