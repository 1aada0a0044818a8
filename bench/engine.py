"""Engine benchmark: prefill throughput and decode time per token vs context length, built-in model.

For each dtype (float32, bfloat16) and context length L (1K ... 32K):
  prefill  time to prefill the first L tokens of one long prompt through `LLMEngine.step()`, chunked
           (chunk size divides every L, so the first L tokens are processed exactly as an L-token
           prompt would be); median over `--runs` runs of the longest prompt.
  decode   time of one engine step that decodes one token over an L-token KV cache; median over
           `--decode-steps` steps. The prefill is skipped for these: the request's first L-1
           positions are marked as cached (their KV values do not change the cost of a step).
Each number stands next to its roofline floor on this machine (bench/roofline.py):
  prefill floor = FLOPs(L) / matmul rate,  FLOPs = 2·L·(linear params) + attention 4·d·Hq·layers·L(L+1)/2
  decode floor  = (weight bytes + KV bytes of L tokens) / copy rate
The model's trained context is 8K; longer contexts use a max_model_len override, which is fine for
speed (not for quality).

Writes bench/results/engine.json and bench/results/engine.md.
Run: PYTHONPATH=. python -m bench.engine [--runs 3] [--contexts 1024,2048,...] [--quick]

Decode grid (--decode-grid): float32 decode steps only, for every torch thread count x batch size B x
context L: B requests, each with L cached positions (prefill skipped as above), decoding together;
median step time over --decode-steps steps. With --baseline PATH (a checkout of another commit, e.g.
`git worktree add /tmp/base HEAD~1`), the two checkouts are measured in alternating subprocesses,
--rounds times, so that both see the same load; each round records the load average. The medians
over rounds go into engine.json's "decode_grid" and a section of engine.md; the floor is
(weights + B x KV bytes of L tokens) / copy rate.
Run: PYTHONPATH=. python -m bench.engine --decode-grid [--baseline PATH] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import roofline
from common.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.engine.demo import build_document
from common.model.loader import load_checkpoint
from common.model.tokenizer import load_tokenizer
from common.sampling_params import SamplingParams

log = logging.getLogger("bench.engine")
RESULTS = Path(__file__).resolve().parent / "results"
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
SHORT_CONTEXT = 8192        # runs beyond --long-runs stop here
BYTES = {"float32": 4, "bfloat16": 2}


# ---- roofline floors ------------------------------------------------------------------------------
def linear_params(mc: ModelConfig) -> int:
    """Weights multiplied per token in the decoder layers (q, k, v, o, gate, up, down)."""
    h, d = mc.hidden_size, mc.head_dim
    attn = h * d * (2 * mc.num_heads + 2 * mc.num_kv_heads)
    return mc.num_layers * (attn + 3 * h * mc.intermediate_size)


def prefill_flops(mc: ModelConfig, L: int) -> float:
    attention = 4 * mc.head_dim * mc.num_heads * mc.num_layers * L * (L + 1) / 2
    return 2 * L * linear_params(mc) + attention + 2 * mc.vocab_size * mc.hidden_size


def decode_bytes(mc: ModelConfig, L: int, dtype: str, batch: int = 1) -> float:
    weights = linear_params(mc) + mc.vocab_size * mc.hidden_size          # + LM head
    kv = batch * L * mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim
    return (weights + kv) * BYTES[dtype]


# ---- measurements -----------------------------------------------------------------------------------
def make_engine(checkpoint, dtype: str, max_len: int, chunk: int, eos) -> LLMEngine:
    cfg = EngineConfig(dtype=dtype, max_model_len=max_len,
                       cache=CacheConfig(max_kv_tokens=max_len + 64, prefix_caching=False),   # rounds repeat prompts
                       scheduler=SchedulerConfig(chunk_size=chunk, max_batch_tokens=max(chunk, 8192)))
    return LLMEngine(cfg, checkpoint, extra_eos_ids=eos)


def prefill_marks(engine: LLMEngine, prompt: list[int], marks: list[int]) -> dict[int, float]:
    """Seconds from arrival until the first L prompt tokens are in the cache, for each L in marks."""
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    t0 = time.perf_counter()
    rid = engine.add_request(prompt, params)
    times: dict[int, float] = {}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id == rid and o.num_computed in marks:
                times[o.num_computed] = now - t0
                log.info("  prefill %6d tokens: %8.2f s", o.num_computed, now - t0)
    return times


def decode_step_times(engine: LLMEngine, prompt: list[int], steps: int) -> list[float]:
    """Times of `steps` decode steps over a len(prompt)-token context (prefill skipped).

    The skipped prefill's KV is random values written into the cache once per engine: the cache is
    allocated lazily zeroed, and unwritten pages all map the kernel's one zero page, which every
    read finds in cache (before this, decode attention was timed that way: 2.5x too fast at 8K with
    the CPU decode kernel, bench/results/cpu_kernels.md)."""
    L = len(prompt)
    cache = getattr(engine.executor, "cache", None)
    if cache is not None and not getattr(cache, "bench_written", False):
        cache.data.normal_(0.0, 0.5)
        cache.bench_written = True
    rid = engine.add_request(prompt, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    req = engine.scheduler.requests[rid]
    engine.pool.allocate(rid, L)       # the first L-1 positions count as cached: their values are
    req.num_computed = L - 1           # irrelevant to the cost, and a real prefill would dominate
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    engine.pool.check()
    return times[1:]                   # the first step enters the request (a 1-token "prefill")


def bench_dtype(checkpoint, tokens: list[int], dtype: str, contexts: list[int], runs: int, long_runs: int,
                chunk: int, decode_steps: int, rates: dict, eos) -> list[dict]:
    """`long_runs` runs prefill the longest prompt (every context gets a sample); the remaining
    `runs - long_runs` runs prefill only up to SHORT_CONTEXT tokens (the long ones take many minutes)."""
    mc = checkpoint.config
    longest = max(contexts)
    engine = make_engine(checkpoint, dtype, longest + decode_steps + 8, chunk, eos)
    prompt = (tokens * (longest // len(tokens) + 1))[:longest]
    short = max([L for L in contexts if L <= SHORT_CONTEXT] or [longest])
    runs_by_L: dict[int, list[float]] = {L: [] for L in contexts}
    engine.generate([prompt[:64]], SamplingParams(max_tokens=2, ignore_eos=True))     # warm-up
    for r in range(max(runs, long_runs)):
        n = longest if r < long_runs else short
        log.info("%s: prefill run %d/%d of %d tokens", dtype, r + 1, max(runs, long_runs), n)
        for L, s in prefill_marks(engine, prompt[:n], contexts).items():
            runs_by_L[L].append(s)
        engine.pool.check()
    rows = []
    for L in contexts:
        log.info("%s: decode over %d tokens", dtype, L)
        dec = decode_step_times(engine, prompt[:L], decode_steps)
        pre = statistics.median(runs_by_L[L])
        rows.append({
            "context": L,
            "prefill_s": pre,
            "prefill_s_runs": runs_by_L[L],
            "prefill_tokens_per_s": L / pre,
            "prefill_tflop": prefill_flops(mc, L) / 1e12,
            "decode_ms_per_token": 1e3 * statistics.median(dec),
            "decode_ms_steps": [1e3 * t for t in dec],
            "decode_gb_per_token": decode_bytes(mc, L, dtype) / 1e9,
        })
        refloor(mc, dtype, rows[-1:], rates)
        log.info("%s L=%d: prefill %.1f tok/s (floor %.1f), decode %.1f ms (floor %.1f)", dtype, L,
                 rows[-1]["prefill_tokens_per_s"], rows[-1]["prefill_floor_tokens_per_s"],
                 rows[-1]["decode_ms_per_token"], rows[-1]["decode_floor_ms"])
    return rows


def refloor(mc: ModelConfig, dtype: str, rows: list[dict], rates: dict) -> None:
    """Recomputes the floors of `rows` for (possibly better) roofline `rates`."""
    for r in rows:
        L = r["context"]
        r["prefill_floor_s"] = prefill_flops(mc, L) / (rates["matmul_gflops"][dtype] * 1e9)
        r["prefill_floor_tokens_per_s"] = L / r["prefill_floor_s"]
        r["decode_floor_ms"] = 1e3 * decode_bytes(mc, L, dtype) / (rates["copy_gbs"] * 1e9)


def merge(files: list[str], out: Path, threads: int) -> None:
    reports = [json.loads(Path(f).read_text()) for f in files]
    report = reports[0]
    rates = roofline.best_of(*[r["machine"]["roofline"] for r in reports], roofline.measure(threads))
    mc = load_checkpoint(None).config
    for r in reports[1:]:
        report["results"].update(r["results"])
    # A report already merged carries per_dtype: copy only its own settings (not nested reports).
    per_dtype = {d: {k: v for k, v in r["config"].items() if k != "per_dtype"}
                 for r in reports for d in r["results"]}
    report["config"]["per_dtype"] = per_dtype
    report["machine"]["roofline"] = rates
    report["machine"]["loadavg_before"] = max((r["machine"]["loadavg_before"] for r in reports), key=lambda x: x[0])
    report["machine"]["loadavg_after"] = max((r["machine"]["loadavg_after"] for r in reports), key=lambda x: x[0])
    for d, rows in report["results"].items():
        refloor(mc, d, rows, rates)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "engine.md").write_text(markdown(report))


# ---- decode grid (batched decode, optionally against a baseline checkout) -----------------------------
def batch_decode_step_times(checkpoint, batch: int, L: int, steps: int) -> list[float]:
    """Times of `steps` float32 decode steps of `batch` requests over L cached positions each (a fresh
    engine, so every request's first L positions sit in consecutive blocks, as after a prefill, and
    the blocks of the decoded tokens interleave between requests)."""
    cfg = EngineConfig(dtype="float32", max_model_len=L + steps + 8,
                       cache=CacheConfig(max_kv_tokens=batch * (L + steps + 32), prefix_caching=False),
                       scheduler=SchedulerConfig(chunk_size=1024, max_batch_tokens=8192))
    engine = LLMEngine(cfg, checkpoint)
    prompt = [100 + (i * 7919) % 30000 for i in range(L)]
    for _ in range(batch):
        rid = engine.add_request(prompt, SamplingParams(max_tokens=steps + 2, ignore_eos=True))
        engine.pool.allocate(rid, L)
        engine.scheduler.requests[rid].num_computed = L - 1
    engine.step()                      # enters the requests (a 1-token "prefill" each)
    engine.step()                      # warm-up decode
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return times


def decode_grid_worker(spec: dict) -> list[dict]:
    """One round of the grid in this process, against whatever `common` is on the path."""
    checkpoint = load_checkpoint(None)
    rows = []
    for threads in spec["threads"]:
        torch.set_num_threads(threads)
        for batch in spec["batches"]:
            for L in spec["contexts"]:
                times = batch_decode_step_times(checkpoint, batch, L, spec["steps"])
                rows.append({"threads": threads, "batch": batch, "context": L,
                             "step_ms": [1e3 * t for t in times], "loadavg": os.getloadavg()[0]})
    return rows


def run_grid_round(root: Path, spec: dict) -> list[dict]:
    """Runs decode_grid_worker in a subprocess with `root`'s code first on the path."""
    env = dict(os.environ, PYTHONPATH=str(root))
    # This file's worker, loaded by path (the baseline's bench/engine.py may not have it), with the
    # root's `common` and `bench` packages importable.
    loader = ("import importlib.util as u; s = u.spec_from_file_location('bench_engine_grid', %r); "
              "m = u.module_from_spec(s); s.loader.exec_module(m); m.main()" % str(Path(__file__).resolve()))
    res = subprocess.run([sys.executable, "-c", loader, "--decode-worker", json.dumps(spec)],
                         env=env, cwd=str(root), capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"decode worker in {root} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def decode_grid(spec: dict, rounds: int, baseline: Path | None, rates: dict, mc: ModelConfig) -> dict:
    """Alternates this checkout and the baseline, `rounds` times; medians over rounds."""
    here = Path(__file__).resolve().parent.parent
    sides = {"after": here} if baseline is None else {"before": baseline, "after": here}
    samples: dict[str, list[list[dict]]] = {k: [] for k in sides}
    for r in range(rounds):
        for side, root in (sides.items() if r % 2 == 0 else reversed(sides.items())):
            log.info("decode grid round %d/%d: %s (%s)", r + 1, rounds, side, root)
            samples[side].append(run_grid_round(root, spec))
    rows = []
    for i, first in enumerate(samples["after"][0]):
        row = {k: first[k] for k in ("threads", "batch", "context")}
        for side in sides:
            per_round = [statistics.median(s[i]["step_ms"]) for s in samples[side]]
            row[f"{side}_ms"] = statistics.median(per_round)
            row[f"{side}_ms_rounds"] = per_round
            row[f"{side}_loadavg_rounds"] = [s[i]["loadavg"] for s in samples[side]]
        row["floor_ms"] = 1e3 * decode_bytes(mc, row["context"], "float32", row["batch"]) / (rates["copy_gbs"] * 1e9)
        rows.append(row)
    return {"spec": spec, "rounds": rounds, "baseline": str(baseline) if baseline else None, "rows": rows}


def grid_markdown(grid: dict) -> list[str]:
    rows = grid["rows"]
    before = "before_ms" in rows[0]
    loads = [x for r in rows for k in r if k.endswith("loadavg_rounds") for x in r[k]]
    lines = ["## float32 decode grid (batched decode)", "",
             f"One engine step decoding B requests together, each over an L-token cache; median over "
             f"{grid['spec']['steps']} steps, then median over {grid['rounds']} rounds"
             + (f" alternating with the baseline checkout ({grid.get('baseline_label') or grid['baseline']}) "
                "in separate processes" if before else "") +
             f". Load average during the rounds: {min(loads):.1f} to {max(loads):.1f}. Floor = (weights + "
             "B x KV bytes) / copy rate; \"% of floor\" = floor / median.", ""]
    head = "| threads | B | context | " + ("before ms | " if before else "") + "ms/step | floor ms | % of floor |" \
        + (" speed-up |" if before else "")
    lines += [head, "|" + "---:|" * (head.count("|") - 1)]
    for r in rows:
        cells = [str(r["threads"]), str(r["batch"]), str(r["context"])]
        if before:
            cells.append(f"{r['before_ms']:.1f}")
        cells += [f"{r['after_ms']:.1f}", f"{r['floor_ms']:.1f}", f"{100 * r['floor_ms'] / r['after_ms']:.0f}%"]
        if before:
            cells.append(f"{r['before_ms'] / r['after_ms']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += grid.get("notes", [])           # written by hand into engine.json
    return lines


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Engine benchmark (built-in SmolLM2-135M-Instruct, one process, CPU)",
        "",
        f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}. Roofline: matmul "
        f"{m['roofline']['matmul_gflops']['float32']:.0f} GFLOP/s float32, "
        f"{m['roofline']['matmul_gflops']['bfloat16']:.0f} GFLOP/s bfloat16; copy "
        f"{m['roofline']['copy_gbs']:.1f} GB/s. Load average before/after: "
        f"{m['loadavg_before'][0]:.1f} / {m['loadavg_after'][0]:.1f} (the machine is shared).",
        "",
        f"Prefill: time to prefill the first L tokens of one prompt in chunks of "
        f"{report['config']['chunk_size']} tokens, median (and best) of the runs (n); "
        f"floor = FLOPs / matmul rate. Decode: one engine step over an L-token cache, median (and best) "
        f"of {report['config']['decode_steps']} steps; floor = (weights + KV bytes) / copy rate. "
        "Contexts past 8K exceed the model's trained context (speed only). \"% of floor\" = floor "
        "time / measured time (100% = at the roofline), from the medians.",
        "",
    ]
    if max(m["loadavg_before"][0], m["loadavg_after"][0]) > m["threads"]:
        lines += [f"**Caution:** the load average reached {max(m['loadavg_before'][0], m['loadavg_after'][0]):.1f} "
                  f"on this machine while it ran (other jobs shared its cores), so the medians include "
                  "heavy interference; the best sample (in parentheses) is the least disturbed one. The "
                  "roofline rates are the best of repeated measurements for the same reason.", ""]
    for dtype, rows in report["results"].items():
        lines += [f"## {dtype}", "",
                  "| context | n | prefill s (best) | prefill tok/s | floor tok/s | % of floor | "
                  "decode ms/token (best) | floor ms | % of floor |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(
                f"| {r['context']} | {len(r['prefill_s_runs'])} | {r['prefill_s']:.2f} "
                f"({min(r['prefill_s_runs']):.2f}) | "
                f"{r['prefill_tokens_per_s']:.0f} | {r['prefill_floor_tokens_per_s']:.0f} | "
                f"{100 * r['prefill_floor_s'] / r['prefill_s']:.0f}% | {r['decode_ms_per_token']:.1f} "
                f"({min(r['decode_ms_steps']):.1f}) | {r['decode_floor_ms']:.1f} | "
                f"{100 * r['decode_floor_ms'] / r['decode_ms_per_token']:.0f}% |")
        lines.append("")
    if "decode_grid" in report:
        lines += grid_markdown(report["decode_grid"])
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--runs", type=int, default=3, help="prefill runs per context up to 8K")
    p.add_argument("--long-runs", type=int, default=None,
                   help="how many of the runs prefill the longest prompt (default: all)")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="contexts 256,512, one run (smoke test)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--render", action="store_true", help="only rewrite engine.md from engine.json")
    p.add_argument("--decode-grid", action="store_true",
                   help="float32 decode only, batches x contexts x threads (see above); updates the "
                        "decode_grid of engine.json")
    p.add_argument("--batches", default="1,8", help="decode grid: batch sizes")
    p.add_argument("--grid-threads", default="1,2", help="decode grid: torch thread counts")
    p.add_argument("--grid-contexts", default="1024,8192", help="decode grid: context lengths")
    p.add_argument("--rounds", type=int, default=3, help="decode grid: rounds (alternating with --baseline)")
    p.add_argument("--baseline", metavar="PATH", help="decode grid: a checkout to measure alternately")
    p.add_argument("--baseline-label", default=None, help="decode grid: how to name the baseline in engine.md")
    p.add_argument("--decode-worker", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine the dtypes of several engine.json files into --out, measuring the "
                        "roofline again (the best of all measurements sets the floors)")
    args = p.parse_args()
    out = Path(args.out)
    if args.decode_worker:
        print(json.dumps(decode_grid_worker(json.loads(args.decode_worker))))
        return
    if args.decode_grid:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        spec = {"threads": [int(t) for t in args.grid_threads.split(",")],
                "batches": [int(b) for b in args.batches.split(",")],
                "contexts": [int(c) for c in args.grid_contexts.split(",")], "steps": args.decode_steps}
        report = json.loads((out / "engine.json").read_text())
        rates = roofline.best_of(report["machine"]["roofline"], roofline.measure(args.threads))
        grid = decode_grid(spec, args.rounds, Path(args.baseline).resolve() if args.baseline else None, rates,
                           load_checkpoint(None).config)
        grid["baseline_label"] = args.baseline_label
        grid["copy_gbs"] = rates["copy_gbs"]
        grid["notes"] = report.get("decode_grid", {}).get("notes", [])
        report["decode_grid"] = grid
        (out / "engine.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "engine.md").write_text(markdown(report))
        print("\n".join(grid_markdown(grid)))
        return
    if args.render:
        (out / "engine.md").write_text(markdown(json.loads((out / "engine.json").read_text())))
        return
    if args.merge:
        merge(args.merge, out, args.threads)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    contexts = [256, 512] if args.quick else [int(c) for c in args.contexts.split(",")]
    runs = 1 if args.quick else args.runs
    long_runs = runs if args.long_runs is None else min(args.long_runs, runs)
    chunk = min([args.chunk_size] + contexts)
    if any(L % chunk for L in contexts):
        p.error(f"--chunk-size {chunk} must divide every context length")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rates = roofline.measure(args.threads)
    log.info("roofline: %s", rates)
    checkpoint = load_checkpoint(None)
    tokenizer = load_tokenizer(None, checkpoint.config)
    tokens = tokenizer.encode(build_document(tokenizer, 4000))
    report = {
        "benchmark": "engine",
        "model": {"name": Path(checkpoint.source).name, "linear_params": linear_params(checkpoint.config),
                  "lm_head_params": checkpoint.config.vocab_size * checkpoint.config.hidden_size,
                  "layers": checkpoint.config.num_layers, "heads": checkpoint.config.num_heads,
                  "kv_heads": checkpoint.config.num_kv_heads, "head_dim": checkpoint.config.head_dim},
        "config": {"chunk_size": chunk, "runs": runs, "long_runs": long_runs, "decode_steps": args.decode_steps,
                   "contexts": contexts, "attention_backend": "auto (cpu_flash)"},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "roofline": rates, "loadavg_before": load_before},
        "results": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    for dtype in args.dtypes.split(","):
        report["results"][dtype] = bench_dtype(checkpoint, tokens, dtype, contexts, runs, long_runs, chunk,
                                               args.decode_steps, rates, tokenizer.eos_token_ids)
        report["machine"]["loadavg_after"] = os.getloadavg()
        # Measure the roofline again and keep the best: floors must not be loosened by load spikes.
        rates = roofline.best_of(rates, roofline.measure(args.threads))
        report["machine"]["roofline"] = rates
        for d, rows in report["results"].items():
            refloor(checkpoint.config, d, rows, rates)
        (out / "engine.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "engine.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
