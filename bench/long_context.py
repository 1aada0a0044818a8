"""A long prompt through the disaggregated services, exactly (issue 12), on the long-context TEST model.

    python -m bench.long_context                        # 1,048,576 tokens, spp 2, kvp 4, M = 262,160, 16 tokens
    python -m bench.long_context --tokens 32768 --layouts 2x4 1x4 2x1 --transformers --probe-tokens 512

For each layout (prefill spp x decode kvp; the first is the main one) a fresh `make up` deployment
(scripts/up.py's Cluster, sized by --max-model-len = tokens + max_tokens) on the test model written
by `mnemosyne make-test-model` (random weights, seed 0: 2 layers, 1 KV head of dim 16) serves one
prompt of --tokens random token ids, greedy, --max-tokens tokens, ignore_eos. Measured by the router (its
Finished timings): TTFT, TBT p50 / p99 (gaps between streamed tokens), and the first gap's excess over the median TBT,
an estimate of the KV transfer not hidden behind the prefill (the decode starts once the last KV
arrived); from the services' metrics: KV bytes sent (prefill) and received (decode); from /proc:
the peak RSS (VmHWM) of every process of every service, grid workers included.

Checks: the main layout's tokens and logprobs equal the single-process engine's (LLMEngine in this
process, after the deployment stopped; --no-reference skips it), and with --transformers its tokens
equal Hugging Face transformers' greedy generation on the same checkpoint, prefilled in chunks with
its own KV cache (a one-shot forward would materialise an L x L mask). --probe-tokens P: a P-token
prompt (long enough for the prefill pool) served on the idle deployment, then again while the long
prompt is a quarter through its prefill: its TTFT both ways (LARS preempts at chunk boundaries).

Results: bench/results/long_context.json and .md (--out-name to write elsewhere). Costs on a 2-core
CPU: see README "Long contexts"; attention is quadratic, so 1M tokens costs ~4,000x 16K.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
BLOCK = 16


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def peak_rss(cluster) -> dict[str, dict[str, int]]:
    """service -> {"pid N (name)": VmHWM bytes} for the service's process and all its descendants."""
    import psutil

    from common.metrics import peak_rss_bytes
    out: dict[str, dict[str, int]] = {}
    for name, svc in cluster.services.items():
        procs = {}
        try:
            root = psutil.Process(svc.pid)
            for p in [root, *root.children(recursive=True)]:
                procs[f"pid {p.pid} ({'main' if p.pid == svc.pid else 'child'})"] = peak_rss_bytes(p.pid)
        except psutil.Error:
            continue
        out[name] = procs
    return out


def stream(cluster, ids: list[int], max_tokens: int, on_progress=None, own_slo: bool = True) -> dict:
    """One request; its timings, tokens, logprobs, the progress events. `own_slo`: a TTFT SLO of a
    week (the long prompt: admission must not reject it as hopeless on a CPU); else the deployment's
    default SLO for its length (the probe: LARS ranks it by that slack)."""
    from common.client import RouterClient
    from common.rpc.protos import router_pb2
    with RouterClient(cluster.router_address, timeout_s=7 * 24 * 3600) as client:
        req = client.request(token_ids=ids, max_tokens=max_tokens, ignore_eos=True,
                             ttft_slo_s=7 * 24 * 3600.0 if own_slo else None, tbt_slo_s=3600.0 if own_slo else None)
        t0 = time.monotonic()
        times, tokens, logprobs, progress, timings, route = [], [], [], 0, None, None
        for ev in client.stream(req):
            if ev.HasField("started"):
                route = router_pb2.Route.Name(ev.started.route)
            elif ev.HasField("progress"):
                progress += 1
                if on_progress is not None:
                    on_progress(ev.progress.tokens_done, ev.progress.tokens_total)
            elif ev.HasField("delta") and ev.delta.token_ids:
                times.append(time.monotonic() - t0)
                tokens += list(ev.delta.token_ids)
                logprobs += list(ev.delta.logprobs)
            elif ev.HasField("finished"):
                timings = ev.finished.timings
    # TTFT and the gaps between tokens as the router saw them leave (a client that reads late gets
    # several tokens in one message; the router's clock does not), and the client's TTFT.
    return {"ttft_s": timings.ttft_s, "tbt_s": list(timings.tbt_s), "client_ttft_s": times[0] if times else None,
            "tokens": tokens, "logprobs": logprobs, "progress_events": progress, "route": route}


