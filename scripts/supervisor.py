"""`make up`'s supervisor: a service process that exits while the cluster runs is started again.

    supervisor = Supervisor(cluster)
    while supervisor.poll():              # False: a service kept failing; stop everything
        time.sleep(0.3)

What it restarts (through `cluster.restart(name)`, which keeps the addresses the others know): the
private redis-server (same port, its append-only file reloaded), the kvstore (same port), the prefill
and decode instances (they register again) and the router. Consecutive failures of one service wait
0.5 s, 1 s, 2 s, ... up to 10 s before the next start; a service that stayed up `healthy_s` has its
failures forgiven; the `max_failures`-th failure in a row gives up.

With `standby` (make up's default), each Python service also has a spare process that imported its
code and waits (common/standby.py; `cluster.spawn_standby(name)`, started STANDBY_AFTER_S after the
service itself so it does not slow that start): `cluster.restart(name)` starts it in place of the
one that exited, and a new spare follows. A spare that dies is started again at most every
STANDBY_RETRY_S.

Plain logic over a duck-typed cluster (`services`, `redis`, `stopping`, `restart`, and with standby
`has_standby`, `spawn_standby`), with an injectable clock: tests/unit/test_supervisor.py drives it
with a fake cluster and a fake clock.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from common.errors import ConfigError

log = logging.getLogger("up")

ORDER = ("redis", "kvstore", "prefill", "decode", "router")   # what the others depend on first
STANDBYS = ("kvstore", "prefill", "decode", "router")          # the services a spare process can stand in for
STANDBY_AFTER_S = 3.0                    # a spare starts this long after the service it stands in for
STANDBY_RETRY_S = 10.0                   # and at most this often


@dataclass(frozen=True)
class RestartPolicy:
    first_backoff_s: float = 0.5             # wait before restarting after a first failure
    max_backoff_s: float = 10.0              # the wait doubles per consecutive failure, up to this
    healthy_s: float = 60.0                  # up this long: its earlier failures are forgiven
    max_failures: int = 5                    # this many failures in a row: give up, stop everything

    def __post_init__(self) -> None:
        if not 0 < self.first_backoff_s <= self.max_backoff_s:
            raise ConfigError(f"up: restart backoff needs 0 < first_backoff_s <= max_backoff_s, got "
                              f"{self.first_backoff_s} and {self.max_backoff_s}")
        if self.max_failures < 1:
            raise ConfigError(f"up: max_failures must be >= 1, got {self.max_failures}")

    def backoff_s(self, failures: int) -> float:
        """The wait before the restart that follows the `failures`-th consecutive failure (>= 1)."""
        return min(self.first_backoff_s * 2 ** (failures - 1), self.max_backoff_s)


@dataclass
class _Track:
    started_at: float                        # when it was (re)started, on the supervisor's clock
    failures: int = 0                        # consecutive failures, each within healthy_s of its start
    due: float | None = None                 # when the pending restart runs (None: none pending)
    standby_at: float = 0.0                  # the earliest time its next spare process may start


class Supervisor:
    """Watches a cluster's processes; `poll()` restarts what exited. Call it from one thread."""

    def __init__(self, cluster: Any, policy: RestartPolicy = RestartPolicy(),
                 clock: Callable[[], float] = time.monotonic, standby: bool = False) -> None:
        self.cluster = cluster
        self.policy = policy
        self.clock = clock
        self.standby = standby
        self.standbys: dict[str, int] = {}   # name -> spare processes started
        self.gave_up: str | None = None      # the service it gave up on
        self.restarts: dict[str, int] = {}   # name -> restarts done (for tests and the log)
        now = clock()
        self._tracks = {name: _Track(now) for name in self._names()}

    def _names(self) -> list[str]:
        names = set(self.cluster.services) | ({"redis"} if self.cluster.redis is not None else set())
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))

    def _exit_code(self, name: str) -> int | str | None:
        """None while it runs; else its exit status ("?" for a Redis that failed to start again)."""
        if name == "redis":
            redis = self.cluster.redis
            return None if redis.running else ("?" if redis.returncode is None else redis.returncode)
        return self.cluster.services[name].proc.poll()

    def _log_path(self, name: str) -> str:
        path = self.cluster.redis.log_path if name == "redis" else self.cluster.services[name].log_path
        return str(path)

    def poll(self) -> bool:
        """Notes every exit and runs the restarts that are due. False once it gave up (the caller
        stops the cluster); True otherwise, also while the cluster is stopping (it restarts nothing)."""
        if self.gave_up is not None:
            return False
        for name in self._names():
            if self.cluster.stopping:
                return True
            track = self._tracks.setdefault(name, _Track(self.clock()))
            code = self._exit_code(name)
            if code is None:
                self._keep_standby(name, track)
                continue
            now = self.clock()
            if track.due is None:                                   # a new exit
                if now - track.started_at >= self.policy.healthy_s:
                    track.failures = 0
                track.failures += 1
                if track.failures >= self.policy.max_failures:
                    log.error("%s exited with code %s, its %d. failure in a row; giving up (log: %s)",
                              name, code, track.failures, self._log_path(name))
                    self.gave_up = name
                    return False
                wait = self.policy.backoff_s(track.failures)
                log.warning("%s exited with code %s; restarting in %g s (log: %s)", name, code, wait,
                            self._log_path(name))
                track.due = now + wait
            if now >= track.due:
                track.due = None
                track.started_at = now
                track.standby_at = 0.0               # its spare (if any) is used up by this restart
                self.restarts[name] = self.restarts.get(name, 0) + 1
                try:
                    self.cluster.restart(name)
                    log.info("%s is back (%.1f s)", name, self.clock() - now)
                except ConfigError as e:                            # exited while starting: the next
                    log.warning("%s", e)                            # poll counts it as a failure
        return True

    def _keep_standby(self, name: str, track: _Track) -> None:
        """Starts a spare process for running service `name` when it has none (see the module doc)."""
        if not self.standby or name not in STANDBYS or self.cluster.has_standby(name):
            return
        now = self.clock()
        if now < max(track.started_at + STANDBY_AFTER_S, track.standby_at):
            return
        track.standby_at = now + STANDBY_RETRY_S
        self.standbys[name] = self.standbys.get(name, 0) + 1
        try:
            self.cluster.spawn_standby(name)
        except (OSError, ConfigError) as e:
            log.warning("%s: no standby process (%s)", name, e)

    def run(self, stop: threading.Event, interval_s: float = 0.3) -> None:
        """poll() every interval_s until `stop` is set or it gives up (a thread's target in tests)."""
        while not stop.is_set() and self.poll():
            stop.wait(interval_s)
