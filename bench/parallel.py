"""SPP and KVP on this machine, side by side in one run, with the built-in model (float32).

- TTFT of a long prompt through a grid with spp = 1 and spp = 2 (one 1-thread worker per stage), next to
  the ideal pipeline speed-up spp * N / (N + spp - 1) for N chunks and the time spent communicating.
- TBT at a long context with kvp = 1 and kvp = 2 (one 1-thread worker per group), next to the ideal
  (Amdahl over the bytes each decode step reads: weights are replicated per group, KV is split).
Results: bench/results/parallel.json and parallel.md. Medians over several runs.

--kvp-only [--baseline PATH] [--rounds N]: only the TBT part. With a baseline checkout (e.g.
`git worktree add /tmp/base HEAD~1`), both checkouts are measured in alternating subprocesses, N
rounds, so that both see the same load; parallel.json's "tbt_compare" keeps the per-round medians and
load averages, and the TBT table shows both. Notes written by hand live in parallel.json's "notes"
(markdown lines) and are rendered at the end of parallel.md.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from common.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from common.model.loader import load_checkpoint
from common.parallel.driver import ParallelEngine
from common.sampling_params import SamplingParams

OUT = pathlib.Path(__file__).resolve().parent / "results"


def prompt(n: int) -> list[int]:
    return [(37 * i + 11) % 40000 + 100 for i in range(n)]


def ttft_runs(spp: int, n_tokens: int, chunk: int, runs: int) -> dict:
    cfg = EngineConfig(cache=CacheConfig(block_size=16, max_kv_tokens=n_tokens + 64, prefix_caching=False),
                       scheduler=SchedulerConfig(chunk_size=chunk, max_batch_tokens=chunk),
                       parallel=ParallelConfig(spp=spp))
    ttfts, comms = [], []
    with ParallelEngine(cfg) as eng:
        eng.generate([prompt(64)], SamplingParams(max_tokens=1))                  # warm-up
        for _ in range(runs):
            c0 = eng.executor.comm_s
            t0 = time.monotonic()
            eng.generate([prompt(n_tokens)], SamplingParams(max_tokens=1, ignore_eos=True))
            ttfts.append(time.monotonic() - t0)
            comms.append(eng.executor.comm_s - c0)
    return {"spp": spp, "ttft_s": statistics.median(ttfts), "ttft_runs_s": ttfts,
            "comm_s": statistics.median(comms)}


def tbt_runs(kvp: int, context: int, steps: int, runs: int) -> dict:
    m = -(-(context + steps + 16) // kvp)
    cfg = EngineConfig(cache=CacheConfig(block_size=16, max_kv_tokens=m + 64, prefix_caching=False),
                       scheduler=SchedulerConfig(chunk_size=1024, max_batch_tokens=1024),
                       parallel=ParallelConfig(kvp=kvp, kvp_tokens=m if kvp > 1 else None))
    tbts, comms = [], []
    with ParallelEngine(cfg) as eng:
        for _ in range(runs):
            rid = eng.add_request(prompt(context), SamplingParams(max_tokens=steps, ignore_eos=True))
            last, got = None, 0
            c0 = None
            while eng.has_unfinished():
                for o in eng.step():
                    if o.token_id is None:
                        continue
                    now = time.monotonic()
                    if last is not None:
                        tbts.append(now - last)
                    else:
                        c0 = eng.executor.comm_s
                    last, got = now, got + 1
            comms.append((eng.executor.comm_s - c0) / max(1, got - 1))
    return {"kvp": kvp, "tbt_s": statistics.median(tbts), "tbt_p90_s": sorted(tbts)[int(0.9 * len(tbts))],
            "comm_per_token_s": statistics.median(comms), "samples": len(tbts), "tbt_steps_s": tbts}


def _p90(xs: list[float]) -> float:
    return sorted(xs)[int(0.9 * len(xs))]


def weight_and_kv_bytes(context: int) -> tuple[int, int]:
    cfg = load_checkpoint(None).config
    weights = 4 * (cfg.vocab_size * cfg.hidden_size + cfg.num_layers * (
        cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        + cfg.num_heads * cfg.head_dim * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size))
    kv = 4 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context
    return weights, kv


def tbt_section(context: int, steps: int, runs: int) -> dict:
    tbt = [tbt_runs(k, context, steps, runs) for k in (1, 2)]
    weights, kv = weight_and_kv_bytes(context)
    return {"context_tokens": context, "decode_steps": steps, "runs": tbt,
            "speedup": tbt[0]["tbt_s"] / tbt[1]["tbt_s"], "ideal_speedup_bytes": (weights + kv) / (weights + kv / 2),
            "weight_bytes": weights, "kv_bytes": kv}


def run_side(root: pathlib.Path, context: int, steps: int) -> dict:
    """One TBT section (kvp 1 and 2, one run each) in a subprocess with `root`'s code on the path; this
    file is loaded by path, since the other checkout's copy may lack the worker."""
    here = str(pathlib.Path(__file__).resolve())
    loader = ("import importlib.util as u; s = u.spec_from_file_location('bench_parallel_side', %r); "
              "m = u.module_from_spec(s); s.loader.exec_module(m); m.side_main()" % here)
    res = subprocess.run([sys.executable, "-c", loader, json.dumps({"context": context, "steps": steps})],
                         env=dict(os.environ, PYTHONPATH=str(root)), cwd=str(root), capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"TBT run in {root} failed:\n{res.stderr[-4000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["loadavg"] = os.getloadavg()[0]
    return out


def side_main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(tbt_section(spec["context"], spec["steps"], 1)))


