"""The CPU kernels (common/model/cpu_kernels.py) against what they replace, side by side in one run.

Five parts, each alternating the two sides, --rounds rounds, medians (each round's load average kept):
  gemv       one decode step's linears of the built-in model's shapes (q/k/v, o, gate/up, down: 30
             distinct weights each, as the model's layers, so they stream from memory; the LM head once),
             for 1 and 4 rows: F.linear on the layout torch streams fastest ([in, out] for float32,
             [out, in] for bfloat16) vs the kernel on [out, in]; ms and GB/s of weight bytes, beside a
             plain streaming read of the same bytes (torch.sum) measured in the same round;
  attention  one layer's decode attention over the paged cache (scattered blocks, block 16, 3 KV heads
             x 64, 9 query heads), 1 and 4 sequences of 1K, 8K and 32K keys: the flash planner
             (common/attention/cpu.py) vs the kernel; microseconds a call and GB/s of K+V bytes;
  chunk      one layer's attention of a prefill chunk (1,024 queries over 1K, 4K, 8K keys; 128 over
             64K) in each dtype a chunk kernel takes on this build (bfloat16 on AVX512-BF16; float32
             and bfloat16 on AVX2): the flash path vs the chunk kernel; ms and GFLOP/s;
  gemm       one prefill chunk's linears of the built-in model (1,024 rows through q/k/v, o, gate/up,
             down; 30 distinct weights each, so they stream from memory, in AVX2 builds only): what
             `linear` ran before the GEMM kernel (float32: F.linear; bfloat16: F.linear of the operands
             widened to float32, rounded once) vs the kernel (cpu_kernels.gemm); ms and GFLOP/s;
  engine     the built-in model's decode step (one request, prefill skipped as in bench/engine.py) at
             1K, 4K and 8K in float32 and bfloat16: an engine with the kernels (its layers in one call,
             common/model/decode_layers.py), the same engine with its layers module by module
             (`decode_layers.disabled()`), and one built and run inside `cpu_kernels.disabled()` (so
             with float32 weights [in, out], the layout it used).

Writes bench/results/cpu_kernels.{json,md} (--name: another stem).
Run: PYTHONPATH=. python -m bench.cpu_kernels [--rounds 3] [--parts gemv,attention,chunk,gemm,engine]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common.model import cpu_kernels, decode_layers
from tests.fixtures.paged import scattered_cache

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
H, I, V, LAYERS = 576, 1536, 49152, 30
SHAPES = {"qkv": (H + 2 * 192, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I), "lm_head": (V, H)}


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls after two warm ones."""
    fn()
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def gemv_round(dtype: torch.dtype, rows: int) -> dict:
    lib = cpu_kernels.library()
    out = {}
    total = {"torch": 0.0, "kernel": 0.0}
    nbytes_all = 0
    for name, (o, i) in SHAPES.items():
        n = 1 if name == "lm_head" else LAYERS
        ws = [torch.randn(o, i).to(dtype) for _ in range(n)]
        wt = [w.t().contiguous().t() for w in ws] if dtype == torch.float32 else ws    # torch's faster layout
        x = torch.randn(rows, i).to(dtype)
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        t_torch = timed(lambda: [F.linear(x, w) for w in wt], 7)
        t_kernel = timed(lambda: [cpu_kernels.gemv(lib, x, w) for w in ws], 7)
        out[name] = {"bytes": nbytes, "torch_ms": 1e3 * t_torch, "kernel_ms": 1e3 * t_kernel}
        total["torch"] += t_torch
        total["kernel"] += t_kernel
        nbytes_all += nbytes
        del ws, wt
    buf = torch.empty(nbytes_all // 4, dtype=torch.float32).fill_(1.0)
    read = min(timed(buf.sum, 3) for _ in range(2))
    out["step"] = {"bytes": nbytes_all, "torch_ms": 1e3 * total["torch"], "kernel_ms": 1e3 * total["kernel"],
                   "read_ms": 1e3 * read}
    return out


def gemm_round(dtype: torch.dtype, rows: int = 1024) -> dict | None:
    lib = cpu_kernels.library()
    probe_x, probe_w = torch.randn(8, 16).to(dtype), torch.randn(16, 16).to(dtype)
    if not cpu_kernels.gemm_applies(probe_x, probe_w):
        return None

    def before(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:     # linear's path before the kernel
        if dtype == torch.bfloat16:
            return F.linear(x.float(), w.float()).to(torch.bfloat16)
        return F.linear(x, w)

    def kernel(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = cpu_kernels.gemm(lib, x, w)
        return y if dtype == torch.float32 else y.to(torch.bfloat16)

    out = {}
    total = {"torch": 0.0, "kernel": 0.0, "flops": 0.0}
    for name, (o, i) in SHAPES.items():
        if name == "lm_head":
            continue
        ws = [torch.randn(o, i).to(dtype) for _ in range(LAYERS)]
        x = torch.randn(rows, i).to(dtype)
        flops = 2.0 * rows * o * i * LAYERS
        t_torch = timed(lambda: [before(x, w) for w in ws], 3)
        t_kernel = timed(lambda: [kernel(x, w) for w in ws], 3)
        out[name] = {"flops": flops, "torch_ms": 1e3 * t_torch, "kernel_ms": 1e3 * t_kernel}
        total["torch"] += t_torch
        total["kernel"] += t_kernel
        total["flops"] += flops
        del ws
    out["chunk"] = {"flops": total["flops"], "torch_ms": 1e3 * total["torch"], "kernel_ms": 1e3 * total["kernel"]}
    return out


def attention_round(dtype: torch.dtype, keys: int, batch: int) -> dict:
    from common.attention.cpu import CpuFlashBackend
    k, v, tables, lens = scattered_cache([keys] * batch, 16, 3, 64, dtype)
    q = torch.randn(batch, 9, 64).to(dtype)
    lib = cpu_kernels.library()
    flash = CpuFlashBackend()
    with cpu_kernels.disabled():
        t_flash = timed(lambda: flash.decode_paged(q, k, v, tables, lens, scale=0.125), 9)
    t_kernel = timed(lambda: cpu_kernels.decode_attention(lib, q, k, v, tables, lens, 0.125), 9)
    nbytes = 2 * batch * keys * 3 * 64 * k.element_size()
    return {"bytes": nbytes, "flash_us": 1e6 * t_flash, "kernel_us": 1e6 * t_kernel}


def chunk_round(dtype: torch.dtype, queries: int, keys: int) -> dict | None:
    """One layer's attention of a prefill chunk (the chunk's queries are the last of `keys` positions):
    the flash path of common/attention/cpu.py vs the chunk kernel; None where no kernel takes `dtype`."""
    from common.attention.cpu import CpuFlashBackend
    q = torch.randn(queries, 9, 64).to(dtype)
    k = torch.randn(keys, 3, 64).to(dtype)
    v = torch.randn(keys, 3, 64).to(dtype)
    start = keys - queries
    flash = CpuFlashBackend()
    lib = cpu_kernels.library()
    if cpu_kernels.chunk_attention(lib, q[:1], k[:1], v[:1], 0, 0, 0.125) is None:
        return None
    with cpu_kernels.disabled():
        t_flash = timed(lambda: flash.forward(q, k, v, q_start=start, k_start=0, scale=0.125), 3)
    assert cpu_kernels.chunk_attention(lib, q[:1], k, v, start, 0, 0.125) is not None
    t_kernel = timed(lambda: cpu_kernels.chunk_attention(lib, q, k, v, start, 0, 0.125), 3)
    flops = 4 * 9 * 64 * (queries * start + queries * queries / 2)
    return {"flops": flops, "flash_ms": 1e3 * t_flash, "kernel_ms": 1e3 * t_kernel}


def engine_round(engines: dict, context: int, steps: int) -> dict:
    from bench.engine import decode_step_times
    prompt = [100 + (i * 7919) % 30000 for i in range(context - steps - 2)]
    out = {}
    for side, engine in engines.items():
        if side == "kernels":
            ts = decode_step_times(engine, prompt, steps)
        elif side == "per_op":
            with decode_layers.disabled():
                ts = decode_step_times(engine, prompt, steps)
        else:
            with cpu_kernels.disabled():
                ts = decode_step_times(engine, prompt, steps)
        out[side] = 1e3 * statistics.median(ts[1:])
    return out


def markdown(report: dict) -> str:
    c = report["config"]
    lines = ["# CPU kernels vs what they replace (common/model/cpu_kernels.py)", "",
             f"{report['machine']['platform']}, torch {report['machine']['torch']}, {c['threads']} threads; "
             f"kernels {report['machine']['cpu_kernels']}. {c['rounds']} rounds, the two sides alternating; "
             "medians over rounds; load average per round in the JSON "
             f"(before {report['loadavg_before'][0]:.1f}, after {report['loadavg_after'][0]:.1f}).", ""]
    if "gemv" in report:
        lines += ["## A decode step's linears (30 distinct weights per shape, as the model's layers; the LM head once)", "",
                  "| dtype, rows | shape | torch ms (GB/s) | kernel ms (GB/s) | kernel speed-up |",
                  "|---|---|---:|---:|---:|"]
        for key, rs in report["gemv"].items():
            for shape in list(SHAPES) + ["step"]:
                b = rs[0][shape]["bytes"]
                t = statistics.median(r[shape]["torch_ms"] for r in rs)
                k = statistics.median(r[shape]["kernel_ms"] for r in rs)
                lines.append(f"| {key} | {shape} | {t:.2f} ({b / t / 1e6:.1f}) | {k:.2f} ({b / k / 1e6:.1f}) | {t / k:.2f}x |")
            rd = statistics.median(r["step"]["read_ms"] for r in rs)
            b = rs[0]["step"]["bytes"]
            lines.append(f"| {key} | plain read of the step's bytes | | {rd:.2f} ({b / rd / 1e6:.1f}) | |")
        lines.append("")
    for part, title, head, unit, work, rate in (
            ("attention", "One layer's decode attention over the paged cache (scattered blocks)",
             "dtype, sequences x keys | flash planner us (GB/s of K+V) | kernel us (GB/s)", "us", "bytes", 1e3),
            ("chunk", "One layer's attention of a prefill chunk (9 query heads, 3 KV heads x 64)",
             "dtype, queries x keys | flash path ms (GFLOP/s) | kernel ms (GFLOP/s)", "ms", "flops", 1e6)):
        if part not in report:
            continue
        lines += [f"## {title}", "", f"| {head} | kernel speed-up |", "|---|---:|---:|---:|"]
        for key, rs in report[part].items():
            w = rs[0][work]
            f = statistics.median(r[f"flash_{unit}"] for r in rs)
            k = statistics.median(r[f"kernel_{unit}"] for r in rs)
            lines.append(f"| {key} | {f:.1f} ({w / f / rate:.1f}) | {k:.1f} ({w / k / rate:.1f}) | {f / k:.2f}x |")
        lines.append("")
    if "gemm" in report:
        lines += ["## A prefill chunk's linears (1,024 rows; 30 distinct weights per shape, as the model's layers)", "",
                  "Before: F.linear (bfloat16: of the operands widened to float32, rounded once); kernel: "
                  "cpu_kernels.gemm (the same rounding).", "",
                  "| dtype | shape | before ms (GFLOP/s) | kernel ms (GFLOP/s) | kernel speed-up |",
                  "|---|---|---:|---:|---:|"]
        for key, rs in report["gemm"].items():
            for shape in [n for n in SHAPES if n != "lm_head"] + ["chunk"]:
                fl = rs[0][shape]["flops"]
                t = statistics.median(r[shape]["torch_ms"] for r in rs)
                k = statistics.median(r[shape]["kernel_ms"] for r in rs)
                lines.append(f"| {key} | {shape} | {t:.1f} ({fl / t / 1e6:.0f}) | {k:.1f} ({fl / k / 1e6:.0f}) | {t / k:.2f}x |")
        lines.append("")
    if "engine" in report:
        lines += ["## The built-in model's decode step (one request)", "",
                  "Without the kernels; with them, the layers module by module (`decode_layers.disabled()`); "
                  "with them, the layers in one call (common/model/decode_layers.py, what the engine runs).", "",
                  "| context, dtype | without the kernels ms | per-op kernels ms | one call ms | speed-up (vs without; "
                  "vs per-op) | rounds (without; per-op; one call) |",
                  "|---|---:|---:|---:|---:|---|"]
        for key, rs in report["engine"].items():
            a = statistics.median(r["without"] for r in rs)
            k = statistics.median(r["kernels"] for r in rs)
            po = [r["per_op"] for r in rs if "per_op" in r]
            o = statistics.median(po) if po else float("nan")
            per = "; ".join("/".join(f"{r[s]:.1f}" for r in rs if s in r) for s in ("without", "per_op", "kernels"))
            lines.append(f"| {key} | {a:.1f} | {o:.1f} | {k:.1f} | {a / k:.2f}x; {o / k:.2f}x | {per} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", default="gemv,attention,chunk,gemm,engine")
    p.add_argument("--contexts", default="1024,4096,8192")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="decode steps per engine round")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="cpu_kernels")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernels.library() is None:
        raise SystemExit(f"the CPU kernels are {cpu_kernels.status()}: nothing to compare")
    parts = args.parts.split(",")
    report: dict = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                                "cpu_kernels": cpu_kernels.status()},
                    "config": {"rounds": args.rounds, "threads": args.threads, "parts": parts},
                    "loadavg_before": list(os.getloadavg()), "loadavg_rounds": []}
    engines = {}
    if "engine" in parts:
        from bench.engine import make_engine
        from common.model.loader import load_checkpoint
        ckpt = load_checkpoint(None)
        longest = max(int(c) for c in args.contexts.split(","))
        for d in DTYPES:
            engines[d] = {"kernels": make_engine(ckpt, d, longest + 8, 1024, ())}
            engines[d]["per_op"] = engines[d]["kernels"]          # the same engine, its layers module by module
            with cpu_kernels.disabled():
                engines[d]["without"] = make_engine(ckpt, d, longest + 8, 1024, ())
    for r in range(args.rounds):
        if "gemv" in parts:
            for d, dt in DTYPES.items():
                for rows in (1, 4):
                    report.setdefault("gemv", {}).setdefault(f"{d}, {rows}", []).append(gemv_round(dt, rows))
        if "attention" in parts:
            for d, dt in DTYPES.items():
                for batch, keys in ((1, 1024), (1, 8192), (1, 32768), (4, 8192)):
                    report.setdefault("attention", {}).setdefault(f"{d}, {batch} x {keys}", []).append(
                        attention_round(dt, keys, batch))
        if "gemm" in parts:
            for d, dt in DTYPES.items():
                if (row := gemm_round(dt)) is not None:
                    report.setdefault("gemm", {}).setdefault(d, []).append(row)
        if "chunk" in parts:
            for d, dt in DTYPES.items():
                for queries, keys in ((1024, 1024), (1024, 4096), (1024, 8192), (128, 65536)):
                    if (row := chunk_round(dt, queries, keys)) is not None:
                        report.setdefault("chunk", {}).setdefault(f"{d}, {queries} x {keys}", []).append(row)
        if "engine" in parts:
            for d in DTYPES:
                pair = dict(engines[d]) if r % 2 == 0 else dict(reversed(list(engines[d].items())))
                for ctx in (int(c) for c in args.contexts.split(",")):
                    report.setdefault("engine", {}).setdefault(f"{ctx // 1024}K, {d}", []).append(
                        engine_round(pair, ctx, args.steps))
        report["loadavg_rounds"].append(list(os.getloadavg()))
        print(f"round {r + 1} done (load {os.getloadavg()[0]:.1f})", flush=True)
    report["loadavg_after"] = list(os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
