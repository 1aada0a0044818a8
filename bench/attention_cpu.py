"""cpu_flash vs reference: one 512-token chunk over an 8K cached context, and one decode step.

Run: PYTHONPATH=. python bench/attention_cpu.py [--context 8192] [--chunk 512] [--heads 8] [--kv-heads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from common.attention.cpu import CpuFlashBackend
from common.attention.reference import ReferenceBackend


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    L = a.context + a.chunk
    q = torch.randn(a.chunk, a.heads, a.head_dim)
    k, v = torch.randn(L, a.kv_heads, a.head_dim), torch.randn(L, a.kv_heads, a.head_dim)
    scale = a.head_dim ** -0.5
    ref, fast = ReferenceBackend(), CpuFlashBackend()
    for label, qq, q_start in (("chunk", q, a.context), ("decode", q[-1:], L - 1)):
        kk, vv = k[:q_start + qq.shape[0]], v[:q_start + qq.shape[0]]
        t_ref = _time(lambda: ref.forward(qq, kk, vv, q_start=q_start, k_start=0, scale=scale), a.reps)
        t_fast = _time(lambda: fast.forward(qq, kk, vv, q_start=q_start, k_start=0, scale=scale), a.reps)
        print(f"{label}: n={qq.shape[0]} over {q_start} cached, Hq={a.heads} Hkv={a.kv_heads} D={a.head_dim}, "
              f"{torch.get_num_threads()} threads: reference {t_ref * 1e3:.1f} ms, cpu_flash {t_fast * 1e3:.1f} ms, "
              f"speed-up {t_ref / t_fast:.1f}x")


if __name__ == "__main__":
    main()
