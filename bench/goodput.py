"""Goodput under overload, admission on versus off, side by side in one run.

The same deployment (scripts/up.py's Cluster: one decode instance, tiny random HF model, CPU) is
started twice, once with the router's SLO-aware admission and once with --no-admission, and gets
the same offered load: `--rate` requests per second (Poisson arrivals, fixed seed) for `--seconds`,
each a short prompt with its own TTFT SLO. Every call has a deadline.

goodput = requests whose first token came within their TTFT SLO / run duration (arrival of the
first request to the end of the last). Also: admitted/rejected counts, TTFT p50/p90 of the
served requests, how fast rejections came back.

Results: bench/results/goodput.json and goodput.md.
Run: python -m bench.goodput [--rate 40] [--seconds 20] [--ttft-slo-s 0.5]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results"

from common.auth import bearer, resolve_api_key
from common.client import RouterClient  # noqa: E402
from common.rpc import client as rpc_client  # noqa: E402
from common.rpc.protos import router_pb2_grpc  # noqa: E402
from scripts.up import Cluster, ClusterConfig  # noqa: E402
from tests.fixtures.hf_models import write_random_hf_model  # noqa: E402

DEADLINE_S = 60.0


def prompt(n: int, seed: int) -> list[int]:
    return [(7 * i + 13 * seed + 3) % 300 + 10 for i in range(n)]


def call(stub, ids: list[int], max_tokens: int, slo_s: float) -> dict:
    req = RouterClient.request(token_ids=ids, max_tokens=max_tokens, ttft_slo_s=slo_s)
    t0 = time.monotonic()
    ttft = None
    try:
        for ev in stub.Generate(req, timeout=DEADLINE_S):
            if ev.WhichOneof("event") == "delta" and ev.delta.token_ids and ttft is None:
                ttft = time.monotonic() - t0
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
    return {"start": t0, "end": time.monotonic(), "ttft": ttft, "code": code}


def run_load(address: str, rate: float, seconds: float, prompt_tokens: int, max_tokens: int,
             slo_s: float, seed: int) -> dict:
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while t < seconds:
        arrivals.append(t)
        t += rng.expovariate(rate)
    results: list[dict] = []
    lock = threading.Lock()
    with rpc_client.blocking_channel(address, metadata=bearer(resolve_api_key())) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        call(stub, prompt(prompt_tokens, 10_000), max_tokens, 10.0)          # warm-up
        time.sleep(1.0)
        t0 = time.monotonic()
        with ThreadPoolExecutor(256) as pool:
            futs = []
            for i, at in enumerate(arrivals):
                delay = t0 + at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futs.append(pool.submit(call, stub, prompt(prompt_tokens, i), max_tokens, slo_s))
            for f in futs:
                r = f.result()
                with lock:
                    results.append(r)
    duration = max(r["end"] for r in results) - t0
    served = [r for r in results if r["code"] == "OK"]
    good = [r for r in served if r["ttft"] is not None and r["ttft"] <= slo_s]
    rejected = [r for r in results if r["code"] == "RESOURCE_EXHAUSTED"]
    ttfts = sorted(r["ttft"] for r in served if r["ttft"] is not None)

    def pct(xs: list[float], q: float) -> float | None:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4) if xs else None

    return {"requests": len(results), "served": len(served), "met_slo": len(good),
            "rejected": len(rejected), "other_errors": len(results) - len(served) - len(rejected),
            "duration_s": round(duration, 2), "goodput_rps": round(len(good) / duration, 3),
            "throughput_rps": round(len(served) / duration, 3),
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p90_s": pct(ttfts, 0.9),
            "reject_latency_p90_s": pct(sorted(r["end"] - r["start"] for r in rejected), 0.9)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.goodput", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=100.0, help="offered requests per second")
    p.add_argument("--seconds", type=float, default=10.0, help="how long the load is offered")
    p.add_argument("--prompt-tokens", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--ttft-slo-s", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="goodput-"))
    model = write_random_hf_model(tmp / "model", "llama", num_hidden_layers=2, max_position_embeddings=512,
                                  seed=5)
    rows = {}
    for mode, admission in (("admission_on", True), ("admission_off", False)):
        cfg = ClusterConfig(model=str(model), kv_backend="tcp", router_port=0, prefill_spp=1, decode_kvp=1,
                            decode_kv_tokens=131072, prefill_kv_tokens=1024, chunk_size=64,
                            short_prompt_tokens=512, admission=admission,
                            deployment=f"goodput-{uuid.uuid4().hex[:8]}", log_dir=str(tmp / mode))
        with Cluster(cfg) as c:
            rows[mode] = run_load(c.router_address, a.rate, a.seconds, a.prompt_tokens, a.max_tokens,
                                  a.ttft_slo_s, a.seed)
        print(mode, rows[mode], flush=True)
    result = {"config": vars(a), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "deployment": "1 decode instance (decode-only route, KV for 131072 tokens so the kvstore never refuses), tiny random llama (2 layers), CPU, tcp",
              "results": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "goodput.json").write_text(json.dumps(result, indent=2) + "\n")
    keys = ("requests", "served", "met_slo", "rejected", "other_errors", "duration_s", "goodput_rps",
            "throughput_rps", "ttft_p50_s", "ttft_p90_s", "reject_latency_p90_s")
    lines = ["# Goodput under overload: admission on vs off", "",
             f"Offered load: {a.rate} req/s (Poisson, seed {a.seed}) for {a.seconds} s; prompts of "
             f"{a.prompt_tokens} tokens, {a.max_tokens} new tokens, TTFT SLO {a.ttft_slo_s} s per request. "
             f"{result['deployment']}; {os.cpu_count()} CPUs. goodput = requests meeting the TTFT SLO "
             "per second of the run.", "",
             "| metric | admission on | admission off |", "|---|---|---|"]
    for k in keys:
        lines.append(f"| {k} | {rows['admission_on'][k]} | {rows['admission_off'][k]} |")
    (OUT / "goodput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
