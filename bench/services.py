"""Service overhead: TTFT and TBT of one prompt through the deployed services versus the offline
single-process engine, built-in model (float32), one torch thread per process, medians of several runs.

A first row runs a short prompt (64 tokens) on the decode-only route, where the fixed per-request cost
of the services (router, kvstore reservation, two gRPC hops) is not hidden by the prefill.
Every row is compared with the offline engine (LLMEngine in this process: no RPC, no transfer), whose
runs alternate with the row's service runs so that both see the same load on a shared machine:
- decode_only       router -> decode instance (kvp = 1) prefills and decodes: gRPC + router + kvstore
- disaggregated     router -> prefill (spp = 1) -> KV streamed -> decode (kvp = 1): adds the KV transfer
- make_up_layout    the `make up` layout (prefill spp = 2, decode kvp = 2), for reference; on a machine
                    with fewer cores than worker processes it measures contention, not parallelism

TTFT and TBT are measured by the client (request sent -> first token received; gaps between tokens).
Results: bench/results/services.json and services.md.

Run: python -m bench.services [--prompt-tokens N] [--max-tokens N] [--runs N] [--backend tcp|nixl]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import time

OUT = pathlib.Path(__file__).resolve().parent / "results"
SHORT_PROMPT = 64           # the fixed per-request cost shows best on a short prompt


def build_prompt(n_tokens: int) -> list[int]:
    from common.engine.demo import QUESTION, build_document
    from common.model.tokenizer import load_tokenizer
    tok = load_tokenizer(None)
    text = f"{build_document(tok, n_tokens - 40)}\n\n{QUESTION}"
    return tok.apply_chat_template([{"role": "user", "content": text}])


class Offline:
    """The reference: LLMEngine in this process, same chunking, one thread."""

    def __init__(self, prompt: list[int], max_tokens: int, chunk: int) -> None:
        import torch

        from common.config import CacheConfig, EngineConfig, SchedulerConfig
        from common.engine.engine import LLMEngine
        from common.model.tokenizer import load_tokenizer
        from common.sampling_params import SamplingParams
        torch.set_num_threads(1)
        cache = CacheConfig(block_size=16, max_kv_tokens=len(prompt) + max_tokens + 64,
                            prefix_caching=False)        # every run prefills the repeated prompt
        self.engine = LLMEngine(EngineConfig(cache=cache, scheduler=SchedulerConfig(chunk_size=chunk)),
                                extra_eos_ids=load_tokenizer(None).eos_token_ids)
        self.prompt, self.params = prompt, SamplingParams(max_tokens=max_tokens)
        self.run(self.prompt[:64])                                              # warm-up

    def run(self, prompt: list[int] | None = None):
        from common.cli import stream_one
        return stream_one(self.engine, prompt or self.prompt, self.params)


def paired_runs(name: str, cluster, offline: Offline, runs: int, out: dict,
                prompt: list[int] | None = None) -> None:
    """Alternates offline and service runs, so both see the same load on a shared machine."""
    from common.client import RouterClient
    prompt = prompt or offline.prompt
    with RouterClient(cluster.router_address, timeout_s=1800) as c:
        c.complete(token_ids=offline.prompt[:300], max_tokens=2)               # warm-up (connections)
        for _ in range(runs):
            ref = offline.run(prompt)
            got = c.complete(token_ids=prompt, max_tokens=offline.params.max_tokens)
            out.setdefault(name, []).append((ref, got))
            print(f"{name}: TTFT {got.ttft_s:.2f} s ({got.route}); offline TTFT {ref.ttft_s:.2f} s", flush=True)


def _median_tbt(runs: list) -> float | None:
    tbts = [statistics.median(r.tbt_s) for r in runs if r.tbt_s]
    return statistics.median(tbts) if tbts else None


def summarize(name: str, pairs: list) -> dict:
    """One row: the service's medians next to the medians of the offline runs of the same round."""
    refs, gots = [p[0] for p in pairs], [p[1] for p in pairs]
    row = {"name": name, "route": gots[0].route,
           "ttft_s": statistics.median(g.ttft_s for g in gots), "tbt_s": _median_tbt(gots),
           "offline_ttft_s": statistics.median(r.ttft_s for r in refs), "offline_tbt_s": _median_tbt(refs),
           "ttft_runs_s": [g.ttft_s for g in gots], "offline_ttft_runs_s": [r.ttft_s for r in refs],
           "same_tokens_as_offline": all(g.token_ids == r.token_ids for r, g in pairs)}
    row["ttft_overhead_s"] = row["ttft_s"] - row["offline_ttft_s"]
    row["tbt_overhead_s"] = (row["tbt_s"] - row["offline_tbt_s"]
                             if row["tbt_s"] is not None and row["offline_tbt_s"] is not None else None)
    return row


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from scripts.up import Cluster, ClusterConfig
    prompt = build_prompt(args.prompt_tokens)
    n = len(prompt)
    print(f"prompt: {n} tokens, {args.max_tokens} new, {args.runs} runs per row", flush=True)
    offline = Offline(prompt, args.max_tokens, args.chunk)
    runs: dict[str, list] = {}
    base = ClusterConfig(kv_backend=args.backend, router_port=0, prefill_spp=1, decode_kvp=1,
                         decode_kv_tokens=2 * (n + args.max_tokens) + 512, prefill_kv_tokens=n + 512,
                         chunk_size=args.chunk, short_prompt_tokens=n + 1,
                         pool_flags=("--no-prefix-caching",))     # the runs repeat one prompt
    with Cluster(base) as c:
        paired_runs(f"decode_only_{SHORT_PROMPT}_tokens", c, offline, 3 * args.runs, runs, prompt[:SHORT_PROMPT])
        paired_runs("decode_only", c, offline, args.runs, runs)
        c.services["router"].proc.terminate()                                 # same instances, new threshold
        c.services["router"].proc.wait(30)
        c.config = dataclasses.replace(base, short_prompt_tokens=256)
        c.restart("router")
        paired_runs("disaggregated", c, offline, args.runs, runs)
    if not args.skip_up_layout:
        m = -(-n // 2 // 16) * 16 + 16                                          # two KVP groups
        up = dataclasses.replace(base, prefill_spp=2, decode_kvp=2, kvp_tokens=m,
                                 decode_kv_tokens=m + args.max_tokens + 512, short_prompt_tokens=256)
        with Cluster(up) as c:
            paired_runs("make_up_layout", c, offline, args.runs, runs)
    rows = [summarize(name, pairs) for name, pairs in runs.items()]
    return {"benchmark": "services", "model": "built-in SmolLM2-135M-Instruct (float32)",
            "prompt_tokens": n, "max_tokens": args.max_tokens, "runs": args.runs, "chunk_size": args.chunk,
            "kv_backend": args.backend, "threads_per_process": 1,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)", "rows": rows,
            "date": time.strftime("%Y-%m-%d")}


