"""A prompt's first chunk as one causal flash call against the former split + merge, side by side.

`CpuFlashBackend.forward` attends a chunk as A (keys up to its first query, non-causal) + B (its own
later keys, causal) merged by log-sum-exp. For a chunk with no key before it (a prompt's first
chunk, a KVP shard's first position) A is the first query's own key alone, and A + B is one top-left
causal call: no merge. This runs the built-in model's prefill in one engine (1,016-token prompts, a
fresh prompt per run, prefix caching off), alternating the current backend with the former path
(replicated here) per round, and reports seconds per prefill (+ 1 decode step) and whether the
greedy tokens agree. Writes bench/results/first_chunk_ab.{json,md}.

Run: PYTHONPATH=. python -m bench.first_chunk_ab [--rounds 5] [--dtypes float32,bfloat16]
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

import common.attention.cpu as cpu
from bench.cpu_vs_transformers import Ours, prompt_tokens
from common.model.builtin import builtin_model_path
from common.model.loader import load_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
CURRENT = cpu.CpuFlashBackend.forward


def former(self, q, k, v, *, q_start, k_start, scale):
    """The former path: always A (non-causal) + B (causal) merged, also when A is one key."""
    n = q.shape[0]
    if min(max(k_start - q_start, 0), n) or n == 0:
        return CURRENT(self, q, k, v, q_start=q_start, k_start=k_start, scale=scale)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_a = min(k.shape[0], q_start + 1 - k_start)
    n_b = min(k.shape[0], q_start + n - k_start) - n_a
    if n_a <= 0:
        return cpu._empty(n, q)
    out, lse = cpu._noncausal(q, k[:n_a], v[:n_a], scale)
    if n_b > 0:
        out_b, lse_b = cpu._causal_topleft(q[1:], k[n_a:n_a + n_b], v[n_a:n_a + n_b], scale)
        out_m, lse_m = cpu.merge_attention_states([out[1:], out_b], [lse[1:], lse_b])
        out, lse = torch.cat([out[:1], out_m]), torch.cat([lse[:1], lse_m])
    return out.to(q.dtype), lse.to(lse_dtype)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.first_chunk_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--tokens", type=int, default=1016)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ckpt = load_checkpoint(builtin_model_path())
    rows = []
    for dtype in a.dtypes.split(","):
        ours = Ours(ckpt, dtype, 2 * a.tokens, 1024)
        times: dict[str, list[float]] = {"one_call": [], "former": []}
        same, load = True, []
        ours.run(prompt_tokens(a.tokens - 1), 2)                   # warm-up, not counted
        for r in range(a.rounds):
            prompt = prompt_tokens(a.tokens + r)                 # a new prompt per round, both paths
            tokens = {}
            for mode in (("former", "one_call") if r % 2 == 0 else ("one_call", "former")):
                cpu.CpuFlashBackend.forward = former if mode == "former" else CURRENT
                t0 = time.perf_counter()
                _, _, tokens[mode] = ours.run(prompt, 2)
                times[mode].append(time.perf_counter() - t0)
            cpu.CpuFlashBackend.forward = CURRENT
            same &= tokens["former"] == tokens["one_call"]
            load.append(os.getloadavg()[0])
        med = {m: statistics.median(t) for m, t in times.items()}
        rows.append({"dtype": dtype, "tokens": a.tokens, "seconds": times, "median": med,
                     "speedup": med["former"] / med["one_call"], "same_greedy_tokens": same, "loadavg": load})
        print(dtype, json.dumps(rows[-1]), flush=True)
    meta = {"machine": platform.platform(), "torch": torch.__version__, "threads": a.threads, "rounds": a.rounds}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "first_chunk_ab.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# A prompt's first chunk: one causal call vs the former split + merge", "",
             f"`bench/first_chunk_ab.py`: built-in model, {a.tokens}-token prompts (a new one per round), prefill "
             f"+ 1 decode step, one engine alternating the two paths, {a.rounds} rounds; {meta['machine']}, torch "
             f"{meta['torch']}, {a.threads} threads. Seconds per run, median (rounds).", "",
             "| dtype | former (split + merge) | one call | speedup | same greedy tokens | load avg |",
             "|---|---:|---:|---:|:---:|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['median']['former']:.3f} ({', '.join(f'{x:.2f}' for x in r['seconds']['former'])}) "
                     f"| {r['median']['one_call']:.3f} ({', '.join(f'{x:.2f}' for x in r['seconds']['one_call'])}) "
                     f"| {r['speedup']:.2f}x | {'yes' if r['same_greedy_tokens'] else 'no'} "
                     f"| {', '.join(f'{x:.1f}' for x in r['loadavg'])} |")
    (RESULTS / "first_chunk_ab.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