def compare(baseline: pathlib.Path, rounds: int, context: int, steps: int) -> dict:
    here = pathlib.Path(__file__).resolve().parent.parent
    sides = [("before", baseline), ("after", here)]
    got: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(rounds):
        for name, root in (sides if r % 2 == 0 else sides[::-1]):
            print(f"round {r + 1}/{rounds}: {name} ({root})", file=sys.stderr, flush=True)
            got[name].append(run_side(root, context, steps))
    out = {"baseline": str(baseline), "rounds": rounds, "context_tokens": context, "decode_steps": steps}
    for name, secs in got.items():
        out[name] = {
            "tbt_ms": {str(k): statistics.median(1e3 * s["runs"][i]["tbt_s"] for s in secs)
                       for i, k in enumerate((1, 2))},
            "comm_per_token_ms": {str(k): statistics.median(1e3 * s["runs"][i]["comm_per_token_s"] for s in secs)
                                  for i, k in enumerate((1, 2))},
            "tbt_ms_rounds": {str(k): [1e3 * s["runs"][i]["tbt_s"] for s in secs] for i, k in enumerate((1, 2))},
            "tbt_steps_ms": {str(k): [1e3 * t for s in secs for t in s["runs"][i]["tbt_steps_s"]]
                             for i, k in enumerate((1, 2))},
            "loadavg_rounds": [s["loadavg"] for s in secs],
        }
    return out


