"""A prefill grid worker SIGKILLed mid-prefill, with real processes (scripts/up.py's Cluster, TCP
backend, a prefill instance of two pipeline stages).

The prefill instance fails the request (no token has reached the client), leaves the pool, rebuilds
its grid from its mapped weights and registers again, its engine_epoch one higher, within about a
second (0.1 s here: often before the router looked again); the router's retry waits for that newer
engine (`--prefill-wait-s`) instead of having the decode instance prefill the 1,000-token prompt
itself, and the client gets the whole answer, equal to the offline engine's. Nothing is left after.
"""
from __future__ import annotations

import os
import re
import signal
import time
import uuid

import grpc
import pytest

from common.client import RouterClient
from common.rpc import client as rpc_client
from common.rpc.protos import router_pb2_grpc
from scripts.up import Cluster, ClusterConfig
from tests.fixtures.processes import grid_workers
from tests.fixtures.waiting import wait_until
# test_retry's model, 1,000-token prompt (63 chunks of 16: about a second of prefill) and reference
from tests.integration.test_retry import MAX_TOKENS, PROMPT, model, reference  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(300)

LEASE_S = 2.0


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    cfg = ClusterConfig(model=model, kv_backend="tcp", router_port=0, decode_kvp=1, decode_kv_tokens=2048,
                        prefill_kv_tokens=2048, prefill_spp=2, chunk_size=16, short_prompt_tokens=64,
                        pool_flags=("--chunking", "fixed"),   # chunks of 16: the fault lands mid-prefill
                        lease_s=LEASE_S, deployment=f"prefill-retry-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp("prefill-retry-logs")))
    with Cluster(cfg) as c:
        yield c


def attempts(cluster: Cluster, rid: str) -> list[str]:
    """The router's log lines of `rid`'s new attempts."""
    text = (cluster.log_dir / "router.log").read_text(errors="replace")
    return [line for line in text.splitlines() if f"request {rid}: a new attempt" in line]


def test_a_prefill_worker_lost_mid_prefill_is_retried_on_the_rebuilt_instance(cluster, store, reference):
    rid = f"prefill-lost-{uuid.uuid4().hex[:8]}"
    (prefill,) = store.list_instances("prefill")
    workers = grid_workers(cluster.services["prefill"].pid)
    assert len(workers) == 2, workers
    tokens, t_kill = [], None
    with rpc_client.blocking_channel(cluster.router_address, metadata=cluster.auth_metadata) as ch:
        call = router_pb2_grpc.RouterStub(ch).Generate(
            RouterClient.request(token_ids=PROMPT, max_tokens=MAX_TOKENS, request_id=rid), timeout=120)
        try:
            for ev in call:
                if ev.HasField("delta"):
                    tokens.extend(ev.delta.token_ids)
                if t_kill is None and ev.HasField("progress") and not tokens:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    t_kill = time.monotonic()
        except grpc.RpcError as e:
            pytest.fail(f"the client saw the fault: {e.code()}: {e.details()}")
    assert t_kill is not None, "the request ended before the fault"
    print(f"\nprefill worker SIGKILL -> request complete: {time.monotonic() - t_kill:.1f} s")
    assert tokens == reference
    (line,) = attempts(cluster, rid)
    # placed again with the same prefill instance (rebuilt and registered again), not decode-only
    assert re.search(rf", prefill {re.escape(prefill.instance_id)}$", line), line
    assert cluster.services["prefill"].proc.poll() is None                # the process itself never died
    (again,) = store.list_instances("prefill")
    assert again.instance_id == prefill.instance_id and again.engine_epoch == prefill.engine_epoch + 1
    wait_until(lambda: store.num_placements() == 0, LEASE_S + 5, "no placement left")
