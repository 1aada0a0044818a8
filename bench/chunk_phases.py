"""Where the AVX2 chunk attention kernel's time goes, and how far its arithmetic is from the core's peak.

A prefill chunk's attention is two products (scores q . k and the weights times V, 2 d FLOPs a score
each) with an online softmax between them, which costs time the FLOP count does not see: on a CPU
without AVX-512 the products take 16 8-lane multiply-adds a score at d = 64 (8 cycles at two a cycle),
the softmax ~25 instructions per 8 scores off the diagonal (e^x alone 18; ~35 through the masks of the
diagonal's rows), ~1-1.4 cycles a score where nothing else runs: ~1/7 to 1/5 of the products' time.
This benchmark builds the kernel with
-DMN_CHUNK_PHASES (time-stamp counter ticks per thread in each phase of every register block:
scores, softmax, V product; the build otherwise the one the engine loads) and runs one layer's
attention of a 1,024-query chunk over 1K, 4K and 8K keys (the built-in model's heads: 9 query heads, 3
KV heads of 64), in float32 and bfloat16, --rounds rounds, medians. Per point:
  kernel GFLOP/s     causal FLOPs of the call (4 d per visible score and query head) / its wall time;
  phase shares       of the threads' ticks in the three phases, and the rest of the call (laying K out,
                     the state's set-up and the output) as the wall time's share not in them;
  products / core    each product's FLOPs / its ticks summed over threads, in GFLOP/s a core, against
                     the engine's GEMM on one core on operands in cache (cpu_kernels.gemm, measured
                     before every point, the best of the run: the FMA peak the products could reach);
  softmax / score    ticks (time-stamp counter, not core cycles) per visible score;
  ceiling            the kernel's rate if both products ran at the GEMM's rate and everything else took
                     what it took: what the softmax and the call's set-up alone cost.
The ticks are wall-clock cycles of the time-stamp counter (its rate measured in the run); the phases are
timed per register block (6 rows x 128 keys: ~200K FLOPs between four counter reads).

Writes bench/results/chunk_phases.{json,md} (--name: another stem). AVX2 builds only (the kernel's
float32 path); elsewhere it says so and writes nothing.
Run: PYTHONPATH=. python -m bench.chunk_phases [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common.model import cpu_kernels

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HQ, HKV, D, QUERIES = 9, 3, 64, 1024
PHASES = ("scores", "softmax", "pv")


def phases_build(directory: Path) -> ctypes.CDLL:
    flags = cpu_kernels.FLAGS + ("-DMN_CHUNK_PHASES",)
    path = cpu_kernels.library_path(directory, flags)
    if path is None:
        raise SystemExit("no C++ compiler: nothing to measure")
    cpu_kernels.build(path, flags)
    return cpu_kernels.load(path)


def counters(lib: ctypes.CDLL) -> list[int]:
    """[scores, softmax, pv] ticks since the last call (summed over threads), and the counter now."""
    out = (ctypes.c_uint64 * 4)()
    if lib.mn_chunk_phases(out) != 0:
        raise SystemExit("this build has no float32 chunk kernel (AVX2 builds only): nothing to measure")
    return list(out)


def tick_rate(lib: ctypes.CDLL) -> float:
    """Time-stamp counter ticks per second, over 0.3 s of wall time."""
    t0, c0 = time.perf_counter(), counters(lib)[3]
    time.sleep(0.3)
    t1, c1 = time.perf_counter(), counters(lib)[3]
    return (c1 - c0) / (t1 - t0)


def gemm_core_gflops(lib: ctypes.CDLL, threads: int) -> float:
    """The engine's GEMM on one core with its operands in cache: 192 rows x 576 against 128 x 576 (288
    KiB of weight), best of 40 calls."""
    x, w = torch.randn(192, 576), torch.randn(128, 576)
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(40):
            t = time.perf_counter()
            cpu_kernels.gemm(lib, x, w)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return 2 * 192 * 128 * 576 / best / 1e9


def point(lib: ctypes.CDLL, dtype: torch.dtype, keys: int, rounds: int, hz: float) -> dict:
    g = torch.Generator().manual_seed(keys)
    q = torch.randn(QUERIES, HQ, D, generator=g).to(dtype)
    k = torch.randn(keys, HKV, D, generator=g).to(dtype)
    v = torch.randn(keys, HKV, D, generator=g).to(dtype)
    start = keys - QUERIES
    scores = HQ * (QUERIES * start + QUERIES * (QUERIES + 1) / 2)       # visible (query head, key) pairs
    flops = 4 * D * scores
    assert cpu_kernels.chunk_attention(lib, q, k, v, start, 0, D ** -0.5) is not None
    counters(lib)
    rows = []
    for _ in range(rounds):
        t = time.perf_counter()
        cpu_kernels.chunk_attention(lib, q, k, v, start, 0, D ** -0.5)
        wall = time.perf_counter() - t
        c = counters(lib)
        rows.append({"wall_s": wall, **{p: c[i] for i, p in enumerate(PHASES)}})
    med = {key: statistics.median(r[key] for r in rows) for key in ("wall_s", *PHASES)}
    threads = torch.get_num_threads()
    thread_ticks = med["wall_s"] * hz * threads
    in_phases = sum(med[p] for p in PHASES)
    return {
        "keys": keys, "queries": QUERIES, "flops": flops, "rounds": rows,
        "kernel_gflops": flops / med["wall_s"] / 1e9,
        "share": {**{p: med[p] / thread_ticks for p in PHASES}, "rest": max(0.0, 1 - in_phases / thread_ticks)},
        "product_core_gflops": {p: (flops / 2) / (med[p] / hz) / 1e9 for p in ("scores", "pv")},
        "softmax_ticks_per_score": med["softmax"] / scores,
    }


def markdown(report: dict) -> str:
    c = report["config"]
    lines = ["# The AVX2 chunk attention kernel by phase (`bench/chunk_phases.py`)", "",
             f"{c['cpu']}; {c['threads']} threads, {c['rounds']} rounds, medians; time-stamp counter "
             f"{report['tick_hz'] / 1e9:.3f} GHz; the engine's GEMM on one core, operands in cache: "
             f"**{report['gemm_core_gflops']:.1f} GFLOP/s** (the products' peak). One layer's attention, "
             f"{QUERIES} queries (the chunk's, the last of the context) x {HQ} heads over {HKV} KV heads of {D}.", "",
             "| dtype | keys | kernel GFLOP/s | scores | softmax | V product | rest | scores GFLOP/s a core (x GEMM) "
             "| V product GFLOP/s a core (x GEMM) | softmax ticks / score | ceiling GFLOP/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    peak = report["gemm_core_gflops"]
    for row in report["points"]:
        s, pc = row["share"], row["product_core_gflops"]
        lines.append(f"| {row['dtype']} | {row['keys']} | {row['kernel_gflops']:.1f} | {s['scores']:.0%} | "
                     f"{s['softmax']:.0%} | {s['pv']:.0%} | {s['rest']:.0%} | {pc['scores']:.1f} ({pc['scores'] / peak:.2f}) "
                     f"| {pc['pv']:.1f} ({pc['pv'] / peak:.2f}) | {row['softmax_ticks_per_score']:.2f} | "
                     f"{row['ceiling_gflops']:.1f} |")
    lines += ["", "Shares are of the threads' wall time (threads x the call's median wall time); `rest` is the "
              "call outside the register blocks' phases (laying K out as K^T panels, the state's set-up, "
              "the output, threads waiting). The ceiling keeps the softmax and the rest as measured and "
              "runs both products at the GEMM's one-core rate on every thread.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keys", default="1024,4096,8192")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="chunk_phases")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        lib = phases_build(Path(tmp))
        counters(lib)
        hz = tick_rate(lib)
        peaks, points = [], []
        for name in args.dtypes.split(","):
            for keys in map(int, args.keys.split(",")):
                peaks.append(gemm_core_gflops(lib, args.threads))     # before every point: the best counts
                row = {"dtype": name, **point(lib, DTYPES[name], keys, args.rounds, hz)}
                points.append(row)
                print(f"{name} {keys} keys: {row['kernel_gflops']:.1f} GFLOP/s, shares "
                      + ", ".join(f"{k} {v:.0%}" for k, v in row["share"].items()), flush=True)
    peak = max(peaks)
    for row in points:
        # every thread's products at the GEMM's rate, the softmax and the rest as measured
        wall = statistics.median(r["wall_s"] for r in row["rounds"])
        other = wall * args.threads * (row["share"]["softmax"] + row["share"]["rest"])
        row["ceiling_gflops"] = row["flops"] / ((row["flops"] / (peak * 1e9) + other) / args.threads) / 1e9
    report = {"config": {"rounds": args.rounds, "threads": args.threads, "cpu": cpu_kernels.cpuinfo("model name"),
                         "machine": platform.machine(), "load_avg": os.getloadavg()},
              "tick_hz": hz, "gemm_core_gflops": peak, "gemm_core_gflops_runs": peaks, "points": points}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
