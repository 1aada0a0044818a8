"""Prefix caching benchmark: cold vs warm TTFT, hit rate and tokens saved, offline on the engine
(built-in SmolLM2-135M-Instruct, float32, one process, CPU).

Three workloads, each run twice, on one engine per run that first served an unrelated warm-up prompt
(so neither run pays first-step costs): cold (prefix caching off: every prompt prefilled whole) and
warm (prefix caching on, the requests in order):
  document   one document of --doc-tokens tokens, then --questions questions about it (chat
             template: the document opens every prompt); the first request is cold in both runs.
  chat       a multi-turn chat of --turns turns: each prompt is the previous turns (the user's
             messages and the model's answers) plus a new message.
  mixed      --docs documents whose total exceeds the KV cache (--mixed-cache-tokens), questions
             round-robin over them: the cache evicts (least recently used first) and hits only
             where a document's blocks survived.
Every warm output is checked against its cold run: identical greedy tokens, logprobs within 1e-4.
TTFT = time from adding the request to its first token (engine.generate of one prompt).

Writes bench/results/prefix_cache.json and bench/results/prefix_cache.md.

A fourth workload, `--workload concurrent` (run on its own): --concurrent questions about one document
of --concurrent-doc-tokens tokens, all added at once (engine.generate of all prompts), in three runs:
off (prefix caching off), on without compute-once (caching on, but the scheduler never waits for a
prefix another request is computing: what the engine did before, every question prefills the
document), and on (the default: the document is computed once, the others wait for it and reuse it).
Counts the prompt tokens the model computed (every scheduled item) and each request's TTFT (from the
moment all were added); checks every run's outputs against the off run. Writes
bench/results/prefix_cache_concurrent.{json,md}.

Run: PYTHONPATH=. python -m bench.prefix_cache [--doc-tokens 1536 --questions 4 --turns 4 ...]
     PYTHONPATH=. python -m bench.prefix_cache --workload concurrent [--concurrent 4 --concurrent-doc-tokens 256]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.demo import COUNTRIES, build_document
from common.engine.engine import LLMEngine
from common.model.loader import load_checkpoint
from common.model.tokenizer import load_tokenizer
from common.sampling_params import SamplingParams

log = logging.getLogger("bench.prefix_cache")
RESULTS = Path(__file__).resolve().parent / "results"
LOGPROB_TOL = 1e-4
WARM_UP = list(range(1000, 1040))          # token ids no chat-template prompt starts with


def make_engine(checkpoint, caching: bool, kv_tokens: int, chunk: int) -> LLMEngine:
    cfg = EngineConfig(cache=CacheConfig(max_kv_tokens=kv_tokens, prefix_caching=caching),
                       scheduler=SchedulerConfig(chunk_size=chunk, max_batch_tokens=max(chunk, 2048)))
    return LLMEngine(cfg, checkpoint)


def run_one(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> dict:
    r = engine.generate([prompt], params)[0]
    return {"prompt_tokens": len(prompt), "cached_tokens": r.num_cached_tokens, "ttft_s": r.ttft_s,
            "token_ids": r.token_ids, "logprobs": r.logprobs}


def compare(cold: list[dict], warm: list[dict]) -> dict:
    same_tokens = all(c["token_ids"] == w["token_ids"] for c, w in zip(cold, warm))
    max_dlp = max((abs(a - b) for c, w in zip(cold, warm) for a, b in zip(c["logprobs"], w["logprobs"])),
                  default=0.0)
    prompt = sum(w["prompt_tokens"] for w in warm)
    hit = sum(w["cached_tokens"] for w in warm)
    return {"identical_tokens": same_tokens, "max_logprob_diff": max_dlp, "exact": same_tokens and max_dlp <= LOGPROB_TOL,
            "prompt_tokens": prompt, "hit_tokens": hit, "hit_rate": hit / prompt if prompt else 0.0,
            "warm_ttft_median_s": statistics.median(w["ttft_s"] for w in warm[1:]) if len(warm) > 1 else None,
            "cold_ttft_median_s": statistics.median(c["ttft_s"] for c in cold[1:]) if len(cold) > 1 else None}


def workload(name: str, checkpoint, prompts_fn, params, kv_tokens: int, chunk: int) -> dict:
    """prompts_fn(engine_or_None, outputs_so_far) -> the next prompt or None (a chat needs the answers)."""
    runs = {}
    for mode in ("cold", "warm"):
        engine = make_engine(checkpoint, mode == "warm", kv_tokens, chunk)
        engine.generate([WARM_UP], params)                  # shares no block with the prompts
        rows: list[dict] = []
        while (prompt := prompts_fn(rows)) is not None:
            rows.append(run_one(engine, prompt, params))
            log.info("%s %s #%d: %d tokens, %d cached, TTFT %.2f s", name, mode, len(rows),
                     rows[-1]["prompt_tokens"], rows[-1]["cached_tokens"], rows[-1]["ttft_s"])
        runs[mode] = rows
        engine.blocks.check()
        if mode == "warm":
            runs["evictions"] = engine.blocks.evictions
    out = {"requests": [{"prompt_tokens": w["prompt_tokens"], "cached_tokens": w["cached_tokens"],
                         "cold_ttft_s": round(c["ttft_s"], 4), "warm_ttft_s": round(w["ttft_s"], 4)}
                        for c, w in zip(runs["cold"], runs["warm"])],
           "evictions": runs["evictions"]}
    out.update(compare(runs["cold"], runs["warm"]))
    return out


def concurrent(checkpoint, prompts: list[list[int]], params, kv_tokens: int, chunk: int) -> dict:
    """All prompts added at once, in the three runs (see the module docstring)."""
    runs = {}
    for mode in ("off", "on_without_compute_once", "on"):
        engine = make_engine(checkpoint, mode != "off", kv_tokens, chunk)
        engine.generate([WARM_UP], params)                  # shares no block with the prompts
        sched = engine.scheduler
        if mode == "on_without_compute_once":
            sched.awaits_prefix = lambda req: False         # the engine before compute-once
        computed = [0]
        schedule = sched.schedule

        def counting():
            out = schedule()
            computed[0] += sum(max(0, min(it.start + it.num_tokens, it.request.prompt_len) - it.start)
                               for it in out.items)
            return out
        sched.schedule = counting
        load0, t0 = os.getloadavg()[0], time.monotonic()
        res = engine.generate(prompts, params)
        wall, load1 = time.monotonic() - t0, os.getloadavg()[0]
        engine.blocks.check()
        runs[mode] = {"computed_prompt_tokens": computed[0],
                      "cached_tokens": [r.num_cached_tokens for r in res],
                      "ttft_s": [round(r.ttft_s, 4) for r in res],
                      "ttft_median_s": round(statistics.median(r.ttft_s for r in res), 4),
                      "ttft_max_s": round(max(r.ttft_s for r in res), 4), "wall_s": round(wall, 3),
                      "load": [round(load0, 2), round(load1, 2)],
                      "token_ids": [r.token_ids for r in res], "logprobs": [r.logprobs for r in res]}
        log.info("concurrent %s: %d prompt tokens computed, TTFT median %.2f s, wall %.2f s", mode,
                 computed[0], runs[mode]["ttft_median_s"], wall)
    ref = dict(runs["off"])
    for mode, r in runs.items():
        same = r.pop("token_ids") == ref["token_ids"]
        dlp = max((abs(a - b) for x, y in zip(r.pop("logprobs"), ref["logprobs"]) for a, b in zip(x, y)), default=0.0)
        r.update(identical_tokens=same, max_logprob_diff=dlp, exact=same and dlp <= LOGPROB_TOL)
    return {"requests": len(prompts), "prompt_tokens": [len(p) for p in prompts], "runs": runs}


def concurrent_markdown(report: dict) -> str:
    m, w = report["meta"], report["workload"]
    lines = ["# Prefix cache: concurrent questions about one document (built-in SmolLM2-135M-Instruct, "
             "one process, CPU, float32)", "",
             f"Machine: {m['machine']}, {m['threads']} torch threads, torch {m['torch']}; chunk {m['chunk']}, "
             f"{m['max_tokens']} generated tokens per request. Load average before/after: "
             f"{m['load_before']} / {m['load_after']} (the machine is shared with other jobs: TTFTs are one "
             f"sample per request, read the medians with that in mind). Wall time {m['wall_s']} s.", "",
             f"{w['requests']} prompts of {w['prompt_tokens']} tokens (one document, then a different question), "
             "added to one engine at once; TTFT from that moment. off: prefix caching off. on without "
             "compute-once: caching on, but no request waits for a prefix another is computing (the engine "
             "before this change). on: the default. Exact = identical greedy tokens and every logprob within "
             "1e-4 of the off run.", "",
             "| run | prompt tokens computed | cached per request | TTFT median s | TTFT max s | wall s | "
             "load before/after | exact |",
             "|---|---:|---|---:|---:|---:|---|---|"]
    for mode, r in w["runs"].items():
        lines.append(f"| {mode} | {r['computed_prompt_tokens']} | {r['cached_tokens']} | {r['ttft_median_s']:.2f} | "
                     f"{r['ttft_max_s']:.2f} | {r['wall_s']:.2f} | {r['load'][0]} / {r['load'][1]} | {r['exact']} |")
    lines += ["", "TTFTs per request (s): " + "; ".join(f"{mode} {r['ttft_s']}" for mode, r in w["runs"].items()), "",
              "The prompt tokens computed do not depend on the machine's load; the TTFTs do (each run's load "
              "average is in its row: compare TTFTs only between runs at a similar load).", ""]
    return "\n".join(lines)


def chat(tok, messages: list[dict]) -> list[int]:
    return tok.apply_chat_template(messages)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--mixed-doc-tokens", type=int, default=400)
    ap.add_argument("--mixed-questions", type=int, default=6)
    ap.add_argument("--mixed-cache-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--out", default=None, help="results path without extension (default: "
                    "bench/results/prefix_cache, or prefix_cache_concurrent for --workload concurrent)")
    ap.add_argument("--workload", choices=("sequential", "concurrent"), default="sequential",
                    help="sequential: document, chat and mixed (default); concurrent: see above")
    ap.add_argument("--concurrent", type=int, default=4, help="questions added at once (--workload concurrent)")
    ap.add_argument("--concurrent-doc-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    checkpoint = load_checkpoint(None)
    tok = load_tokenizer(None, checkpoint.config)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    load0 = os.getloadavg()
    t0 = time.monotonic()
    questions = [f"What is the capital of {c[0]}?" for c in COUNTRIES]

    def meta() -> dict:
        return {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "model": "built-in SmolLM2-135M-Instruct", "dtype": "float32", "chunk": args.chunk,
                "max_tokens": args.max_tokens, "load_before": round(load0[0], 2),
                "load_after": round(os.getloadavg()[0], 2), "wall_s": round(time.monotonic() - t0, 1)}

    if args.workload == "concurrent":
        doc = build_document(tok, args.concurrent_doc_tokens)
        prompts = [chat(tok, [{"role": "user", "content": f"{doc}\n\n{questions[i % len(questions)]}"}])
                   for i in range(args.concurrent)]
        work = concurrent(checkpoint, prompts, params, sum(len(p) for p in prompts) + 1024, args.chunk)
        report = {"meta": meta(), "workload": work}
        out = args.out or str(RESULTS / "prefix_cache_concurrent")
        Path(out + ".json").write_text(json.dumps(report, indent=2) + "\n")
        Path(out + ".md").write_text(concurrent_markdown(report))
        print(concurrent_markdown(report))
        return 0 if all(r["exact"] for r in work["runs"].values()) else 1
    big_kv = args.doc_tokens + 1024

    doc = build_document(tok, args.doc_tokens)
    doc_prompts = [chat(tok, [{"role": "user", "content": f"{doc}\n\n{questions[i % len(questions)]}"}])
                   for i in range(args.questions)]
    results = {"document": workload("document", checkpoint,
                                     lambda rows: doc_prompts[len(rows)] if len(rows) < len(doc_prompts) else None,
                                     params, big_kv, args.chunk)}

    user_turns = [f"Tell me about {c[0]}." for c in COUNTRIES[:args.turns]]

    def next_turn(rows):
        if len(rows) >= len(user_turns):
            return None
        messages = []
        for i, row in enumerate(rows):
            messages += [{"role": "user", "content": user_turns[i]},
                         {"role": "assistant", "content": tok.decode(row["token_ids"])}]
        return chat(tok, messages + [{"role": "user", "content": user_turns[len(rows)]}])

    results["chat"] = workload("chat", checkpoint, next_turn, params, big_kv, args.chunk)

    docs = [build_document(tok, args.mixed_doc_tokens + 97 * k) for k in range(args.docs)]
    docs = [f"Document {k}.\n{d}" for k, d in enumerate(docs)]
    mixed = [chat(tok, [{"role": "user", "content": f"{docs[i % args.docs]}\n\n{questions[i]}"}])
             for i in range(args.mixed_questions)]
    results["mixed"] = workload("mixed", checkpoint, lambda rows: mixed[len(rows)] if len(rows) < len(mixed) else None,
                                params, args.mixed_cache_tokens, args.chunk)
    results["mixed"]["cache_tokens"] = args.mixed_cache_tokens
    results["mixed"]["document_tokens"] = [len(tok.encode(d)) for d in docs]

    report = {"meta": meta(), "workloads": results}
    out = args.out or str(RESULTS / "prefix_cache")
    Path(out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    Path(out + ".md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(w["exact"] for w in results.values()) else 1


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = ["# Prefix cache benchmark (built-in SmolLM2-135M-Instruct, one process, CPU, float32)", "",
             f"Machine: {m['machine']}, {m['threads']} torch threads, torch {m['torch']}; chunk {m['chunk']}, "
             f"{m['max_tokens']} generated tokens per request. Load average before/after: "
             f"{m['load_before']} / {m['load_after']} (the machine is shared; TTFTs are single samples). "
             f"Wall time {m['wall_s']} s.", "",
             "Cold: one engine with prefix caching off (every prompt prefilled whole). Warm: one engine with "
             "prefix caching, the requests in order. Both served an unrelated warm-up prompt first. "
             "TTFT = adding the request to its first token. "
             "Exact = identical greedy tokens and every logprob within 1e-4 of the cold run.", ""]
    for name, w in report["workloads"].items():
        lines += [f"## {name}", ""]
        if name == "mixed":
            lines += [f"{len(w['document_tokens'])} documents of {w['document_tokens']} tokens, KV cache "
                      f"{w['cache_tokens']} tokens: questions round-robin, so the cache evicts.", ""]
        lines += ["| # | prompt tokens | cached (reused) | cold TTFT s | warm TTFT s | speed-up |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for i, r in enumerate(w["requests"]):
            lines.append(f"| {i} | {r['prompt_tokens']} | {r['cached_tokens']} | {r['cold_ttft_s']:.3f} | "
                         f"{r['warm_ttft_s']:.3f} | {r['cold_ttft_s'] / r['warm_ttft_s']:.1f}x |")
        lines += ["", f"Hit rate {w['hit_rate']:.1%} of prompt tokens ({w['hit_tokens']} of {w['prompt_tokens']} "
                      f"tokens not computed); evictions {w['evictions']} blocks; exact: {w['exact']} "
                      f"(identical tokens {w['identical_tokens']}, max |Δ logprob| {w['max_logprob_diff']:.2e}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
