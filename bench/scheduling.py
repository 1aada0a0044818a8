"""Scheduling benchmark: LARS + adaptive chunking vs FCFS + fixed chunks, on the built-in model.

One mixed workload (mostly short prompts, a few long ones, Poisson arrivals; fixed seed) is replayed in
real time through the real engine, `--rounds` times per configuration, in alternating order (A B B A:
a drift of the shared machine's background load then favours neither; --concurrent runs both at the
same time in two processes instead):
  fcfs-fixed     FCFS, fixed 256-token chunks, 256 tokens per iteration (a Sarathi-style token budget)
  lars-adaptive  LARS order (slack / total predicted work), adaptive chunks sized by the calibrated
                 performance model so that every iteration fits the decode TBT SLO (decode role)
Measured per configuration: short-request TTFT p50/p99, decode TBT p50/p99 (every gap between two
tokens of a request), SLO attainment (TTFT within its SLO; TBT gaps within the TBT SLO; requests
meeting both), and the performance model's error on the live iterations.

The performance model is calibrated first (common/engine/profile.py; reused from the cache when this
machine, model, dtype and thread count were profiled before) and its held-out error is written to
bench/results/perf_model.json. Torch runs with one thread (--threads): on a 2-core machine shared with
other jobs, two intra-op threads wait for each other in every kernel and make timings erratic.

Writes bench/results/scheduling.json, scheduling.md and perf_model.json.
Run: PYTHONPATH=. python -m bench.scheduling [--quick] [--rounds N] [--concurrent] [--reprofile]
     [--profile-only]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import logging
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.engine.profile import ProfileSpec, calibrate
from common.model.loader import load_checkpoint
from common.perf_model.calibrated import CalibratedModel, held_out_error
from common.perf_model.online import OnlineCorrection
from common.sampling_params import SamplingParams

log = logging.getLogger("bench.scheduling")
RESULTS = Path(__file__).resolve().parent / "results"
PROFILE_SPEC = ProfileSpec(chunk_sizes=(32, 64, 128, 256), contexts=(0, 512, 1024, 2048),
                           decode_sizes=(1, 2, 4, 8), decode_contexts=(64, 512, 1024, 2048),
                           num_prefill=16, num_decode=12, num_mixed=20, repeats=3, warmup=1,
                           holdout=0.25)


@dataclass(frozen=True)
class Workload:
    seed: int = 0
    num_short: int = 24
    short_prompt: tuple[int, int] = (64, 256)
    short_output: tuple[int, int] = (8, 20)
    rate_per_s: float = 0.5              # Poisson arrivals of the short requests
    long_prompts: tuple[int, ...] = (2000, 1800)
    long_arrivals_s: tuple[float, ...] = (2.0, 14.0)
    long_output: int = 4
    ttft_slo_short_s: float = 4.0
    ttft_slo_long_s: float = 120.0
    tbt_slo_s: float = 0.6
    fixed_chunk: int = 256
    time_limit_s: float = 150.0          # per replay; unfinished requests are aborted

    def requests(self, vocab: int) -> list[dict]:
        rng = random.Random(self.seed)
        out, t = [], 0.0
        for i in range(self.num_short):
            t += rng.expovariate(self.rate_per_s)
            out.append(dict(id=f"s{i}", arrival_s=round(t, 3), long=False,
                            prompt=[rng.randrange(100, vocab)
                                    for _ in range(rng.randint(*self.short_prompt))],
                            max_tokens=rng.randint(*self.short_output), ttft_slo_s=self.ttft_slo_short_s))
        for i, (n, at) in enumerate(zip(self.long_prompts, self.long_arrivals_s)):
            out.append(dict(id=f"L{i}", arrival_s=at, long=True,
                            prompt=[rng.randrange(100, vocab) for _ in range(n)],
                            max_tokens=self.long_output, ttft_slo_s=self.ttft_slo_long_s))
        return sorted(out, key=lambda r: r["arrival_s"])


QUICK = Workload(num_short=6, short_prompt=(32, 96), short_output=(3, 6), rate_per_s=2.0,
                 long_prompts=(600,), long_arrivals_s=(0.5,), time_limit_s=90.0)


def configs(w: Workload) -> dict[str, SchedulerConfig]:
    return {
        "fcfs-fixed": SchedulerConfig(policy="fcfs", chunking="fixed", chunk_size=w.fixed_chunk,
                                      max_batch_tokens=w.fixed_chunk),
        "lars-adaptive": SchedulerConfig(policy="lars", chunking="adaptive", role="decode",
                                         tbt_slo_s=w.tbt_slo_s, min_chunk=32, max_chunk=2048,
                                         long_threshold=1024, max_batch_tokens=8192),
    }


@dataclass
class Trace:
    arrival: float
    tokens: list[float] = field(default_factory=list)


def replay(checkpoint, sched: SchedulerConfig, w: Workload, reqs: list[dict], model: CalibratedModel,
           max_len: int) -> dict:
    """Replays the workload in real time; returns per-request token times and per-iteration times."""
    cfg = EngineConfig(max_model_len=max_len, cache=CacheConfig(max_kv_tokens=16384, prefix_caching=False),
                       scheduler=sched)                 # (no prefix caching: runs repeat the workload's prompts)
    engine = LLMEngine(cfg, checkpoint, perf_model=OnlineCorrection(model))
    schedule, last = engine.scheduler.schedule, {}

    def recording_schedule():
        last["out"] = schedule()
        return last["out"]

    engine.scheduler.schedule = recording_schedule
    traces: dict[str, Trace] = {}
    iterations = []                       # (measured s, predicted s, BatchShape)
    pending = list(reqs)
    t0 = time.monotonic()
    while pending or engine.has_unfinished():
        now = time.monotonic()
        if now - t0 > w.time_limit_s:
            log.warning("time limit: aborting %d requests", len(engine.scheduler.requests))
            for rid in list(engine.scheduler.requests):
                engine.abort(rid)
            break
        while pending and t0 + pending[0]["arrival_s"] <= now:
            r = pending.pop(0)
            arrival = t0 + r["arrival_s"]
            params = SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True)
            rid = engine.add_request(r["prompt"], params, r["id"], arrival_s=arrival,
                                     ttft_deadline_s=arrival + r["ttft_slo_s"], tbt_slo_s=w.tbt_slo_s)
            traces[rid] = Trace(arrival)
            engine.subscribe(rid, lambda ev: traces[ev.request_id].tokens.append(time.monotonic())
                             if ev.token_id is not None else None)
        if not engine.has_unfinished():
            time.sleep(max(0.0, t0 + pending[0]["arrival_s"] - time.monotonic()))
            continue
        start = time.monotonic()
        outs = engine.step()
        took = time.monotonic() - start
        out = last["out"]
        if out.items:
            iterations.append((took, out.predicted_s, out.batch))
        elif not outs:
            time.sleep(0.005)
    return dict(traces=traces, iterations=iterations, wall_s=time.monotonic() - t0)


def run_one(name: str, sched: SchedulerConfig, w: Workload, reqs: list[dict], model: CalibratedModel,
            max_len: int, threads: int, checkpoint=None, barrier=None) -> dict:
    """Loads the model (unless given), waits for the other replay (barrier, concurrent mode), replays."""
    torch.set_num_threads(threads)
    checkpoint = checkpoint or load_checkpoint(None)
    if barrier is not None:
        barrier.wait()
    loadavg = round(os.getloadavg()[0], 2)
    log.info("running %s (%d requests, load average %.1f)", name, len(reqs), loadavg)
    run = replay(checkpoint, sched, w, reqs, model, max_len)
    run["loadavg_at_start"] = loadavg
    log.info("%s done in %.0f s", name, run["wall_s"])
    return run


def _child(name, sched, w, reqs, model, max_len, threads, barrier, queue) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        queue.put((name, run_one(name, sched, w, reqs, model, max_len, threads, barrier=barrier)))
    except BaseException as e:                    # reported by the parent, which fails the run
        barrier.abort()
        queue.put((name, {"error": repr(e)}))


def run_concurrently(cfgs: dict[str, SchedulerConfig], w: Workload, reqs: list[dict],
                     model: CalibratedModel, max_len: int, threads: int) -> dict[str, dict]:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(len(cfgs)), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(n, c, w, reqs, model, max_len, threads, barrier, queue),
                         name=f"bench-{n}") for n, c in cfgs.items()]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=w.time_limit_s + 600) for _ in procs)
    for p in procs:
        p.join(30)
    failed = {n: r["error"] for n, r in results.items() if "error" in r}
    if failed:
        raise RuntimeError(f"replay failed: {failed}")
    return results


def run_all(cfgs: dict[str, SchedulerConfig], w: Workload, reqs: list[dict], model: CalibratedModel,
            max_len: int, threads: int, rounds: int, concurrent: bool) -> dict[str, list[dict]]:
    """Runs of each configuration. Sequential rounds alternate the order (A B, B A, ...) so that a
    slow drift of the machine's load does not favour one configuration."""
    runs: dict[str, list[dict]] = {n: [] for n in cfgs}
    checkpoint = None if concurrent else load_checkpoint(None)
    for r in range(rounds):
        if concurrent:
            for n, run in run_concurrently(cfgs, w, reqs, model, max_len, threads).items():
                runs[n].append(run)
            continue
        names = list(cfgs) if r % 2 == 0 else list(reversed(cfgs))
        for n in names:
            runs[n].append(run_one(n, cfgs[n], w, reqs, model, max_len, threads, checkpoint))
    return runs


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summarize(runs: list[dict], reqs: list[dict], w: Workload) -> dict:
    """Pools the requests, TBT gaps and iterations of all runs (rounds) of one configuration."""
    by_id = {r["id"]: r for r in reqs}
    ttft_short, ttft_long, gaps, rows = [], [], [], []
    met_ttft = met_both = done = 0
    tbt_ok = tbt_all = 0
    traces = [(i, rid, tr) for i, run in enumerate(runs) for rid, tr in run["traces"].items()]
    for round_, rid, tr in traces:
        r = by_id[rid]
        finished = len(tr.tokens) == r["max_tokens"]
        done += finished
        ttft = tr.tokens[0] - tr.arrival if tr.tokens else None
        g = [b - a for a, b in zip(tr.tokens, tr.tokens[1:])]
        gaps += g
        tbt_ok += sum(x <= w.tbt_slo_s for x in g)
        tbt_all += len(g)
        ok_ttft = ttft is not None and ttft <= r["ttft_slo_s"]
        ok_both = ok_ttft and finished and all(x <= w.tbt_slo_s for x in g)
        met_ttft += ok_ttft
        met_both += ok_both
        (ttft_long if r["long"] else ttft_short).append(ttft if ttft is not None else float("inf"))
        rows.append(dict(round=round_, id=rid, long=r["long"], prompt=len(r["prompt"]),
                         arrival_s=r["arrival_s"], ttft_s=ttft, max_tbt_s=max(g) if g else None,
                         tokens=len(tr.tokens)))
    its = [it for run in runs for it in run["iterations"]]
    errs = [abs(p - m) / m for m, p, _ in its if p]
    ratios = [m / p for m, p, _ in its if p]
    slow = sorted(its, key=lambda i: -i[0])[:5]
    n = len(traces)
    return dict(
        rounds=len(runs), requests=n, finished=done, wall_s=[round(run["wall_s"], 1) for run in runs],
        loadavg_at_start=[run["loadavg_at_start"] for run in runs], iterations=len(its),
        short_ttft_p50_s=pct(ttft_short, 50), short_ttft_p99_s=pct(ttft_short, 99),
        long_ttft_s=ttft_long, tbt_p50_s=pct(gaps, 50), tbt_p99_s=pct(gaps, 99),
        tbt_max_s=max(gaps, default=None),
        ttft_slo_attainment=met_ttft / n, tbt_slo_attainment=tbt_ok / max(tbt_all, 1),
        slo_attainment=met_both / n,
        iteration_p50_s=pct([m for m, *_ in its], 50), iteration_p99_s=pct([m for m, *_ in its], 99),
        live_model_median_rel_err=statistics.median(errs) if errs else None,
        live_measured_over_predicted_p50=statistics.median(ratios) if ratios else None,
        slowest_iterations=[dict(measured_s=round(m, 3), predicted_s=round(p, 3), prefills=sh.prefills,
                                 decodes=len(sh.decodes)) for m, p, sh in slow],
        per_request=sorted(rows, key=lambda x: (x["round"], x["arrival_s"])))


