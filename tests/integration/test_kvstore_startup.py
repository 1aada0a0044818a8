"""The kvstore process when Redis is not up yet (a real `python -m services.kvstore`, real
redis-server): it keeps trying for --redis-connect-timeout-s, one log line per attempt, then either
serves (Redis came up meanwhile) or exits 1 with a one-line error and no traceback.
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from common.metadata.redis_server import RedisServer
from common.rpc import client as rpc_client
from common.rpc.protos import kvstore_pb2, kvstore_pb2_grpc

pytestmark = pytest.mark.timeout(120)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def start_kvstore(log: pathlib.Path, redis_port: int, timeout_s: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOSYNE_")}
    env["PYTHONPATH"] = str(ROOT)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.kvstore", "--port", "0", "--metrics-port", "-1", "--grace-s", "0",
             "--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--redis-connect-timeout-s", str(timeout_s)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def attempts(text: str) -> int:
    return text.count("not reachable (attempt")


def test_without_redis_it_gives_up_after_the_timeout_with_one_clear_line(tmp_path, free_port):
    log = tmp_path / "kvstore.log"
    port = free_port()                               # nobody listens there
    t0 = time.monotonic()
    proc = start_kvstore(log, port, 1.5)
    assert proc.wait(60) == 1
    elapsed = time.monotonic() - t0
    text = log.read_text()
    assert "Traceback" not in text, text
    assert attempts(text) >= 3, text                 # backoff: 0.2, 0.4, 0.8 s ... within 1.5 s
    last = text.strip().splitlines()[-1]
    assert f"Redis at 127.0.0.1:{port} did not answer within 1.5 s" in last and "ERROR" in last, last
    assert elapsed < 20, f"took {elapsed:.1f} s"


def test_redis_that_starts_late_is_waited_for(tmp_path, free_port):
    log = tmp_path / "kvstore.log"
    port = free_port()
    proc = start_kvstore(log, port, 30)
    redis = RedisServer(port=port)
    try:
        deadline = time.monotonic() + 30
        while attempts(log.read_text()) < 2:         # it is waiting for Redis
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        redis.start()
        while "kvstore listening on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        address = log.read_text().split("kvstore listening on ", 1)[1].split()[0]
        with rpc_client.blocking_channel(address) as ch:
            got = kvstore_pb2_grpc.KVStoreStub(ch).ListInstances(kvstore_pb2.ListInstancesRequest(), timeout=10)
        assert list(got.instances) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        redis.stop()


def test_a_bad_value_of_the_timeout_is_a_config_error():
    from common.errors import ConfigError
    from services.kvstore.config import KVStoreConfig
    with pytest.raises(ConfigError, match=r"redis_connect_timeout_s.*\(--redis-connect-timeout-s\)"):
        KVStoreConfig.from_args(["--redis-connect-timeout-s", "0"], env={})
    assert KVStoreConfig.from_args([], env={"MNEMOSYNE_REDIS_CONNECT_TIMEOUT_S": "7"}).redis_connect_timeout_s == 7
