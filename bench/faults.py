"""SIGKILLs each process kind of a real deployment mid-request and measures what the client gets,
what is left behind, and how long until the deployment serves again, with nobody stepping in.

    .venv/bin/python bench/faults.py --trials 5            # -> bench/results/faults.{json,md}

The deployment is `make up`'s (scripts/up.py's Cluster with its defaults: the built-in model, a
prefill instance of 2 SPP stages, a decode instance of 2 KVP groups, mutual TLS, a Redis password,
API keys) with make up's supervisor running in a thread (scripts/supervisor.py, its default policy);
only the lease is shorter (--lease-s, 3 s instead of 10) so that the leftovers can be checked sooner.
Prefix caching is on, as make up runs it: every trial sends a prompt no instance has seen (its first
token differs), so it takes the disaggregated route, and its right answer comes from the single-process
engine in this process; a retried request may find what its failed attempt computed in the prefill
instance's prefix cache (the trial records the cache hits: KV re-sent instead of computed again).

Per trial: a long prompt (prefill -> KV transfer -> decode) is sent; the fault strikes at a point of
the request (its `phase`: "prefill" at its first prefill progress event, "decode" after 3 streamed
tokens); the trial records
- the outcome: completed (and whether its tokens equal the fault-free answer) or the status code and
  message, the seconds from the fault to that outcome, and for a completed request the seconds the
  fault added to it (its time minus the same request's fault-free time, measured first);
- the seconds from the fault until a new request is served again (a short probe every 0.25 s from the
  fault on, beside the struck request: the decode instance serves it alone) and until both pools are
  registered again after one left (looked at as often);
- the leftovers lease_s + 2 s after the outcome: placements / leases in Redis, blocks the kvstore
  counts as reserved, decode KV blocks in use (its /metrics); and when they were all gone.

Kinds: prefill_worker, prefill_main, decode_worker (the worker of the decode instance's KVP group 0,
which holds the prompt's KV, struck while the KV arrives), decode_worker_decoding (the same worker,
struck while the request decodes), decode_main, kvstore, router, redis_kill (SIGKILL)
and redis_restart (SIGTERM: a clean shutdown; the supervisor starts it again). Trials run round-robin
over the kinds, so the supervisor sees one service fail at most every few minutes (as in production,
not a crash loop: its backoff would grow and its give-up count would be reached).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402

from common.client import RouterClient  # noqa: E402
from common.metadata.store import MetadataStore  # noqa: E402
from common.metrics import scrape, total  # noqa: E402
from common.rpc import client as rpc_client  # noqa: E402
from common.rpc.protos import router_pb2, router_pb2_grpc  # noqa: E402
from scripts.supervisor import Supervisor  # noqa: E402
from scripts.up import Cluster, ClusterConfig  # noqa: E402
from tests.fixtures.processes import grid_worker, grid_workers  # noqa: E402

RESULTS = ROOT / "bench" / "results"
KINDS = ("prefill_worker", "prefill_main", "decode_worker", "decode_worker_decoding", "decode_main", "kvstore",
         "router", "redis_kill", "redis_restart")
PHASE = {"prefill_worker": "prefill", "prefill_main": "prefill", "decode_worker": "prefill",
         "decode_worker_decoding": "decode", "decode_main": "prefill", "kvstore": "decode", "router": "decode",
         "redis_kill": "decode", "redis_restart": "decode"}
PROMPT = [(7 * i + 3) % 5000 + 100 for i in range(600)]      # long: the prefill instance's


def trial_prompt(n: int) -> list[int]:
    """The n-th trial's prompt: PROMPT with another first token, so no prefix block is shared with an
    earlier trial's (prefix caching stays on: the retry's reuse of its own attempt is measured)."""
    return [100 + (37 * n + 11) % 4800] + PROMPT[1:]


class Reference:
    """Fault-free answers from the single-process engine (the built-in model, make up's float32)."""

    def __init__(self) -> None:
        from common.config import EngineConfig
        from common.engine.engine import LLMEngine
        from common.model.tokenizer import load_tokenizer
        self.engine = LLMEngine(EngineConfig(dtype="float32"), extra_eos_ids=load_tokenizer(None).eos_token_ids)

    def tokens(self, prompt: list[int]) -> list[int]:
        from common.sampling_params import SamplingParams
        return list(self.engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS))[0].token_ids)
