"""This machine's roofline: dense matmul GFLOP/s (float32, bfloat16) and memory copy GB/s.

The engine benchmark puts every measurement next to the floor these rates imply:
prefill >= FLOPs / matmul rate, decode >= bytes streamed / copy rate.

Copy rate follows STREAM's convention: (bytes read + bytes written) / time, for a buffer far larger
than the caches. Matmul rate is the best of several repetitions of [M, K] @ [K, N] at a shape the
model actually runs (a 2048-token chunk through an MLP projection) and at a large square shape.
Best, not median: on a shared machine the fastest repetition is the least disturbed one, and a floor
must not be loosened by other people's load.

Run: PYTHONPATH=. python -m bench.roofline [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

MATMUL_SHAPES = ((2048, 576, 1536), (2048, 2048, 2048))   # (M, K, N)
COPY_BYTES = 1 << 29                                       # 512 MiB per buffer


def _best_time(fn, reps: int) -> float:
    fn()                                        # warm-up (allocations, kernel selection)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(dtype: torch.dtype, reps: int = 10) -> float:
    """Best GFLOP/s over MATMUL_SHAPES (2·M·K·N flops per product)."""
    rates = []
    for m, k, n in MATMUL_SHAPES:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        t = _best_time(lambda: torch.mm(a, b), reps)
        rates.append(2 * m * k * n / t / 1e9)
    return max(rates)


def copy_gbs(reps: int = 10) -> float:
    """STREAM-style copy bandwidth: 2 × buffer bytes / time, GB/s (1e9)."""
    src = torch.ones(COPY_BYTES // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), reps)
    return 2 * COPY_BYTES / t / 1e9


def measure(threads: int = 2) -> dict:
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {
            "threads": threads,
            "matmul_gflops": {"float32": matmul_gflops(torch.float32),
                              "bfloat16": matmul_gflops(torch.bfloat16)},
            "copy_gbs": copy_gbs(),
            "matmul_shapes": [list(s) for s in MATMUL_SHAPES],
            "copy_buffer_bytes": COPY_BYTES,
        }
    finally:
        torch.set_num_threads(prev)


def best_of(*measurements: dict) -> dict:
    """Element-wise best of several `measure()` results: on a shared machine, the least disturbed
    measurement is the closest to what the hardware can do, i.e. the honest floor."""
    out = dict(measurements[0])
    out["matmul_gflops"] = {k: max(m["matmul_gflops"][k] for m in measurements) for k in out["matmul_gflops"]}
    out["copy_gbs"] = max(m["copy_gbs"] for m in measurements)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print(json.dumps(measure(args.threads), indent=2))


if __name__ == "__main__":
    main()
