"""Fuzzes every RPC of a real loopback deployment (scripts/up.py's Cluster: Redis, kvstore, prefill,
decode with 2 KVP groups, router with an API key) with protobuf-aware requests (tests/fixtures/fuzz.py)
and reports, per RPC, how many answers had each status; every crash (a process that exited or whose
grid workers were replaced), hang (no answer within the deadline) and answer outside the contract;
and the RSS of every process before and after.

    .venv/bin/python bench/fuzz.py --requests 10000            # -> bench/results/fuzz.{json,md}

The cluster runs unsupervised, so a crash stays visible instead of being restarted. After the run a
normal request (a long prompt: prefill -> KV transfer -> decode) must still be served.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import re
import sys
import tempfile
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from common.client import RouterClient  # noqa: E402
from scripts.up import Cluster, ClusterConfig  # noqa: E402
from tests.fixtures import fuzz  # noqa: E402
from tests.fixtures.hf_models import write_random_hf_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def small_model(directory: pathlib.Path) -> str:
    return str(write_random_hf_model(directory, "llama", num_attention_heads=4, num_key_value_heads=2,
                                     num_hidden_layers=2, max_position_embeddings=1024, seed=5))


def cluster_config(model: str, log_dir: str) -> ClusterConfig:
    return ClusterConfig(model=model, kv_backend="tcp", router_port=0, http_port=-1, kvp_tokens=128,
                         decode_kv_tokens=2048, prefill_kv_tokens=1024, prefill_spp=1, chunk_size=64,
                         short_prompt_tokens=32, lease_s=5.0, supervise=False, log_dir=log_dir,
                         insecure=True, deployment=f"fuzz-{uuid.uuid4().hex[:8]}")


#: Log lines of an engine that failed (and left the pool to rebuild) or of an unhandled error.
FAILURE = re.compile(r"engine failure|leaving the pool|Traceback|worker rank \d+ stops")


def processes(cluster: Cluster) -> dict[str, dict]:
    """Every process of the deployment: name -> pid, RSS (MB), its children's pids, and how many
    failure lines (FAILURE) its log has."""
    out = {}
    for name, svc in cluster.services.items():
        try:
            p = psutil.Process(svc.pid)
            kids = p.children(recursive=True)
            out[name] = {"pid": p.pid, "rss_mb": round(p.memory_info().rss / 2**20, 1),
                         "children": sorted(k.pid for k in kids),
                         "children_rss_mb": round(sum(_rss(k) for k in kids) / 2**20, 1),
                         "failure_lines": failure_lines(svc.log_path)}
        except psutil.NoSuchProcess:
            out[name] = {"pid": svc.pid, "gone": True}
    if cluster.redis is not None and cluster.redis.pid is not None:
        out["redis"] = {"pid": cluster.redis.pid,
                        "rss_mb": round(_rss(psutil.Process(cluster.redis.pid)) / 2**20, 1), "children": []}
    return out


def failure_lines(path: pathlib.Path) -> list[str]:
    try:
        return [line[:300] for line in path.read_text(errors="replace").splitlines() if FAILURE.search(line)]
    except OSError:
        return []


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def crashes(before: dict, after: dict) -> list[str]:
    """Processes that exited or were replaced (a grid worker rebuilt is a crash too)."""
    found = []
    for name, b in before.items():
        a = after.get(name, {"gone": True})
        if a.get("gone") or a["pid"] != b["pid"]:
            found.append(f"{name} (pid {b['pid']}) exited")
        elif a["children"] != b["children"]:
            found.append(f"{name}: worker processes changed {b['children']} -> {a['children']}")
        elif len(a.get("failure_lines", ())) > len(b.get("failure_lines", ())):
            found.append(f"{name}: {a['failure_lines'][len(b['failure_lines'])]}")
    return found


def serves(cluster: Cluster, vocab: int) -> tuple[bool, str]:
    """A long prompt (prefill pool -> KV -> decode pool, both groups) and a short one are served."""
    client = RouterClient(cluster.router_address, api_key=cluster.api_key)
    try:
        for n in (200, 8):
            r = client.complete(token_ids=[(7 * i + 3) % vocab for i in range(n)], max_tokens=4)
            if len(r.token_ids) != 4:
                return False, f"prompt of {n}: {len(r.token_ids)} tokens"
        return True, "a 200-token and an 8-token prompt served (4 tokens each)"
    except Exception as e:  # noqa: BLE001 - reported
        return False, f"{type(e).__name__}: {e}"
    finally:
        client.close()


def run(args: argparse.Namespace) -> dict:
    work = pathlib.Path(tempfile.mkdtemp(prefix="mnemosyne-fuzz-"))
    model = small_model(work / "model")
    with Cluster(cluster_config(model, str(work / "logs"))) as cluster:
        target = fuzz.target_of(cluster.router_address, cluster.kvstore_address, cluster.api_key or "")
        addresses = {n: cluster.services[n].address for n in ("router", "prefill", "decode", "kvstore")}
        rpcs = [r for r in fuzz.all_rpcs() if not args.only or r.service in args.only.split(",")
                or r.name in args.only.split(",")]
        fuzzer = fuzz.Fuzzer(args.seed, target, rpcs)
        ok_before, _ = serves(cluster, target.vocab_size)
        before = processes(cluster)
        tally, t0, done, rss_trace = fuzz.Tally(), time.monotonic(), 0, []
        stopped_early = ""
        while done < args.requests:
            n = min(args.batch, args.requests - done)
            fuzz.run(addresses, fuzzer, range(done, done + n), deadline_s=args.deadline_s, workers=args.workers,
                     tally=tally)
            done += n
            now = processes(cluster)
            rss_trace.append({"requests": done, "seconds": round(time.monotonic() - t0, 1),
                              **{k: v.get("rss_mb") for k, v in now.items()}})
            print(f"{done} requests, {time.monotonic() - t0:.0f} s, {len(tally.problems)} problems, "
                  f"router RSS {now['router'].get('rss_mb')} MB", flush=True)
            dead = crashes(before, now)
            if dead:
                stopped_early = f"stopped: {dead}"
                break
            if args.time_limit_s and time.monotonic() - t0 > args.time_limit_s:
                stopped_early = f"stopped at the time limit ({args.time_limit_s} s)"
                break
        seconds = time.monotonic() - t0
        time.sleep(1.0)
        after = processes(cluster)
        ok_after, how = serves(cluster, target.vocab_size)
        return {
            "bench": "fuzz", "seed": args.seed, "only": args.only, "requests_planned": args.requests, "requests": tally.total,
            "stopped_early": stopped_early, "seconds": round(seconds, 1), "workers": args.workers,
            "deadline_s": args.deadline_s, "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform()},
            "layout": "kvstore + prefill (spp 1) + decode (kvp 2, M 128) + router with an API key, TCP KV, "
                      "a random 2-layer Llama", "serves_before": ok_before,
            "serves_after": ok_after, "serves_after_detail": how,
            "crashes": crashes(before, after),
            "hangs": [p for p in tally.problems if p["problem"].startswith("hang")],
            "wrong_status": [p for p in tally.problems if not p["problem"].startswith("hang")],
            "counts": tally.counts, "slowest_answer_s": round(tally.slowest_s, 2),
            "sample_details": {k: v for k, v in sorted(tally.samples.items()) if v},
            "processes_before": before, "processes_after": after, "rss_trace": rss_trace,
        }


def markdown(r: dict) -> str:
    codes = sorted({c for per in r["counts"].values() for c in per})
    what = f"the {r['only']} RPCs" if r.get("only") else "every RPC"
    lines = [f"# Fuzzing {what} ({r['requests']} requests, seed {r['seed']})", "",
             f"{r['layout']}; {r['workers']} client threads, deadline {r['deadline_s']} s per call; "
             f"{r['seconds']} s on {r['machine']['cpus']} CPUs.", ""]
    if r["stopped_early"]:
        lines += [f"**Stopped early**: {r['stopped_early']} (planned {r['requests_planned']}).", ""]
    lines += [f"- crashes: {len(r['crashes'])} {r['crashes'] or ''}",
              f"- hangs: {len(r['hangs'])}", f"- answers outside the contract: {len(r['wrong_status'])}",
              f"- serves a normal request afterwards: {r['serves_after']} ({r['serves_after_detail']})",
              f"- slowest answer: {r['slowest_answer_s']} s", "",
              "| RPC | " + " | ".join(codes) + " |", "|---|" + "---:|" * len(codes)]
    for name in sorted(r["counts"]):
        lines.append(f"| {name} | " + " | ".join(str(r["counts"][name].get(c, "")) for c in codes) + " |")
    lines += ["", "RSS (MB; children = grid workers) before -> after:", ""]
    for name, b in r["processes_before"].items():
        a = r["processes_after"].get(name, {})
        kids = f", children {b.get('children_rss_mb')} -> {a.get('children_rss_mb')}" if b.get("children") else ""
        lines.append(f"- {name}: {b.get('rss_mb')} -> {a.get('rss_mb')}{kids}")
    for name in ("router", "kvstore"):
        trace = ", ".join(f"{t[name]}" for t in r["rss_trace"])
        lines.append(f"- {name} RSS after each batch: {trace}")
    if r.get("note"):
        lines += ["", r["note"]]
    for p in (r["hangs"] + r["wrong_status"])[:30]:
        lines += ["", f"- `{p['problem'][:200]}`: {p['case'][:300]}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=500, help="requests between liveness and RSS checks")
    ap.add_argument("--deadline-s", type=float, default=30.0)
    ap.add_argument("--time-limit-s", type=float, default=0.0, help="stop after this long (0 = none)")
    ap.add_argument("--only", default="", help="fuzz only these services or RPCs (comma-separated, e.g. "
                    "Router or KVStore.Reserve,Decode.Decode)")
    ap.add_argument("--out", default=str(RESULTS / "fuzz"))
    args = ap.parse_args(argv)
    r = run(args)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out + ".json").write_text(json.dumps(r, indent=1) + "\n")
    pathlib.Path(args.out + ".md").write_text(markdown(r))
    print(markdown(r))
    return 0 if not (r["crashes"] or r["hangs"] or r["wrong_status"]) and r["serves_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
