"""Admission accuracy under a loaded mixed workload, through the real services.

The deployment is scripts/up.py's Cluster (router + prefill + decode + kvstore + Redis on loopback).
The workload: Poisson arrivals (`--rate` per second for `--seconds`, fixed seed), mostly short
prompts (decode-only route) and a fraction `--long-share` of long ones (disaggregated route), each
with the deployment's default SLOs (the router's deadline = max(class SLO, slo_factor x predicted
prefill time alone); the TBT SLO is the decode pool's). Before the measured load, a short warm-up
lets admission's online correction see a few measured TTFTs (not counted): short and long prompts
alone, and short prompts sent while a long one is prefilled beside them (make up's pools share the
host's cores: the host contention factor learns from those).

Per admitted request: the router's predicted TTFT and deadlines (the Started event), the TTFT and
mean TBT measured by the client. Reported per run, then the median over `--runs` runs:
  p90_rel_err   p90 of |predicted - actual| / actual over admitted requests   (target <= 0.25)
  met_ttft      fraction of admitted requests whose first token came by their deadline (>= 0.95)
  met_both      fraction meeting both their TTFT deadline and their TBT SLO (mean gap)
  short_ttft_p99, admitted / rejected counts
  floor_p90     after the load, `--floor` identical prompts sent one at a time to the idle deployment:
                p90 of |TTFT - their median| / TTFT, the best constant prediction's error (the
                machine's own spread: no admission can predict better than that here)

`--compare`: the same workload, alternating runs of the pools on LARS + adaptive chunks and on
FCFS + fixed 512-token chunks (the pools' --policy / --chunking / --chunk-size flags through the
Cluster's per-service `extra`), reporting short-request TTFT p99 and requests meeting both SLOs
side by side (needs pool services that take those flags).

Results: bench/results/admission.json and admission.md (the compare mode: admission_compare.*;
`--out-name STEM` writes STEM.json and STEM.md instead).
Run:  python -m bench.admission [--quick] [--compare] [--runs 3] [--rate 1] [--seconds 60]
      [--model builtin|random|PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results"

from common.client import ROUTES, RouterClient  # noqa: E402
from common.errors import MnemosyneError  # noqa: E402
from scripts.up import Cluster, ClusterConfig  # noqa: E402
from tests.fixtures.hf_models import write_random_hf_model  # noqa: E402

DEADLINE_S = 300.0
POLICIES = {"lars_adaptive": ["--policy", "lars", "--chunking", "adaptive"],
            "fcfs_fixed": ["--policy", "fcfs", "--chunking", "fixed", "--chunk-size", "512"]}


def prompt(n: int, seed: int) -> list[int]:
    return [(7 * i + 13 * seed + 3) % 300 + 10 for i in range(n)]


def workload(a: argparse.Namespace, seed: int) -> list[tuple[float, int]]:
    """(arrival second, prompt tokens) of every request."""
    rng = random.Random(seed)
    out, t = [], 0.0
    while t < a.seconds:
        long = rng.random() < a.long_share
        n = rng.randint(*a.long_tokens) if long else rng.randint(*a.short_tokens)
        out.append((t, n))
        t += rng.expovariate(a.rate)
    return out


def call(client: RouterClient, ids: list[int], max_tokens: int, seed: int) -> dict:
    """One request. TTFT and TBT as the router measured them (Finished.timings: from its arrival at
    the router, what admission predicts; the client's own connection is not the pools' doing)."""
    out = {"prompt": len(ids), "code": "OK", "predicted": None}
    try:
        for ev in client.stream(client.request(token_ids=ids, max_tokens=max_tokens, seed=seed)):
            kind = ev.WhichOneof("event")
            if kind == "started":
                st = ev.started
                out.update(route=ROUTES.get(st.route, ""),
                           predicted=st.predicted_ttft_s if st.HasField("predicted_ttft_s") else None,
                           ttft_slo=st.ttft_slo_s if st.HasField("ttft_slo_s") else None,
                           tbt_slo=st.tbt_slo_s if st.HasField("tbt_slo_s") else None)
            elif kind == "finished":
                t = ev.finished.timings
                out.update(ttft=t.ttft_s, tbt_mean=t.tbt_mean_s)
    except MnemosyneError as e:
        return {"prompt": len(ids), "code": type(e).__name__}
    return out


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4) if xs else None


def summarize(results: list[dict], short_limit: int, long_min: int) -> dict:
    """short: prompts below the router's short-prompt limit (decode-only route); mid: the other
    non-long prompts (prefill pool, queued behind or beside long ones); goodput: the share of all
    offered requests that were admitted and met both their TTFT deadline and TBT SLO."""
    ok = [r for r in results if r["code"] == "OK"]
    judged = [r for r in ok if r["predicted"] is not None and r["ttft"] > 0]
    errs = [abs(r["predicted"] - r["ttft"]) / r["ttft"] for r in judged]
    met_ttft = [r for r in judged if r["ttft"] <= r["ttft_slo"]]
    met_both = [r for r in met_ttft if r["tbt_mean"] <= r["tbt_slo"]]
    short = [r["ttft"] for r in ok if r["prompt"] < short_limit]
    mid = [r["ttft"] for r in ok if short_limit <= r["prompt"] < long_min]
    by_route = {}
    for route in ("decode_only", "disaggregated"):
        e = [abs(r["predicted"] - r["ttft"]) / r["ttft"] for r in judged if r["route"] == route]
        by_route[route] = {"admitted": len(e), "p90_rel_err": pct(e, 0.9)}
    return {"requests": len(results), "admitted": len(ok),
            "rejected": sum(r["code"] == "CapacityError" for r in results),
            "other_errors": sorted({r["code"] for r in results} - {"OK", "CapacityError"}),
            "p90_rel_err": pct(errs, 0.9), "median_rel_err": pct(errs, 0.5),
            "met_ttft": round(len(met_ttft) / len(judged), 4) if judged else None,
            "met_both": round(len(met_both) / len(judged), 4) if judged else None,
            "met_both_count": len(met_both),
            "short_ttft_p50_s": pct(short, 0.5), "short_ttft_p99_s": pct(short, 0.99),
            "mid_ttft_p50_s": pct(mid, 0.5), "mid_ttft_p99_s": pct(mid, 0.99),
            "goodput": round(len(met_both) / len(results), 4) if results else None,
            "by_route": by_route}


def run_once(a: argparse.Namespace, model: str | None, tmp: pathlib.Path, label: str, extra_pool: list[str],
             seed: int) -> dict:
    pools = {"prefill": extra_pool, "decode": extra_pool} if extra_pool else {}
    cfg = ClusterConfig(model=model, kv_backend="tcp", router_port=0, prefill_spp=a.spp, decode_kvp=1,
                        decode_kv_tokens=a.decode_kv_tokens, prefill_kv_tokens=8192,
                        short_prompt_tokens=a.short_prompt_tokens, threads=a.threads, extra=pools,
                        deployment=f"adm-{uuid.uuid4().hex[:8]}", log_dir=str(tmp / label))
    arrivals = workload(a, seed)
    with Cluster(cfg) as c, RouterClient(c.router_address, timeout_s=DEADLINE_S) as client:
        for i in range(a.warmup):                     # the online correction sees both routes
            n = a.long_tokens[0] if i % 3 == 2 else a.short_tokens[1]
            if i % 3 != 2:
                call(client, prompt(n, 10_000 + i), a.max_tokens, i)
                continue
            # and a short prompt while the long one is prefilled beside it: the decode pool's host
            # contention factor learns from it
            long = threading.Thread(target=call, args=(client, prompt(n, 10_000 + i), a.max_tokens, i))
            long.start()
            time.sleep(1.0)
            call(client, prompt(a.short_tokens[1], 20_000 + i), a.max_tokens, i)
            long.join(timeout=DEADLINE_S)
        time.sleep(1.0)
        results: list[dict] = []
        lock = threading.Lock()
        t0 = time.monotonic()

        def one(i: int, n: int) -> None:
            sent = time.monotonic() - t0
            r = call(client, prompt(n, i), a.max_tokens, i)
            r["sent_s"] = round(sent, 3)
            with lock:
                results.append(r)
        with ThreadPoolExecutor(128) as pool:
            for i, (at, n) in enumerate(arrivals):
                delay = t0 + at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(one, i, n)
        corrections = router_gauges(c.metrics_urls["router"])
        wall = time.monotonic() - t0
        time.sleep(1.0)
        floor = idle_floor(client, a)                  # after the load: it does not teach admission
    row = summarize(results, a.short_prompt_tokens, a.long_tokens[0])
    row.update(floor)
    row["wall_s"] = round(wall, 1)
    row["corrections"] = corrections
    # [prompt tokens, route, predicted TTFT, measured TTFT, seconds into the load it was sent]: the
    # send time tells which prompts overlapped (a miss's neighbours), in arrival order
    row["samples"] = [[r["prompt"], r["route"], round(r["predicted"], 4), round(r["ttft"], 4), r["sent_s"]]
                      for r in sorted(results, key=lambda r: r["sent_s"])
                      if r["code"] == "OK" and r["predicted"] is not None]
    print(label, json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
    return row


def idle_floor(client: RouterClient, a: argparse.Namespace) -> dict:
    """The machine's own spread, which no prediction can beat: `--floor` prompts of one length (the
    short prompts' midpoint), sent one at a time to the deployment, idle after the load (so they do
    not feed admission's corrections before the measured requests). floor_p90 = p90 of
    |TTFT - their median| / TTFT: the p90 relative error of the best constant prediction of
    identical requests on an idle instance (a lower bound on what any admission can reach for
    prompts of this size here)."""
    if a.floor <= 0:
        return {}
    n = (a.short_tokens[0] + a.short_tokens[1]) // 2
    ttfts = []
    for i in range(a.floor):
        # fresh ids, no prefix shared with any prompt before (prompt(n, s) repeats every 300 seeds, and
        # one seed's prompts share their prefixes: the prefix cache served those in 0.1 s)
        rng = random.Random(f"floor-{i}")
        r = call(client, [rng.randrange(10, 310) for _ in range(n)], a.max_tokens, i)
        if r.get("ttft"):
            ttfts.append(r["ttft"])
        time.sleep(0.3)
    if not ttfts:
        return {}
    mid = statistics.median(ttfts)
    return {"floor_tokens": n, "floor_ttft_median_s": round(mid, 4),
            "floor_p90": pct([abs(t - mid) / t for t in ttfts], 0.9)}


def router_gauges(url: str) -> dict:
    """The router's online TTFT corrections at the end of the run (ratio, overhead, host contention
    and load factors per pool)."""
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        if line.startswith(("mnemosyne_admission_ttft_", "mnemosyne_admission_host_contention",
                            "mnemosyne_admission_load_factor")) and "member_role=" in line:
            role = line.split('member_role="')[1].split('"')[0]
            name = ("ratio" if "correction_ratio" in line else "contention" if "contention" in line
                    else "load" if "load_factor" in line else "overhead_s")
            out.setdefault(role, {})[name] = round(float(line.rsplit(" ", 1)[1]), 4)
    return out


def median_row(rows: list[dict]) -> dict:
    keys = ("p90_rel_err", "median_rel_err", "floor_p90", "met_ttft", "met_both", "short_ttft_p50_s", "short_ttft_p99_s",
            "mid_ttft_p50_s", "mid_ttft_p99_s", "goodput", "met_both_count", "admitted", "rejected", "requests")
    return {k: (round(statistics.median([r[k] for r in rows if r.get(k) is not None]), 4)
                if any(r.get(k) is not None for r in rows) else None) for k in keys}


def pools_take_policy_flags() -> bool:
    out = subprocess.run([sys.executable, "-m", "services.prefill", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    return "--policy" in out.stdout and "--chunking" in out.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one short run (about a minute per mode)")
    p.add_argument("--compare", action="store_true",
                   help="alternate LARS + adaptive vs FCFS + fixed pools on the same workload")
    p.add_argument("--runs", type=int, default=3, help="runs (per policy with --compare)")
    p.add_argument("--rate", type=float, default=1.0, help="offered requests per second")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the load is offered")
    p.add_argument("--long-share", type=float, default=0.1, help="fraction of long prompts")
    p.add_argument("--short-tokens", type=int, nargs=2, default=(32, 200), metavar=("MIN", "MAX"))
    p.add_argument("--long-tokens", type=int, nargs=2, default=(1024, 3072), metavar=("MIN", "MAX"))
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--short-prompt-tokens", type=int, default=256)
    p.add_argument("--warmup", type=int, default=9, help="requests before the measured load")
    p.add_argument("--floor", type=int, default=12,
                   help="identical prompts sent one at a time to the idle deployment after the load: the "
                        "spread of their TTFTs is the floor of any prediction's error here (0: skip)")
    p.add_argument("--spp", type=int, default=1, help="prefill pipeline stages")
    p.add_argument("--decode-kv-tokens", type=int, default=32768)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="builtin",
                   help="builtin (what `make up` serves: SmolLM2-135M, 30 layers), random (a random llama "
                        "of --layers layers) or a checkpoint path")
    p.add_argument("--layers", type=int, default=4, help="layers of the random llama model (--model random)")
    p.add_argument("--width", choices=("smollm", "tiny"), default="smollm",
                   help="the random model's layer shape (--model random): smollm = the built-in model's "
                        "(hidden 576, 9/3 heads, MLP 1536; compute-bound, like a real model), tiny = "
                        "hidden 64 (bound by per-iteration overhead)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-name", default=None,
                   help="results file stem under bench/results (default: admission, or admission_compare)")
    p.add_argument("--preempt-interval-s", type=float, default=None,
                   help="--compare: also run LARS + adaptive with this prefill preemption interval "
                        "(the pools' --preempt-interval-s; the default policy runs at the pools' default)")
    a = p.parse_args(argv)
    if a.quick:
        a.runs, a.seconds, a.warmup = 1, min(a.seconds, 20.0), min(a.warmup, 6)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="admission-bench-"))
    if a.model == "random":
        shape = (dict(num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536)
                 if a.width == "smollm" else dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16))
        model = str(write_random_hf_model(tmp / "model", "llama", num_hidden_layers=a.layers,
                                          max_position_embeddings=4096, seed=5, **shape))
        described = (f"random llama ({a.layers} layers, hidden {shape['num_attention_heads'] * shape['head_dim']}, "
                     f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads)")
    else:
        model = None if a.model == "builtin" else a.model     # None: the Cluster's built-in model
        described = "the built-in model (SmolLM2-135M, 30 layers, float32)" if model is None else model
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    deployment = (f"router + 1 prefill (spp {a.spp}) + 1 decode + kvstore + redis on loopback; {described}, "
                  f"CPU, tcp; {a.threads} torch thread(s) per process")
    OUT.mkdir(parents=True, exist_ok=True)
    if not a.compare:
        rows = [run_once(a, model, tmp, f"run{i}", [], a.seed) for i in range(a.runs)]
        med = median_row(rows)
        result = {"config": vars(a), "machine": machine, "deployment": deployment, "runs": rows, "median": med,
                  "targets": {"p90_rel_err": 0.25, "met_ttft": 0.95}}
        stem = a.out_name or "admission"
        (OUT / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        lines = ["# Admission accuracy under a loaded mixed workload", "",
                 f"{a.rate} req/s Poisson for {a.seconds} s (seed {a.seed}), {a.long_share:.0%} long prompts "
                 f"({a.long_tokens[0]}-{a.long_tokens[1]} tokens, disaggregated), the rest "
                 f"{a.short_tokens[0]}-{a.short_tokens[1]} tokens (decode-only); {a.max_tokens} new tokens; "
                 f"default SLOs. {deployment}. {machine['cpus']} CPUs. Median over {a.runs} run(s). "
                 f"floor_p90: after the load, {a.floor} identical prompts of the short ones' midpoint length "
                 f"sent one at a time to the idle deployment; p90 of |TTFT - their median| / TTFT, the error "
                 f"of the best constant prediction (what the machine's own spread leaves to any admission).", "",
                 "| metric | median | target | runs |", "|---|---|---|---|"]
        for k, target in (("p90_rel_err", "<= 0.25"), ("median_rel_err", ""), ("floor_p90", ""), ("met_ttft", ">= 0.95"),
                          ("met_both", ""), ("short_ttft_p99_s", ""), ("admitted", ""), ("rejected", ""),
                          ("requests", "")):
            lines.append(f"| {k} | {med[k]} | {target} | {', '.join(str(r.get(k)) for r in rows)} |")
        lines += ["", "Per route (p90 relative error): " + "; ".join(
            f"run{i}: " + ", ".join(f"{k} {v['p90_rel_err']} ({v['admitted']})" for k, v in r["by_route"].items())
            for i, r in enumerate(rows))]
        (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    if not pools_take_policy_flags():
        print("the pool services of this build take no --policy/--chunking flags: --compare needs them",
              file=sys.stderr)
        return 2
    policies = dict(POLICIES)
    if a.preempt_interval_s is not None:
        policies[f"lars_adaptive_{a.preempt_interval_s:g}s"] = POLICIES["lars_adaptive"] + [
            "--preempt-interval-s", str(a.preempt_interval_s)]
    per: dict[str, list[dict]] = {k: [] for k in policies}
    for i in range(a.runs):                            # alternated on the same workload
        for name, flags in policies.items():
            per[name].append(run_once(a, model, tmp, f"{name}-{i}", flags, a.seed))
    meds = {k: median_row(v) for k, v in per.items()}
    result = {"config": vars(a), "machine": machine, "deployment": deployment, "runs": per, "median": meds}
    stem = a.out_name or "admission_compare"
    (OUT / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Served LARS + adaptive vs FCFS + fixed (512) on the same mixed workload", "",
             f"{a.rate} req/s Poisson for {a.seconds} s (seed {a.seed}), {a.long_share:.0%} long prompts "
             f"({a.long_tokens[0]}-{a.long_tokens[1]} tokens), the rest {a.short_tokens[0]}-{a.short_tokens[1]} "
             f"tokens (prompts of {a.short_prompt_tokens}+ tokens take the prefill pool: 'mid' below); "
             f"{a.max_tokens} new tokens; default SLOs. {deployment}. Alternated runs, median of {a.runs} each "
             f"(per run in brackets). goodput = requests admitted that met both SLOs / requests offered.", "",
             "| metric | " + " | ".join(policies) + " |", "|---" * (len(policies) + 1) + "|"]
    for k in ("goodput", "met_both_count", "mid_ttft_p50_s", "mid_ttft_p99_s", "short_ttft_p50_s",
              "short_ttft_p99_s", "met_both", "met_ttft", "p90_rel_err", "admitted", "rejected", "requests"):
        cells = [f"{meds[name][k]} [{', '.join(str(r[k]) for r in per[name])}]" for name in policies]
        lines.append(f"| {k} | {' | '.join(cells)} |")
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
