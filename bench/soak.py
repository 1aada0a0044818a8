"""A soak run: `make up`'s deployment under steady load at a fraction of its measured capacity, with
random client cancellations, for a long time; does anything grow or leak?

    .venv/bin/python -m bench.soak --minutes 30 --load 0.8      # -> bench/results/soak.{json,md}

The deployment is scripts/up.py's Cluster at make up's defaults (the built-in model, a prefill
instance of 2 SPP stages, a decode instance of 2 KVP groups, TLS, API keys), with make up's supervisor;
only the lease is shorter (--lease-s) so that leftovers can be checked soon after the end.

1. Capacity: `--clients` closed-loop clients send the workload back to back for `--capacity-s`;
   capacity = requests completed per second.
2. Soak: Poisson arrivals at `--load` x capacity for `--minutes`, on one shared channel. The workload
   (fixed seed): prompts of 32-200 tokens (decoded where they are prefilled) and a `--long-share` of
   512-1,024-token prompts (prefill pool -> KV transfer -> decode), `--max-tokens` each, the deployment's
   default SLOs. A `--cancel-share` of the requests is cancelled by the client at a random moment in
   their first 2 s (before, during or after the first token).
3. Every `--sample-s`: the resident memory (RSS) of every process of the deployment (each service's
   main process and its grid workers), the decode workers' KV blocks in use, the placements in Redis,
   and the window's outcomes: completed, completed within their TTFT SLO, rejected by admission
   (RESOURCE_EXHAUSTED), cancelled, other errors.
4. After the load: the requests in flight finish, then the lease runs out; nothing may be left
   (placements, leases, reserved blocks, used blocks: bench/faults.py's `leftovers`).

Reported: RSS per process at the first sample after the warm-up (the first `--warmup-minutes`) and
its maximum after it (flat = within 10%); goodput (completed within SLO per second) per window and its
spread; leftovers; every error that is not admission's.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402

from bench.faults import clean, leftovers, load  # noqa: E402
from common.client import RouterClient  # noqa: E402
from common.rpc import client as rpc_client  # noqa: E402
from common.rpc.protos import router_pb2_grpc  # noqa: E402
from common.rpc.status import retry_after_s  # noqa: E402
from scripts.supervisor import Supervisor  # noqa: E402
from scripts.up import Cluster, ClusterConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def workload(seed: int, long_share: float):
    """An endless stream of (prompt ids, kind) from a fixed seed."""
    rng = random.Random(seed)
    i = 0
    while True:
        i += 1
        long = rng.random() < long_share
        n = rng.randint(512, 1024) if long else rng.randint(32, 200)
        start = rng.randrange(5000)
        yield [(start + 7 * j) % 5000 + 100 for j in range(n)], "long" if long else "short"


class Tally:
    """Outcomes of the requests that ended in the current window (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.window: dict[str, int] = {}
        self.errors: list[str] = []
        self.in_flight = 0

    def add(self, key: str, error: str | None = None) -> None:
        with self.lock:
            self.window[key] = self.window.get(key, 0) + 1
            if error is not None and len(self.errors) < 50:
                self.errors.append(error)

    def take(self) -> dict[str, int]:
        with self.lock:
            out, self.window = self.window, {}
            return out


def one(stub, ids: list[int], max_tokens: int, cancel_after_s: float | None, tally: Tally,
        timeout_s: float) -> float | None:
    """One request; outcome into `tally`: ok_slo | ok_late | rejected | cancelled | error:<CODE>.
    Returns the retry hint of a rejection (seconds; 0.5 when it gave none), else None."""
    with tally.lock:
        tally.in_flight += 1
    t0 = time.monotonic()
    call = stub.Generate(RouterClient.request(token_ids=ids, max_tokens=max_tokens), timeout=timeout_s)
    timer = threading.Timer(cancel_after_s, call.cancel) if cancel_after_s is not None else None
    if timer is not None:
        timer.start()
    slo = ttft = None
    try:
        for ev in call:
            if ev.HasField("started") and ev.started.HasField("ttft_slo_s"):
                slo = ev.started.ttft_slo_s
            if ev.HasField("delta") and ev.delta.token_ids and ttft is None:
                ttft = time.monotonic() - t0
        tally.add("ok_slo" if ttft is not None and (slo is None or ttft <= slo) else "ok_late")
    except grpc.RpcError as e:
        code = e.code()
        if code is grpc.StatusCode.CANCELLED and timer is not None:
            tally.add("cancelled")
        elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            tally.add("rejected")
            return retry_after_s(e) or 0.5
        else:
            tally.add(f"error:{code.name}", f"{code.name}: {(e.details() or '')[:200]}")
    finally:
        if timer is not None:
            timer.cancel()
        with tally.lock:
            tally.in_flight -= 1
    return None


def processes(cluster: Cluster) -> dict[str, list[psutil.Process]]:
    """Every process of the deployment by service: its main process and its descendants."""
    out: dict[str, list[psutil.Process]] = {}
    mains = {name: svc.pid for name, svc in cluster.services.items()}
    if getattr(cluster, "redis", None) is not None:
        mains["redis"] = cluster.redis.pid
    for name, pid in mains.items():
        try:
            p = psutil.Process(pid)
            out[name] = [p] + p.children(recursive=True)
        except psutil.NoSuchProcess:
            out[name] = []
    return out


def rss_mib(cluster: Cluster) -> dict[str, float]:
    """RSS (MiB) of each process, keyed service:main or service:worker<i>."""
    out: dict[str, float] = {}
    for name, procs in processes(cluster).items():
        for i, p in enumerate(procs):
            try:
                out[f"{name}:{'main' if i == 0 else f'child{i}'}"] = round(p.memory_info().rss / 2**20, 1)
            except psutil.NoSuchProcess:
                pass
    return out


def capacity(stub, args, gen) -> float:
    """Requests completed per second by `args.clients` closed-loop clients over args.capacity_s."""
    tally = Tally()
    stop = time.monotonic() + args.capacity_s
    lock = threading.Lock()

    def client() -> None:
        while time.monotonic() < stop:
            with lock:
                ids, _ = next(gen)
            retry = one(stub, ids, args.max_tokens, None, tally, args.timeout_s)
            if retry is not None:                 # rejected: back off as the router asks
                time.sleep(min(retry, 5.0))

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.capacity_s + args.timeout_s + 30)
    seen = tally.take()
    done = seen.get("ok_slo", 0) + seen.get("ok_late", 0)
    print(f"capacity probe: {seen} in {time.monotonic() - t0:.1f} s", flush=True)
    return done / (time.monotonic() - t0)


