"""Prefix caching under two served workloads (issue 15): a multi-turn chat on the built-in model, and
questions about several documents whose KV does not all fit, with eviction.

    .venv/bin/python -m bench.prefix_workloads chat  [--context-tokens 2048 --turns 6]
        -> bench/results/prefix_cache_chat.{json,md}
    .venv/bin/python -m bench.prefix_workloads mixed [--docs 4 --doc-tokens 8192 --requests 24]
        -> bench/results/prefix_cache_mixed.{json,md}

Both run scripts/up.py's Cluster at make up's layout (prefill spp = 2, decode kvp = 2, KV over TCP,
admission on, the router's default SLOs unless relaxed below) and send one request at a time,
`--pause-s` after the previous answer, `--max-tokens` greedy tokens (ignore_eos). TTFT is the router's
(Finished.timings); `cached` is Started.cached_prompt_tokens, the router's prefix match where it sent the
request.

chat: the built-in model (SmolLM2-135M-Instruct) in a ChatML conversation: a system message holding a
`--context-tokens` document, then `--turns` user questions. Each turn's prompt is the previous prompt,
the previous answer's token ids and the next user turn (token ids, never re-tokenized text, as a chat
client that keeps the ids does), so every turn extends the last. The same conversation (the same
prompts) runs twice, on a deployment with prefix caching (make up's default) and on one with
`--no-prefix-caching` (every turn prefilled whole: the cold run), side by side; both against the
single-process engine with nothing cached on each prompt (identical tokens, logprobs within 1e-4).

mixed: the long-context test model (random weights). `--docs` documents of `--doc-tokens` random ids;
`--requests` questions, each about a document drawn with weights 1/(rank + 1) (a few popular documents
and a tail), with 32 question tokens of its own. The decode instance holds about `--cache-docs`
documents per KVP group and the prefill instance one, so the documents do not all fit and the caches
evict (least recently used first). Reported: per request the route, the match and TTFT; in all, the
hit rate (prompt tokens the router found cached / prompt tokens), the engines' own counters
(mnemosyne_prefix_cache_hit_tokens_total / query_tokens_total) and the repeat misses (a document asked
about before whose KV had been evicted by then); every answer against the single-process engine with
nothing cached (run after the services, so their timings are not disturbed).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.long_context import reference  # noqa: E402
from bench.prefix_served import BLOCK, LOGPROB_TOL, QUESTION_TOKENS, RESULTS, ask  # noqa: E402

WORDS = ("the", "river", "contract", "engine", "north", "ledger", "quiet", "signal", "harbor", "seven", "copper",
         "window", "garden", "policy", "orbit", "lantern", "margin", "thread", "valley", "summer", "archive")
QUESTIONS = ("What is the document about?", "Who signed the contract?", "Summarize the second part.",
             "Which word appears most often?", "What happened in the harbor?", "List three places it names.",
             "Is the ledger balanced?", "What does the policy say about copper?")


def exact(row: dict, ref: dict) -> None:
    row["reference_seconds"] = round(ref["seconds"], 2)
    row["same_tokens"] = row["tokens"] == ref["tokens"]
    row["max_logprob_diff"] = max((abs(a - b) for a, b in zip(row["logprobs"], ref["logprobs"])), default=None)


def is_exact(rows: list[dict]) -> bool:
    return all(r["same_tokens"] and (r["max_logprob_diff"] or 0.0) <= LOGPROB_TOL for r in rows)


def scrape_totals(url: str) -> dict[str, float]:
    from common.metrics import scrape, total
    fams = scrape(url)
    return {name: total(fams, name) for name in ("mnemosyne_prefix_cache_query_tokens_total",
                                                 "mnemosyne_prefix_cache_hit_tokens_total")}


def machine() -> dict:
    import psutil
    return {"cpus": psutil.cpu_count(), "platform": platform.platform(),
            "load_at_end": [round(x, 2) for x in os.getloadavg()]}


def wait_for_prefill_pool(cluster, rng: random.Random) -> None:
    """The router lists the instances every few hundred ms: until it has seen the prefill pool a long
    prompt takes the decode-only route. A probe of other tokens shows when it has."""
    probe = [rng.randrange(4, 320) for _ in range(300)]
    deadline = time.monotonic() + 60
    while ask(cluster, probe, 1).get("route") != "disaggregated" and time.monotonic() < deadline:
        time.sleep(0.5)


# ---- chat -------------------------------------------------------------------------------------------

def chat_turns(tok, context_tokens: int, turns: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """(the first prompt's ids, the ids each later user turn appends after the previous answer)."""
    rng = random.Random(seed)
    words: list[str] = []
    system = ""
    while len(tok.encode(system, add_special_tokens=False)) < context_tokens:
        words += [rng.choice(WORDS) for _ in range(64)]
        system = "You answer questions about this document.\n" + " ".join(words)
    first = tok.apply_chat_template([{"role": "system", "content": system},
                                     {"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    later = [tok.encode(f"<|im_end|>\n<|im_start|>user\n{QUESTIONS[i % len(QUESTIONS)]}<|im_end|>\n"
                        f"<|im_start|>assistant\n", add_special_tokens=False) for i in range(1, turns)]
    return first, later


def run_chat(args: argparse.Namespace) -> dict:
    from common.model.builtin import builtin_model_path
    from common.model.tokenizer import load_tokenizer
    from scripts.up import Cluster, ClusterConfig
    model = str(builtin_model_path())
    tok = load_tokenizer(model)
    first, later = chat_turns(tok, args.context_tokens, args.turns, args.seed)
    work = pathlib.Path(tempfile.mkdtemp(prefix="prefix-chat-"))
    prompts: list[list[int]] = []
    runs: dict[str, list[dict]] = {}
    startup: dict[str, float] = {}
    for mode, flags in (("cached", ()), ("cold", ("--no-prefix-caching",))):
        cfg = ClusterConfig(kv_backend="tcp", router_port=0, http_port=-1, pool_flags=flags,
                            deployment=f"chat-{mode}-{uuid.uuid4().hex[:6]}", log_dir=str(work / mode))
        t0 = time.monotonic()
        rows = []
        with Cluster(cfg) as cluster:
            startup[mode] = round(time.monotonic() - t0, 1)
            wait_for_prefill_pool(cluster, random.Random(args.seed + 1))
            for turn in range(args.turns):
                if mode == "cached":          # the conversation: each turn appends to the last answer
                    prompts.append(first if turn == 0 else prompts[-1] + rows[-1]["tokens"] + later[turn - 1])
                time.sleep(args.pause_s)
                r = ask(cluster, prompts[turn], args.max_tokens)
                r.update(turn=turn, prompt_tokens=len(prompts[turn]), load=round(os.getloadavg()[0], 2))
                rows.append(r)
                print(f"{mode} turn {turn}: {r['prompt_tokens']} tokens, {r['route']}, cached "
                      f"{r['cached_prompt_tokens']}, TTFT {r['ttft_s']:.3f} s", flush=True)
        runs[mode] = rows
    for turn, ids in enumerate(prompts):
        ref = reference(model, ids, args.max_tokens)
        for mode in runs:
            exact(runs[mode][turn], ref)
        print(f"turn {turn}: reference {ref['seconds']:.1f} s, same tokens "
              f"{[runs[m][turn]['same_tokens'] for m in runs]}", flush=True)
    return chat_summary({"config": {k: v for k, v in vars(args).items() if k != "func"},
            "model": "SmolLM2-135M-Instruct (built-in, float32)", "machine": machine(), "startup_s": startup,
            "runs": runs, "exact": is_exact(runs["cached"]) and is_exact(runs["cold"])})


def chat_summary(r: dict) -> dict:
    """`r` plus the later turns' TTFT medians and speed-up, and the hit rate: the prompt tokens the
    router found cached over all prompt tokens, with caching on."""
    cached, cold = r["runs"]["cached"], r["runs"]["cold"]
    warm_t, cold_t = [x["ttft_s"] for x in cached[1:]], [x["ttft_s"] for x in cold[1:]]
    matched, total = sum(x["cached_prompt_tokens"] for x in cached), sum(x["prompt_tokens"] for x in cached)
    return {**r, "warm_ttft_median_s": statistics.median(warm_t), "cold_ttft_median_s": statistics.median(cold_t),
            "speedup_median": statistics.median(c / w for c, w in zip(cold_t, warm_t)),
            "matched_tokens": matched, "prompt_tokens": total, "hit_rate_tokens": matched / total}


def chat_markdown(r: dict) -> str:
    c = r["config"]
    lines = [f"# A {c['turns']}-turn chat on the built-in model, with and without prefix caching", "",
             f"{r['model']}; make up's layout (prefill spp 2, decode kvp 2), KV over TCP, the router's default "
             f"SLOs. A ChatML conversation: a system message with a ~{c['context_tokens']}-token document, then "
             f"{c['turns']} user questions; each turn's prompt = the previous prompt + the previous answer's ids + "
             f"the next user turn; {c['max_tokens']} greedy tokens per answer, {c['pause_s']} s after the previous "
             f"one. The same prompts on a deployment with prefix caching (make up's default) and one with "
             f"--no-prefix-caching (cold), one after the other; TTFT as the router measured it. Exact: the "
             f"single-process engine with nothing cached on each prompt (identical tokens, logprobs within "
             f"{LOGPROB_TOL}). {r['machine']['cpus']} CPUs; deployments started in {r['startup_s']} s.", "",
             "| turn | prompt tokens | cached: route | cached: matched | cached: TTFT s | cold: route | cold: TTFT s "
             "| cold / cached | same tokens (cached, cold) | max abs. logprob diff |",
             "|---:|---:|---|---:|---:|---|---:|---:|:---:|---:|"]
    for w, k in zip(r["runs"]["cached"], r["runs"]["cold"]):
        diff = max(x for x in (w["max_logprob_diff"], k["max_logprob_diff"], 0.0) if x is not None)
        lines.append(f"| {w['turn']} | {w['prompt_tokens']} | {w['route']} | {w['cached_prompt_tokens']} | "
                     f"{w['ttft_s']:.3f} | {k['route']} | {k['ttft_s']:.3f} | {k['ttft_s'] / w['ttft_s']:.1f}x | "
                     f"{w['same_tokens']}, {k['same_tokens']} | {diff:.1e} |")
    lines += ["", f"Turns 1-{c['turns'] - 1}: cached TTFT median {r['warm_ttft_median_s']:.3f} s, cold "
                  f"{r['cold_ttft_median_s']:.3f} s; median speed-up per turn **{r['speedup_median']:.1f}x**; hit rate "
                  f"{r['hit_rate_tokens']:.1%} ({r['matched_tokens']:,} of {r['prompt_tokens']:,} prompt tokens not "
                  f"prefilled again); every answer exact: {r['exact']}."]
    return "\n".join(lines) + "\n"


# ---- mixed documents --------------------------------------------------------------------------------

def run_mixed(args: argparse.Namespace) -> dict:
    from common.model.random_hf import write_longctx_test_model
    from scripts.up import Cluster, ClusterConfig
    work = pathlib.Path(tempfile.mkdtemp(prefix="prefix-mixed-"))
    model = args.model or str(write_longctx_test_model(work / "mnemosyne-longctx-test", seed=0))
    rng = random.Random(args.seed)
    docs = [[rng.randrange(4, 320) for _ in range(args.doc_tokens)] for _ in range(args.docs)]
    weights = [1.0 / (rank + 1) for rank in range(args.docs)]
    asks = [rng.choices(range(args.docs), weights)[0] for _ in range(args.requests)]
    prompts = [docs[d] + [rng.randrange(4, 320) for _ in range(QUESTION_TOKENS)] for d in asks]
    max_len = args.doc_tokens + QUESTION_TOKENS + args.max_tokens + BLOCK
    kvp = 2
    m = -(-max_len // kvp // BLOCK) * BLOCK                     # tokens per KVP group of one request
    cfg = ClusterConfig(model=model, max_model_len=max_len, kv_backend="tcp", router_port=0, http_port=-1,
                        dtype="float32", decode_kvp=kvp, kvp_tokens=m,
                        decode_kv_tokens=int(args.cache_docs * m) + BLOCK,
                        prefill_kv_tokens=max_len + args.doc_tokens // 2,
                        deployment=f"prefix-mixed-{uuid.uuid4().hex[:6]}", log_dir=str(work / "logs"))
    t0 = time.monotonic()
    rows = []
    with Cluster(cfg) as cluster:
        startup = round(time.monotonic() - t0, 1)
        wait_for_prefill_pool(cluster, random.Random(args.seed + 1))
        before = {s: scrape_totals(cluster.metrics_urls[s]) for s in ("prefill", "decode")}
        seen: set[int] = set()
        for i, (d, ids) in enumerate(zip(asks, prompts)):
            time.sleep(args.pause_s)
            r = ask(cluster, ids, args.max_tokens)
            r.update(request=i, doc=d, prompt_tokens=len(ids), seen_before=d in seen,
                     load=round(os.getloadavg()[0], 2))
            seen.add(d)
            rows.append(r)
            print(f"request {i} doc {d}: {r['route']}, cached {r['cached_prompt_tokens']}, TTFT {r['ttft_s']:.3f} s",
                  flush=True)
        after = {s: scrape_totals(cluster.metrics_urls[s]) for s in ("prefill", "decode")}
    for r, ids in zip(rows, prompts):
        exact(r, reference(model, ids, args.max_tokens))
    engines = {s: {k.removeprefix("mnemosyne_prefix_cache_").removesuffix("_total"): after[s][k] - before[s][k]
                   for k in after[s]} for s in after}
    prompt_tokens = sum(r["prompt_tokens"] for r in rows)
    matched = sum(r["cached_prompt_tokens"] for r in rows)
    hits = [r for r in rows if r["cached_prompt_tokens"] >= args.doc_tokens // BLOCK * BLOCK]
    first = [r for r in rows if not r["seen_before"]]
    repeat_misses = [r for r in rows if r["seen_before"] and r["cached_prompt_tokens"] == 0]
    engine_hit = sum(e["hit_tokens"] for e in engines.values())
    engine_query = sum(e["query_tokens"] for e in engines.values())
    return {"config": {k: v for k, v in vars(args).items() if k != "func"},
            "model": "mnemosyne-longctx-test (random, seed 0)", "machine": machine(), "startup_s": startup,
            "sizes": {"max_model_len": max_len, "kvp_tokens": m, "decode_kv_tokens_per_group": cfg.decode_kv_tokens,
                      "prefill_kv_tokens": cfg.prefill_kv_tokens},
            "rows": rows, "prompt_tokens": prompt_tokens, "matched_tokens": matched,
            "hit_rate_tokens": matched / prompt_tokens, "document_hits": len(hits), "first_asks": len(first),
            "repeat_misses": len(repeat_misses), "engines": engines,
            "engine_hit_rate": engine_hit / engine_query if engine_query else None,
            "hit_ttft_median_s": statistics.median(r["ttft_s"] for r in hits) if hits else None,
            "miss_ttft_median_s": statistics.median(r["ttft_s"] for r in rows if r not in hits),
            "exact": is_exact(rows)}


def mixed_markdown(r: dict) -> str:
    c, s = r["config"], r["sizes"]
    lines = [f"# Questions about {c['docs']} documents that do not all fit: prefix caching with eviction", "",
             f"{r['model']}; make up's layout (prefill spp 2, decode kvp 2, M = {s['kvp_tokens']}), KV over TCP. "
             f"{c['docs']} documents of {c['doc_tokens']:,} tokens; {c['requests']} requests, each the document "
             f"(drawn with weights 1/(rank + 1)) + {QUESTION_TOKENS} question tokens of its own, {c['max_tokens']} "
             f"greedy tokens, {c['pause_s']} s apart. The decode instance holds {s['decode_kv_tokens_per_group']:,} "
             f"tokens per KVP group (about {c['cache_docs']} documents), the prefill instance "
             f"{s['prefill_kv_tokens']:,} (one). Exact: the single-process engine with nothing cached on each prompt. "
             f"{r['machine']['cpus']} CPUs; deployment started in {r['startup_s']} s.", "",
             "| # | doc | asked before | route | cached (router's match) | TTFT s | same tokens | max abs. logprob diff |",
             "|---:|---:|:---:|---|---:|---:|:---:|---:|"]
    for row in r["rows"]:
        diff = "-" if row["max_logprob_diff"] is None else f"{row['max_logprob_diff']:.1e}"
        lines.append(f"| {row['request']} | {row['doc']} | {row['seen_before']} | {row['route']} | "
                     f"{row['cached_prompt_tokens']} | {row['ttft_s']:.3f} | {row['same_tokens']} | {diff} |")
    e = r["engines"]
    hit_ttft = "-" if r["hit_ttft_median_s"] is None else f"{r['hit_ttft_median_s']:.3f}"
    lines += ["",
              f"- hit rate (router's match / prompt tokens): **{r['hit_rate_tokens']:.1%}**, "
              f"{r['matched_tokens']:,} of {r['prompt_tokens']:,} prompt tokens not prefilled again;",
              f"- the engines' own counters: decode {e['decode']['hit_tokens']:.0f} hit of "
              f"{e['decode']['query_tokens']:.0f} query tokens, prefill {e['prefill']['hit_tokens']:.0f} of "
              f"{e['prefill']['query_tokens']:.0f} (all: {r['engine_hit_rate']:.1%});",
              f"- {r['document_hits']} requests found their whole document cached, {r['first_asks']} were a "
              f"document's first, {r['repeat_misses']} asked about a document seen before whose KV had been "
              f"evicted by then;",
              f"- TTFT median: {hit_ttft} s with the document cached, {r['miss_ttft_median_s']:.3f} s without;",
              f"- every answer exact: {r['exact']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    chat = sub.add_parser("chat", help="a multi-turn chat on the built-in model, with and without prefix caching")
    chat.add_argument("--context-tokens", type=int, default=2048, help="the system message's document")
    chat.add_argument("--turns", type=int, default=6)
    chat.add_argument("--max-tokens", type=int, default=16)
    chat.add_argument("--out", default="prefix_cache_chat")
    chat.set_defaults(func=run_chat, markdown=chat_markdown)
    mixed = sub.add_parser("mixed", help="questions about several documents whose KV does not all fit")
    mixed.add_argument("--docs", type=int, default=4)
    mixed.add_argument("--doc-tokens", type=int, default=8192)
    mixed.add_argument("--requests", type=int, default=24)
    mixed.add_argument("--cache-docs", type=float, default=2.5,
                       help="the decode instance's KV per group, in documents' share of a group")
    mixed.add_argument("--max-tokens", type=int, default=8)
    mixed.add_argument("--model", default="", help="checkpoint (default: the long-context test model)")
    mixed.add_argument("--out", default="prefix_cache_mixed")
    mixed.set_defaults(func=run_mixed, markdown=mixed_markdown)
    for s in (chat, mixed):
        s.add_argument("--pause-s", type=float, default=0.5, help="after the previous answer")
        s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    render = args.markdown
    del args.markdown
    r = args.func(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    (RESULTS / f"{args.out}.md").write_text(render(r))
    print(render(r))
    return 0 if r["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