def group_tokens(args: argparse.Namespace, kvp: int) -> int:
    """M, the tokens of each KVP group: --kvp-tokens, else the prompt and output over `kvp` groups in
    whole blocks. Every group but the last holds exactly M tokens and generated tokens extend the last,
    so K x M must cover prompt + output: at 2^20 + 16 tokens and K = 4, M = 262,160 (not 2^18)."""
    return args.kvp_tokens or -(-(-(-(args.tokens + args.max_tokens) // kvp)) // BLOCK) * BLOCK


def run_layout(model: str, ids: list[int], spp: int, kvp: int, m: int | None, args) -> dict:
    from common.metrics import scrape, total
    from scripts.up import Cluster, ClusterConfig
    n = len(ids)
    pool_flags = ["--perf-model", args.perf_model]
    cfg = ClusterConfig(model=model, max_model_len=n + args.max_tokens, kv_backend=args.backend, router_port=0,
                        http_port=-1, prefill_spp=spp, decode_kvp=kvp, kvp_tokens=m if kvp > 1 else None,
                        dtype="float32", deployment=f"longctx-{uuid.uuid4().hex[:6]}",
                        log_dir=args.log_dir and os.path.join(args.log_dir, f"spp{spp}-kvp{kvp}"),
                        extra={"prefill": pool_flags, "decode": pool_flags})
    sized = cfg.sized()
    row: dict = {"layout": f"spp{spp}_kvp{kvp}", "prefill_spp": spp, "decode_kvp": kvp,
                 "kvp_tokens": sized.kvp_tokens if kvp > 1 else None}
    t0 = time.monotonic()
    with Cluster(cfg) as cluster:                 # both pools registered, the router's view refreshed
        row["startup_s"] = round(time.monotonic() - t0, 1)
        print(f"  {row['layout']}: up in {row['startup_s']} s", flush=True)
        probe = None
        if args.probe_tokens and spp == args.layouts[0][0] and kvp == args.layouts[0][1]:
            probe_ids = random_ids(args.probe_tokens, 1)
            row["probe_idle"] = stream(cluster, probe_ids, 2, own_slo=False)["ttft_s"]
            # Another prompt of the same length during the long prefill: the idle probe's own prompt
            # would now hit the decode instance's prefix cache and skip the prefill pool.
            probe = {"ids": random_ids(args.probe_tokens, 2),
                     "sent": threading.Event(), "result": None}

            def send_probe() -> None:
                probe["result"] = stream(cluster, probe["ids"], 2, own_slo=False)

            def on_progress(done: int, tot: int) -> None:
                if done >= tot // 4 and not probe["sent"].is_set():
                    probe["sent"].set()
                    probe["thread"] = threading.Thread(target=send_probe, daemon=True)
                    probe["thread"].start()
        res = stream(cluster, ids, args.max_tokens, on_progress if probe else None)
        if probe and probe["sent"].is_set():
            probe["thread"].join(3600)
            row["probe_during_long_prefill"] = probe["result"]["ttft_s"] if probe["result"] else None
        urls = cluster.metrics_urls
        pre, dec = scrape(urls["prefill"]), scrape(urls["decode"])
        row["kv_bytes_sent"] = total(pre, "mnemosyne_kv_transfer_bytes_total", direction="send")
        row["kv_bytes_received"] = total(dec, "mnemosyne_kv_transfer_bytes_total", direction="recv")
        row["peak_rss_bytes"] = peak_rss(cluster)
    tbt = res["tbt_s"]
    row["route"] = res["route"]
    if res["route"] != "ROUTE_DISAGGREGATED":
        print(f"  {row['layout']}: WARNING: the prompt took {res['route']}, not the prefill pool", flush=True)
    row.update(ttft_s=res["ttft_s"], client_ttft_s=res["client_ttft_s"], tbt_p50_s=percentile(tbt[1:], 50), tbt_p99_s=percentile(tbt[1:], 99),
               first_gap_s=tbt[0] if tbt else None, progress_events=res["progress_events"],
               tokens=res["tokens"], logprobs=res["logprobs"])
    if len(tbt) > 1:
        row["kv_tail_estimate_s"] = max(0.0, tbt[0] - statistics.median(tbt[1:]))
    print(f"  {row['layout']}: TTFT {row['ttft_s']:.2f} s, TBT p50 {1000 * (row['tbt_p50_s'] or 0):.1f} ms",
          flush=True)
    return row


def reference(model: str, ids: list[int], max_tokens: int) -> dict:
    """The single-process engine on the same prompt."""
    from common.config import CacheConfig, EngineConfig
    from common.engine.engine import LLMEngine
    from common.sampling_params import SamplingParams
    n = len(ids) + max_tokens
    engine = LLMEngine(EngineConfig(model=model, max_model_len=n, dtype="float32", perf_model="analytic",
                                    cache=CacheConfig(block_size=BLOCK, num_blocks=-(-n // BLOCK) + 4)))
    t0 = time.monotonic()
    out = engine.generate([ids], SamplingParams(max_tokens=max_tokens, ignore_eos=True))[0]
    return {"tokens": list(out.token_ids), "logprobs": list(out.logprobs), "seconds": time.monotonic() - t0}


def transformers_tokens(model: str, ids: list[int], max_tokens: int) -> dict:
    """Greedy tokens of Hugging Face transformers, the prompt prefilled in chunks with its own cache."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa").eval()
    cfg = hf.config
    # the chunk's [heads, chunk, L] float32 mask and scores stay under ~1 GiB
    chunk = max(64, min(4096, (1 << 28) // (len(ids) * cfg.num_attention_heads)))
    cache = DynamicCache()
    t0 = time.monotonic()
    tokens = []
    with torch.no_grad():
        logits = None
        for s in range(0, len(ids), chunk):
            piece = torch.tensor([ids[s:s + chunk]])
            pos = torch.arange(s, s + piece.shape[1]).unsqueeze(0)
            logits = hf(input_ids=piece, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
        for i in range(max_tokens):
            t = int(logits.argmax(-1))
            tokens.append(t)
            if i + 1 == max_tokens:
                break
            pos = torch.tensor([[len(ids) + i]])
            logits = hf(input_ids=torch.tensor([[t]]), position_ids=pos, past_key_values=cache,
                        use_cache=True).logits[:, -1]
    return {"tokens": tokens, "seconds": time.monotonic() - t0, "chunk": chunk}


def run(args: argparse.Namespace) -> dict:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from common.model.random_hf import LONGCTX_TEST_MODEL
    model = checkpoint(args)
    n = args.tokens
    ids = prompt_ids(n)
    print(f"prompt: {n} tokens, {args.max_tokens} new; layouts {args.layouts}", flush=True)
    rows = []
    for spp, kvp in args.layouts:
        rows.append(run_layout(model, ids, spp, kvp, group_tokens(args, kvp), args))
    main_row = rows[0]
    result = {"benchmark": "long_context", "model": f"{LONGCTX_TEST_MODEL} (random weights, seed 0, float32; "
                                                    "2 layers, 2 heads, 1 KV head of dim 16)",
              "prompt_tokens": n, "max_tokens": args.max_tokens, "kv_backend": args.backend,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)", "threads_per_process": 1,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.reference_from:
        earlier_reference(args, result, main_row)
    elif args.reference:
        ref = reference(model, ids, args.max_tokens)
        diff = max((abs(a - b) for a, b in zip(main_row["logprobs"], ref["logprobs"])), default=math.inf)
        result["reference"] = {"engine_s": ref["seconds"], "same_tokens": main_row["tokens"] == ref["tokens"],
                               "max_logprob_diff": diff}
        for row in rows[1:]:
            row["same_tokens_as_reference"] = row["tokens"] == ref["tokens"]
        print(f"  single-process engine: same tokens {result['reference']['same_tokens']}, "
              f"max logprob diff {diff:.2e}", flush=True)
    if args.transformers:
        hf = transformers_tokens(model, ids, args.max_tokens)
        result["transformers"] = {"seconds": hf["seconds"], "chunk": hf["chunk"],
                                  "same_tokens": hf["tokens"] == main_row["tokens"], "tokens": hf["tokens"]}
        print(f"  transformers: same tokens {result['transformers']['same_tokens']}", flush=True)
    return result


def earlier_reference(args: argparse.Namespace, result: dict, main_row: dict) -> None:
    """The comparisons of an earlier run on the same prompt (--reference-from NAME), instead of running
    the single-process engine (and transformers) again: this run's main tokens and logprobs against
    that run's main ones, which it compared with the engine's (and transformers' tokens). Exact only
    through an earlier run whose logprobs equalled the engine's to the bit; its difference is added."""
    earlier = json.loads((OUT / f"{args.reference_from}.json").read_text())
    if (earlier["prompt_tokens"], earlier["max_tokens"]) != (result["prompt_tokens"], result["max_tokens"]):
        raise SystemExit(f"{args.reference_from}.json is a run of {earlier['prompt_tokens']} + "
                         f"{earlier['max_tokens']} tokens")
    ref, then = earlier.get("reference"), earlier["rows"][0]
    if not ref or not ref["same_tokens"]:
        raise SystemExit(f"{args.reference_from}.json has no main layout equal to the engine's to compare with")
    diff = max((abs(a - b) for a, b in zip(main_row["logprobs"], then["logprobs"])), default=math.inf)
    result["reference"] = {"engine_s": ref["engine_s"], "same_tokens": main_row["tokens"] == then["tokens"],
                           "max_logprob_diff": diff + ref["max_logprob_diff"], "from": args.reference_from,
                           "from_date": earlier["date"]}
    for row in result["rows"][1:]:
        row["same_tokens_as_reference"] = row["tokens"] == then["tokens"]
    hf = earlier.get("transformers")
    if hf:
        result["transformers"] = {**hf, "same_tokens": hf["tokens"] == main_row["tokens"],
                                  "from": args.reference_from}


def checkpoint(args: argparse.Namespace) -> str:
    """--model, else the test model (deterministic from its seed) written to a temp dir."""
    from common.model.random_hf import LONGCTX_TEST_MODEL, write_longctx_test_model
    if args.model:
        return args.model
    model = str(pathlib.Path(tempfile.mkdtemp(prefix="longctx-")) / LONGCTX_TEST_MODEL)
    write_longctx_test_model(model, seed=0)
    return model


def random_ids(n: int, seed: int) -> list[int]:
    """n token ids drawn from one seeded generator (ids 0-3: special tokens). A prompt of one repeated
    id would make every value vector alike, and attention over any set of positions give the same
    output: no test of exactness at all."""
    rng = random.Random(seed)
    return [rng.randrange(4, 320) for _ in range(n)]


def prompt_ids(n: int) -> list[int]:
    return random_ids(n, 0)


def add_transformers(args: argparse.Namespace) -> dict:
    """transformers' greedy tokens on an earlier run's prompt, compared with its main layout's tokens."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    result = json.loads((OUT / f"{args.out_name}.json").read_text())
    if (result["prompt_tokens"], result["max_tokens"]) != (args.tokens, args.max_tokens):
        raise SystemExit(f"{args.out_name}.json is a run of {result['prompt_tokens']} + {result['max_tokens']} "
                         f"tokens, not {args.tokens} + {args.max_tokens}")
    hf = transformers_tokens(checkpoint(args), prompt_ids(args.tokens), args.max_tokens)
    result["transformers"] = {"seconds": hf["seconds"], "chunk": hf["chunk"],
                              "same_tokens": hf["tokens"] == result["rows"][0]["tokens"], "tokens": hf["tokens"]}
    print(f"  transformers: same tokens {result['transformers']['same_tokens']}", flush=True)
    return result


def update(args: argparse.Namespace) -> dict:
    """Reruns `args.layouts` and puts their rows in place of the same layouts' rows of an earlier run."""
    result = json.loads((OUT / f"{args.out_name}.json").read_text())
    if (result["prompt_tokens"], result["max_tokens"]) != (args.tokens, args.max_tokens):
        raise SystemExit(f"{args.out_name}.json is a run of {result['prompt_tokens']} + {result['max_tokens']} tokens")
    model, ids = checkpoint(args), prompt_ids(args.tokens)
    main = result["rows"][0]
    for spp, kvp in args.layouts:
        row = run_layout(model, ids, spp, kvp, group_tokens(args, kvp), args)
        at = [i for i, r in enumerate(result["rows"]) if r["layout"] == row["layout"]]
        if at and at[0] == 0:
            raise SystemExit("--update reruns other layouts than the main one (its tokens are the comparison)")
        row["same_tokens_as_reference"] = row["tokens"] == main["tokens"]
        row["rerun"] = time.strftime("%Y-%m-%d %H:%M")
        if at:
            result["rows"][at[0]] = row
        else:
            result["rows"].append(row)
    return result


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / (1 << 20):.0f}"


def write(result: dict, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    n = result["prompt_tokens"]
    lines = [f"# Long context through the services ({n:,} tokens)", "",
             f"{result['model']}; {n:,}-token prompt of random ids, {result['max_tokens']} greedy tokens "
             f"(ignore_eos), KV over {result['kv_backend']}, one torch thread per process, {result['machine']}, "
             f"{result['date']}. A fresh `make up` deployment per layout (--max-model-len {n + result['max_tokens']}); "
             "TTFT and TBT as the router saw the tokens leave; the KV tail is the first gap's excess over the median TBT "
             "(the decode starts once the last KV arrived).", "",
             "| layout | route | M | TTFT s | TBT p50 ms | TBT p99 ms | KV tail s (est.) | KV sent MiB | KV recv MiB | "
             "progress events | startup s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        route = {"ROUTE_DISAGGREGATED": "prefill pool", "ROUTE_DECODE_ONLY": "decode only"}.get(r.get("route"), "?")
        lines.append(f"| {r['layout']} | {route} | {r['kvp_tokens'] or '-'} | {r['ttft_s']:.2f} | "
                     f"{1000 * (r['tbt_p50_s'] or 0):.1f} | {1000 * (r['tbt_p99_s'] or 0):.1f} | "
                     f"{r.get('kv_tail_estimate_s', 0):.3f} | {_mb(r['kv_bytes_sent'])} | {_mb(r['kv_bytes_received'])} | "
                     f"{r['progress_events']} | {r['startup_s']} |")
    lines += ["", "Peak RSS per process (VmHWM, MiB), main layout:", ""]
    for svc, procs in result["rows"][0]["peak_rss_bytes"].items():
        lines.append(f"- {svc}: " + ", ".join(f"{k} {_mb(v)}" for k, v in procs.items()))
    ref = result.get("reference")
    if ref:
        via = (f" (through `{ref['from']}.json` of {ref['from_date']}: its main layout's, which were compared "
               "with the engine's there)" if "from" in ref else "")
        lines += ["", f"Exactness: the main layout's tokens {'equal' if ref['same_tokens'] else 'DIFFER FROM'} "
                      f"the single-process engine's{via}; logprobs within {ref['max_logprob_diff']:.1e} "
                      f"(engine alone: {ref['engine_s']:.1f} s)."]
        others = [r for r in result["rows"][1:] if "same_tokens_as_reference" in r]
        if others:
            lines.append("Other layouts: " + ", ".join(
                f"{r['layout']} {'same' if r['same_tokens_as_reference'] else 'DIFFERENT'} tokens" for r in others) + ".")
    hf = result.get("transformers")
    if hf:
        lines.append(f"Hugging Face transformers (prefilled in chunks of {hf['chunk']} with its own cache, "
                     f"{hf['seconds']:.1f} s{', in ' + hf['from'] + '.json' if 'from' in hf else ''}): "
                     f"{'same' if hf['same_tokens'] else 'DIFFERENT'} tokens.")
    main = result["rows"][0]
    if "probe_idle" in main:
        during = main.get("probe_during_long_prefill")
        lines.append(f"A short prompt on the prefill pool: TTFT {main['probe_idle']:.2f} s on the idle deployment, "
                     + (f"{during:.2f} s when sent a quarter into the long prefill." if during is not None
                        else "not measured during the long prefill."))
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")


def _layout(s: str) -> tuple[int, int]:
    spp, _, kvp = s.partition("x")
    return int(spp), int(kvp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.long_context", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1 << 20, help="prompt tokens (default: 1,048,576)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens to generate (default: 16)")
    p.add_argument("--layouts", type=_layout, nargs="+", default=[(2, 4)], metavar="SPPxKVP",
                   help="prefill spp x decode kvp, the first one the main (default: 2x4)")
    p.add_argument("--kvp-tokens", type=int, default=None,
                   help="M, tokens per decode KVP group (default: ceil((tokens + max_tokens) / kvp) rounded up to the "
                        "block: 262,160 at 1M + 16 and kvp 4)")
    p.add_argument("--model", default="", help="checkpoint (default: the test model, written to a temp dir)")
    p.add_argument("--backend", default="tcp", choices=("tcp", "nixl"))
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the single-process engine run (as long as the prefill again)")
    p.add_argument("--reference-from", default="", metavar="NAME",
                   help="compare with the main layout of an earlier run on the same prompt (bench/results/NAME.json, "
                        "itself compared with the engine and transformers) instead of running them again")
    p.add_argument("--transformers", action="store_true", help="also compare with transformers' greedy tokens")
    p.add_argument("--add-transformers", action="store_true",
                   help="only run transformers on the prompt of an earlier run's results (--out-name, same --tokens "
                        "and --max-tokens) and add its comparison to them: at 1M tokens each reference takes about "
                        "as long as the served prefill, so they can run apart")
    p.add_argument("--probe-tokens", type=int, default=0,
                   help="TTFT of a prompt this long, idle and during the long prefill (0 = none; >= 256 to use the "
                        "prefill pool)")
    p.add_argument("--perf-model", default="calibrate",
                   help="the pools' performance model: calibrate (make up's default: profiled and anchored at "
                        "the budget at start), analytic (the roofline), saved or a profile's path")
    p.add_argument("--update", action="store_true",
                   help="run only --layouts (not the first of an earlier run) and replace those rows of the earlier "
                        "run's results (--out-name, same --tokens and --max-tokens); their tokens are compared with "
                        "its main layout's")
    p.add_argument("--log-dir", default="", help="keep the services' logs here")
    p.add_argument("--out-name", default="long_context", help="results file name in bench/results")
    args = p.parse_args(argv)
    result = add_transformers(args) if args.add_transformers else update(args) if args.update else run(args)
    write(result, args.out_name)
    print(f"wrote bench/results/{args.out_name}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
