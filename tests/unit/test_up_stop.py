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
