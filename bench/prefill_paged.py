"""A prefill chunk's attention over a paged cache whose blocks are in order, descending, or shuffled.

One layer's `ForwardContext.attend` for a chunk of `--chunk` queries at the end of a context of
`keys` keys, side by side in one process, the layouts alternating within each round (medians over
the rounds):

- `ascending`: the table of a fresh pool, one run of consecutive blocks (one view);
- `descending`: what a pool that served a few requests hands a long prompt (BlockPool.free gives
  blocks back tail first), one run per block, attended as `plan_parts` does: the blocks every query
  sees in id order (one view here), the chunk's own blocks in position order;
- `descending_gathered`: the same table through what ForwardContext did before plan_parts, the whole
  context gathered into one tensor for the chunk (its index_select, every chunk, every layer);
- `shuffled`: runs of 1-12 consecutive blocks with gaps of 1-12 blocks between them (other requests'
  blocks), in random order: the 16 longest runs as views and the rest (most of it) gathered.

Every layout's output is checked against one call over its own table's keys gathered in position
order (the tables put different K/V at a position, so layouts are not compared with each other).

Floor: the chunk's attention FLOPs (4 x queries x keys x query heads x head dim) at --floor-gflops.
Run: PYTHONPATH=. python -m bench.prefill_paged [--rounds 5] [--out-name prefill_paged]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import statistics
import time

import torch

from common.attention.cpu import CpuFlashBackend
from common.engine import forward_context as fc
from common.kv_cache.paged import PagedKVCache

OUT = pathlib.Path(__file__).resolve().parent / "results"

# (label, context keys, Hq, Hkv, D)
CASES = [
    ("built-in model", 65536, 9, 3, 64),
    ("built-in model", 262144, 9, 3, 64),
    ("long-context test model", 1048576, 2, 1, 16),
]
LAYOUTS = ["ascending", "descending", "descending_gathered", "shuffled"]


def _table(layout: str, nb: int, rng: random.Random) -> list[int]:
    if layout == "ascending":
        return list(range(nb))
    if layout.startswith("descending"):
        return list(range(nb - 1, -1, -1))
    runs, b, held = [], 0, 0
    while held < nb:
        n = min(rng.randint(1, 12), nb - held)
        runs.append(list(range(b, b + n)))
        held += n
        b += n + rng.randint(1, 12)
    rng.shuffle(runs)
    return [x for r in runs for x in r]


def run_case(keys: int, hq: int, hkv: int, d: int, chunk: int, rounds: int) -> dict:
    bs = 16
    nb = -(-keys // bs)
    rng = random.Random(0)
    tables = {layout: _table(layout, nb, rng) for layout in LAYOUTS}
    num_blocks = max(max(t) for t in tables.values()) + 1
    cache = PagedKVCache(range(1), num_blocks, bs, hkv, d, torch.float32)
    g = torch.Generator().manual_seed(0)
    for i in range(0, num_blocks, 4096):                          # filled in slices (no second full copy)
        cache.data[:, :, i:i + 4096].copy_(torch.randn(cache.data[:, :, i:i + 4096].shape, generator=g))
    q = torch.randn(chunk, hq, d, generator=g)
    q_start = keys - chunk
    backend = CpuFlashBackend()
    ctxs = {}
    for layout, table in tables.items():
        ctx = fc.ForwardContext(cache, backend, [fc.SeqAttn(slice(0, chunk), q_start, 0, keys, table)],
                                d ** -0.5, None, None)
        if layout == "descending_gathered":                       # the former path: one positional gather
            ctx.parts[0] = [fc.Part(0, keys, gather=torch.tensor(table[:nb], dtype=torch.long))]
        ctxs[layout] = ctx
    diff = 0.0
    for name, ctx in ctxs.items():                                # against its own table, one call
        k, v = cache.gather(0, tables[name], keys)
        ref, _ = backend.forward(q, k, v, q_start=q_start, k_start=0, scale=d ** -0.5)
        got = ctx.attend(0, q, q[:, :hkv], q[:, :hkv])
        diff = max(diff, (got.double() - ref.double()).abs().max().item())
        del k, v
    times: dict[str, list[float]] = {name: [] for name in ctxs}
    load = os.getloadavg()[0]
    for _ in range(rounds):
        for name, ctx in ctxs.items():
            t0 = time.perf_counter()
            ctx.attend(0, q, q[:, :hkv], q[:, :hkv])
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"keys": keys, "chunk": chunk, "hq": hq, "hkv": hkv, "head_dim": d, "block_size": bs,
            "parts": {name: len(ctx.parts[0]) for name, ctx in ctxs.items()},
            "gathered_keys": {name: sum(p.n for p in ctx.parts[0] if p.gather is not None)
                              for name, ctx in ctxs.items()},
            "ms": {name: 1e3 * t for name, t in med.items()},
            "runs_ms": {name: [1e3 * t for t in ts] for name, ts in times.items()},
            "max_abs_diff_vs_one_call": diff, "flops": 4 * chunk * keys * hq * d,
            "loadavg": [load, os.getloadavg()[0]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prefill_paged", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--chunk", type=int, nargs="+", default=[256, 1024], help="queries per chunk")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--floor-gflops", type=float, default=190.0, help="this machine's float32 matmul rate")
    p.add_argument("--out-name", default="prefill_paged")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for label, keys, hq, hkv, d in CASES:
        for chunk in a.chunk:
            row = {"model": label, **run_case(keys, hq, hkv, d, chunk, a.rounds)}
            row["floor_ms"] = 1e3 * row["flops"] / (a.floor_gflops * 1e9)
            rows.append(row)
            ms = row["ms"]
            print(f"{label} {keys} keys, chunk {chunk}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
                  + f", floor {row['floor_ms']:.1f} ms, load {row['loadavg'][0]:.1f}", flush=True)
    result = {"benchmark": "prefill_paged", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": a.rounds,
              "threads": a.threads, "floor_gflops": a.floor_gflops, "max_runs": fc.MAX_RUNS,
              "min_view_blocks": fc.MIN_VIEW_BLOCKS, "rows": rows}
    lines = [
        "# A prefill chunk's attention over ordered, descending and shuffled block tables (CPU)",
        "",
        f"`python -m bench.prefill_paged` ({a.rounds} rounds, the layouts alternating in each; medians), one "
        f"layer's ForwardContext.attend, float32, 16-token blocks, {a.threads} torch thread(s), "
        f"{result['machine']}, torch {torch.__version__}, {result['date']} UTC. The chunk is the context's "
        "last queries. `descending_gathered` is the former path for a table of more than MAX_RUNS runs "
        "(the whole context gathered each chunk); `descending` and `shuffled` go through plan_parts. "
        f"Floor: the attention FLOPs at {a.floor_gflops:.0f} GFLOP/s.",
        "",
        "| model | keys | chunk | ascending ms | descending ms | descending, gathered ms | shuffled ms "
        "| gathered / descending | floor ms | ascending x floor | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['model']} | {r['keys']} | {r['chunk']} | {ms['ascending']:.1f} | {ms['descending']:.1f} "
                     f"| {ms['descending_gathered']:.1f} | {ms['shuffled']:.1f} "
                     f"| {ms['descending_gathered'] / ms['descending']:.2f}x | {r['floor_ms']:.1f} "
                     f"| {ms['ascending'] / r['floor_ms']:.1f} | {r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f} |")
    lines += ["", "Largest difference of a layout's output from one call over its table's keys gathered in "
              f"position order: {max(r['max_abs_diff_vs_one_call'] for r in rows):.1e} (float32, merge order).",
              "Parts per call (views + gathered), shuffled: "
              + ", ".join(f"{r['keys']}/{r['chunk']}: {r['parts']['shuffled']} ({r['gathered_keys']['shuffled']} keys "
                          "gathered)" for r in rows) + "."]
    OUT.mkdir(exist_ok=True)
    (OUT / f"{a.out_name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (OUT / f"{a.out_name}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