def run(args: argparse.Namespace) -> dict:
    work = pathlib.Path(tempfile.mkdtemp(prefix="soak-bench-"))
    cfg = ClusterConfig(router_port=0, http_port=-1, lease_s=args.lease_s, log_dir=str(work / "logs"),
                        deployment=f"soak-{uuid.uuid4().hex[:8]}")
    gen = workload(args.seed, args.long_share)
    rng = random.Random(args.seed + 1)
    t_start = time.monotonic()
    with Cluster(cfg) as cluster:
        supervisor = Supervisor(cluster, standby=cluster.config.standby)
        stop_sup = threading.Event()
        sup = threading.Thread(target=supervisor.run, args=(stop_sup,), name="supervisor", daemon=True)
        sup.start()
        try:
            with rpc_client.blocking_channel(cluster.router_address, metadata=cluster.auth_metadata) as ch:
                grpc.channel_ready_future(ch).result(timeout=60)
                stub = router_pb2_grpc.RouterStub(ch)
                cap = capacity(stub, args, gen)
                rate = args.load * cap
                print(f"capacity {cap:.3f} req/s; soak at {rate:.3f} req/s for {args.minutes} min", flush=True)
                tally = Tally()
                samples: list[dict] = []
                pool = ThreadPoolExecutor(max_workers=256)
                t0 = time.monotonic()
                end = t0 + 60 * args.minutes
                next_arrival = t0 + rng.expovariate(rate)
                next_sample = t0 + args.sample_s
                offered = 0
                while time.monotonic() < end:
                    now = time.monotonic()
                    if now >= next_sample:
                        left = leftovers(cluster)
                        s = {"t_s": round(now - t0, 1), "outcomes": tally.take(), "in_flight": tally.in_flight,
                             "offered": offered, "rss_mib": rss_mib(cluster), "load": load(),
                             "decode_blocks_used": left.get("decode_blocks_used"), "placements": left.get("leases")}
                        samples.append(s)
                        offered = 0
                        print(json.dumps({k: v for k, v in s.items() if k != "rss_mib"}), flush=True)
                        next_sample += args.sample_s
                    if now >= next_arrival:
                        ids, _ = next(gen)
                        cancel = rng.uniform(0.0, 2.0) if rng.random() < args.cancel_share else None
                        pool.submit(one, stub, ids, args.max_tokens, cancel, tally, args.timeout_s)
                        offered += 1
                        next_arrival += rng.expovariate(rate)
                    time.sleep(max(0.0, min(next_arrival, next_sample) - time.monotonic()))
                pool.shutdown(wait=True)
                tail = tally.take()
            t_end = time.monotonic()
            time.sleep(cfg.lease_s + 2.0)
            left = leftovers(cluster)
            deadline = time.monotonic() + 30.0
            while not clean(left) and time.monotonic() < deadline:
                time.sleep(0.5)
                left = leftovers(cluster)
            final_rss = rss_mib(cluster)
        finally:
            stop_sup.set()
            sup.join(60)
    return {"config": {**{k: v for k, v in vars(args).items() if k != "out"}, "model": "built-in",
                       "prefill_spp": cfg.prefill_spp, "decode_kvp": cfg.decode_kvp},
            "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform(), "load_at_end": load()},
            "capacity_rps": round(cap, 4), "rate_rps": round(rate, 4), "samples": samples, "tail": tail,
            "final_rss_mib": final_rss, "leftovers": left, "clean": clean(left),
            "clean_after_s": round(time.monotonic() - t_end, 1) if clean(left) else None,
            "errors": tally.errors, "supervisor_restarts": dict(supervisor.restarts),
            "seconds": round(time.monotonic() - t_start, 1)}


