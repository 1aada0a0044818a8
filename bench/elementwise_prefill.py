"""The elementwise steps of a prefill chunk (RMSNorm, RoPE of q and k, SiLU-and-multiply): the kernel's
one call each (cpu_kernels.elementwise) against the model's eager torch ops, side by side.

Two parts, per dtype:
  ops     one layer's steps on a chunk of --rows rows of the built-in model's shapes (hidden 576,
          9 + 3 heads of 64, intermediate 1,536): best of --reps calls each, kernel and torch
          alternating, per round; medians over rounds;
  engine  the engine's prefill of a --context-token prompt in chunks of 1,024 (bench/cpu_vs_transformers'
          Ours), the elementwise steps in the kernel or in torch's ops (cpu_kernels.elementwise swapped
          for cpu_kernels.small, which takes a decode step's rows only), the two alternating in one
          process, --rounds rounds; medians, and whether the greedy tokens agree.
The load average is recorded per round (the machine is shared).

Writes bench/results/elementwise_prefill.{json,md} (--name: another stem).
Run: PYTHONPATH=. python -m bench.elementwise_prefill [--rounds 5] [--context 1024]
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

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SIDES = ("kernel", "torch ops")


def _best_ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def op_times(dtype: torch.dtype, rows: int, reps: int) -> dict[str, dict[str, float]]:
    """ms of one layer's steps, kernel and eager, on random activations of the built-in model's shapes."""
    from common.config import RopeScaling
    from common.model import cpu_kernels
    from common.model.rope import Rope, apply_rope
    lib = cpu_kernels.elementwise(torch.zeros(rows, 16, dtype=dtype))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, 576, generator=g).to(dtype), torch.randn(576, generator=g).to(dtype)
    qkv = torch.randn(rows, 960, generator=g).to(dtype)
    q, k = qkv[:, :576].view(rows, 9, 64), qkv[:, 576:768].view(rows, 3, 64)
    cos, sin = Rope(64, 10000.0, RopeScaling()).cos_sin(torch.arange(rows), dtype)
    gu = torch.randn(rows, 3072, generator=g).to(dtype)

    def eager_norm():
        f = x.float()
        return w * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

    def eager_silu():
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate) * up

    pairs = {
        "rms_norm": (lambda: cpu_kernels.rms_norm(lib, x, w, 1e-5), eager_norm),
        "rope q+k": (lambda: (cpu_kernels.rope(lib, q, cos, sin), cpu_kernels.rope(lib, k, cos, sin)),
                     lambda: (apply_rope(q, cos, sin), apply_rope(k, cos, sin))),
        "silu_mul": (lambda: cpu_kernels.silu_mul(lib, gu), eager_silu),
    }
    return {name: {"kernel": _best_ms(a, reps), "torch ops": _best_ms(b, reps)} for name, (a, b) in pairs.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--name", default="elementwise_prefill")
    a = p.parse_args()
    torch.set_num_threads(2)
    from bench.cpu_vs_transformers import Ours, prompt_tokens
    from common.model import cpu_kernels
    from common.model.loader import load_checkpoint

    if cpu_kernels.elementwise(torch.zeros(a.rows, 16)) is None:
        print(f"elementwise_prefill: skipped, the kernels do not take a prefill chunk's rows here ({cpu_kernels.status()})")
        return 0
    checkpoint = load_checkpoint(None)
    prompt = prompt_tokens(a.context)
    kernel_gate = cpu_kernels.elementwise
    report = {"config": vars(a), "host": platform.processor() or platform.machine(),
              "kernels": cpu_kernels.status(), "dtypes": {}}
    try:
        for dname in a.dtypes.split(","):
            dtype = DTYPES[dname]
            ours = Ours(checkpoint, dname, a.context + 64, 1024)
            ops: dict[str, dict[str, list[float]]] = {}
            prefill = {s: [] for s in SIDES}
            tokens, loads = {}, []
            for r in range(a.rounds):
                loads.append(os.getloadavg()[0])
                for name, t in op_times(dtype, a.rows, a.reps).items():
                    for side, ms in t.items():
                        ops.setdefault(name, {s: [] for s in SIDES})[side].append(ms)
                for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                    cpu_kernels.elementwise = kernel_gate if side == "kernel" else cpu_kernels.small
                    seconds, _, toks = ours.run(prompt, 4)
                    prefill[side].append(seconds)
                    tokens[side] = toks
                cpu_kernels.elementwise = kernel_gate
            med = {s: statistics.median(v) for s, v in prefill.items()}
            report["dtypes"][dname] = {
                "ops_ms": {n: {s: statistics.median(v) for s, v in t.items()} for n, t in ops.items()},
                "ops_ms_rounds": ops, "prefill_s": med, "prefill_s_rounds": prefill,
                "prefill_ratio": med["torch ops"] / med["kernel"], "same_tokens": tokens["kernel"] == tokens["torch ops"],
                "loadavg_rounds": loads}
            print(dname, report["dtypes"][dname]["ops_ms"], med, flush=True)
    finally:
        cpu_kernels.elementwise = kernel_gate
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Elementwise steps of a prefill chunk: kernel vs torch ops ({report['host']})", "",
             f"Kernels: {report['kernels']}. {a.rounds} rounds, medians; one layer's steps on {a.rows} rows "
             f"(best of {a.reps} calls); the engine's prefill of {a.context} tokens in chunks of 1,024, 30 layers.", "",
             "| dtype | step | kernel ms | torch ops ms | ratio |", "|---|---|---:|---:|---:|"]
    for dname, d in report["dtypes"].items():
        for n, t in d["ops_ms"].items():
            lines.append(f"| {dname} | {n} | {t['kernel']:.3f} | {t['torch ops']:.3f} | {t['torch ops'] / t['kernel']:.2f}x |")
    lines += ["", "| dtype | prefill s, kernel | prefill s, torch ops | ratio | same greedy tokens | load avg per round |",
              "|---|---:|---:|---:|---|---|"]
    for dname, d in report["dtypes"].items():
        lines.append(f"| {dname} | {d['prefill_s']['kernel']:.3f} | {d['prefill_s']['torch ops']:.3f} | "
                     f"{d['prefill_ratio']:.3f}x | {d['same_tokens']} | {', '.join(f'{x:.2f}' for x in d['loadavg_rounds'])} |")
    (RESULTS / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