def markdown(res: dict) -> str:
    md = [f"# SPP and KVP on this machine ({res['machine']})", ""]
    if "ttft" in res:
        t = res["ttft"]
        md += [f"TTFT, {t['prompt_tokens']}-token prompt in {t['chunks']} chunks of {t['chunk']} "
               f"(median of {len(t['runs'][0]['ttft_runs_s'])}):", "",
               "| spp | TTFT (s) | reporter comm (s) |", "|---|---|---|"]
        md += [f"| {r['spp']} | {r['ttft_s']:.2f} | {r['comm_s']:.2f} |" for r in t["runs"]]
        md += ["", f"Speed-up {t['speedup']:.2f}x; ideal {t['ideal_speedup']:.2f}x.", ""]
    d = res["tbt"]
    md += [f"TBT at {d['context_tokens']} tokens of context, {d['decode_steps']} decode steps per run "
           "(median over all steps):", "",
           "| kvp | TBT p50 (ms) | TBT p90 (ms) | comm per token (ms) |", "|---|---|---|---|"]
    md += [f"| {r['kvp']} | {1e3 * r['tbt_s']:.1f} | {1e3 * r['tbt_p90_s']:.1f} | "
           f"{1e3 * r['comm_per_token_s']:.1f} |" for r in d["runs"]]
    md += ["", f"Speed-up {d['speedup']:.2f}x; ideal by bytes read per step {d['ideal_speedup_bytes']:.2f}x "
           f"(weights {d['weight_bytes'] / 1e6:.0f} MB replicated per group, KV {d['kv_bytes'] / 1e6:.0f} MB split).",
           ""]
    c = res.get("tbt_compare")
    if c:
        loads = c["before"]["loadavg_rounds"] + c["after"]["loadavg_rounds"]
        md += [f"### Before/after ({c.get('label') or c['baseline']})", "",
               f"TBT at {c['context_tokens']} tokens, {c['decode_steps']} decode steps per run; median of the "
               f"per-round medians over {c['rounds']} rounds alternating the two checkouts in separate processes "
               "(load average "
               f"{min(loads):.1f} to {max(loads):.1f}).", "",
               "| kvp | before TBT (ms) | after TBT (ms) | before comm/token (ms) | after comm/token (ms) |",
               "|---|---|---|---|---|"]
        for k in ("1", "2"):
            md.append(f"| {k} | {c['before']['tbt_ms'][k]:.1f} | {c['after']['tbt_ms'][k]:.1f} | "
                      f"{c['before']['comm_per_token_ms'][k]:.1f} | {c['after']['comm_per_token_ms'][k]:.1f} |")
        md.append("")
    md += res.get("notes", [])
    return "\n".join(md).rstrip("\n") + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--kvp-only", action="store_true", help="only the TBT (KVP) part")
    p.add_argument("--baseline", metavar="PATH", help="with --kvp-only: a checkout measured alternately")
    p.add_argument("--label", default=None, help="how to name the baseline in parallel.md")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    n_tokens, chunk, runs = (1024, 128, 2) if a.quick else (3072, 256, 3)
    context, steps = (1024, 8) if a.quick else (6144, 16)
    name = "parallel-quick" if a.quick else "parallel"
    path = OUT / f"{name}.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res.update({"machine": "2 CPU cores (shared), float32, 1 thread per worker",
                "model": "SmolLM2-135M-Instruct (built-in)"})
    if a.baseline:
        if not a.kvp_only:
            p.error("--baseline needs --kvp-only")
        res["tbt_compare"] = compare(pathlib.Path(a.baseline).resolve(), a.rounds, context, steps)
        res["tbt_compare"]["label"] = a.label
        after = res["tbt_compare"]["after"]
        weights, kv = weight_and_kv_bytes(context)
        res["tbt"] = {"context_tokens": context, "decode_steps": steps,   # the "after" side, all steps pooled
                      "runs": [{"kvp": int(k), "tbt_s": statistics.median(after["tbt_steps_ms"][k]) / 1e3,
                                "tbt_p90_s": _p90(after["tbt_steps_ms"][k]) / 1e3,
                                "comm_per_token_s": after["comm_per_token_ms"][k] / 1e3,
                                "samples": len(after["tbt_steps_ms"][k])} for k in ("1", "2")],
                      "speedup": after["tbt_ms"]["1"] / after["tbt_ms"]["2"],
                      "ideal_speedup_bytes": (weights + kv) / (weights + kv / 2),
                      "weight_bytes": weights, "kv_bytes": kv}
    else:
        if not a.kvp_only:
            ttft = [ttft_runs(s, n_tokens, chunk, runs) for s in (1, 2)]
            n_chunks = -(-n_tokens // chunk)
            res["ttft"] = {"prompt_tokens": n_tokens, "chunk": chunk, "chunks": n_chunks, "runs": ttft,
                           "speedup": ttft[0]["ttft_s"] / ttft[1]["ttft_s"],
                           "ideal_speedup": 2 * n_chunks / (n_chunks + 1)}
        res["tbt"] = tbt_section(context, steps, runs)
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (OUT / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
