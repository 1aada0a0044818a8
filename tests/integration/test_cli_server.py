"""`mnemosyne generate --server` with the request's own SLOs, against a real deployment (scripts/up.py's
Cluster: Redis, kvstore, one prefill and one decode instance, router; the built-in model): an
impossible --ttft-slo-s is rejected by the router's admission (RESOURCE_EXHAUSTED), printed as one
error line with exit status 2; a generous one is served."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

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
