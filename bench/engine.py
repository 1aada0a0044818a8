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
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
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


def decode_bytes(mc: ModelConfig, L: int, dtype: str) -> float:
    weights = linear_params(mc) + mc.vocab_size * mc.hidden_size          # + LM head
    kv = L * mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim
    return (weights + kv) * BYTES[dtype]


# ---- measurements -----------------------------------------------------------------------------------
def make_engine(checkpoint, dtype: str, max_len: int, chunk: int, eos) -> LLMEngine:
    cfg = EngineConfig(dtype=dtype, max_model_len=max_len, cache=CacheConfig(max_kv_tokens=max_len + 64),
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
    """Times of `steps` decode steps over a len(prompt)-token context (prefill skipped)."""
    L = len(prompt)
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
    per_dtype = {d: dict(r["config"]) for r in reports for d in r["results"]}
    report["config"]["per_dtype"] = per_dtype
    report["machine"]["roofline"] = rates
    report["machine"]["loadavg_before"] = max((r["machine"]["loadavg_before"] for r in reports), key=lambda x: x[0])
    report["machine"]["loadavg_after"] = max((r["machine"]["loadavg_after"] for r in reports), key=lambda x: x[0])
    for d, rows in report["results"].items():
        refloor(mc, d, rows, rates)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "engine.md").write_text(markdown(report))


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
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine the dtypes of several engine.json files into --out, measuring the "
                        "roofline again (the best of all measurements sets the floors)")
    args = p.parse_args()
    out = Path(args.out)
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
