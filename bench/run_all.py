"""Runs every benchmark module present under bench/ (what `make bench` calls).

Known benchmarks run first, in BENCHMARKS order; any other bench/<name>.py with a `main()` follows,
alphabetically. Missing ones are skipped, helpers (HELPERS) are not run on their own. Each runs in
its own process (`python -m bench.<name>`), so one failure does not stop the rest; the exit status is
non-zero if any failed. Results land under bench/results/.

Run: python -m bench.run_all [NAME ...] [--list]
"""
from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BENCHMARKS = ("engine", "attention_cpu", "merge", "scheduler", "spp", "kvp", "tp", "kv_transfer", "router")
HELPERS = {"run_all", "roofline", "__init__"}
NO_CUDA = 3          # exit status of the GPU-only benchmarks (gpu_probe, gpu_step_profile) without CUDA


def has_main(path: Path) -> bool:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return False
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


def discover() -> list[str]:
    present = {p.stem for p in BENCH_DIR.glob("*.py")
               if p.stem not in HELPERS and not p.stem.startswith("_") and has_main(p)}
    return [b for b in BENCHMARKS if b in present] + sorted(present - set(BENCHMARKS))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all present)")
    p.add_argument("--list", action="store_true", help="list the benchmarks found and exit")
    args = p.parse_args()
    found = discover()
    if args.list:
        print("\n".join(found))
        return 0
    names = args.names or found
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    failed = []
    for name in names:
        if name not in found:
            print(f"bench: skipping {name!r} (no bench/{name}.py with a main())", flush=True)
            continue
        print(f"bench: running {name}", flush=True)
        t = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", f"bench.{name}"], cwd=ROOT, env=env)
        if rc == NO_CUDA:
            print(f"bench: {name} skipped (needs a CUDA device)", flush=True)
            continue
        print(f"bench: {name} {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.monotonic() - t:.0f} s",
              flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
