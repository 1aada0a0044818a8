"""Two builds of the CPU kernels side by side: another revision's `common/model/cpu_kernels.cpp` against the
working tree's, paired rounds in one run.

On this project's shared hosts the machine's speed moves by up to 2x from one minute to the next, so a
kernel change is judged here by paired rounds: each round times both builds back to back (the order
alternating: ABBA), and the figure is the median of the per-round ratios (baseline time / current
time: above 1 the current build is faster), with its quartiles.

Parts:
  linears    the built-in model's decode linears (q/k/v, o, gate/up, down: --layers distinct weights each,
             so they stream from memory as a decode step reads them, and the LM head) for each
             --linear-rows count of rows of x, through each build's matrix-vector kernel
             (cpu_kernels.gemv: the batch path past 4 rows); GB/s of weight bytes beside a plain read
             of the same bytes (torch.sum, best of 5 before and after), the outputs compared;
  attention  the decode attention kernel (cpu_kernels.decode_attention) over `--layers` distinct layers'
             paged caches (block 16, 3 KV heads x 64, 9 query heads: the built-in model's shape), as a
             decode step reads them: every layer's K and V cold, from memory (`cold`; `--scattered`
             adds a run with the blocks in a random order), and one layer read `--layers` times, in
             cache (`warm`). One sequence of each --contexts length, and the --batches (B sequences
             of KEYS keys, blocks scattered). The outputs of the two builds are compared with each
             other and, for the first sequence, with a float64 reference.
  chunk      a prefill chunk's attention (cpu_kernels.chunk_attention: 1,024 queries, the last of
             --contexts keys, one layer of the built-in model's shape) timed 3 times a side a round;
             GFLOP/s and the outputs compared.
  prefill    the built-in model's prefill at each --prefill-contexts length (chunks of --chunk), one prefill a
             side a round (--prefill-rounds, ABBA), from submitting the prompt to its first token;
  engine     the built-in model's decode step (the prefill skipped as in bench/engine.py) at each
             --engine-contexts length, for each --engine-batches count of requests decoding together
             (each over that many cached positions): the steps alternate between the builds
             (`cpu_kernels.using`, the builds' row limits with them), median step time per side.

Writes bench/results/<name>.{json,md} (default name kernel_ab).
Run: PYTHONPATH=. python -m bench.kernel_ab --baseline HEAD [--rounds 12] [--parts linears,attention,chunk,engine]
     (prefill: --parts prefill [--prefill-contexts 1024,4096] [--prefill-rounds 4] [--chunk 2048])
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from common.model import cpu_kernels
from tests.fixtures.paged import scattered_cache

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HQ, HKV, D, BLOCK = 9, 3, 64, 16


def build_revision(rev: str, out: Path) -> ctypes.CDLL:
    """The kernel source at git revision `rev`, built and loaded (its library must export what
    cpu_kernels.load declares: revisions from the twenty-fifth session's on)."""
    src = subprocess.run(["git", "show", f"{rev}:common/model/cpu_kernels.cpp"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    path = out / "baseline.cpp"
    path.write_text(src)
    so = out / "baseline.so"
    cpu_kernels.build(so, source=path)
    try:
        return cpu_kernels.load(so)
    except AttributeError as e:
        raise SystemExit(f"the kernel of {rev} lacks a function cpu_kernels.load declares ({e}): pick a newer baseline")


def build_current(out: Path) -> ctypes.CDLL:
    so = out / "current.so"
    cpu_kernels.build(so)
    return cpu_kernels.load(so)


def quartiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median": statistics.median(xs), "q1": xs[len(xs) // 4], "q3": xs[(3 * len(xs)) // 4]}


def paired(libs: dict, run, rounds: int) -> tuple[dict[str, list[float]], list[float]]:
    """`run(lib)` -> seconds, for both sides each round (ABBA order): the times per side and the per-round
    ratios baseline / current."""
    sides = list(libs)
    times: dict[str, list[float]] = {s: [] for s in sides}
    ratios = []
    for r in range(rounds):
        t = {s: run(libs[s]) for s in (sides if r % 2 == 0 else sides[::-1])}
        for s in sides:
            times[s].append(t[s])
        ratios.append(t[sides[0]] / t[sides[1]])
    return times, ratios


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """float64 attention of q [1, Hq, D] over the first n keys of the paged cache (table row 0)."""
    rows = (table[0, : -(-n // BLOCK)].long()[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)[:n]
    kk = k.reshape(-1, HKV, D)[rows].double().repeat_interleave(HQ // HKV, 1)       # [n, Hq, D]
    vv = v.reshape(-1, HKV, D)[rows].double().repeat_interleave(HQ // HKV, 1)
    s = torch.einsum("hd,nhd->hn", q[0].double() * D ** -0.5, kk)
    return torch.einsum("hn,nhd->hd", s.softmax(-1), vv)


def attention_part(libs: dict, dtype: torch.dtype, keys: int, layers: int, rounds: int, scattered: bool,
                   batch: int = 1) -> dict:
    """`batch` sequences of `keys` keys each (their blocks interleaved at random where batch > 1)."""
    nb = keys // BLOCK
    gen = torch.Generator().manual_seed(keys)
    if batch == 1:
        caches = [(torch.randn(nb, BLOCK, HKV, D, generator=gen).to(dtype),
                   torch.randn(nb, BLOCK, HKV, D, generator=gen).to(dtype)) for _ in range(layers)]
        table = (torch.randperm(nb, generator=gen) if scattered else torch.arange(nb)).to(torch.int32)[None]
    else:
        made = [scattered_cache([keys] * batch, BLOCK, HKV, D, dtype, gen) for _ in range(layers)]
        caches, table = [(k, v) for k, v, _, _ in made], made[0][2]       # one table: every layer's blocks alike
    lens = torch.full((batch,), keys, dtype=torch.int32)
    q = torch.randn(batch, HQ, D, generator=gen).to(dtype)
    scale = D ** -0.5
    ref = reference(q[:1], *caches[0], table, keys)
    out = {side: cpu_kernels.decode_attention(lib, q, *caches[0], table, lens, scale)[0][0] for side, lib in libs.items()}
    sides = list(libs)
    check = {"max_abs_between": float((out[sides[0]].float() - out[sides[1]].float()).abs().max()),
             **{f"max_abs_vs_float64_{s}": float((o.double() - ref).abs().max()) for s, o in out.items()}}

    def run(lib, warm: bool) -> float:
        t = time.perf_counter()
        for i in range(layers):
            cpu_kernels.decode_attention(lib, q, *caches[0 if warm else i], table, lens, scale)
        return time.perf_counter() - t

    res = {}
    for mode in ("cold", "warm"):
        for lib in libs.values():
            run(lib, mode == "warm")
        times, ratios = paired(libs, lambda lib: run(lib, mode == "warm"), rounds)
        kv = layers * 2 * caches[0][0].numel() * caches[0][0].element_size()
        res[mode] = {"ms": {s: 1e3 * statistics.median(v) for s, v in times.items()},
                     "gbs": {s: kv / statistics.median(v) / 1e9 for s, v in times.items()},
                     "ratio": quartiles(ratios)}
    return {**res, "check": check}


def chunk_part(libs: dict, dtype: torch.dtype, keys: int, rounds: int, queries: int = 1024) -> dict | None:
    """None where a build has no chunk kernel for `dtype`."""
    gen = torch.Generator().manual_seed(keys + 1)
    q = torch.randn(queries, HQ, D, generator=gen).to(dtype)
    k = torch.randn(keys, HKV, D, generator=gen).to(dtype)
    v = torch.randn(keys, HKV, D, generator=gen).to(dtype)
    start, scale = keys - queries, D ** -0.5
    out = {side: cpu_kernels.chunk_attention(lib, q, k, v, start, 0, scale) for side, lib in libs.items()}
    if any(o is None for o in out.values()):
        return None
    sides = list(libs)

    def run(lib) -> float:
        t = time.perf_counter()
        for _ in range(3):
            cpu_kernels.chunk_attention(lib, q, k, v, start, 0, scale)
        return (time.perf_counter() - t) / 3

    times, ratios = paired(libs, run, rounds)
    flops = 4 * HQ * D * (queries * start + queries * queries / 2)
    a, b = (out[s][0].float() for s in sides)
    return {"ms": {s: 1e3 * statistics.median(v) for s, v in times.items()},
            "gflops": {s: flops / statistics.median(v) / 1e9 for s, v in times.items()},
            "ratio": quartiles(ratios), "max_abs_between": float((a - b).abs().max()),
            "same_bits": bool(torch.equal(out[sides[0]][0], out[sides[1]][0]))}


LINEAR_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))     # [out, in]: q/k/v, o, gate/up, down
VOCAB = 49152


def linears_part(libs: dict, dtype: torch.dtype, rows: int, layers: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(rows)
    ws = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(layers) for n, k in LINEAR_SHAPES]
    ws.append(torch.randn(VOCAB, 576, generator=gen).to(dtype))
    xs = {k: torch.randn(rows, k, generator=gen).to(dtype) for k in (576, 1536)}
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    flat = torch.ones(nbytes // 4)

    def read() -> float:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            flat.sum()
            best = min(best, time.perf_counter() - t)
        return nbytes / best / 1e9

    def run(lib) -> float:
        t = time.perf_counter()
        for w in ws:
            cpu_kernels.gemv(lib, xs[w.shape[1]], w)
        return time.perf_counter() - t

    reads = [read()]
    times, ratios = paired(libs, run, rounds)
    reads.append(read())
    a, b = (cpu_kernels.gemv(lib, xs[ws[2].shape[1]], ws[2]) for lib in libs.values())
    return {"ms": {s: 1e3 * statistics.median(v) for s, v in times.items()},
            "gbs": {s: nbytes / statistics.median(v) / 1e9 for s, v in times.items()}, "read_gbs": max(reads),
            "ratio": quartiles(ratios), "same_bits": bool(torch.equal(a, b)),
            "max_abs_between": float((a.float() - b.float()).abs().max())}


def engine_part(libs: dict, checkpoint, dtype: str, context: int, steps: int, batch: int = 1) -> dict:
    from common.config import CacheConfig, EngineConfig, SchedulerConfig
    from common.engine.engine import LLMEngine
    from common.sampling_params import SamplingParams
    cfg = EngineConfig(dtype=dtype, max_model_len=context + steps + 8,
                       cache=CacheConfig(max_kv_tokens=batch * (context + steps + 32), prefix_caching=False),
                       scheduler=SchedulerConfig(chunk_size=1024, max_batch_tokens=8192))
    engine = LLMEngine(cfg, checkpoint)
    cache = engine.executor.cache
    cache.data.normal_(0.0, 0.5)       # as bench/engine.decode_step_times: real values, not the zero page
    prompt = [100 + (i * 7919) % 30000 for i in range(context)]
    for _ in range(batch):
        rid = engine.add_request(prompt, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
        engine.pool.allocate(rid, context)
        engine.scheduler.requests[rid].num_computed = context - 1
    sides = list(libs)
    times = {s: [] for s in sides}
    i = 0
    while engine.has_unfinished():
        side = sides[(i // 2) % 2]          # two steps each: A A B B A A ...
        with cpu_kernels.using(libs[side]):
            t = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t
        if i > 0:                           # the first step enters the requests
            times[side].append(dt)
        i += 1
    engine.pool.check()
    return {"ms": {s: 1e3 * statistics.median(v) for s, v in times.items()},
            "steps": {s: len(v) for s, v in times.items()},
            "ratio": statistics.median(times[sides[0]]) / statistics.median(times[sides[1]])}


def prefill_part(libs: dict, checkpoint, dtype: str, context: int, rounds: int, chunk: int) -> dict:
    """The built-in model's prefill of `context` - 1 tokens (within its 8,192) through one engine, chunked by
    `chunk`, the builds alternating in ABBA order, one prefill a side a round (as bench/cpu_vs_transformers.py
    times it: from submitting the prompt to its first token)."""
    from bench.cpu_vs_transformers import Ours, prompt_tokens
    ours = Ours(checkpoint, dtype, context, chunk)
    prompt = prompt_tokens(context - 1)
    tokens: dict[str, set] = {s: set() for s in libs}       # each side's greedy first tokens

    def run(lib) -> float:
        with cpu_kernels.using(lib):
            seconds, _, out = ours.run(prompt, 1)
        tokens[next(s for s, v in libs.items() if v is lib)].add(tuple(out))
        return seconds

    times, ratios = paired(libs, run, rounds)
    ours.engine.pool.check()
    return {"s": {s: statistics.median(v) for s, v in times.items()}, "ratio": quartiles(ratios), "rounds": rounds,
            "same_token": len(set().union(*tokens.values())) == 1}


def section(title: str, intro: str, columns: list[str], rule: str | None = None) -> list[str]:
    """A report section's heading, sentence and table head (the first column left, the others right)."""
    return [f"## {title}", "", intro, "", "| " + " | ".join(columns) + " |",
            rule or "|---|" + "---:|" * (len(columns) - 1)]


def ratio(r: dict) -> str:
    return f"{r['median']:.3f} ({r['q1']:.3f}-{r['q3']:.3f})"


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"# Kernel A/B: {c['baseline']} (baseline) vs the working tree (current)", "",
             f"{report['machine']['platform']}, torch {report['machine']['torch']}, {c['threads']} threads, "
             f"kernels {report['machine']['cpu_kernels']}. Load average before {report['loadavg_before'][0]:.2f}, "
             f"after {report['loadavg_after'][0]:.2f}.", "",
             f"Paired rounds ({c['rounds']}, ABBA order); x = baseline time / current time, median of the "
             "per-round ratios (q1-q3): above 1 the current build is faster.", ""]
    if "linears" in report:
        lines += section("Decode linears", f"The built-in model's decode linears, {c['layers']} layers' weights (cold) "
                         "and the LM head, R rows of x; a plain read of the same bytes beside them.",
                         ["dtype, R", "baseline ms (GB/s)", "current ms (GB/s)", "plain read GB/s", "x (q1-q3)",
                          "same bits (max abs)"], "|---|---:|---:|---:|---:|---|")
        for key, m in report["linears"].items():
            lines.append(f"| {key} | {m['ms']['baseline']:.2f} ({m['gbs']['baseline']:.1f}) | {m['ms']['current']:.2f} "
                         f"({m['gbs']['current']:.1f}) | {m['read_gbs']:.1f} | {ratio(m['ratio'])} "
                         f"| {'yes' if m['same_bits'] else 'no'} ({m['max_abs_between']:.1e}) |")
        lines.append("")
    if "attention" in report:
        lines += section("Decode attention", f"One sequence (B x keys: B sequences), {c['layers']} layers (cold: each "
                         "layer's own cache, read from memory as a decode step reads it; warm: one layer read again "
                         "and again, in cache).",
                         ["keys, dtype, blocks", "mode", "baseline ms", "current ms", "current GB/s", "x (q1-q3)",
                          "max abs: between, vs float64 (baseline / current)"], "|---|---|---:|---:|---:|---:|---|")
        for key, row in report["attention"].items():
            ch = row["check"]
            for mode in ("cold", "warm"):
                m = row[mode]
                lines.append(f"| {key} | {mode} | {m['ms']['baseline']:.2f} | {m['ms']['current']:.2f} "
                             f"| {m['gbs']['current']:.1f} | {ratio(m['ratio'])} "
                             f"| {ch['max_abs_between']:.1e}; {ch['max_abs_vs_float64_baseline']:.1e} / "
                             f"{ch['max_abs_vs_float64_current']:.1e} |")
        lines.append("")
    if "chunk" in report:
        lines += section("Prefill chunk attention",
                         "1,024 queries, the last of the keys, one layer (9 query heads, 3 kv heads, head dim 64).",
                         ["keys, dtype", "baseline ms", "current ms", "baseline GFLOP/s", "current GFLOP/s", "x (q1-q3)",
                          "same bits (max abs)"], "|---|---:|---:|---:|---:|---:|---|")
        for key, m in report["chunk"].items():
            lines.append(f"| {key} | {m['ms']['baseline']:.1f} | {m['ms']['current']:.1f} | {m['gflops']['baseline']:.0f} "
                         f"| {m['gflops']['current']:.0f} | {ratio(m['ratio'])} "
                         f"| {'yes' if m['same_bits'] else 'no'} ({m['max_abs_between']:.1e}) |")
        lines.append("")
    if "prefill" in report:
        lines += section("Engine prefill", f"The built-in model's prefill of the context's tokens less one, chunks of "
                         f"{c.get('chunk', 2048)}, one prefill a side a round ({c.get('prefill_rounds', '-')} rounds, "
                         "ABBA), as bench/cpu_vs_transformers.py times it.",
                         ["context, dtype", "baseline s", "current s", "x (q1-q3)", "same first token"],
                         "|---|---:|---:|---:|---|")
        for key, m in report["prefill"].items():
            lines.append(f"| {key} | {m['s']['baseline']:.2f} | {m['s']['current']:.2f} | {ratio(m['ratio'])} "
                         f"| {'yes' if m['same_token'] else 'no'} |")
        lines.append("")
    if "engine" in report:
        lines += section("Engine decode step", "The built-in model, B requests decoding together, the steps "
                         "alternating between the builds (two each).",
                         ["context, dtype, B", "baseline ms/step", "current ms/step", "x"])
        for key, rows in report["engine"].items():
            b = statistics.median(r["ms"]["baseline"] for r in rows)
            cur = statistics.median(r["ms"]["current"] for r in rows)
            x = statistics.median(r["ratio"] for r in rows)
            lines.append(f"| {key} | {b:.2f} | {cur:.2f} | {x:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="HEAD", help="git revision whose cpu_kernels.cpp is the baseline")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--parts", default="linears,attention,chunk,engine")
    p.add_argument("--linear-rows", default="1,8", help="rows of x in the linears part")
    p.add_argument("--contexts", default="1024,4096,8192")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--scattered", action="store_true", help="also the cold run with blocks in a random order")
    p.add_argument("--batches", default="16x512,64x128",
                   help="decode batches BxKEYS for the attention part (blocks scattered; empty: none)")
    p.add_argument("--prefill-contexts", default="1024,4096", help="contexts of the prefill part")
    p.add_argument("--prefill-rounds", type=int, default=4)
    p.add_argument("--chunk", type=int, default=2048, help="the prefill part's chunk size")
    p.add_argument("--engine-contexts", default="8192")
    p.add_argument("--engine-batches", default="1,8", help="requests decoding together in the engine part")
    p.add_argument("--engine-rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=24, help="decode steps per engine round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="kernel_ab")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    report: dict = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                                "cpu_kernels": cpu_kernels.status()},
                    "config": {"baseline": f"{args.baseline} ({rev})", "rounds": args.rounds, "layers": args.layers,
                               "threads": args.threads, "parts": parts, "chunk": args.chunk,
                               "prefill_rounds": args.prefill_rounds},
                    "loadavg_before": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"baseline": build_revision(args.baseline, Path(tmp)), "current": build_current(Path(tmp))}
        if "linears" in parts:
            for d, dt in DTYPES.items():
                for rows in (int(r) for r in args.linear_rows.split(",")):
                    key = f"{d}, {rows}"
                    report.setdefault("linears", {})[key] = linears_part(libs, dt, rows, args.layers, args.rounds)
                    print("linears", key, json.dumps(report["linears"][key]), flush=True)
        if "attention" in parts:
            for d, dt in DTYPES.items():
                for keys in (int(k) for k in args.contexts.split(",")):
                    for scattered in ((False, True) if args.scattered else (False,)):
                        key = f"{keys // 1024}K, {d}, {'scattered' if scattered else 'in order'}"
                        report.setdefault("attention", {})[key] = attention_part(
                            libs, dt, keys, args.layers, args.rounds, scattered)
                        print(key, json.dumps(report["attention"][key]), flush=True)
                for shape in filter(None, args.batches.split(",")):
                    batch, keys = (int(x) for x in shape.split("x"))
                    key = f"{batch} x {keys}, {d}, scattered"
                    report.setdefault("attention", {})[key] = attention_part(
                        libs, dt, keys, args.layers, args.rounds, True, batch)
                    print(key, json.dumps(report["attention"][key]), flush=True)
        if "chunk" in parts:
            for d, dt in DTYPES.items():
                for keys in (int(k) for k in args.contexts.split(",")):
                    if (row := chunk_part(libs, dt, keys, args.rounds)) is not None:
                        report.setdefault("chunk", {})[f"{keys // 1024}K, {d}"] = row
                        print(f"chunk {keys} {d}", json.dumps(row), flush=True)
        if "prefill" in parts or "engine" in parts:
            from common.model.loader import load_checkpoint
            ckpt = load_checkpoint(None)
        if "prefill" in parts:
            for d in DTYPES:
                for ctx in (int(c) for c in args.prefill_contexts.split(",")):
                    key = f"{ctx // 1024}K, {d}"
                    report.setdefault("prefill", {})[key] = prefill_part(libs, ckpt, d, ctx, args.prefill_rounds,
                                                                         args.chunk)
                    print("prefill", key, json.dumps(report["prefill"][key]), flush=True)
        if "engine" in parts:
            for d in DTYPES:
                for ctx in (int(c) for c in args.engine_contexts.split(",")):
                    for batch in (int(b) for b in args.engine_batches.split(",")):
                        key = f"{ctx // 1024}K, {d}, {batch}"
                        for _ in range(args.engine_rounds):
                            report.setdefault("engine", {}).setdefault(key, []).append(
                                engine_part(libs, ckpt, d, ctx, args.steps, batch))
                        print(key, json.dumps(report["engine"][key]), flush=True)
    report["loadavg_after"] = list(os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
