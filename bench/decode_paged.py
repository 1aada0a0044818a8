"""The CPU backend's paged decode, K/V gathered into its workspace vs attended where they lie.

One decode query per sequence over a block table of consecutive blocks (what a prompt gets from a
fresh pool), side by side in one process: `gathered` forces every block through the workspace gather
(MIN_VIEW_BLOCKS out of reach), `in_place` is the default (runs of >= MIN_VIEW_BLOCKS consecutive
blocks holding >= MIN_VIEW_BYTES of K and V attended as strided views). The two alternate within
each round; medians over the rounds. Reported against this machine's memory floor: the K and V
bytes each call must read, at the copy rate given by --floor-gbs.

`--engine`: the same comparison on whole decode steps of the engine (the built-in model, the prompt
really prefilled once per context, then steps alternating between the two in the same process, on
the same KV), per dtype and context; per step also the memory floor (weights and KV at --floor-gbs).

Run: PYTHONPATH=. python -m bench.decode_paged [--rounds 9] [--out-name decode_paged]
     PYTHONPATH=. python -m bench.decode_paged --engine [--contexts 4096 8192] [--dtypes float32 bfloat16]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import torch

import common.attention.cpu as cpu

OUT = pathlib.Path(__file__).resolve().parent / "results"

# (label, keys per sequence, batch, Hq, Hkv, D, dtype)
CASES = [
    ("long-context test model", 65536, 1, 2, 1, 16, torch.float32),
    ("long-context test model", 262144, 1, 2, 1, 16, torch.float32),
    ("built-in model", 1024, 8, 9, 3, 64, torch.float32),
    ("built-in model", 4096, 1, 9, 3, 64, torch.float32),
    ("built-in model", 8192, 1, 9, 3, 64, torch.float32),
    ("built-in model", 8192, 1, 9, 3, 64, torch.bfloat16),
]


def run_case(keys: int, batch: int, hq: int, hkv: int, d: int, dtype: torch.dtype, rounds: int, reps: int
             ) -> dict:
    bs = 16
    nb = -(-keys // bs)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(batch * nb + 1, bs, hkv, d, generator=g).to(dtype)
    v = torch.randn(batch * nb + 1, bs, hkv, d, generator=g).to(dtype)
    q = torch.randn(batch, hq, d, generator=g).to(dtype)
    tables = torch.arange(batch * nb, dtype=torch.int32).view(batch, nb)
    lens = torch.full((batch,), keys, dtype=torch.int32)
    scale = d ** -0.5
    backends = {"gathered": cpu.CpuFlashBackend(), "in_place": cpu.CpuFlashBackend()}

    def call(name: str) -> torch.Tensor:
        return _forced(name, lambda: backends[name].decode_paged(q, k, v, tables, lens, scale=scale)[0])

    out = {name: call(name) for name in backends}          # plans built, workspace grown
    diff = (out["gathered"].double() - out["in_place"].double()).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in backends}
    load = os.getloadavg()[0]
    for _ in range(rounds):
        for name in backends:
            t0 = time.perf_counter()
            for _ in range(reps):
                call(name)
            times[name].append((time.perf_counter() - t0) / reps)
    kv_bytes = 2 * batch * keys * hkv * d * torch.empty((), dtype=dtype).element_size()
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"keys": keys, "batch": batch, "hq": hq, "hkv": hkv, "head_dim": d, "dtype": str(dtype).split(".")[-1],
            "kv_mib": kv_bytes / (1 << 20), "gathered_ms": 1e3 * med["gathered"], "in_place_ms": 1e3 * med["in_place"],
            "gathered_runs_ms": [1e3 * t for t in times["gathered"]],
            "in_place_runs_ms": [1e3 * t for t in times["in_place"]],
            "speedup": med["gathered"] / med["in_place"], "in_place_gbs": kv_bytes / med["in_place"] / 1e9,
            "max_abs_diff": diff, "loadavg": [load, os.getloadavg()[0]]}


def _forced(name: str, fn):
    """fn() with the decode's K/V gathered ("gathered") or the default ("in_place")."""
    default = cpu.MIN_VIEW_BLOCKS
    cpu.MIN_VIEW_BLOCKS = 1 << 40 if name == "gathered" else default
    try:
        return fn()
    finally:
        cpu.MIN_VIEW_BLOCKS = default


def run_engine(context: int, dtype: str, rounds: int, steps: int, floor_gbs: float) -> dict:
    """The built-in model's engine: a `context`-token prompt prefilled, then `rounds` x 2 blocks of
    `steps` decode steps, alternating gathered / in place. Returns ms per step."""
    from bench.engine import decode_bytes, make_engine
    from common.model.loader import load_checkpoint
    from common.sampling_params import SamplingParams
    ckpt = load_checkpoint(None)
    n_steps = 2 * rounds * (steps + 1) + 4
    engine = make_engine(ckpt, dtype, context + n_steps + 8, 512, ())
    prompt = [100 + (i * 7919) % 30000 for i in range(context)]
    engine.add_request(prompt, SamplingParams(max_tokens=n_steps, ignore_eos=True))
    t0 = time.perf_counter()
    while engine.scheduler.running == [] or engine.scheduler.running[0].num_computed < context:
        engine.step()
    prefill_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {"gathered": [], "in_place": []}
    load = os.getloadavg()[0]
    for _ in range(rounds):
        for name in times:
            _forced(name, engine.step)                                # the plan, rebuilt
            t = time.perf_counter()
            for _ in range(steps):
                _forced(name, engine.step)
            times[name].append((time.perf_counter() - t) / steps)
    while engine.has_unfinished():
        engine.step()
    med = {name: statistics.median(ts) for name, ts in times.items()}
    floor_s = decode_bytes(ckpt.config, context, dtype) / (floor_gbs * 1e9)
    return {"context": context, "dtype": dtype, "threads": torch.get_num_threads(), "prefill_s": prefill_s,
            "gathered_ms": 1e3 * med["gathered"], "in_place_ms": 1e3 * med["in_place"],
            "gathered_runs_ms": [1e3 * t for t in times["gathered"]],
            "in_place_runs_ms": [1e3 * t for t in times["in_place"]],
            "speedup": med["gathered"] / med["in_place"], "floor_ms": 1e3 * floor_s,
            "in_place_x_floor": med["in_place"] / floor_s, "loadavg": [load, os.getloadavg()[0]]}


