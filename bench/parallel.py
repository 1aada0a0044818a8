"""SPP and KVP on this machine, side by side in one run, with the built-in model (float32).

- TTFT of a long prompt through a grid with spp = 1 and spp = 2 (one 1-thread worker per stage), next to
  the ideal pipeline speed-up spp * N / (N + spp - 1) for N chunks and the time spent communicating.
- TBT at a long context with kvp = 1 and kvp = 2 (one 1-thread worker per group), next to the ideal
  (Amdahl over the bytes each decode step reads: weights are replicated per group, KV is split).
Results: bench/results/parallel.json and parallel.md. Medians over several runs.
"""
from __future__ import annotations

import json
import pathlib
import statistics
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
    cfg = EngineConfig(cache=CacheConfig(block_size=16, max_kv_tokens=n_tokens + 64),
                       scheduler=SchedulerConfig(chunk_size=chunk, max_batch_tokens=chunk),
                       parallel=ParallelConfig(spp=spp))
    ttfts, comms = [], []
    with ParallelEngine(cfg) as eng:
        eng.generate([prompt(64)], SamplingParams(max_tokens=1))                  # warm-up
        for _ in range(runs):
            c0 = eng.comm_s
            t0 = time.monotonic()
            eng.generate([prompt(n_tokens)], SamplingParams(max_tokens=1, ignore_eos=True))
            ttfts.append(time.monotonic() - t0)
            comms.append(eng.comm_s - c0)
    return {"spp": spp, "ttft_s": statistics.median(ttfts), "ttft_runs_s": ttfts,
            "comm_s": statistics.median(comms)}


def tbt_runs(kvp: int, context: int, steps: int, runs: int) -> dict:
    m = -(-(context + steps + 16) // kvp)
    cfg = EngineConfig(cache=CacheConfig(block_size=16, max_kv_tokens=m + 64),
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
                        c0 = eng.comm_s
                    last, got = now, got + 1
            comms.append((eng.comm_s - c0) / max(1, got - 1))
    return {"kvp": kvp, "tbt_s": statistics.median(tbts), "tbt_p90_s": sorted(tbts)[int(0.9 * len(tbts))],
            "comm_per_token_s": statistics.median(comms), "samples": len(tbts)}


def main() -> int:
    quick = "--quick" in sys.argv
    n_tokens, chunk, runs = (1024, 128, 2) if quick else (3072, 256, 3)
    context, steps = (1024, 8) if quick else (6144, 16)
    cfg = load_checkpoint(None).config
    ttft = [ttft_runs(s, n_tokens, chunk, runs) for s in (1, 2)]
    n_chunks = -(-n_tokens // chunk)
    ideal_spp = 2 * n_chunks / (n_chunks + 1)
    tbt = [tbt_runs(k, context, steps, runs) for k in (1, 2)]
    weights = 4 * (cfg.vocab_size * cfg.hidden_size + cfg.num_layers * (
        cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        + cfg.num_heads * cfg.head_dim * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size))
    kv = 4 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context
    ideal_kvp = (weights + kv) / (weights + kv / 2)
    res = {
        "machine": "2 CPU cores (shared), float32, 1 thread per worker",
        "model": "SmolLM2-135M-Instruct (built-in)",
        "ttft": {"prompt_tokens": n_tokens, "chunk": chunk, "chunks": n_chunks, "runs": ttft,
                 "speedup": ttft[0]["ttft_s"] / ttft[1]["ttft_s"], "ideal_speedup": ideal_spp},
        "tbt": {"context_tokens": context, "decode_steps": steps, "runs": tbt,
                "speedup": tbt[0]["tbt_s"] / tbt[1]["tbt_s"], "ideal_speedup_bytes": ideal_kvp,
                "weight_bytes": weights, "kv_bytes": kv},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    name = "parallel-quick" if quick else "parallel"
    (OUT / f"{name}.json").write_text(json.dumps(res, indent=2))
    t, d = res["ttft"], res["tbt"]
    md = [f"# SPP and KVP on this machine ({res['machine']})", "",
          f"TTFT, {n_tokens}-token prompt in {n_chunks} chunks of {chunk} (median of {runs}):", "",
          "| spp | TTFT (s) | reporter comm (s) |", "|---|---|---|"]
    md += [f"| {r['spp']} | {r['ttft_s']:.2f} | {r['comm_s']:.2f} |" for r in t["runs"]]
    md += ["", f"Speed-up {t['speedup']:.2f}x; ideal {t['ideal_speedup']:.2f}x.", "",
           f"TBT at {context} tokens of context, {steps} decode steps per run (median over all steps):", "",
           "| kvp | TBT p50 (ms) | TBT p90 (ms) | comm per token (ms) |", "|---|---|---|---|"]
    md += [f"| {r['kvp']} | {1e3 * r['tbt_s']:.1f} | {1e3 * r['tbt_p90_s']:.1f} | "
           f"{1e3 * r['comm_per_token_s']:.1f} |" for r in d["runs"]]
    md += ["", f"Speed-up {d['speedup']:.2f}x; ideal by bytes read per step {d['ideal_speedup_bytes']:.2f}x "
           f"(weights {d['weight_bytes'] / 1e6:.0f} MB replicated per group, KV {d['kv_bytes'] / 1e6:.0f} MB split)."]
    (OUT / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