PROBE = [(5 * i + 1) % 3000 + 100 for i in range(16)]          # short: decoded by the decode instance
MAX_TOKENS = 24
SERVE_TIMEOUT_S = 180.0
PROBE_EVERY_S = 0.25
REFERENCE_RUNS = 3
OUTCOME_TIMEOUT_S = 180.0


def strike(cluster: Cluster, kind: str) -> int:
    """Delivers the fault; returns the pid it hit."""
    if kind == "prefill_worker":
        pid = grid_workers(cluster.services["prefill"].pid)[-1].pid
    elif kind in ("decode_worker", "decode_worker_decoding"):
        # KVP group 0's: the one holding the prompt's KV (M is half of max_model_len, so a prompt
        # shorter than that lives in group 0 alone; the worker of group 1 would cost it nothing)
        pid = grid_worker(cluster.services["decode"].pid, 1).pid
    elif kind in ("prefill_main", "decode_main"):
        pid = cluster.services[kind.split("_")[0]].pid
    elif kind in ("kvstore", "router"):
        pid = cluster.services[kind].pid
    else:
        pid = cluster.redis.pid
    os.kill(pid, signal.SIGTERM if kind == "redis_restart" else signal.SIGKILL)
    return pid


def serves(cluster: Cluster) -> bool:
    try:
        with RouterClient(cluster.router_address, timeout_s=20) as c:
            return len(c.complete(token_ids=PROBE, max_tokens=2).token_ids) == 2
    except (grpc.RpcError, OSError, Exception):  # noqa: BLE001 - anything short of an answer: not yet
        return False


