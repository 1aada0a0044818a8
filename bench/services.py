"""Service overhead: TTFT and TBT of one prompt through the deployed services versus the offline
single-process engine, built-in model (float32), one torch thread per process, medians of several runs.

Rows:
- offline           LLMEngine in this process (the reference: no RPC, no transfer); its runs alternate
                    with the service runs so that both see the same load on a shared machine
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
        self.engine = LLMEngine(EngineConfig(cache=CacheConfig(block_size=16, max_kv_tokens=len(prompt) + max_tokens + 64),
                                             scheduler=SchedulerConfig(chunk_size=chunk)),
                                extra_eos_ids=load_tokenizer(None).eos_token_ids)
        self.prompt, self.params = prompt, SamplingParams(max_tokens=max_tokens)
        self.run(self.prompt[:64])                                              # warm-up

    def run(self, prompt: list[int] | None = None):
        from common.cli import stream_one
        return stream_one(self.engine, prompt or self.prompt, self.params)


def paired_runs(name: str, cluster, offline: Offline, runs: int, rows: dict) -> None:
    """Alternates offline and service runs, so both see the same load on a shared machine."""
    from common.client import RouterClient
    with RouterClient(cluster.router_address, timeout_s=1800) as c:
        c.complete(token_ids=offline.prompt[:300], max_tokens=2)               # warm-up (connections)
        for _ in range(runs):
            rows.setdefault("offline", []).append(offline.run())
            out = c.complete(token_ids=offline.prompt, max_tokens=offline.params.max_tokens)
            rows.setdefault(name, []).append(out)
            print(f"{name}: TTFT {out.ttft_s:.2f} s ({out.route}); offline TTFT {rows['offline'][-1].ttft_s:.2f} s",
                  flush=True)


def summarize(name: str, runs: list) -> dict:
    tbts = [statistics.median(r.tbt_s) for r in runs if r.tbt_s]
    return {"name": name, "ttft_s": statistics.median(r.ttft_s for r in runs),
            "tbt_s": statistics.median(tbts) if tbts else None,
            "ttft_runs_s": [r.ttft_s for r in runs], "tbt_runs_s": tbts, "tokens": runs[0].token_ids,
            "route": getattr(runs[0], "route", "in-process")}


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
                         chunk_size=args.chunk, short_prompt_tokens=n + 1)
    with Cluster(base) as c:
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
    rows = [summarize(name, r) for name, r in runs.items()]
    ref, ref_tokens = rows[0], rows[0]["tokens"]
    for r in rows:
        r["same_tokens_as_offline"] = r.pop("tokens") == ref_tokens
        r["ttft_overhead_s"] = r["ttft_s"] - ref["ttft_s"]
        r["tbt_overhead_s"] = (r["tbt_s"] - ref["tbt_s"]) if r["tbt_s"] is not None and ref["tbt_s"] else None
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
             f"{result['runs']} runs (offline runs interleaved with the service runs), chunk {result['chunk_size']}, KV over {result['kv_backend']}, one torch "
             f"thread per process, {result['machine']}. TTFT/TBT measured by the client.", "",
             "| path | TTFT s | TTFT overhead s | TBT ms | TBT overhead ms | same tokens |",
             "|---|---:|---:|---:|---:|:---:|"]
    for r in result["rows"]:
        tbt = f"{1e3 * r['tbt_s']:.1f}" if r["tbt_s"] is not None else "-"
        over = f"{1e3 * r['tbt_overhead_s']:+.1f}" if r["tbt_overhead_s"] is not None else "-"
        lines.append(f"| {r['name']} | {r['ttft_s']:.2f} | {r['ttft_overhead_s']:+.2f} | {tbt} | {over} | "
                     f"{'yes' if r['same_tokens_as_offline'] else 'NO'} |")
    lines += ["", "decode_only: router -> decode instance (prefills itself). disaggregated: router -> prefill "
              "instance -> KV transfer -> decode instance. make_up_layout: prefill spp=2, decode kvp=2 (more "
              "worker processes than cores here: contention, not speed-up).", ""]
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
