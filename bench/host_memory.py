"""The host allocator's thresholds (common/model/host_memory.py) on and off, side by side.

Each round runs the built-in model in two fresh processes, MNEMOSYNE_HOST_MALLOC=1 and =0 (their order
alternating between rounds): per dtype, a first prefill of --context tokens (the process's memory
touched once), then the measured one, in chunks of 1,024, and 16 decode steps; each reports the
prefill's seconds, the median decode step, and the minor page faults and system CPU seconds of the
measured prefill and its steps. Medians over rounds.

Writes bench/results/host_memory.{json,md}.
Run: PYTHONPATH=. python -m bench.host_memory [--rounds 3] [--context 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = ("tuned", "glibc default")


def child(dtype: str, context: int) -> dict:
    import torch
    torch.set_num_threads(2)
    from bench.cpu_vs_transformers import Ours, prompt_tokens
    from common.model import host_memory
    from common.model.loader import load_checkpoint
    ours = Ours(load_checkpoint(None), dtype, context + 64, 1024)
    ours.run(prompt_tokens(context), 2)               # the process's first prefill touches its memory first
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    prefill, steps, _ = ours.run(prompt_tokens(context), 16)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"tuned": host_memory.tune(), "prefill_s": prefill, "decode_ms": 1e3 * statistics.median(steps[1:]),
            "minflt": r1.ru_minflt - r0.ru_minflt, "sys_s": r1.ru_stime - r0.ru_stime,
            "wall_s": time.perf_counter() - t}


def side(name: str, dtype: str, context: int) -> dict:
    env = dict(os.environ, MNEMOSYNE_HOST_MALLOC="1" if name == SIDES[0] else "0")
    out = subprocess.run([sys.executable, "-m", "bench.host_memory", "--child", dtype, "--context", str(context)],
                         env=env, capture_output=True, text=True, timeout=900, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    lines = ["# The host allocator's thresholds on and off (common/model/host_memory.py)", "",
             f"{report['platform']}, 2 threads; {report['rounds']} rounds, each side a fresh process, their order "
             f"alternating; medians over rounds. The second prefill of {report['context']} tokens in the process (chunks of "
             "1,024) and its 16 decode steps, the built-in model.", "",
             "| dtype | side | prefill s | decode ms/step | minor faults (prefill and steps) | system CPU s (prefill and steps) |",
             "|---|---|---:|---:|---:|---:|"]
    for dtype, sides in report["results"].items():
        for name in SIDES:
            rs = sides[name]
            med = {k: statistics.median(r[k] for r in rs) for k in ("prefill_s", "decode_ms", "minflt", "sys_s")}
            lines.append(f"| {dtype} | {name} | {med['prefill_s']:.2f} | {med['decode_ms']:.1f} | "
                         f"{med['minflt']:.0f} | {med['sys_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="host_memory")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.context)))
        return
    report = {"platform": platform.platform(), "rounds": a.rounds, "context": a.context, "results": {},
              "loadavg_rounds": []}
    for r in range(a.rounds):
        for dtype in a.dtypes.split(","):
            order = SIDES if r % 2 == 0 else tuple(reversed(SIDES))
            for name in order:
                report["results"].setdefault(dtype, {}).setdefault(name, []).append(side(name, dtype, a.context))
        report["loadavg_rounds"].append(list(os.getloadavg()))
        print(f"round {r + 1} done (load {os.getloadavg()[0]:.1f})", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{a.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
