"""`mnemosyne generate --server` with the request's own SLOs, against a real deployment (scripts/up.py's
Cluster: Redis, kvstore, one prefill and one decode instance, router; the built-in model): an
impossible --ttft-slo-s is rejected by the router's admission (RESOURCE_EXHAUSTED), printed as one
error line with exit status 2; a generous one is served. Top log-probabilities come back on both
routes (decode-only and disaggregated, where the prefill instance samples the first token) as the
offline engine computes them. `mnemosyne bench serve` against the same deployment reports every request.
One deployment for the whole module (starting one is most of its time)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import uuid

import pytest

from common.client import RouterClient
from common.config import CacheConfig, EngineConfig
from common.engine.engine import LLMEngine
from common.model.tokenizer import load_tokenizer
from common.rpc import convert
from common.rpc.protos import router_pb2
from common.sampling_params import SamplingParams
from scripts.up import Cluster, ClusterConfig

pytestmark = pytest.mark.timeout(600)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cfg = ClusterConfig(kv_backend="tcp", router_port=0, prefill_spp=1, decode_kvp=1, decode_kv_tokens=2048,
                        prefill_kv_tokens=1024, deployment=f"cli-slo-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp("cli-slo-logs")))
    with Cluster(cfg) as c:
        yield c


def generate(router: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.cli", "generate", "--server", router, "--prompt",
                           "Hi", "--max-tokens", "2", *flags], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=180)


def test_generate_sends_the_requests_own_slos_to_the_router(cluster: Cluster):
    ok = generate(cluster.router_address, "--ttft-slo-s", "600", "--tbt-slo-s", "30", "--json")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert 1 <= len(out["token_ids"]) <= 2 and out["ttft_s"] > 0

    r = generate(cluster.router_address, "--ttft-slo-s", "0.000001")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("mnemosyne: error: "), r.stderr
    assert lines[0].startswith("mnemosyne: error: RESOURCE_EXHAUSTED: "), lines[0]
    assert "rejected by admission (ttft_unattainable)" in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout.strip() == ""


def test_top_logprobs_on_both_routes_equal_the_offline_engine(cluster: Cluster, tmp_path):
    """A short prompt (decode-only) and one >= short_prompt_tokens (disaggregated: the first token's
    list comes from the prefill instance's FirstToken): per token K sorted alternatives, the first at
    least as likely as the chosen token, the chosen logprob and the lists within 1e-4 of offline."""
    k, n = 3, 3
    tok = load_tokenizer(None)
    ids = tok.encode("Paris is the capital of France, on the Seine; Berlin is the capital of Germany. " * 30)
    prompts = {"short": ids[:20], "long": ids[:300]}
    routes = {"short": router_pb2.ROUTE_DECODE_ONLY, "long": router_pb2.ROUTE_DISAGGREGATED}
    assert len(prompts["long"]) == 300 >= ClusterConfig.short_prompt_tokens > len(prompts["short"])
    engine = LLMEngine(EngineConfig(model=None, dtype="float32", cache=CacheConfig(max_kv_tokens=1024)),
                       extra_eos_ids=tok.eos_token_ids)
    ref = dict(zip(prompts, engine.generate(list(prompts.values()), SamplingParams(max_tokens=n, top_logprobs=k))))
    engine.shutdown()
    with RouterClient(cluster.router_address, timeout_s=300) as client:
        for name, prompt in prompts.items():
            evs = list(client.stream(client.request(token_ids=prompt, max_tokens=n, logprobs=False, top_logprobs=k,
                                                    ttft_slo_s=600.0, tbt_slo_s=600.0)))
            assert evs[0].started.route == routes[name], f"{name} prompt took route {evs[0].started.route}"
            deltas = [e.delta for e in evs if e.HasField("delta") and e.delta.token_ids]
            tokens = [t for d in deltas for t in d.token_ids]
            logprobs = [lp for d in deltas for lp in d.logprobs]             # implied by top_logprobs
            tops = [convert.top_logprobs_from_proto(t) for d in deltas for t in d.top_logprobs]
            want = ref[name]
            assert tokens == want.token_ids and len(logprobs) == len(tops) == len(tokens) == n, name
            for i, (t, lp, top) in enumerate(zip(tokens, logprobs, tops)):
                assert len(top) == k and top[0][1] >= lp, f"{name} token {i}: {top} vs chosen {lp}"
                assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
                assert abs(lp - want.logprobs[i]) <= 1e-4, f"{name} token {i}: {lp} vs offline {want.logprobs[i]}"
                assert [a for a, _ in top] == [a for a, _ in want.top_logprobs[i]], f"{name} token {i}"
                assert max(abs(v - w) for (_, v), (_, w) in zip(top, want.top_logprobs[i])) <= 1e-4

    # the CLI prints the same through --server
    f = tmp_path / "long.json"
    f.write_text(json.dumps(prompts["long"]))
    r = subprocess.run([sys.executable, "-m", "common.cli", "generate", "--server", cluster.router_address,
                        "--prompt-tokens", str(f), "--max-tokens", str(n), "--top-logprobs", str(k), "--json"],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["token_ids"] == ref["long"].token_ids
    assert [[a for a, _ in top] for top in out["top_logprobs"]] == \
        [[a for a, _ in top] for top in ref["long"].top_logprobs]


def test_ignore_eos_is_honoured_over_the_server(cluster: Cluster):
    """The built-in model ends this chat answer with <|im_end|> well before 24 tokens; with
    --ignore-eos the router and the pools generate exactly --max-tokens."""
    question = ("--prompt", "What is the capital of France?", "--chat", "--max-tokens", "24", "--json")
    plain = subprocess.run([sys.executable, "-m", "common.cli", "generate", "--server", cluster.router_address,
                            *question], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                           text=True, timeout=180)
    assert plain.returncode == 0, plain.stderr
    assert len(json.loads(plain.stdout)["token_ids"]) < 24
    r = subprocess.run([sys.executable, "-m", "common.cli", "generate", "--server", cluster.router_address,
                        *question, "--ignore-eos"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 24


def test_progress_lines_for_a_long_prompt_over_the_server(cluster: Cluster, tmp_path):
    """A prompt past --short-prompt-tokens (256) is prefilled by the prefill pool, whose progress
    the router streams (PrefillProgress): --progress draws it on stderr, stdout keeps the text."""
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([(7 * i + 3) % 1000 + 10 for i in range(300)]))
    r = subprocess.run([sys.executable, "-m", "common.cli", "generate", "--server", cluster.router_address,
                        "--prompt-tokens", str(ids), "--max-tokens", "2", "--progress"], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    bars = [line for line in r.stderr.splitlines() if line.startswith("prefill [")]
    assert bars and "300/300 tokens  100%" in bars[-1] and "tokens/s" in bars[-1], r.stderr
    assert "disaggregated" in r.stderr and "prefill [" not in r.stdout
    quiet = subprocess.run([sys.executable, "-m", "common.cli", "generate", "--server", cluster.router_address,
                            "--prompt-tokens", str(ids), "--max-tokens", "2", "--no-progress"], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "prefill [" not in quiet.stderr, quiet.stderr


# `mnemosyne bench serve`: N requests with SLOs a loaded 2-core CI machine must not miss.
N = 6
TTFT_SLO_S, TBT_SLO_S = 120.0, 30.0

def q(values: list[float], p: int) -> float:
    """numpy's default percentile (linear), independently of common/bench_serve.percentile."""
    return values[0] if len(values) == 1 else statistics.quantiles(values, n=100, method="inclusive")[p - 1]


@pytest.mark.parametrize("transport, api", [("grpc", "completions"), ("http", "completions"), ("http", "chat")])
def test_bench_serve_reports_every_request(cluster, tmp_path, transport, api):
    """`mnemosyne bench serve` as a subprocess, over gRPC and over the HTTP API: every planned request is in
    the JSON with sane client-side timings, and the summary's percentiles, throughput and goodput agree with
    the per-request records (recomputed here with statistics.quantiles, not the module's own percentile)."""
    endpoint = f"grpc://{cluster.router_address}" if transport == "grpc" else cluster.http_url
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "bench", "serve", "--endpoint", endpoint, "--api", api,
         "--rate", "8", "--num-requests", str(N), "--prompt-tokens", "8-24:0.5,40-60:0.5", "--output-tokens", "3-5",
         "--seed", "7", "--ttft-slo-s", str(TTFT_SLO_S), "--tbt-slo-s", str(TBT_SLO_S), "--max-concurrency", "4",
         "--json", str(out)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "TTFT" in proc.stdout and "goodput" in proc.stdout and endpoint in proc.stdout
    doc = json.loads(out.read_text())
    recs, s = doc["requests"], doc["summary"]
    assert doc["config"]["endpoint"] == endpoint and doc["model"]["name"] == "SmolLM2-135M-Instruct"

    assert [r["index"] for r in recs] == list(range(N))
    assert [r["outcome"] for r in recs] == ["ok"] * N, [r["message"] for r in recs]
    for r in recs:
        assert 0 <= r["scheduled_s"] <= r["sent_s"] < r["end_s"]
        assert 0 < r["ttft_s"] <= r["e2e_s"] <= r["end_s"] - r["sent_s"] + 1e-3
        assert r["ttft_s"] + sum(r["tbt_s"]) <= r["e2e_s"] + 1e-6
        assert all(g >= 0 for g in r["tbt_s"])
        assert 1 <= r["output_tokens"] <= r["output_tokens_requested"]
        assert len(r["tbt_s"]) == r["output_tokens"] - 1          # this server streams one token per chunk
        assert r["finish_reason"] in ("length", "stop") and r["request_id"] and r["route"] == "decode_only"
        assert r["server_ttft_s"] is not None and r["server_ttft_s"] <= r["ttft_s"]
        if api == "completions":
            assert r["prompt_tokens"] == r["prompt_tokens_requested"]   # token-id prompts are exact
        else:
            assert r["prompt_tokens"] >= r["prompt_tokens_requested"]   # words + the chat template
    assert any(r["prompt_tokens_requested"] >= 40 for r in recs) and any(r["prompt_tokens_requested"] <= 24
                                                                         for r in recs)

    ttfts = [r["ttft_s"] for r in recs]
    gaps = [g for r in recs for g in r["tbt_s"]]
    e2es = [r["e2e_s"] for r in recs]
    for key, values, ps in (("ttft_s", ttfts, (50, 90, 99)), ("tbt_s", gaps, (50, 90, 99)), ("e2e_s", e2es, (50, 90))):
        assert s[key]["mean"] == pytest.approx(statistics.mean(values))
        for p in ps:
            assert s[key][f"p{p}"] == pytest.approx(q(values, p)), (key, p)
    assert s["ttft_s"]["p50"] <= s["ttft_s"]["p90"] <= s["ttft_s"]["p99"] <= max(ttfts)
    duration = max(r["end_s"] for r in recs)
    assert s["duration_s"] == pytest.approx(duration)
    assert s["throughput_rps"] == pytest.approx(N / duration)
    assert s["output_tokens_per_s"] == pytest.approx(sum(r["output_tokens"] for r in recs) / duration)
    good = sum(r["ttft_s"] <= TTFT_SLO_S and max(r["tbt_s"], default=0) <= TBT_SLO_S for r in recs)
    assert s["goodput"] == pytest.approx(good / N) and s["goodput"] == 1.0
    assert (s["ok"], s["rejected"], s["error"], s["rejection_rate"], s["error_rate"]) == (N, 0, 0, 0.0, 0.0)
    assert "p99 TBT" in s["goodput_criterion"]