def wait_serving(cluster: Cluster, timeout_s: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if serves(cluster):
            return time.monotonic()
        time.sleep(0.5)
    return None


def pools_registered(cluster: Cluster) -> bool:
    """Both pools are in the deployment (a rebuilding instance leaves it until it serves again)."""
    return cluster.registered_roles() >= {"prefill", "decode"}


def wait_pools(timeout_s: float, cluster: Cluster) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if pools_registered(cluster):
            return time.monotonic()
        time.sleep(0.5)
    return None


def leftovers(cluster: Cluster) -> dict:
    """What is held now: placements (= leases: the deadlines set) and placement records in Redis, the
    kvstore's reserved blocks, the decode workers' used KV blocks."""
    out: dict = {}
    store = MetadataStore(cluster.redis_url, deployment=cluster.config.deployment, password=cluster.redis_password,
                          timeout_s=2.0)
    try:
        out["leases"] = store.num_placements()
        out["placement_records"] = sum(1 for _ in store.redis.scan_iter(store._plc_prefix + "*"))
        out["reserved_blocks"] = sum(sum(i.reserved) for i in store.list_instances())
        out["decode_registered"] = len(store.list_instances("decode"))
    except Exception as e:  # noqa: BLE001 - Redis down: recorded as such
        out["redis_error"] = str(e)[:200]
    finally:
        store.close()
    try:
        url = cluster.metrics_urls.get("decode")
        out["decode_blocks_used"] = total(scrape(url, timeout_s=3.0), "mnemosyne_kv_blocks_used") if url else None
    except Exception as e:  # noqa: BLE001 - decode restarting
        out["decode_blocks_used"] = None
        out["decode_metrics_error"] = str(e)[:200]
    return out


def clean(left: dict) -> bool:
    return (left.get("leases") == 0 and left.get("placement_records") == 0 and left.get("reserved_blocks") == 0
            and left.get("decode_blocks_used") == 0)


class Prober:
    """From the fault on, beside the struck request, every PROBE_EVERY_S on threads of their own: a
    short probe request until one is served (`served_at`, time.monotonic()), and a look at the
    kvstore's registry until both pools are registered again after one left (`whole_at`; `left` says
    whether one was seen gone: a fault that takes no pool away leaves `whole_at` None). None when it
    did not happen within SERVE_TIMEOUT_S."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self.served_at, self.whole_at, self.left = cluster, None, None, False
        self.t0 = time.monotonic()
        self.threads = [threading.Thread(target=f, name=f"prober-{f.__name__}", daemon=True)
                        for f in (self._serve, self._registry)]
        for t in self.threads:
            t.start()

    def _serve(self) -> None:
        while time.monotonic() - self.t0 < SERVE_TIMEOUT_S:
            if serves(self.cluster):
                self.served_at = time.monotonic()
                return
            time.sleep(PROBE_EVERY_S)

    def _registry(self) -> None:
        while time.monotonic() - self.t0 < SERVE_TIMEOUT_S:
            whole = pools_registered(self.cluster)
            if not whole:
                self.left = True
            elif self.left:
                self.whole_at = time.monotonic()
                return
            elif self.served_at is not None and time.monotonic() - self.served_at > 5.0:
                return                     # served, and no pool left in the meantime: none will
            time.sleep(PROBE_EVERY_S)

    def result(self) -> tuple[float | None, float | None, bool]:
        for t in self.threads:
            t.join(SERVE_TIMEOUT_S + 30)
        return self.served_at, self.whole_at, self.left


def run_request(cluster: Cluster, rid: str, kind: str | None, prompt: list[int] = PROMPT) -> dict:
    """One request; `kind`: the fault to deliver at its PHASE point (None: none); a Prober starts at
    the fault (res["prober"])."""
    res: dict = {"request_id": rid, "tokens": [], "events": 0}
    t_kill = None
    t0 = time.monotonic()
    with rpc_client.blocking_channel(cluster.router_address, metadata=cluster.auth_metadata) as ch:
        call = router_pb2_grpc.RouterStub(ch).Generate(
            RouterClient.request(token_ids=prompt, max_tokens=MAX_TOKENS, request_id=rid), timeout=OUTCOME_TIMEOUT_S)
        try:
            for ev in call:
                res["events"] += 1
                if ev.HasField("delta"):
                    res["tokens"].extend(ev.delta.token_ids)
                if ev.HasField("started"):
                    res["route"] = router_pb2.Route.Name(ev.started.route)
                if kind is not None and t_kill is None:
                    at_prefill = ev.HasField("progress") or (ev.HasField("delta") and res["tokens"])
                    if (PHASE[kind] == "prefill" and at_prefill) or len(res["tokens"]) >= 3:
                        res["struck_after_tokens"] = len(res["tokens"])
                        res["pid"] = strike(cluster, kind)
                        t_kill = time.monotonic()
                        res["prober"] = Prober(cluster)
            res["outcome"] = "completed"
        except grpc.RpcError as e:
            res["outcome"] = e.code().name
            res["message"] = (e.details() or "")[:400]
    t_end = time.monotonic()
    res["seconds"] = round(t_end - t0, 3)
    res["t_kill"], res["t_end"] = t_kill, t_end
    return res


def prefill_cache_hits(cluster: Cluster) -> float | None:
    try:
        return total(scrape(cluster.metrics_urls["prefill"], timeout_s=3.0), "mnemosyne_prefix_cache_hit_tokens_total")
    except Exception:  # noqa: BLE001 - prefill restarting
        return None


def decode_kv_received(cluster: Cluster) -> float | None:
    """KV bytes the decode instance has received (its counter; None while it restarts)."""
    try:
        return total(scrape(cluster.metrics_urls["decode"], timeout_s=3.0), "mnemosyne_kv_transfer_bytes_total",
                     direction="recv")
    except Exception:  # noqa: BLE001 - decode restarting
        return None


def _delta(a: float | None, b: float | None) -> float | None:
    return b - a if a is not None and b is not None and b >= a else None


def trial(cluster: Cluster, kind: str, prompt: list[int], reference: list[int], lease_s: float,
          reference_s: float | None = None, reference_kv: float | None = None) -> dict:
    """`reference_s`: the fault-free request's served seconds (median), for `added_s`; `reference_kv`:
    the KV bytes the decode instance received for it, for `kv_received_x`."""
    # Every trial starts from a whole deployment (the previous fault's instance rebuilt and back in
    # its pool), so that the long prompt takes the disaggregated route.
    if wait_pools(SERVE_TIMEOUT_S, cluster) is None or wait_serving(cluster, SERVE_TIMEOUT_S) is None:
        return {"kind": kind, "skipped": "the deployment was not whole before the trial"}
    time.sleep(1.0)                                   # the probe's own cleanup
    hits0, kv0 = prefill_cache_hits(cluster), decode_kv_received(cluster)
    r = run_request(cluster, f"fault-{kind}-{uuid.uuid4().hex[:6]}", kind, prompt)
    t_kill, t_end, prober = r.pop("t_kill"), r.pop("t_end"), r.pop("prober", None)
    hits1, kv1 = prefill_cache_hits(cluster), decode_kv_received(cluster)
    # KV the decode instance received for the request and its retries (the same process before and
    # after; the probes beside it are decoded there alone), in units of the fault-free request's.
    kv = _delta(kv0, kv1)
    r["kv_received_x"] = round(kv / reference_kv, 2) if kv is not None and reference_kv else None
    # Tokens this prefill instance (the same process before and after) found cached: a retry's reuse.
    r["prefill_cache_hit_tokens"] = hits1 - hits0 if hits0 is not None and hits1 is not None and hits1 >= hits0 else None
    tokens = r.pop("tokens")
    out = {"kind": kind, "phase": PHASE[kind], **r, "completion_tokens": len(tokens),
           "correct": tokens == reference if r["outcome"] == "completed" else None}
    if t_kill is None:
        out["note"] = "the request ended before the fault point"
        return out
    out["outcome_after_s"] = round(t_end - t_kill, 3)
    if r["outcome"] == "completed" and reference_s is not None:
        out["added_s"] = round(r["seconds"] - reference_s, 3)     # what the fault cost the request
    t_serve, t_whole, left = prober.result()
    out["serves_again_after_s"] = round(t_serve - t_kill, 2) if t_serve is not None else None
    out["pool_left"] = left
    out["whole_again_after_s"] = round(t_whole - t_kill, 2) if t_whole is not None else None
    # Leftovers once the lease ran out: counted from the outcome, or from when a new request was served
    # if that came later (not from when the prober's threads ended: its registry watch lingers).
    due = max(t_end, t_serve if t_serve is not None else time.monotonic()) + lease_s + 2.0
    time.sleep(max(0.0, due - time.monotonic()))
    out["leftovers"] = left = leftovers(cluster)
    deadline = time.monotonic() + 30.0
    while not clean(left) and time.monotonic() < deadline:
        time.sleep(0.5)
        left = leftovers(cluster)
    out["clean_after_s"] = round(time.monotonic() - t_kill, 2) if clean(left) else None
    if not clean(left):
        out["leftovers_30s_later"] = left
    return out


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args: argparse.Namespace) -> dict:
    work = pathlib.Path(tempfile.mkdtemp(prefix="faults-bench-"))
    cfg = ClusterConfig(router_port=0, http_port=-1, lease_s=args.lease_s, log_dir=str(work / "logs"),
                        deployment=f"faults-{uuid.uuid4().hex[:8]}")
    kinds = [k for k in KINDS if not args.kinds or k in args.kinds]
    # the trials' prompts, then one per round for its fault-free reference, then the start's references
    prompts = [trial_prompt(n) for n in range(args.trials * (len(kinds) + 1) + REFERENCE_RUNS)]
    oracle = Reference()
    answers = [oracle.tokens(p) for p in prompts]
    t_start = time.monotonic()
    with Cluster(cfg) as cluster:
        supervisor = Supervisor(cluster, standby=cluster.config.standby)   # make up's, with its defaults
        stop = threading.Event()
        thread = threading.Thread(target=supervisor.run, args=(stop,), name="supervisor", daemon=True)
        thread.start()
        try:
            # Fault-free, each on a prompt of its own (no cache hit): the deployment agrees with the
            # engine, and the served request's time is what a fault's added seconds are counted from.
            ref_s = []
            for k in range(1, REFERENCE_RUNS + 1):
                ref = run_request(cluster, f"reference-{k}", None, prompts[-k])
                assert ref["outcome"] == "completed" and ref["tokens"] == answers[-k], (ref, answers[-k])
                ref_s.append(ref["seconds"])
            reference_s = statistics.median(ref_s)
            trials, round_ref_s = [], []
            for i in range(args.trials):
                # This machine's speed drifts within a run (a fault-free request took 5.9 s at one hour
                # and 6.8 s at the next): each round measures its own fault-free request, and a fault's
                # added seconds are counted from the one of its round.
                n = args.trials * len(kinds) + i
                round_s = round_kv = None
                if wait_pools(SERVE_TIMEOUT_S, cluster) is not None and wait_serving(cluster, SERVE_TIMEOUT_S) is not None:
                    time.sleep(1.0)
                    kv0 = decode_kv_received(cluster)
                    ref = run_request(cluster, f"reference-round-{i}", None, prompts[n])
                    if ref["outcome"] == "completed" and ref["tokens"] == answers[n]:
                        round_s, round_kv = ref["seconds"], _delta(kv0, decode_kv_received(cluster))
                round_ref_s.append(round_s)
                for j, kind in enumerate(kinds):
                    n = i * len(kinds) + j
                    try:
                        t = trial(cluster, kind, prompts[n], answers[n], cfg.lease_s,
                                  round_s if round_s is not None else reference_s, round_kv)
                    except Exception as e:  # noqa: BLE001 - one broken trial must not lose the others
                        t = {"kind": kind, "bench_error": f"{type(e).__name__}: {e}"[:400]}
                    t["round"], t["load"], t["round_reference_s"] = i, load(), round_s
                    trials.append(t)
                    print(json.dumps(t), flush=True)
                    if args.partial:
                        pathlib.Path(args.partial).write_text(json.dumps(trials, indent=1) + "\n")
        finally:
            stop.set()
            thread.join(60)
        restarts = dict(supervisor.restarts)
        gave_up = supervisor.gave_up
    return {"config": {"trials_per_kind": args.trials, "lease_s": cfg.lease_s, "kv_backend": cluster.config.kv_backend,
                       "secure": not cfg.insecure, "model": "built-in", "prompt_tokens": len(PROMPT),
                       "max_tokens": MAX_TOKENS, "prefill_spp": cfg.prefill_spp, "decode_kvp": cfg.decode_kvp},
            "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform(), "load_at_end": load()},
            "reference_seconds": reference_s, "reference_runs": ref_s, "round_reference_runs": round_ref_s,
            "seconds": round(time.monotonic() - t_start, 1),
            "supervisor_restarts": restarts, "supervisor_gave_up": gave_up, "trials": trials}


def _median(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    return f"{statistics.median(xs):.1f}" if xs else "-"


def _median2(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    return f"{statistics.median(xs):.2f}" if xs else "-"


def _whole(ts: list[dict]) -> str:
    if not any(t.get("pool_left", True) for t in ts):
        return "stayed"
    return _median([t.get("whole_again_after_s") for t in ts if t.get("pool_left", True)])


def _ref(r: dict) -> str:
    runs = r.get("reference_runs")
    return f"{r['reference_seconds']:.1f}" + (f" ({', '.join(f'{x:.1f}' for x in runs)})" if runs else "")


def _rounds(r: dict) -> str:
    runs = r.get("round_reference_runs")
    if not runs:
        return ""
    return ("; each round's own fault-free run, before its faults: "
            + ", ".join("-" if x is None else f"{x:.1f}" for x in runs) + " s")


def markdown(r: dict, json_name: str = "faults.json") -> str:
    c = r["config"]
    lines = ["# Faults: SIGKILL of each process kind mid-request", "",
             f"`bench/faults.py`, {c['trials_per_kind']} trial(s) per kind, round-robin; make up's deployment "
             f"({c['model']} model, prefill SPP {c['prefill_spp']}, decode KVP {c['decode_kvp']}, KV over "
             f"{c['kv_backend']}, {'mutual TLS + Redis password + API key' if c['secure'] else 'insecure'}) with "
             f"make up's supervisor; lease {c['lease_s']} s; a {c['prompt_tokens']}-token prompt, {c['max_tokens']} "
             f"tokens. {r['machine']['cpus']} CPUs shared with other work; load average at the end "
             f"{r['machine']['load_at_end']}. {r['seconds']} s in all.", "",
             f"The same request without a fault takes {_ref(r)} s served (median of its fault-free runs, each "
             "on a prompt of its own)" + _rounds(r) + ".", "",
             "Columns: outcome counts; median seconds from the fault to the client's outcome; median seconds "
             "the fault added to a completed request (its time minus the fault-free one's, of its round when "
             "rounds measured one); median seconds "
             "from the fault until a new request is served (a short probe every 0.25 s from the fault on, "
             "beside the struck request) and until both pools are registered again after one left (looked at as "
             "often; `stayed`: no pool left the registry); trials with nothing left (no lease, placement, reserved or used "
             "decode block) lease + 2 s after the outcome; median seconds from the fault until nothing was left; "
             "median prompt tokens the prefill instance found in its prefix cache during the trial (a retry "
             "re-sending what its failed attempt computed; - when the prefill instance itself restarted); median "
             "KV bytes the decode instance received during the trial, in units of its round's fault-free "
             "request's (1.0: the prompt's KV once; - when the decode instance itself restarted).",
             "Fault at: `prefill` = at the request's first prefill progress event, or at its first token when "
             "the prefill sent none (adaptive chunking may take a short prompt in one chunk); `decode` = after 3 "
             "streamed tokens; the column says where it struck (tokens already streamed, median).",
             "", "| kind | fault at | struck after tokens | outcomes | to outcome (s) | added (s) | serves again (s) | "
             "both pools back (s) | clean after lease | clean after (s) | prefill cache hits (tokens) | "
             "decode KV received (x) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        ts = [t for t in r["trials"] if t["kind"] == kind and "outcome" in t]
        if not ts:
            continue
        counts: dict[str, int] = {}
        for t in ts:
            key = ("completed, correct" if t["correct"] else "completed, WRONG tokens") \
                if t["outcome"] == "completed" else t["outcome"]
            counts[key] = counts.get(key, 0) + 1
        clean_n = sum(1 for t in ts if t.get("leftovers") and clean(t["leftovers"]))
        lines.append(f"| {kind} | {PHASE[kind]} | {_median([t.get('struck_after_tokens') for t in ts])} | "
                     f"{', '.join(f'{v}x {k}' for k, v in counts.items())} | "
                     f"{_median([t.get('outcome_after_s') for t in ts])} | "
                     f"{_median([t.get('added_s') for t in ts])} | "
                     f"{_median([t.get('serves_again_after_s') for t in ts])} | "
                     f"{_whole(ts)} | {clean_n}/{len(ts)} | "
                     f"{_median([t.get('clean_after_s') for t in ts])} | "
                     f"{_median([t.get('prefill_cache_hit_tokens') for t in ts])} | "
                     f"{_median2([t.get('kv_received_x') for t in ts])} |")
    lines += ["", "Messages the client got (one per kind and status):", ""]
    seen = set()
    for t in r["trials"]:
        if t.get("message") and (t["kind"], t["outcome"]) not in seen:
            seen.add((t["kind"], t["outcome"]))
            lines.append(f"- {t['kind']}: {t['outcome']}: {t['message']}")
    lines += ["", f"Supervisor restarts: {r['supervisor_restarts']}; gave up: {r['supervisor_gave_up']}.",
              "", f"Raw per-trial data: `{json_name}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5, help="trials per kind")
    ap.add_argument("--lease-s", type=float, default=3.0)
    ap.add_argument("--kinds", nargs="*", choices=KINDS, help="only these kinds (default: all)")
    ap.add_argument("--out", default=str(RESULTS / "faults"), help="results path without extension")
    ap.add_argument("--partial", default="", help="also write the trials so far to this file after each one")
    args = ap.parse_args(argv)
    r = run(args)
    pathlib.Path(args.out + ".json").write_text(json.dumps(r, indent=1) + "\n")
    md = markdown(r, pathlib.Path(args.out).name + ".json")
    pathlib.Path(args.out + ".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
