"""One long document, then several different questions about it, through make up's services:
cold and warm TTFT side by side, what the router matched and where it sent each question, and
whether every answer equals a cold run's (issue 15's document workload, served).

    .venv/bin/python -m bench.prefix_served --doc-tokens 16384 --questions 8
        -> bench/results/prefix_cache_served.{json,md}

The deployment is scripts/up.py's Cluster at make up's layout (prefill spp = 2, decode kvp = 2, KV over
TCP, prefix caching and cache-aware routing on, the pools' default performance model) on the
long-context TEST model (random weights: `mnemosyne make-test-model`), with --max-model-len sized for
the document and a question. Question i's prompt is the document followed by its own 32 tokens; each
asks for --max-tokens greedy tokens (ignore_eos), with a relaxed SLO (a CPU must not be rejected as
hopeless on the cold document), --pause-s after the previous answer.

The first question is cold (nothing cached); the others find the document cached where the first one
left it: the decode instance, which keeps the KV it received, so the router sends them decode-only and
only the question is prefilled. Reported per question: TTFT (router-side, from the Finished event),
route, Started.cached_prompt_tokens, and the tokens / logprobs against the single-process engine with
nothing cached (bench/long_context.py's reference, a fresh engine per prompt: the cold answer; run after
the services, so their timings are not disturbed).

At 262,144 tokens a cold single-process run takes as long as the served cold prefill (CPU attention
over 262K keys), and eight of them would take hours here: `--cold-references K` runs them for the
first K questions only, and `--warm-reference` adds one single-process engine with prefix caching on
that computes the document once and answers every question after it (its cached path is checked
against cold runs by the tests; here it checks every served answer at the full size).
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

RESULTS = ROOT / "bench" / "results"
BLOCK = 16
QUESTION_TOKENS = 32
LOGPROB_TOL = 1e-4


def ask(cluster, ids: list[int], max_tokens: int) -> dict:
    """One request through the router: Started fields, router-side TTFT, tokens, logprobs."""
    from common.client import RouterClient
    from common.rpc.protos import router_pb2
    out: dict = {"tokens": [], "logprobs": []}
    with RouterClient(cluster.router_address, timeout_s=24 * 3600) as client:
        req = client.request(token_ids=ids, max_tokens=max_tokens, ignore_eos=True, ttft_slo_s=24 * 3600.0,
                             tbt_slo_s=3600.0)
        t0 = time.monotonic()
        for ev in client.stream(req):
            if ev.HasField("started"):
                st = ev.started
                out["route"] = router_pb2.Route.Name(st.route).removeprefix("ROUTE_").lower()
                out["cached_prompt_tokens"] = st.cached_prompt_tokens if st.HasField("cached_prompt_tokens") else 0
            elif ev.HasField("delta") and ev.delta.token_ids:
                out.setdefault("client_ttft_s", time.monotonic() - t0)
                out["tokens"] += list(ev.delta.token_ids)
                out["logprobs"] += list(ev.delta.logprobs)
            elif ev.HasField("finished"):
                out["ttft_s"] = ev.finished.timings.ttft_s
    return out


def run(args: argparse.Namespace) -> dict:
    import psutil
    from common.model.random_hf import write_longctx_test_model
    from scripts.up import Cluster, ClusterConfig
    work = pathlib.Path(tempfile.mkdtemp(prefix="prefix-served-"))
    model = args.model or str(write_longctx_test_model(work / "mnemosyne-longctx-test", seed=0))
    rng = random.Random(args.seed)
    doc = [rng.randrange(4, 320) for _ in range(args.doc_tokens)]
    prompts = [doc + [rng.randrange(4, 320) for _ in range(QUESTION_TOKENS)] for _ in range(args.questions)]
    max_len = args.doc_tokens + QUESTION_TOKENS + args.max_tokens + BLOCK
    cfg = ClusterConfig(model=model, max_model_len=max_len, kv_backend="tcp", router_port=0, http_port=-1,
                        dtype="float32", deployment=f"prefix-served-{uuid.uuid4().hex[:6]}",
                        log_dir=args.log_dir or str(work / "logs"))
    t0 = time.monotonic()
    rows = []
    with Cluster(cfg) as cluster:
        startup = time.monotonic() - t0
        # The router lists the instances every few hundred ms: until it has seen the prefill pool, a
        # long prompt would take the decode-only route. A short probe of other tokens shows when.
        probe = [rng.randrange(4, 320) for _ in range(300)]
        deadline = time.monotonic() + 60
        while ask(cluster, probe, 1).get("route") != "disaggregated" and time.monotonic() < deadline:
            time.sleep(0.5)
        for i, ids in enumerate(prompts):
            time.sleep(args.pause_s)
            load = os.getloadavg()[0]
            r = ask(cluster, ids, args.max_tokens)
            r.update(question=i, prompt_tokens=len(ids), load=round(load, 2))
            rows.append(r)
            print(f"question {i}: {r['route']}, cached {r['cached_prompt_tokens']}, TTFT {r['ttft_s']:.3f} s",
                  flush=True)
    cold_refs = len(rows) if args.cold_references < 0 else args.cold_references
    for r, ids in zip(rows, prompts):
        if r["question"] >= cold_refs:
            r["same_tokens"], r["max_logprob_diff"] = None, None
            continue
        ref = reference(model, ids, args.max_tokens)       # a fresh engine: nothing cached, a cold run
        r["reference_seconds"] = round(ref["seconds"], 2)
        r["same_tokens"] = r["tokens"] == ref["tokens"]
        r["max_logprob_diff"] = max((abs(a - b) for a, b in zip(r["logprobs"], ref["logprobs"])), default=None)
        print(f"question {r['question']}: same tokens {r['same_tokens']}, max |dlogprob| {r['max_logprob_diff']}",
              flush=True)
    if args.warm_reference:
        for r, ref in zip(rows, warm_reference(model, prompts, args.max_tokens)):
            r["warm_ref_same_tokens"] = r["tokens"] == ref["tokens"]
            r["warm_ref_max_logprob_diff"] = max((abs(a - b) for a, b in zip(r["logprobs"], ref["logprobs"])),
                                                 default=None)
            r["warm_ref_seconds"] = round(ref["seconds"], 2)
            print(f"question {r['question']}: warm reference ({ref['seconds']:.1f} s): same tokens "
                  f"{r['warm_ref_same_tokens']}", flush=True)
    cold, warm = rows[0]["ttft_s"], [r["ttft_s"] for r in rows[1:]]
    return {"config": {"pause_s": args.pause_s, "doc_tokens": args.doc_tokens, "question_tokens": QUESTION_TOKENS, "questions": args.questions,
                       "max_tokens": args.max_tokens, "model": "mnemosyne-longctx-test (random, seed 0)",
                       "prefill_spp": cfg.prefill_spp, "decode_kvp": cfg.decode_kvp, "max_model_len": max_len},
            "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform(),
                        "load_at_end": [round(x, 2) for x in os.getloadavg()]},
            "startup_s": round(startup, 1), "rows": rows, "cold_ttft_s": cold,
            "warm_ttft_median_s": statistics.median(warm) if warm else None,
            "speedup_median": cold / statistics.median(warm) if warm else None,
            "cold_references": cold_refs, "warm_reference": args.warm_reference,
            "exact": all((r["same_tokens"] is None or (r["same_tokens"] and (r["max_logprob_diff"] or 0) <= LOGPROB_TOL))
                         and (not args.warm_reference or (r["warm_ref_same_tokens"]
                                                          and (r["warm_ref_max_logprob_diff"] or 0) <= LOGPROB_TOL))
                         for r in rows)}


def warm_reference(model: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """One single-process engine with prefix caching on, the prompts one after another (the first
    computes the document, the others reuse it): tokens, logprobs and seconds per prompt."""
    from common.config import CacheConfig, EngineConfig
    from common.engine.engine import LLMEngine
    from common.sampling_params import SamplingParams
    n = max(len(p) for p in prompts) + max_tokens
    blocks = 2 * (-(-n // BLOCK)) + 8                       # the document cached, and a question beside it
    engine = LLMEngine(EngineConfig(model=model, max_model_len=n, dtype="float32", perf_model="analytic",
                                    cache=CacheConfig(block_size=BLOCK, num_blocks=blocks, prefix_caching=True)))
    out = []
    for ids in prompts:
        t0 = time.monotonic()
        res = engine.generate([ids], SamplingParams(max_tokens=max_tokens, ignore_eos=True))[0]
        out.append({"tokens": list(res.token_ids), "logprobs": list(res.logprobs), "seconds": time.monotonic() - t0})
    return out


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [f"# A {c['doc_tokens']:,}-token document, then {c['questions']} questions, through the services", "",
             f"{c['model']}; make up's layout (prefill spp {c['prefill_spp']}, decode kvp {c['decode_kvp']}), KV over "
             f"TCP, prefix caching and cache-aware routing on; --max-model-len {c['max_model_len']}. Each prompt: the "
             f"document + {c['question_tokens']} question tokens, {c['pause_s']} s after the previous answer; "
             f"{c['max_tokens']} greedy tokens. TTFT as the router "
             f"measured it. Exact: a fresh single-process engine (nothing cached) on the same prompt (identical "
             f"tokens, logprobs within {LOGPROB_TOL})"
             + ("" if r.get("cold_references", c["questions"]) >= c["questions"] else
                f", for the first {r['cold_references']} question(s) (a cold run is as slow as the served cold prefill)")
             + ("; and one single-process engine with prefix caching on, the document computed once, for every "
                "question" if r.get("warm_reference") else "")
             + f". {r['machine']['cpus']} CPUs, shared; deployment started in {r['startup_s']} s.", "",
             "| # | prompt tokens | route | cached (router's match) | TTFT s | speed-up vs cold | same tokens | "
             "max abs. logprob diff | load |" + (" warm reference: same tokens, max diff |" if r.get("warm_reference") else ""),
             "|---:|---:|---|---:|---:|---:|:---:|---:|---:|" + ("---|" if r.get("warm_reference") else "")]
    for row in r["rows"]:
        speed = r["cold_ttft_s"] / row["ttft_s"] if row["ttft_s"] else float("nan")
        diff = "-" if row["max_logprob_diff"] is None else f"{row['max_logprob_diff']:.1e}"
        same = "-" if row["same_tokens"] is None else row["same_tokens"]
        warm = (f" {row['warm_ref_same_tokens']}, {row['warm_ref_max_logprob_diff']:.1e} |"
                if r.get("warm_reference") else "")
        lines.append(f"| {row['question']} | {row['prompt_tokens']} | {row['route']} | {row['cached_prompt_tokens']} | "
                     f"{row['ttft_s']:.3f} | {speed:.0f}x | {same} | {diff} | {row['load']} |{warm}")
    lines += ["", f"Cold TTFT {r['cold_ttft_s']:.2f} s; warm median {r['warm_ttft_median_s']:.3f} s: "
                  f"**{r['speedup_median']:.0f}x**; every answer exact: {r['exact']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--doc-tokens", type=int, default=16384)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--model", default="", help="checkpoint (default: the long-context test model, written to a temp dir)")
    p.add_argument("--pause-s", type=float, default=1.0,
                   help="between questions (a user's reading time; the index learns a new cache entry with the "
                        "holder's next heartbeat, every 0.25 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cold-references", type=int, default=-1,
                   help="check the first K questions against a cold single-process run (default: all)")
    p.add_argument("--warm-reference", action="store_true",
                   help="also check every question against one single-process engine with prefix caching on")
    p.add_argument("--log-dir", default="")
    p.add_argument("--out", default="prefix_cache_served", help="results name in bench/results")
    args = p.parse_args(argv)
    r = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(r, indent=1) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(r))
    print(markdown(r))
    return 0 if r["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