def profile_report(cal, spec: ProfileSpec) -> dict:
    m = cal.model
    rep = dict(key=asdict(m.key), coefficients=dict(zip(
        ("token", "attn_pair", "kv_token", "seq", "const", "prefill_seq", "prefill_ctx"), m.coefficients)),
        held_out_median_rel_err=cal.held_out_error, reused_cached_profile=cal.reused, fit=m.fit_info,
        threshold=0.15, passed=cal.held_out_error < 0.15, path=str(cal.path))
    if cal.held_out:
        rep["held_out"] = [dict(prefills=b.prefills, decodes=len(b.decodes),
                                decode_ctx_mean=round(statistics.mean(b.decodes), 1) if b.decodes else 0,
                                measured_s=round(t, 4), predicted_s=round(m.predict(b), 4),
                                rel_err=round(abs(m.predict(b) - t) / t, 3)) for b, t in cal.held_out]
        rep["held_out_median_rel_err_check"] = held_out_error(m, cal.held_out)
    return rep


def fmt(x, unit="s") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and x == float("inf"):
        return "∞"
    if unit == "x":
        return f"{x:.2f}x"
    return f"{x:.2f} {unit}" if unit else f"{x:.0%}"


def markdown(report: dict) -> str:
    w, res = report["workload"], report["results"]
    names = list(res)
    lines = [
        "# Scheduling: LARS + adaptive chunking vs FCFS + fixed chunks",
        "",
        f"Built-in model (SmolLM2-135M, float32) on {report['machine']}, torch threads: "
        f"{report['threads']}. {w['num_short']} short prompts "
        f"({w['short_prompt'][0]}–{w['short_prompt'][1]} tokens, {w['short_output'][0]}–"
        f"{w['short_output'][1]} output tokens, Poisson {w['rate_per_s']}/s) and "
        f"{len(w['long_prompts'])} long ones ({', '.join(map(str, w['long_prompts']))} tokens), replayed in "
        f"real time through the engine. SLOs: short TTFT {w['ttft_slo_short_s']} s, long TTFT "
        f"{w['ttft_slo_long_s']} s, TBT {w['tbt_slo_s']} s. FCFS: {w['fixed_chunk']}-token chunks and "
        f"iteration token budget; LARS: adaptive chunks, iteration budget = "
        f"{report['configs']['lars-adaptive']['tbt_headroom']} x TBT SLO (decode role), "
        f"performance model calibrated on this machine (held-out median error "
        f"{report['perf_model']['held_out_median_rel_err']:.1%}).",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    rows = [("short TTFT p50", "short_ttft_p50_s", "s"), ("short TTFT p99", "short_ttft_p99_s", "s"),
            ("decode TBT p50", "tbt_p50_s", "s"), ("decode TBT p99", "tbt_p99_s", "s"),
            ("decode TBT max", "tbt_max_s", "s"), ("TTFT SLO attainment", "ttft_slo_attainment", ""),
            ("TBT SLO attainment (gaps)", "tbt_slo_attainment", ""),
            ("SLO attainment (requests, both)", "slo_attainment", ""),
            ("iteration p50", "iteration_p50_s", "s"), ("iteration p99", "iteration_p99_s", "s"),
            ("perf model error on live iterations (median)", "live_model_median_rel_err", ""),
            ("live iteration / predicted (median)", "live_measured_over_predicted_p50", "x")]
    for label, key, unit in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(res[n][key], unit) for n in names) + " |")
    lines.append("| long TTFT | " + " | ".join(", ".join(fmt(x) for x in res[n]["long_ttft_s"])
                                               for n in names) + " |")
    lines.append("| finished / requests | " + " | ".join(f"{res[n]['finished']}/{res[n]['requests']}"
                                                         for n in names) + " |")
    lines.append("| wall time per replay | " + " | ".join(", ".join(f"{x} s" for x in res[n]["wall_s"])
                                                          for n in names) + " |")
    lines += ["", f"{report['rounds']} replays of each configuration ({report['mode']}); metrics pool "
              f"all replays. Load average at the start of each replay: "
              + "; ".join(f"{n} {', '.join(map(str, res[n]['loadavg_at_start']))}" for n in names) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny workload (smoke test)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--reprofile", action="store_true", help="profile again even if a profile is cached")
    p.add_argument("--rounds", type=int, default=2, help="replays of each configuration (default 2)")
    p.add_argument("--concurrent", action="store_true",
                   help="replay the configurations at the same time, in two processes")
    p.add_argument("--profile-only", action="store_true", help="only calibrate and write perf_model.json")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w = QUICK if args.quick else Workload()
    checkpoint = load_checkpoint(None)
    max_len = 4096

    probe = LLMEngine(EngineConfig(max_model_len=max_len, cache=CacheConfig(max_kv_tokens=40000, prefix_caching=False)),
                      checkpoint)
    t = time.monotonic()
    cal = calibrate(probe, PROFILE_SPEC, reuse=not args.reprofile)
    log.info("perf model: held-out median error %.1f%% (%s, %.0f s)", 100 * cal.held_out_error,
             "reused" if cal.reused else "profiled", time.monotonic() - t)
    if not cal.reused or not (out / "perf_model.json").exists():     # keep the report of the profile
        (out / "perf_model.json").write_text(json.dumps(profile_report(cal, PROFILE_SPEC), indent=2,
                                                        default=str) + "\n")
    del probe
    if args.profile_only:
        return

    reqs = w.requests(checkpoint.config.vocab_size)
    del checkpoint
    runs = run_all(configs(w), w, reqs, cal.model, max_len, args.threads, args.rounds, args.concurrent)
    results = {n: summarize(rs, reqs, w) for n, rs in runs.items()}
    for n, r in results.items():
        log.info("%s: short TTFT p50 %s p99 %s, TBT p50 %s p99 %s, SLO %.0f%%", n, r["short_ttft_p50_s"],
                 r["short_ttft_p99_s"], r["tbt_p50_s"], r["tbt_p99_s"], 100 * r["slo_attainment"])
    report = dict(workload=asdict(w), configs={n: asdict(c) for n, c in configs(w).items()}, results=results,
                  perf_model=dict(held_out_median_rel_err=cal.held_out_error, key=asdict(cal.model.key)),
                  machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
                  threads=args.threads, quick=args.quick, rounds=args.rounds,
                  mode="concurrent (two processes)" if args.concurrent else "sequential, alternating order")
    name = "scheduling_quick" if args.quick else "scheduling"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
