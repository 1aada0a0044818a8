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
Run: PYTHONPATH=. python -m bench.prefix_cache [--doc-tokens 1536 --questions 4 --turns 4 ...]
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
    ap.add_argument("--out", default=str(RESULTS / "prefix_cache"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    checkpoint = load_checkpoint(None)
    tok = load_tokenizer(None, checkpoint.config)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    load0 = os.getloadavg()
    t0 = time.monotonic()
    questions = [f"What is the capital of {c[0]}?" for c in COUNTRIES]
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

    meta = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "model": "built-in SmolLM2-135M-Instruct", "dtype": "float32", "chunk": args.chunk,
            "max_tokens": args.max_tokens, "load_before": round(load0[0], 2),
            "load_after": round(os.getloadavg()[0], 2), "wall_s": round(time.monotonic() - t0, 1)}
    report = {"meta": meta, "workloads": results}
    Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(report))
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
