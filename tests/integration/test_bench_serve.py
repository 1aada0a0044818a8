"""`mnemosyne bench serve`, run as a subprocess against a real deployment (scripts/up.py's Cluster on the
built-in model) over gRPC and over the HTTP API: every planned request is in the JSON with sane client-side
timings, and the summary's percentiles, throughput and goodput agree with the per-request records
(recomputed here with statistics.quantiles, not with the module's own percentile)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from scripts.up import Cluster, ClusterConfig

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]
N = 6
TTFT_SLO_S, TBT_SLO_S = 120.0, 30.0          # a loaded 2-core CI machine must not be rejected


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cfg = ClusterConfig(kv_backend="tcp", router_port=0, prefill_spp=1, decode_kvp=1, decode_kv_tokens=2048,
                        prefill_kv_tokens=1024, deployment=f"bench-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp("bench-logs")))
    with Cluster(cfg) as c:
        yield c


def q(values: list[float], p: int) -> float:
    """numpy's default percentile (linear), independently of common/bench_serve.percentile."""
    return values[0] if len(values) == 1 else statistics.quantiles(values, n=100, method="inclusive")[p - 1]


@pytest.mark.parametrize("transport, api", [("grpc", "completions"), ("http", "completions"), ("http", "chat")])
def test_bench_serve_reports_every_request(cluster, tmp_path, transport, api):
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
