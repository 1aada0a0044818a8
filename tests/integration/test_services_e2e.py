"""The whole deployment end to end: real processes (scripts/up.py's Cluster: Redis, kvstore, prefill
spp=2, decode kvp=2, router), real gRPC, real Redis, for each KV backend (NIXL and TCP; TCP is
`slow`: the other integration modules all serve over it).

Checked against the offline single-process engine: a long prompt spanning both KVP groups gives the
same greedy tokens (and logprobs within float32 rounding); a short prompt takes the short path; 8
concurrent requests of mixed lengths all complete correctly; a client cancel frees every block on
every decode worker and removes the placement from Redis. And `scripts/up.py` (make up) with the
CLI's --server mode as its client, stopped with Ctrl-C.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest

from common.client import RouterClient
from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.metadata.store import MetadataStore
from common.model.tokenizer import load_tokenizer
from common.rpc import client as rpc_client
from common.rpc.protos import decode_pb2, decode_pb2_grpc, router_pb2, router_pb2_grpc
from common.sampling_params import SamplingParams
from scripts.up import Cluster, ClusterConfig
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.waiting import wait_until
from tests.fixtures.placements import placement_for

pytestmark = pytest.mark.timeout(300)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
M = 256                         # tokens per decode KVP group
SHORT = 64                      # prompts below this many tokens skip the prefill pool
MAX_TOKENS = 16


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(7 * i + 13 * seed + 3) % 300 + 10 for i in range(n)]


LONG = prompt(300)              # groups 0 and 1 (M = 256)
MIXED = [prompt(n, s) for s, n in enumerate((20, 300, 40, 100, 350, 60, 200, 450))]
CANCEL = prompt(280, 9)
SEEDED = prompt(300, 21)        # not LONG: LONG is cached by then, and would take the decode-only route


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_random_hf_model(tmp_path_factory.mktemp("svc-model"), "llama", num_attention_heads=6,
                                     num_key_value_heads=2, num_hidden_layers=4, max_position_embeddings=1024,
                                     seed=11))


@pytest.fixture(scope="module")
def offline(model):
    """run(prompt, max_tokens) -> GenerationResult of the single-process engine (the reference)."""
    engine = LLMEngine(EngineConfig(model=model, cache=CacheConfig(block_size=16, num_blocks=256),
                                    scheduler=SchedulerConfig(chunk_size=64)),
                       extra_eos_ids=load_tokenizer(model).eos_token_ids)
    cache: dict = {}

    def run(ids: list[int], max_tokens: int = MAX_TOKENS, **sampling):
        key = (tuple(ids), max_tokens, tuple(sorted(sampling.items())))
        if key not in cache:
            cache[key] = engine.generate([ids], SamplingParams(max_tokens=max_tokens, **sampling))[0]
        return cache[key]
    return run


# TCP in `make test-all` only: every other integration module serves over TCP (test_long_context's
# spp 2 x kvp 4 prompt among them), so `make test` runs this module on NIXL, make up's default.
@pytest.fixture(scope="module", params=["nixl", pytest.param("tcp", marks=pytest.mark.slow)])
def cluster(request, model, tmp_path_factory):
    cfg = ClusterConfig(insecure=True,   # the test calls the kvstore, decode and Redis directly (plaintext)
                        model=model, kv_backend=request.param, router_port=0, kvp_tokens=M,
                        decode_kv_tokens=4096, prefill_kv_tokens=2048, chunk_size=64, short_prompt_tokens=SHORT,
                        lease_s=4.0, deployment=f"e2e-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp(f"logs-{request.param}")))
    with Cluster(cfg) as c:
        yield c


def decode_stats(cluster: Cluster) -> decode_pb2.StatsResponse:
    with rpc_client.blocking_channel(cluster.services["decode"].address) as ch:
        return decode_pb2_grpc.DecodeStub(ch).Stats(decode_pb2.StatsRequest())


def all_free(stats: decode_pb2.StatsResponse) -> bool:
    return all(g.free_blocks == g.total_blocks for g in stats.groups)


def events(cluster: Cluster, ids: list[int], max_tokens: int = MAX_TOKENS) -> list[router_pb2.GenerateResponse]:
    with RouterClient(cluster.router_address, timeout_s=120) as c:
        return list(c.stream(c.request(token_ids=ids, max_tokens=max_tokens)))


def tokens_of(evs) -> tuple[list[int], list[float]]:
    deltas = [e.delta for e in evs if e.HasField("delta")]
    return [t for d in deltas for t in d.token_ids], [lp for d in deltas for lp in d.logprobs]


def test_long_prompt_spanning_both_kvp_groups_equals_offline(cluster, model, offline):
    evs = events(cluster, LONG)
    started = evs[0].started
    assert started.route == router_pb2.ROUTE_DISAGGREGATED
    assert started.prefill_instance and started.decode_instance and started.prompt_tokens == len(LONG)
    progress = [e.progress for e in evs if e.HasField("progress")]
    assert progress and progress[-1].tokens_done == progress[-1].tokens_total == len(LONG)
    ref = offline(LONG)
    toks, lps = tokens_of(evs)
    assert toks == ref.token_ids
    assert max(abs(a - b) for a, b in zip(lps, ref.logprobs)) < 1e-4
    text = "".join(e.delta.text for e in evs if e.HasField("delta"))
    assert text == load_tokenizer(model).decode(ref.token_ids, skip_special_tokens=True)
    fin = evs[-1].finished
    assert fin.timings.completion_tokens == len(ref.token_ids) and fin.timings.ttft_s > 0
    assert len(fin.timings.tbt_s) == len(ref.token_ids) - 1
    wait_until(lambda: all_free(decode_stats(cluster)), what="decode blocks freed")


def test_seeded_sampling_disaggregated_equals_offline(cluster, offline):
    """The prefill instance draws the first token and the decode instance the rest: with a seed, the
    same tokens as the single process (each draw depends only on seed, token index and logits)."""
    with RouterClient(cluster.router_address, timeout_s=120) as c:
        evs = list(c.stream(c.request(token_ids=SEEDED, max_tokens=MAX_TOKENS, temperature=1.3, top_k=50,
                                      seed=20261126)))
    assert evs[0].started.route == router_pb2.ROUTE_DISAGGREGATED
    ref = offline(SEEDED, temperature=1.3, top_k=50, seed=20261126)
    greedy = offline(SEEDED)
    toks, lps = tokens_of(evs)
    assert toks == ref.token_ids and toks != greedy.token_ids
    assert max(abs(a - b) for a, b in zip(lps, ref.logprobs)) < 1e-4


def test_short_prompt_takes_the_short_path(cluster, offline):
    ids = prompt(SHORT - 1, 5)
    evs = events(cluster, ids)
    started = evs[0].started
    assert started.route == router_pb2.ROUTE_DECODE_ONLY and started.prefill_instance == ""
    assert not any(e.HasField("progress") for e in evs)
    assert tokens_of(evs)[0] == offline(ids).token_ids


def test_eight_concurrent_requests_of_mixed_lengths(cluster, offline):
    refs = [offline(p) for p in MIXED]

    def one(ids):
        with RouterClient(cluster.router_address, timeout_s=180) as c:
            return c.complete(token_ids=ids, max_tokens=MAX_TOKENS)

    with ThreadPoolExecutor(len(MIXED)) as pool:
        outs = list(pool.map(one, MIXED))
    for ids, out, ref in zip(MIXED, outs, refs):
        assert out.route == ("disaggregated" if len(ids) >= SHORT else "decode_only")
        assert out.token_ids == ref.token_ids, f"prompt of {len(ids)} tokens"
        assert out.finish_reason == ref.finish_reason
    wait_until(lambda: all_free(decode_stats(cluster)), what="decode blocks freed")
    store = MetadataStore(cluster.redis_url, deployment=cluster.config.deployment)
    try:
        wait_until(lambda: store.num_placements() == 0, what="placements released")
    finally:
        store.close()


def test_every_listening_socket_is_on_loopback(cluster, offline):
    """make up binds 127.0.0.1: so does everything its processes open, not only the gRPC ports: the
    grids' rendezvous store (torch's own listens on every interface), gloo, the KV receivers and
    NIXL's UCX (which listens on every network device unless told otherwise). Checked after a
    disaggregated request, so every KV path has been set up."""
    assert tokens_of(events(cluster, LONG))[0] == offline(LONG).token_ids
    wide = []
    for name, svc in cluster.services.items():
        root = psutil.Process(svc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                conns = p.net_connections(kind="inet")
            except psutil.Error:
                continue                                # exited meanwhile
            for c in conns:
                ip = c.laddr.ip.removeprefix("::ffff:")
                if c.status == psutil.CONN_LISTEN and ip not in ("127.0.0.1", "::1"):
                    wide.append(f"{name} pid {p.pid} listens on {c.laddr.ip}:{c.laddr.port}")
    assert not wide, "\n".join(wide)


def test_client_cancel_frees_every_block_and_the_placement(cluster, offline):
    max_tokens = 200             # 280 + 200 tokens fit the decode grid (2 x 256)
    assert len(offline(CANCEL, max_tokens).token_ids) == max_tokens    # no EOS: it would run long
    rid = f"cancel-{uuid.uuid4().hex[:8]}"
    store = MetadataStore(cluster.redis_url, deployment=cluster.config.deployment)
    with rpc_client.blocking_channel(cluster.router_address, metadata=cluster.auth_metadata) as ch:
        call = router_pb2_grpc.RouterStub(ch).Generate(
            RouterClient.request(token_ids=CANCEL, max_tokens=max_tokens, request_id=rid), timeout=120)
        seen = 0
        for ev in call:
            if ev.HasField("delta"):
                seen += len(ev.delta.token_ids)
            if seen >= 3:
                assert placement_for(store, rid) is not None
                stats = decode_stats(cluster)
                assert [g.free_blocks < g.total_blocks for g in stats.groups] == [True, True]
                call.cancel()
                break
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        assert info.value.code() is grpc.StatusCode.CANCELLED
    try:
        wait_until(lambda: all_free(decode_stats(cluster)), what="every decode block freed")
        wait_until(lambda: placement_for(store, rid) is None and store.num_placements() == 0,
                   what="placement removed from Redis")
        assert store.expired_total() == 0          # released by the router, not reclaimed by a lease
    finally:
        store.close()


def test_make_up_script_serves_the_cli_and_stops_on_ctrl_c(model, offline, tmp_path):
    """scripts/up.py (what `make up` runs) as a user runs it, with `mnemosyne generate --server` as
    the client: same JSON as offline; SIGINT stops every process it started."""
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": ROOT}
    up = subprocess.Popen([py, "scripts/up.py", "--model", model, "--port", "0", "--kv-backend", "tcp",
                           "--kvp-tokens", str(M), "--log-dir", str(tmp_path)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    pids: list[int] = []
    try:
        for line in up.stdout:
            lines.append(line)
            if line.startswith("Ready."):
                break
        text = "".join(lines)
        assert "Ready." in text, text
        router = re.search(r"router\s+(\S+)", text).group(1)
        pids = [int(p) for p in re.findall(r"^  (?:kvstore|prefill|decode|router)\s+\S+\s+pid (\d+)", text, re.M)]
        assert len(pids) == 4 and re.search(r"prefill\s+\S+\s+pid \d+\s+spp=2", text)
        assert "mTLS     between the services" in text and "password in" in text     # make up's default
        prompt_file = tmp_path / "prompt.json"
        prompt_file.write_text(json.dumps(LONG))
        out = subprocess.run([py, "-m", "common.cli", "generate", "--server", router, "--prompt-tokens",
                              str(prompt_file), "--max-tokens", str(MAX_TOKENS), "--json"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        ref = offline(LONG)
        assert got["token_ids"] == ref.token_ids and len(got["tbt_s"]) == len(ref.token_ids) - 1
        up.send_signal(signal.SIGINT)
        rest = up.communicate(timeout=60)[0]
        assert up.returncode == 0 and "All stopped." in rest, rest
        for pid in pids:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    finally:
        if up.poll() is None:                  # a failed check: still stop what up.py started
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait(10)
        for pid in pids:                       # each service leads its own process group (grid workers too)
            try:
                if "services." in " ".join(psutil.Process(pid).cmdline()):
                    os.killpg(pid, signal.SIGKILL)
            except (psutil.Error, ProcessLookupError, PermissionError):
                pass                           # gone, as it should be
