"""scripts/up.py's Cluster.stop() and kill() leave no child behind, even when stop() is interrupted
(a second Ctrl-C) or called twice; `--no-supervise`. Stand-in children: `sleep` processes in sessions
of their own, as the services run."""
from __future__ import annotations

import signal
import subprocess

import pytest

from scripts.up import Cluster, ClusterConfig, Service, parse_args


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(ClusterConfig(kv_backend="tcp", log_dir=str(tmp_path)))
    for name in ("kvstore", "prefill", "decode", "router"):
        # Ignores SIGTERM, as a wedged service would: only SIGKILL ends it.
        proc = subprocess.Popen(["bash", "-c", "trap '' TERM; echo ready; sleep 60 & wait"],
                                stdout=subprocess.PIPE, start_new_session=True)
        assert proc.stdout.readline() == b"ready\n"       # the trap is set
        proc.stdout.close()
        c.services[name] = Service(name, proc, tmp_path / f"{name}.log")
    yield c
    c.kill()


def alive(c: Cluster) -> list[str]:
    return [n for n, s in c.services.items() if s.proc.poll() is None]


def test_an_interrupted_stop_still_kills_everything(cluster, monkeypatch):
    def interrupted(timeout_s):
        cluster.services["router"].proc.terminate()
        raise KeyboardInterrupt                           # a second Ctrl-C in the middle of the stop
    monkeypatch.setattr(cluster, "_stop_in_order", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cluster.stop()
    assert alive(cluster) == [] and cluster.stopping


def test_stop_escalates_to_sigkill_and_can_be_called_twice(cluster):
    cluster.stop(timeout_s=0.2)
    assert alive(cluster) == []
    assert all(s.proc.returncode == -signal.SIGKILL for s in cluster.services.values())
    cluster.stop(timeout_s=0.2)


def test_kill_without_wait_only_signals(cluster):
    cluster.kill(wait=False)                              # what the signal handler runs
    for s in cluster.services.values():
        assert s.proc.wait(5) == -signal.SIGKILL


def test_no_supervise_flag():
    assert parse_args([]).supervise is True
    assert parse_args(["--no-supervise"]).supervise is False


def standby(tmp_path, script: str, args: list[str]) -> Service:
    proc = subprocess.Popen(["bash", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=True)
    log = tmp_path / "decode.standby.log"
    log.write_text("decode standing by\n")
    return Service("decode", proc, log, args=args)


def test_a_standby_takes_over_only_alive_and_with_the_same_arguments(cluster, tmp_path):
    """A spare that died, or that was started with other arguments, is not used (restart() then starts a
    new process); a live one is told "go" and takes the service's log and place."""
    log = tmp_path / "decode.log"
    dead = standby(tmp_path, "exit 3", ["--port", "0"])
    dead.proc.wait(10)
    assert cluster._take_over(dead, ["--port", "0"], log) is None
    assert cluster.services["decode"] is not dead and not log.exists()
    other = standby(tmp_path, "read line; echo \"$line\"", ["--port", "0"])
    assert cluster._take_over(other, ["--port", "1"], log) is None
    assert other.proc.poll() is not None                             # ended: its stdin closed
    live = standby(tmp_path, "read line; echo \"$line\"", ["--port", "0"])
    assert cluster._take_over(live, ["--port", "0"], log) is live
    assert live.proc.stdout.read() == b"go\n" and live.proc.wait(10) == 0
    assert cluster.services["decode"] is live and live.log_path == log and log.read_text() == "decode standing by\n"