def write(result: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "services.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Service overhead ({result['model']})", "",
             f"{result['prompt_tokens']}-token prompt, {result['max_tokens']} new tokens, median of "
             f"{result['runs']} runs ({3 * result['runs']} for the short prompt); each row's offline runs alternate with its service runs (same load), "
             f"chunk {result['chunk_size']}, KV over {result['kv_backend']}, one torch thread per process, "
             f"{result['machine']}. TTFT/TBT measured by the client.", "",
             "| path | TTFT s (range) | offline TTFT s (range) | TTFT overhead s | TBT ms | offline TBT ms "
             "| TBT overhead ms | same tokens |", "|---|---:|---:|---:|---:|---:|---:|:---:|"]

    def rng(xs: list[float]) -> str:
        return f"{min(xs):.2f}-{max(xs):.2f}"


    def ms(x: float | None, sign: str = "") -> str:
        return "-" if x is None else f"{1e3 * x:{sign}.1f}"

    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['ttft_s']:.2f} ({rng(r['ttft_runs_s'])}) | {r['offline_ttft_s']:.2f} "
                     f"({rng(r['offline_ttft_runs_s'])}) | {r['ttft_overhead_s']:+.2f} "
                     f"| {ms(r['tbt_s'])} | {ms(r['offline_tbt_s'])} | {ms(r['tbt_overhead_s'], '+')} "
                     f"| {'yes' if r['same_tokens_as_offline'] else 'NO'} |")
    lines += ["", f"decode_only_{SHORT_PROMPT}_tokens: the first {SHORT_PROMPT} tokens of the prompt. decode_only: "
              "router -> decode instance (prefills itself). disaggregated: router -> prefill instance -> KV "
              "transfer -> decode instance. make_up_layout: prefill spp=2, decode kvp=2 (more worker processes "
              "than cores here: contention, not speed-up).", "",
              "The machine is shared with other jobs: the spread of one configuration's runs (the ranges) is "
              "larger than the service overhead on the long prompt, so read those overheads as 'within noise'. "
              "The short-prompt row shows the fixed per-request cost of the services (router, kvstore "
              "reservation and release, two gRPC hops).", ""]
    (OUT / "services.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")          # as the services run (before torch loads)
    from scripts.up import default_kv_backend
    p = argparse.ArgumentParser(prog="python -m bench.services", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--backend", choices=("tcp", "nixl"), default=default_kv_backend())
    p.add_argument("--skip-up-layout", action="store_true", help="leave out the spp=2 / kvp=2 row")
    result = run(p.parse_args(argv))
    write(result)
    print((OUT / "services.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