def main_engine(a: argparse.Namespace) -> int:
    rows = []
    torch.set_num_threads(a.threads[0])
    for dtype in a.dtypes:
        for context in a.contexts:
            row = run_engine(context, dtype, a.rounds, a.steps, a.floor_gbs)
            rows.append(row)
            print(f"{dtype} {context}: gathered {row['gathered_ms']:.1f} ms, in place {row['in_place_ms']:.1f} ms "
                  f"({row['speedup']:.2f}x), floor {row['floor_ms']:.1f} ms, load {row['loadavg'][0]:.1f}", flush=True)
    result = _result("decode_paged --engine", a, rows, steps=a.steps)
    lines = [
        "# Engine decode steps on the CPU: K/V gathered vs attended where they lie",
        "",
        f"`python -m bench.decode_paged --engine` (built-in SmolLM2-135M, the prompt prefilled once, then "
        f"{a.rounds} rounds of {a.steps} steps each way, alternating; medians), {a.threads[0]} torch thread(s), "
        f"{result['machine']}, torch {torch.__version__}, {result['date']} UTC. Floor: the weights and the "
        f"context's K/V read once at {a.floor_gbs:.0f} GB/s.",
        "",
        "| dtype | context | gathered ms/step | in place ms/step | speedup | floor ms | in place x floor | load |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['context']} | {r['gathered_ms']:.1f} | {r['in_place_ms']:.1f} "
                     f"| {r['speedup']:.2f}x | {r['floor_ms']:.1f} | {r['in_place_x_floor']:.1f} "
                     f"| {r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f} |")
    _write(a, result, lines)
    return 0


def _result(name: str, a: argparse.Namespace, rows: list[dict], **extra) -> dict:
    return {"benchmark": name, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": a.rounds,
            "floor_gbs": a.floor_gbs, **extra, "rows": rows}


def _write(a: argparse.Namespace, result: dict, lines: list[str]) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{a.out_name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (OUT / f"{a.out_name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_paged", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--floor-gbs", type=float, default=50.0, help="this machine's memory copy rate, GB/s")
    p.add_argument("--engine", action="store_true", help="whole decode steps of the engine (built-in model)")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192], help="--engine: prompt lengths")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="--engine: dtypes")
    p.add_argument("--steps", type=int, default=8, help="--engine: decode steps per timing")
    p.add_argument("--out-name", default=None, help="results stem (default: decode_paged, decode_paged_engine)")
    a = p.parse_args(argv)
    if a.engine:
        a.out_name = a.out_name or "decode_paged_engine"
        return main_engine(a)
    a.out_name = a.out_name or "decode_paged"
    rows = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        for label, keys, batch, hq, hkv, d, dtype in CASES:
            reps = max(1, (1 << 22) // (batch * keys))               # ~4M keys a timing
            row = {"model": label, "threads": threads, **run_case(keys, batch, hq, hkv, d, dtype, a.rounds, reps)}
            row["in_place_x_floor"] = a.floor_gbs / row["in_place_gbs"]
            rows.append(row)
            print(f"T={threads} {label} {keys}x{batch} {row['dtype']}: gathered {row['gathered_ms']:.2f} ms, "
                  f"in place {row['in_place_ms']:.2f} ms ({row['speedup']:.2f}x), load {row['loadavg'][0]:.1f}",
                  flush=True)
    result = _result("decode_paged", a, rows, min_view_blocks=cpu.MIN_VIEW_BLOCKS, min_view_bytes=cpu.MIN_VIEW_BYTES)
    lines = [
        "# Paged decode on the CPU: K/V gathered vs attended where they lie",
        "",
        f"`python -m bench.decode_paged` ({a.rounds} rounds, the two alternating in each; medians), "
        f"{result['machine']}, torch {torch.__version__}, {result['date']} UTC. One decode query per sequence "
        "over a table of consecutive blocks (16 tokens each). x floor: the K and V bytes read at "
        f"{a.floor_gbs:.0f} GB/s against the in-place time.",
        "",
        "| threads | model | keys x batch | dtype | K+V MiB | gathered ms | in place ms | speedup | in place GB/s "
        "| x floor | max diff | load |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['model']} (Hq {r['hq']}, Hkv {r['hkv']}, D {r['head_dim']}) "
                     f"| {r['keys']} x {r['batch']} | {r['dtype']} | {r['kv_mib']:.1f} | {r['gathered_ms']:.2f} "
                     f"| {r['in_place_ms']:.2f} | {r['speedup']:.2f}x | {r['in_place_gbs']:.1f} "
                     f"| {r['in_place_x_floor']:.1f} | {r['max_abs_diff']:.1e} "
                     f"| {r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f} |")
    _write(a, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
