"""torch.profiler over decode steps of the real engine (built-in model, one request, prefill skipped).

For each dtype and weight layout ([out, in] / [in, out], LlamaModel.pack_weights), a context of L
cached tokens (their values do not change the cost; as in bench/engine.py), `--warm` unprofiled steps,
then `--steps` profiled ones. Per configuration: wall ms per step, and per op group the self-CPU ms per
step and calls per step: the linears (aten::mm/addmm), the flash kernel, the decode KV gather
(aten::index_select), the rest; "not in ops" = wall - profiled op time (Python, scheduling).

Writes bench/results/cpu_decode_profile.{json,md} (--name: another stem).
Run: PYTHONPATH=. python -m bench.cpu_decode_profile [--context 4096] [--threads 1] [--dtypes float32]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.engine import decode_step_times, make_engine
from common.model.loader import load_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = {"matmul": ("aten::mm", "aten::addmm"), "flash": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
          "kv gather": ("aten::index_select",)}


def profile_steps(checkpoint, dtype: str, transposed: bool, context: int, warm: int, steps: int) -> dict:
    """One engine, `warm` + `steps` decode steps over `context` cached tokens; the last `steps` profiled."""
    engine = make_engine(checkpoint, dtype, context + warm + steps + 8, 1024, ())
    engine.executor.model.pack_weights(transposed)
    prompt = [100 + (i * 7919) % 30000 for i in range(context)]
    decode_step_times(engine, prompt[:64], 2)                          # warm-up of a fresh engine
    load = os.getloadavg()[0]
    ops: dict[str, list[float]] = {}
    walls: list[float] = []

    def trace(prof) -> None:
        for e in prof.key_averages():
            acc = ops.setdefault(e.key, [0.0, 0])
            acc[0] += e.self_cpu_time_total / 1e3
            acc[1] += e.count

    with profile(activities=[ProfilerActivity.CPU], schedule=torch.profiler.schedule(wait=0, warmup=warm, active=steps),
                 on_trace_ready=trace) as prof:
        rid = engine.add_request(prompt, _params(warm + steps + 1))
        req = engine.scheduler.requests[rid]
        engine.pool.allocate(rid, context)
        req.num_computed = context - 1
        engine.step()                                                  # enters the request
        for i in range(warm + steps):
            t = time.perf_counter()
            engine.step()
            if i >= warm:
                walls.append(time.perf_counter() - t)
            prof.step()
    while engine.has_unfinished():
        engine.step()
    wall_ms = 1e3 * sum(walls) / steps
    groups = {g: [0.0, 0] for g in (*GROUPS, "other ops")}
    for key, (ms, n) in ops.items():
        if key.startswith("ProfilerStep"):          # the step's own self time: outside every op
            continue
        g = next((g for g, names in GROUPS.items() if key in names), "other ops")
        groups[g][0] += ms / steps
        groups[g][1] += n / steps
    in_ops = sum(ms for ms, _ in groups.values())
    top = sorted(((k, v) for k, v in ops.items() if not k.startswith("ProfilerStep")), key=lambda kv: -kv[1][0])[:8]
    return {"dtype": dtype, "transposed": transposed, "context": context, "wall_ms": wall_ms,
            "groups": {g: {"ms": ms, "calls": n} for g, (ms, n) in groups.items()},
            "not_in_ops_ms": wall_ms - in_ops, "loadavg": load, "loadavg_after": os.getloadavg()[0],
            "top_ops": [{"op": k, "ms_per_step": ms / steps, "calls_per_step": n / steps} for k, (ms, n) in top]}


def _params(n: int):
    from common.sampling_params import SamplingParams
    return SamplingParams(max_tokens=n, ignore_eos=True)


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"# Decode step profile at {c['context']} tokens (built-in SmolLM2-135M, {c['threads']} torch "
             f"thread(s), torch.profiler, {c['steps']} steps after {c['warm']} warm ones)", "",
             "Self-CPU ms per step (calls per step) by op group; the two layouts run back to back per dtype. "
             "The machine is shared (load average per row): compare rows of one dtype, not absolute times.", "",
             "| dtype, layout | wall ms | matmul | flash | kv gather (index_select) | other ops | not in ops | load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        g = r["groups"]
        cell = lambda k: f"{g[k]['ms']:.1f} ({g[k]['calls']:.0f})"                      # noqa: E731
        lines.append(f"| {r['dtype']}, {'[in,out]' if r['transposed'] else '[out,in]'} | {r['wall_ms']:.1f} "
                     f"| {cell('matmul')} | {cell('flash')} | {cell('kv gather')} | {cell('other ops')} "
                     f"| {r['not_in_ops_ms']:.1f} | {r['loadavg']:.1f}-{r['loadavg_after']:.1f} |")
    lines += ["", "Top ops by self-CPU time, ms per step (calls per step):", ""]
    for r in report["rows"]:
        lines.append(f"- {r['dtype']}, {'[in,out]' if r['transposed'] else '[out,in]'}: " + ", ".join(
            f"{o['op']} {o['ms_per_step']:.1f} ({o['calls_per_step']:.0f})" for o in r["top_ops"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layouts", default="0,1", help="transposed values to profile, 0 and/or 1")
    p.add_argument("--warm", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="cpu_decode_profile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(None)
    rows = [profile_steps(checkpoint, d, bool(int(t)), args.context, args.warm, args.steps)
            for d in args.dtypes.split(",") for t in args.layouts.split(",")]
    report = {"config": {"context": args.context, "threads": args.threads, "warm": args.warm, "steps": args.steps,
                         "torch": torch.__version__}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
