"""Scheduling policies side by side in the simulator: FCFS + fixed chunks (2048 tokens, one chunk's
worth of tokens per iteration: a Sarathi-style token budget), EDF, LARS by rho alone, and LARS with slack
stealing (the default; with it, a prefill under way also runs before later requests with more work
left where no deadline is lost: common/scheduler/policy.py), at long-context scale.

The engine's own batch formation (common/scheduler/planner.py through common/scheduler/simulate.py)
runs with a performance model standing in for the forward pass, so the results are deterministic:
the shared machine's noise does not enter, and the same seeds give the same numbers. The model is the
analytic roofline of Llama-3-8B in bf16 on one H200 (common/perf_model/analytic.py, preset
h200-bfloat16) — what the paper's long-context regime looks like — not a measurement.

Workload per seed: Poisson arrivals for `--seconds`; 95% short prompts (1K-8K tokens, TTFT SLO 2 s)
and 5% long ones (64K-256K tokens, TTFT SLO = `--long-slo-factor` x their predicted prefill time
alone), every request decoding `--new-tokens` tokens. The arrival rate is set so the offered prefill
work is `--load` of the server's capacity (decodes add to that). Iteration budget 50 ms (a TBT SLO of
~60 ms with headroom).

Also: the paper's three-request example (a 10 s prefill due at 16 s, two 0.5 s prefills arriving at
t = 5 s due 1 s later) on a linear model, for every policy, with an iteration ending at t = 5 s.

Reported per policy and load (medians over seeds): TTFT attainment of short, long and all requests,
short TTFT p50/p99, long TTFT p50, decode TBT p99. Writes bench/results/scheduling_sim.json and .md.
Run: python -m bench.scheduling_sim [--seeds 5] [--loads 0.5,0.8,0.95] [--seconds 60]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

from common.config import ModelConfig
from common.perf_model.analytic import AnalyticModel, hardware
from common.perf_model.calibrated import CalibratedModel
from common.perf_model.prefill_table import PrefillTable
from common.scheduler.chunking import ChunkingConfig
from common.scheduler.simulate import SimConfig, SimRequest, simulate

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET_S = 0.05
LLAMA3_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                        max_position=1 << 20)
CHUNKING = ChunkingConfig(min_chunk=32, max_chunk=8192)
POLICIES = {
    "fcfs-fixed": dict(policy="fcfs", adaptive=False, chunk_size=2048, max_batch_tokens=2048),
    "edf-adaptive": dict(policy="edf"),
    "lars-rho-alone": dict(policy="lars", slack_stealing=False),
    "lars-stealing": dict(policy="lars", slack_stealing=True),
}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def workload(seed: int, load: float, seconds: float, table: PrefillTable, new_tokens: int,
             long_slo_factor: float) -> list[SimRequest]:
    rng = random.Random(seed)
    kinds = []
    for _ in range(10_000):
        long = rng.random() < 0.05
        n = rng.randint(64 * 1024, 256 * 1024) if long else rng.randint(1024, 8192)
        kinds.append((long, n))
    mean_work = statistics.fmean(table.time(n) for _, n in kinds)
    rate = load / mean_work
    reqs, t = [], 0.0
    for i, (long, n) in enumerate(kinds):
        t += rng.expovariate(rate)
        if t > seconds:
            break
        slo = long_slo_factor * table.time(n) if long else 2.0
        reqs.append(SimRequest(f"{'L' if long else 's'}{i}", t, n, new_tokens, slo))
    return reqs


def run_one(name: str, reqs: list[SimRequest], model, table: PrefillTable) -> dict:
    cfg = SimConfig(**{"t_target_s": BUDGET_S, "chunking": CHUNKING, "long_threshold": 256 * 1024,
                       "max_num_seqs": 256, **POLICIES[name]})
    t0 = time.perf_counter()
    res = simulate(reqs, model, cfg, table=table if cfg.adaptive or cfg.policy != "fcfs" else None)
    wall = time.perf_counter() - t0
    short = [tr for tr in res.traces.values() if tr.request.request_id.startswith("s")]
    long = [tr for tr in res.traces.values() if tr.request.request_id.startswith("L")]
    tbts = [g for tr in res.traces.values() for g in tr.tbts]
    frac = lambda trs: sum(tr.met_ttft for tr in trs) / len(trs) if trs else None
    return {"requests": len(reqs), "short": len(short), "long": len(long),
            "met_all": frac(list(res.traces.values())), "met_short": frac(short), "met_long": frac(long),
            "short_ttft_p50": pct([tr.ttft for tr in short], 50), "short_ttft_p99": pct([tr.ttft for tr in short], 99),
            "long_ttft_p50": pct([tr.ttft for tr in long], 50), "tbt_p99": pct(tbts, 99),
            "iterations": len(res.batches), "sim_wall_s": round(wall, 2)}


def three_requests() -> dict:
    """The paper's example on a linear model. A token costs 2**-13 s, so 512-token chunks take 2**-4 s
    exactly and an iteration ends at t = 5 s exactly, when the shorts arrive: the float sums are exact
    and the comparison is the paper's fluid one. (The long one never counts as long here, so it keeps
    the whole budget; its yielding is another mechanism.)"""
    per_token = 2.0 ** -13
    model = CalibratedModel([per_token, 0, 0, 0, 0])
    tok = lambda s: round(s / per_token)
    reqs = [SimRequest("long", 0.0, tok(10.0), 1, 16.0), SimRequest("s1", 5.0, tok(0.5), 1, 1.0),
            SimRequest("s2", 5.0, tok(0.5), 1, 1.0)]
    out = {}
    for name in POLICIES:
        kw = dict(POLICIES[name], chunk_size=512, max_batch_tokens=512) if name == "fcfs-fixed" \
            else POLICIES[name]
        cfg = SimConfig(t_target_s=512 * per_token, long_threshold=1 << 30,
                        chunking=ChunkingConfig(min_chunk=32, max_chunk=512, tolerance=0.0), **kw)
        res = simulate(reqs, model, cfg)
        out[name] = {rid: {"ttft_s": round(res.ttft(rid), 4), "met": res.met(rid)} for rid in res.traces}
    return out


def median_of(runs: list[dict], key: str):
    xs = [r[key] for r in runs if r[key] is not None]
    return statistics.median(xs) if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--loads", default="0.5,0.8,0.95")
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--long-slo-factor", type=float, default=3.0)
    ap.add_argument("--out", default=str(RESULTS / "scheduling_sim"))
    args = ap.parse_args(argv)
    loads = [float(x) for x in args.loads.split(",")]

    model = AnalyticModel(LLAMA3_8B, hardware("h200-bfloat16"), dtype_bytes=2)
    table = PrefillTable(model, BUDGET_S, 256 * 1024, CHUNKING)
    report = {"script": "bench/scheduling_sim.py", "args": vars(args), "host": platform.machine(),
              "model": "Llama-3-8B shapes, analytic roofline, h200-bfloat16 preset",
              "prefill_alone_s": {n: round(table.time(n), 3) for n in (1024, 8192, 65536, 262144)},
              "three_requests": three_requests(), "loads": {}}
    for load in loads:
        per = {}
        for name in POLICIES:
            runs = [run_one(name, workload(seed, load, args.seconds, table, args.new_tokens,
                                           args.long_slo_factor), model, table) for seed in range(args.seeds)]
            per[name] = {"runs": runs, **{k: median_of(runs, k) for k in
                                          ("met_all", "met_short", "met_long", "short_ttft_p50",
                                           "short_ttft_p99", "long_ttft_p50", "tbt_p99")}}
            print(f"load {load}: {name}: met {per[name]['met_all']:.3f} short p99 "
                  f"{per[name]['short_ttft_p99']:.2f}s", flush=True)
        report["loads"][str(load)] = per
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    Path(args.out + ".md").write_text(markdown(report))
    print(f"wrote {args.out}.json and .md")
    return 0


def markdown(r: dict) -> str:
    a = r["args"]
    f = lambda x, fmt="{:.2f}": "–" if x is None else fmt.format(x)
    pc = lambda x: "–" if x is None else f"{100 * x:.0f}%"
    lines = ["# Scheduling policies in the simulator (deterministic)", "",
             f"{r['model']}; the engine's planner in `common/scheduler/simulate.py`; iteration budget "
             f"{BUDGET_S * 1e3:.0f} ms. Prefill alone: " +
             ", ".join(f"{int(n) // 1024}K tokens {t:.2f} s" for n, t in r["prefill_alone_s"].items()) + ".",
             f"Workload: Poisson arrivals for {a['seconds']:.0f} s, 95% short (1K–8K tokens, TTFT SLO 2 s), "
             f"5% long (64K–256K, TTFT SLO {a['long_slo_factor']}x their prefill time alone), "
             f"{a['new_tokens']} new tokens each; load = offered prefill work / capacity. Medians over "
             f"{a['seeds']} seeds.", "",
             "## The paper's three-request example", "",
             "| policy | long (w 10 s, d 16 s) | short 1 (w 0.5 s, d 1 s) | short 2 |", "|---|---|---|---|"]
    for name, res in r["three_requests"].items():
        cell = lambda rid: f"{res[rid]['ttft_s']:.3f} s {'met' if res[rid]['met'] else '**missed**'}"
        lines.append(f"| {name} | {cell('long')} | {cell('s1')} | {cell('s2')} |")
    for load, per in r["loads"].items():
        lines += ["", f"## Load {float(load):.0%}", "",
                  "| policy | TTFT met (all) | short | long | short TTFT p50 | short TTFT p99 | long TTFT p50 | TBT p99 |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, m in per.items():
            lines.append(f"| {name} | {pc(m['met_all'])} | {pc(m['met_short'])} | {pc(m['met_long'])} | "
                         f"{f(m['short_ttft_p50'])} s | {f(m['short_ttft_p99'])} s | {f(m['long_ttft_p50'])} s | "
                         f"{f(m['tbt_p99'], '{:.3f}')} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