def summarize(r: dict, warmup_minutes: float) -> dict:
    after = [s for s in r["samples"] if s["t_s"] >= 60 * warmup_minutes] or r["samples"]
    base = after[0]["rss_mib"]
    growth = {}
    for proc, first in base.items():
        peak = max(s["rss_mib"].get(proc, 0.0) for s in after)
        growth[proc] = {"first_mib": first, "max_mib": peak, "growth": round(peak / first - 1.0, 3) if first else None}
    goodput = [s["outcomes"].get("ok_slo", 0) / r["config"]["sample_s"] for s in after]
    totals: dict[str, int] = {}
    for s in r["samples"]:
        for k, v in s["outcomes"].items():
            totals[k] = totals.get(k, 0) + v
    for k, v in r["tail"].items():
        totals[k] = totals.get(k, 0) + v
    return {"rss": growth, "max_rss_growth": max((g["growth"] for g in growth.values() if g["growth"] is not None),
                                                 default=None),
            "goodput_rps": {"median": round(statistics.median(goodput), 4) if goodput else None,
                            "min": round(min(goodput), 4) if goodput else None,
                            "max": round(max(goodput), 4) if goodput else None},
            "outcomes": totals}


def markdown(r: dict, s: dict) -> str:
    c = r["config"]
    lines = [f"# Soak: {c['minutes']} minutes at {c['load']:.0%} of measured capacity", "",
             f"make up's deployment (built-in model, prefill spp {c['prefill_spp']}, decode kvp {c['decode_kvp']}, "
             f"TLS, API keys, supervisor on; lease {c['lease_s']} s). Workload (seed {c['seed']}): prompts of 32-200 "
             f"tokens and {c['long_share']:.0%} of 512-1,024 tokens, {c['max_tokens']} new tokens, default SLOs; "
             f"{c['cancel_share']:.0%} cancelled by the client within their first 2 s. Capacity "
             f"({c['clients']} closed-loop clients, {c['capacity_s']:.0f} s): {r['capacity_rps']:.3f} req/s; soak at "
             f"{r['rate_rps']:.3f} req/s (Poisson). {r['machine']['cpus']} CPUs, load at end "
             f"{r['machine']['load_at_end']}; {r['seconds']:.0f} s in all.", "",
             f"- Outcomes: {s['outcomes']}",
             f"- Goodput (completed within their TTFT SLO, per second, per {c['sample_s']:.0f} s window after "
             f"{c['warmup_minutes']} min of warm-up): median {s['goodput_rps']['median']}, min "
             f"{s['goodput_rps']['min']}, max {s['goodput_rps']['max']}",
             f"- Leftovers {c['lease_s'] + 2:.0f} s after the last request: {r['leftovers']} -> "
             f"{'clean' if r['clean'] else 'NOT clean'}",
             f"- Largest RSS growth after the warm-up: {s['max_rss_growth']:.1%} (target: within 10%)"
             if s["max_rss_growth"] is not None else "- RSS: no samples",
             f"- Supervisor restarts: {r['supervisor_restarts'] or 'none'}",
             f"- Errors other than admission's: {r['errors'] or 'none'}", "",
             "| process | RSS after warm-up MiB | max MiB | growth |", "|---|---:|---:|---:|"]
    for proc, g in sorted(s["rss"].items()):
        growth = "-" if g["growth"] is None else f"{g['growth']:.1%}"
        lines.append(f"| {proc} | {g['first_mib']} | {g['max_mib']} | {growth} |")
    lines += ["", "| t s | offered | completed in SLO | late | rejected | cancelled | errors | in flight | "
                  "decode blocks used | placements | load |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in r["samples"]:
        o = x["outcomes"]
        errs = sum(v for k, v in o.items() if k.startswith("error:"))
        lines.append(f"| {x['t_s']:.0f} | {x['offered']} | {o.get('ok_slo', 0)} | {o.get('ok_late', 0)} | "
                     f"{o.get('rejected', 0)} | {o.get('cancelled', 0)} | {errs} | {x['in_flight']} | "
                     f"{x['decode_blocks_used']} | {x['placements']} | {x['load']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity offered")
    p.add_argument("--capacity-s", type=float, default=90.0)
    p.add_argument("--clients", type=int, default=4, help="closed-loop clients of the capacity probe")
    p.add_argument("--long-share", type=float, default=0.1)
    p.add_argument("--cancel-share", type=float, default=0.1)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--sample-s", type=float, default=60.0)
    p.add_argument("--warmup-minutes", type=float, default=3.0)
    p.add_argument("--lease-s", type=float, default=3.0)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="soak", help="results name in bench/results")
    args = p.parse_args(argv)
    r = run(args)
    s = summarize(r, args.warmup_minutes)
    r["summary"] = s
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(r, indent=1) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(r, s))
    print(markdown(r, s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
