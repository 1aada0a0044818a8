"""SIGTERM of a pool instance with real processes (scripts/up.py's Cluster, TCP backend): the
instance leaves the kvstore first, so nobody picks it any more, and only then drains.

- A decode instance SIGTERMed while a request decodes is gone from the kvstore's list within a
  moment, while the request still streams; the request then completes with the same tokens as one
  process, and the instance exits 0 afterwards.
- An RPC that reaches an instance right after it left the kvstore (a router that chose it a moment
  before) is still served, not refused with UNAVAILABLE.
- Ctrl-C on `make up` (SIGINT to its whole process group, as a terminal sends it) reaches up.py
  only: it stops the router first and Redis last, so the pools deregister and the kvstore logs no
  "metadata store unavailable" on the way down.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest

from common.client import RouterClient
from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.metadata.store import MetadataStore
from common.model.tokenizer import load_tokenizer
from common.pool_service import LEAVE_SETTLE_S
from common.rpc import client as rpc_client
from common.rpc.protos import common_pb2, decode_pb2, decode_pb2_grpc, router_pb2_grpc
from common.sampling_params import SamplingParams
from scripts.up import Cluster, ClusterConfig
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.waiting import wait_until as _wait_until

pytestmark = pytest.mark.timeout(300)

M = 256
PROMPT = [(11 * i + 5) % 300 + 10 for i in range(280)]        # both KVP groups: disaggregated
SHORT_PROMPT = [(7 * i + 3) % 300 + 10 for i in range(20)]    # decoded on the decode instance alone
MAX_TOKENS = 200                                              # time for the SIGTERM to act mid-stream
GRACE_S = 60                                                  # the decode pool's drain


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_random_hf_model(tmp_path_factory.mktemp("shutdown-model"), "llama", num_attention_heads=6,
                                     num_key_value_heads=2, num_hidden_layers=4, max_position_embeddings=1024,
                                     seed=11))


@pytest.fixture(scope="module")
def offline(model):
    engine = LLMEngine(EngineConfig(model=model, cache=CacheConfig(block_size=16, num_blocks=64),
                                    scheduler=SchedulerConfig(chunk_size=64)),
                       extra_eos_ids=load_tokenizer(model).eos_token_ids)
    return lambda ids, n: engine.generate([ids], SamplingParams(max_tokens=n))[0].token_ids


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    cfg = ClusterConfig(insecure=True,   # the test calls the kvstore, decode and Redis directly (plaintext)
                        model=model, kv_backend="tcp", router_port=0, kvp_tokens=M, decode_kv_tokens=2048,
                        prefill_kv_tokens=1024, chunk_size=64, short_prompt_tokens=64,
                        deployment=f"shutdown-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp("shutdown-logs")),
                        extra={"decode": ["--grace-s", str(GRACE_S)]})
    with Cluster(cfg) as c:
        yield c


@pytest.fixture
def decode(cluster, store):
    """The decode service, running and registered (started again after an earlier test stopped it)."""
    if not decode_ids(store):
        cluster.services["decode"].proc.wait(GRACE_S + 10)
        cluster.restart("decode")
        wait_until(lambda: decode_ids(store), 30, "decode instance registered")
    return cluster.services["decode"]


def decode_ids(store: MetadataStore) -> list[str]:
    return [i.instance_id for i in store.list_instances("decode")]


def wait_until(cond, timeout_s: float, what: str, poll_s: float = 0.02):
    return _wait_until(cond, timeout_s, what, poll_s)


class Reader(threading.Thread):
    """Reads one Generate stream to its end, keeping the tokens (or the error)."""

    def __init__(self, cluster: Cluster, ids: list[int], max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.channel = rpc_client.blocking_channel(cluster.router_address, metadata=cluster.auth_metadata)
        self.call = router_pb2_grpc.RouterStub(self.channel).Generate(
            RouterClient.request(token_ids=ids, max_tokens=max_tokens), timeout=120)
        self.tokens: list[int] = []
        self.finish = None
        self.error: grpc.RpcError | None = None

    def run(self) -> None:
        try:
            for ev in self.call:
                if ev.HasField("delta"):
                    self.tokens.extend(ev.delta.token_ids)
                if ev.HasField("finished"):
                    self.finish = ev.finished.finish_reason
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.done_at = time.monotonic()
            self.channel.close()


def test_sigterm_leaves_the_kvstore_first_and_the_request_in_flight_completes(cluster, store, decode, offline):
    reference = offline(PROMPT, MAX_TOKENS)
    assert len(reference) == MAX_TOKENS               # no early EOS: still decoding when SIGTERM comes
    reader = Reader(cluster, PROMPT, MAX_TOKENS)
    reader.start()
    wait_until(lambda: len(reader.tokens) >= 3 or not reader.is_alive(), 60, "first tokens")
    assert reader.is_alive() and reader.error is None, reader.error
    sent = time.monotonic()
    decode.proc.send_signal(signal.SIGTERM)

    wait_until(lambda: not decode_ids(store), 10, "decode instance gone from the kvstore")
    tokens_when_gone = len(reader.tokens)
    assert decode.proc.poll() is None, "the instance must still be draining"
    # Before the fix the instance left only after its drain, i.e. after this request had finished.
    assert tokens_when_gone < MAX_TOKENS // 2, f"left the kvstore only after {tokens_when_gone} tokens"

    reader.join(120)
    assert reader.error is None, reader.error
    assert reader.tokens == reference and reader.finish == common_pb2.FINISH_REASON_LENGTH
    assert decode.proc.wait(30) == 0, decode.log_tail()
    assert not decode_ids(store)
    # Once out of the kvstore the instance waits LEAVE_SETTLE_S for requests on their way, then drains
    # what still runs; a request that ended within that second (the CPU kernels decode this model's
    # 200 tokens in well under one) needed no drain.
    assert "draining its requests" in decode.log_path.read_text() or reader.done_at - sent < LEAVE_SETTLE_S + 0.5


def test_an_rpc_right_after_the_instance_left_is_still_served(cluster, store, decode, offline):
    """A router that picked the instance just before it left (its instance list is cached) still
    gets its request served during the drain."""
    reference = offline(SHORT_PROMPT, 8)
    decode.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: not decode_ids(store), 10, "decode instance gone from the kvstore")
    with rpc_client.blocking_channel(decode.address) as ch:
        responses = list(decode_pb2_grpc.DecodeStub(ch).Decode(decode_pb2.DecodeRequest(
            request_id=f"late-{uuid.uuid4().hex[:8]}", prompt_token_ids=SHORT_PROMPT,
            sampling=common_pb2.SamplingParams(max_tokens=8)), timeout=60))
    tokens = [t for r in responses if r.HasField("delta") for t in r.delta.token_ids]
    assert tokens == reference
    assert decode.proc.wait(30) == 0, decode.log_tail()


def test_ctrl_c_on_make_up_stops_redis_last_and_the_kvstore_sees_no_outage(model, tmp_path):
    root = pathlib.Path(__file__).resolve().parents[2]
    logs, out_path = tmp_path / "logs", tmp_path / "up.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOSYNE_")}
    with open(out_path, "wb") as out:
        # A process group of its own with up.py at its head: a shell's foreground job.
        up = subprocess.Popen([sys.executable, "scripts/up.py", "--model", model, "--kv-backend", "tcp",
                               "--port", "0", "--prefill-spp", "1", "--decode-kvp", "1", "--decode-kv-tokens",
                               "1024", "--prefill-kv-tokens", "1024", "--perf-model", "analytic",
                               "--deployment", f"ctrl-c-{uuid.uuid4().hex[:8]}", "--log-dir", str(logs)],
                              cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "Ready." in out_path.read_text() or up.poll() is not None, 240, "make up ready")
        assert up.poll() is None, out_path.read_text()
        os.killpg(up.pid, signal.SIGINT)                  # what the terminal does on Ctrl-C
        assert up.wait(120) == 0, out_path.read_text()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    assert "All stopped." in out_path.read_text()
    kvstore = (logs / "kvstore.log").read_text()
    assert "metadata store unavailable" not in kvstore and "WARNING" not in kvstore, kvstore
    for pool in ("prefill", "decode"):
        assert "deregister:" not in (logs / f"{pool}.log").read_text()


LAUNCHER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from scripts.up import Cluster, ClusterConfig
cluster = Cluster(ClusterConfig(model=sys.argv[2], kv_backend="tcp", router_port=0, http_port=-1, prefill_spp=1,
                                decode_kvp=1, decode_kv_tokens=1024, prefill_kv_tokens=1024, insecure=True,
                                deployment=sys.argv[3], log_dir=sys.argv[4],
                                pool_flags=("--perf-model", "analytic"))).start()
print(json.dumps({**{name: svc.pid for name, svc in cluster.services.items()}, "redis": cluster.redis.pid}), flush=True)
time.sleep(600)
"""


def test_services_stop_when_the_process_that_launched_them_dies(model, tmp_path):
    """A benchmark or test that starts a deployment with scripts/up.py's Cluster and is killed (SIGKILL
    here: no clean-up runs) leaves nothing computing: every service sees its launcher gone and stops as
    on SIGTERM (the pools leave the kvstore first, grid workers exit with their driver). (Redis, not a
    service of ours, stays: killed here.)"""
    import json
    import psutil
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOSYNE_")}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(root), model, f"orphans-{uuid.uuid4().hex[:8]}",
                                 str(tmp_path / "logs")], cwd=root, env=env, stdout=subprocess.PIPE, text=True)
    pids: dict = {}
    try:
        pids = json.loads(launcher.stdout.readline())
        assert set(pids) == {"kvstore", "prefill", "decode", "router", "redis"}, pids
        services = {name: psutil.Process(pid) for name, pid in pids.items() if name != "redis"}
        launcher.kill()
        launcher.wait(10)
        wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in services.values()),
                   30, "every service stopped after its launcher died")
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
    for name in ("prefill", "decode", "router", "kvstore"):
        assert "is gone: stopping as on SIGTERM" in (tmp_path / "logs" / f"{name}.log").read_text(), name
