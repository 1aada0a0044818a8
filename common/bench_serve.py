"""`mnemosyne bench serve`: a load generator against a running deployment (gRPC or the HTTP API).

    mnemosyne bench serve --endpoint grpc://127.0.0.1:50051 --rate 2 --num-requests 100 \
        --prompt-tokens 300-800:0.7,2000-3800:0.3 --output-tokens 64 --ttft-slo-s 2 --tbt-slo-s 0.2 \
        --json bench.json

The workload is planned up front from --seed (arrival times, prompt and output lengths, prompt
contents), so two runs with the same flags send the same requests at the same offsets. Each request
is streamed and timed by this client: TTFT = send -> first token, TBT = gaps between the streamed
chunks that carry tokens (this server sends one token per chunk), e2e = send -> last chunk. The
report (`summarize`) is computed from the per-request records alone, so the JSON file is
self-checking: its summary can be recomputed from its `requests`.

This module is the pure part (config, length distributions, the arrival schedule, the summary and
its table) and the run loop; the wire clients are in common/bench_endpoints.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from common.errors import ConfigError
from common.flags import Flags

log = logging.getLogger(__name__)

DEFAULT_NUM_REQUESTS = 100
TBT_CRITERION = "p99 TBT"      # of each request's own gaps (nearly its max gap below 100 gaps)
OUTCOMES = ("ok", "rejected", "error", "cancelled")


# ---- config ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """One `bench serve` run, validated once; flags and MNEMOSYNE_* variables are generated from it."""
    endpoint: str = field(metadata={"metavar": "URL", "help": "grpc://HOST:PORT (or HOST:PORT) of a router, or "
                                    "the base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1"})
    api: Literal["completions", "chat"] = field(default="completions", metadata={"help": (
        "completions: token-id prompts of exactly the requested length; chat: text of repeated words "
        "(approximate length; the report uses the prompt tokens the server counted)")})
    rate: float = field(default=0.0, metadata={"metavar": "R", "help": "requests per second, Poisson "
                                               "arrivals (0 = all at once)"})
    num_requests: int | None = field(default=None, metadata={"help": f"requests to send (none: "
                                     f"{DEFAULT_NUM_REQUESTS}, unless --duration-s)"})
    duration_s: float | None = field(default=None, metadata={"help": "send for this long instead (needs "
                                     "--rate > 0): every arrival of the Poisson schedule before S"})
    prompt_tokens: str = field(default="512", metadata={"metavar": "DIST", "help": (
        "prompt length: N, a uniform range LO-HI, or a weighted mix LO-HI:W,LO-HI:W (e.g. 300-800:0.7,2000-3800:0.3)")})
    output_tokens: str = field(default="128", metadata={"metavar": "DIST", "help": "tokens to generate "
                               "(max_tokens), a DIST like --prompt-tokens"})
    seed: int = field(default=0, metadata={"help": "seed of the schedule, the lengths and the prompts"})
    ttft_slo_s: float | None = field(default=None, metadata={"help": "TTFT SLO for goodput (and sent as the "
                                     "request's own unless --no-send-slo)"})
    tbt_slo_s: float | None = field(default=None, metadata={"help": "TBT SLO for goodput, against each request's "
                                    "p99 gap (and sent as the request's own unless --no-send-slo)"})
    send_slo: bool = field(default=True, metadata={"help": "send --ttft-slo-s / --tbt-slo-s with each request "
                           "(Mnemosyne's extension: its admission then serves or rejects by them)"})
    ignore_eos: bool = field(default=True, metadata={"help": "ask the server to generate past EOS, so outputs have "
                             "the planned length (gRPC GenerateRequest.ignore_eos, HTTP body field ignore_eos)"})
    max_concurrency: int | None = field(default=None, metadata={"help": "requests in flight at most (later "
                                        "arrivals wait in this client; default: no limit)"})
    timeout_s: float = field(default=600.0, metadata={"help": "give up on one request after S"})
    api_key: str = field(default="", repr=False, metadata={"metavar": "KEY", "help": "the API key to present "
                         "(default: $MNEMOSYNE_API_KEY, else the key `make up` generated); never written to the JSON"})
    json_path: str | None = field(default=None, metadata={"flag": "json", "metavar": "PATH", "help": (
        "write {config, model, summary, requests} as JSON to PATH")})

    def __post_init__(self) -> None:
        if not self.endpoint.strip():
            raise ConfigError("bench: endpoint is empty")
        if not (self.rate >= 0 and not math.isnan(self.rate)):
            raise ConfigError(f"bench: rate must be >= 0 requests/s (0 = all at once), got {self.rate}")
        if self.num_requests is not None and self.duration_s is not None:
            raise ConfigError("bench: give num_requests or duration_s, not both")
        if self.num_requests is not None and self.num_requests < 1:
            raise ConfigError(f"bench: num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None:
            if not (self.duration_s > 0 and math.isfinite(self.duration_s)):
                raise ConfigError(f"bench: duration_s must be a positive number of seconds, got {self.duration_s}")
            if self.rate == 0 or math.isinf(self.rate):
                raise ConfigError("bench: duration_s needs a finite rate > 0 (with rate 0 every request is sent "
                                  "at once: give num_requests)")
        for name in ("ttft_slo_s", "tbt_slo_s", "timeout_s"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"bench: {name} must be a positive number of seconds, got {v}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"bench: max_concurrency must be >= 1, got {self.max_concurrency}")
        for name in ("prompt_tokens", "output_tokens"):
            try:
                parse_dist(getattr(self, name))
            except ValueError as e:
                raise ConfigError(f"bench: {name}: {e}") from None

    @property
    def prompt_dist(self) -> "Dist":
        return parse_dist(self.prompt_tokens)

    @property
    def output_dist(self) -> "Dist":
        return parse_dist(self.output_tokens)


FLAGS = Flags(BenchConfig, groups={"": "bench"})


def add_subcommand(sub: Any) -> None:
    """`mnemosyne bench serve` in the CLI's subparsers (common/cli.py); its flags come from BenchConfig."""
    bench = sub.add_parser("bench", help="measure a running deployment", description="Measure a running deployment.")
    serve = bench.add_subparsers(dest="bench_command", required=True, metavar="{serve}").add_parser(
        "serve", help="send a Poisson load to an endpoint (gRPC or HTTP); report TTFT, TBT, goodput",
        description="Send a load to a running endpoint (a router over gRPC, or an OpenAI-compatible HTTP API); "
                    "print TTFT, TBT, throughput, rejections and goodput.")
    FLAGS.add_to(serve)
    serve.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The validated config (flag > MNEMOSYNE_<FLAG> > default); a ConfigError names the flag."""
    return FLAGS.build(args)


# ---- length distributions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    """A mix of uniform integer ranges: parts[i] = (lo, hi) inclusive, chosen with weights[i] (sum 1)."""
    parts: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]

    @property
    def max(self) -> int:
        return max(hi for _, hi in self.parts)

    @property
    def mean(self) -> float:
        return sum(w * (lo + hi) / 2 for (lo, hi), w in zip(self.parts, self.weights))

    def sample(self, rng: random.Random) -> int:
        lo, hi = self.parts[0] if len(self.parts) == 1 else rng.choices(self.parts, self.weights)[0]
        return rng.randint(lo, hi)


def parse_dist(text: str) -> Dist:
    """`512` | `300-800` | `300-800:0.7,2000-3800:0.3` (weights are normalized); ValueError says what
    is wrong with which part."""
    parts, weights = [], []
    items = [t.strip() for t in str(text).split(",")]
    for item in items:
        span, sep, weight = item.partition(":")
        if sep and len(items) == 1 and not weight.strip():
            raise ValueError(f"{item!r}: a weight after ':' is missing")
        lo_s, dash, hi_s = span.strip().partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if dash else lo
            w = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"{item!r} is not N, LO-HI or LO-HI:WEIGHT (in {text!r})") from None
        if lo < 1 or hi < lo:
            raise ValueError(f"{item!r}: lengths must satisfy 1 <= LO <= HI")
        if not (w > 0 and math.isfinite(w)):
            raise ValueError(f"{item!r}: the weight must be a positive number")
        parts.append((lo, hi))
        weights.append(w)
    total = sum(weights)
    return Dist(tuple(parts), tuple(w / total for w in weights))


# ---- the planned workload ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestSpec:
    index: int
    arrival_s: float          # planned send time, seconds from the start of the run
    prompt_tokens: int
    output_tokens: int


def arrivals(rate: float, seed: int, num_requests: int | None = None,
             duration_s: float | None = None) -> list[float]:
    """Send times from the start: a Poisson process of `rate` per second (exponential gaps, the first
    request at 0), `num_requests` of them or every one before `duration_s`; rate 0 (or inf): all at 0."""
    if rate == 0 or math.isinf(rate):
        return [0.0] * (num_requests or 0)
    rng = random.Random(f"{seed}:arrivals")
    out, t = [], 0.0
    while (len(out) < num_requests) if num_requests is not None else (t < duration_s):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def workload(cfg: BenchConfig) -> list[RequestSpec]:
    """The requests of a run. Lengths come from their own seeded stream, so the same seed gives the
    same requests at any rate."""
    n = cfg.num_requests if cfg.num_requests is not None or cfg.duration_s is not None else DEFAULT_NUM_REQUESTS
    times = arrivals(cfg.rate, cfg.seed, n, cfg.duration_s)
    rng = random.Random(f"{cfg.seed}:lengths")
    pd, od = cfg.prompt_dist, cfg.output_dist
    return [RequestSpec(i, t, pd.sample(rng), od.sample(rng)) for i, t in enumerate(times)]


WORDS = ("the of and to in is was for on that with as by at from his an were are which this be or had not "
         "one but all new more time city year first two world after made people state water long day").split()


def token_prompt(seed: int, index: int, n: int, vocab_size: int | None, special_ids: tuple[int, ...]) -> list[int]:
    """`n` token ids, seeded per request: drawn from [1000, min(vocab, 32000)), or the whole vocabulary
    of a tiny one, never an EOS/BOS id. The range avoids the special and byte tokens at both ends of
    common vocabularies; 32000 (Llama 2, Mistral) bounds it when the vocabulary size is unknown (HTTP)."""
    hi = min(vocab_size, 32000) if vocab_size else 32000
    lo = 1000 if hi > 2000 else 0
    rng = random.Random(f"{seed}:prompt:{index}")
    special = set(special_ids)
    out: list[int] = []
    while len(out) < n:
        t = rng.randrange(lo, hi)
        if t not in special:
            out.append(t)
    return out


def word_prompt(seed: int, index: int, n: int) -> str:
    """About `n` tokens of text (common one-token English words); the chat template adds its own."""
    rng = random.Random(f"{seed}:prompt:{index}")
    return " ".join(rng.choice(WORDS) for _ in range(n))


# ---- what one request did ------------------------------------------------------------------------------
@dataclass
class Record:
    """One request, as this client saw it (times in seconds; offsets from the start of the run)."""
    index: int
    scheduled_s: float                        # planned send time
    prompt_tokens_requested: int
    output_tokens_requested: int
    sent_s: float | None = None               # actual send time (later when --max-concurrency held it back)
    end_s: float | None = None                # when its stream ended (any outcome)
    outcome: str = "error"                    # ok | rejected | error | cancelled
    status: str = ""                          # not ok: the gRPC status name or the HTTP status code
    reason: str = ""                          # rejected: admission's reason (e.g. ttft_slo); error: its kind
    message: str = ""
    retry_after_s: float | None = None        # rejected: the server's retry hint
    prompt_tokens: int | None = None          # as the server counted them (Started / usage)
    output_tokens: int = 0
    ttft_s: float | None = None               # send -> first token
    tbt_s: list[float] = field(default_factory=list)   # gaps between chunks carrying tokens
    e2e_s: float | None = None                # send -> end of a completed stream
    finish_reason: str = ""
    request_id: str = ""
    route: str = ""
    server_ttft_s: float | None = None        # the server's own measurement (arrival -> first token sent)
    predicted_ttft_s: float | None = None     # the server's admission prediction of server_ttft_s

    @property
    def tbt_p99_s(self) -> float | None:
        return percentile(self.tbt_s, 99)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tbt_p99_s"] = self.tbt_p99_s
        return d


# ---- the summary ---------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default); None if empty."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    out: dict[str, float | None] = {"mean": sum(values) / len(values) if values else None}
    out.update({f"p{q}": percentile(values, q) for q in qs})
    return out


def meets_slo(r: Record, ttft_slo_s: float | None, tbt_slo_s: float | None) -> bool:
    """Completed, TTFT within its SLO and the per-request p99 gap within the TBT SLO (unset SLOs pass)."""
    if r.outcome != "ok" or r.ttft_s is None:
        return False
    if ttft_slo_s is not None and r.ttft_s > ttft_slo_s:
        return False
    p99 = r.tbt_p99_s
    return tbt_slo_s is None or p99 is None or p99 <= tbt_slo_s


def admission_error(ok: list[Record]) -> dict:
    """How well the server's admission predicted each completed request's TTFT (its own measurement,
    arrival -> first token): relative error |predicted - measured| / measured, and the signed mean
    (positive = pessimistic: admission expected slower first tokens than it delivered)."""
    pairs = [(r.predicted_ttft_s, r.server_ttft_s) for r in ok
             if r.predicted_ttft_s is not None and r.server_ttft_s]
    if not pairs:
        return {"n": 0}
    rel = [abs(p - m) / m for p, m in pairs]
    return {"n": len(pairs), "p50": percentile(rel, 50), "p90": percentile(rel, 90),
            "signed_mean": sum((p - m) / m for p, m in pairs) / len(pairs)}


def summarize(records: list[Record], ttft_slo_s: float | None = None, tbt_slo_s: float | None = None) -> dict:
    """Counts, latency percentiles over completed requests (TBT: every gap of every completed
    request), throughput over the run (its start to the last stream's end) and goodput: the fraction
    of ALL sent requests that completed within the SLOs (`meets_slo`)."""
    ok = [r for r in records if r.outcome == "ok"]
    n = len(records)
    duration = max((r.end_s for r in records if r.end_s is not None), default=0.0)
    by_reason: dict[str, int] = {}
    for r in records:
        if r.outcome == "rejected":
            by_reason[r.reason or "unknown"] = by_reason.get(r.reason or "unknown", 0) + 1
    errors: dict[str, int] = {}
    for r in records:
        if r.outcome == "error":
            errors[r.status or "unknown"] = errors.get(r.status or "unknown", 0) + 1
    counts = {o: sum(r.outcome == o for r in records) for o in OUTCOMES}
    good = sum(meets_slo(r, ttft_slo_s, tbt_slo_s) for r in records)
    out_tokens = sum(r.output_tokens for r in ok)
    criterion = [f"TTFT <= {ttft_slo_s:g} s" if ttft_slo_s is not None else "",
                 f"{TBT_CRITERION} <= {tbt_slo_s:g} s" if tbt_slo_s is not None else ""]
    return {
        "requests": n, **counts,
        "rejection_rate": counts["rejected"] / n if n else 0.0,
        "rejections_by_reason": dict(sorted(by_reason.items())),
        "error_rate": counts["error"] / n if n else 0.0,
        "errors_by_status": dict(sorted(errors.items())),
        "duration_s": duration,
        "throughput_rps": len(ok) / duration if duration > 0 else 0.0,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else 0.0,
        "prompt_tokens_mean": (sum(r.prompt_tokens or 0 for r in ok) / len(ok)) if ok else None,
        "output_tokens_mean": out_tokens / len(ok) if ok else None,
        "ttft_s": stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tbt_s": stats([g for r in ok for g in r.tbt_s]),
        "e2e_s": stats([r.e2e_s for r in ok if r.e2e_s is not None], qs=(50, 90)),
        "admission_error": admission_error(ok),
        "goodput": good / n if n else 0.0,
        "goodput_rps": good / duration if duration > 0 else 0.0,
        "goodput_criterion": "completed" + "".join(f", {c}" for c in criterion if c)
                             + (" (of each request's own gaps)" if tbt_slo_s is not None else ""),
    }


def table(summary: dict, cfg: BenchConfig) -> str:
    """The short aligned report printed on stdout."""
    s = summary

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{1e3 * v:.1f}"

    rate = "all at once" if cfg.rate == 0 or math.isinf(cfg.rate) else f"{cfg.rate:g} req/s Poisson"
    lines = [
        f"{'endpoint':<12}{cfg.endpoint} ({cfg.api})",
        f"{'requests':<12}{s['requests']} sent ({rate}): {s['ok']} ok, {s['rejected']} rejected, "
        f"{s['error']} errors" + (f", {s['cancelled']} cancelled" if s["cancelled"] else ""),
        f"{'throughput':<12}{s['throughput_rps']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s "
        f"over {s['duration_s']:.2f} s",
        "",
        f"{'ms':<12}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}",
    ]
    for name, key in (("TTFT", "ttft_s"), ("TBT", "tbt_s"), ("E2E", "e2e_s")):
        st = s[key]
        lines.append(f"{name:<12}" + "".join(f"{ms(st.get(q)):>9}" for q in ("mean", "p50", "p90", "p99")))
    lines.append("")
    lines.append(f"{'goodput':<12}{s['goodput']:.3f} of sent ({s['goodput_rps']:.2f} req/s): {s['goodput_criterion']}")
    ae = s.get("admission_error") or {}
    if ae.get("n"):
        lines.append(f"{'admission':<12}predicted TTFT off by p50 {100 * ae['p50']:.0f}%, p90 {100 * ae['p90']:.0f}% "
                     f"(signed mean {100 * ae['signed_mean']:+.0f}%, {ae['n']} requests)")
    if s["rejections_by_reason"]:
        lines.append(f"{'rejected':<12}" + ", ".join(f"{k} {v}" for k, v in s["rejections_by_reason"].items())
                     + f" ({100 * s['rejection_rate']:.1f}%)")
    if s["errors_by_status"]:
        lines.append(f"{'errors':<12}" + ", ".join(f"{k} {v}" for k, v in s["errors_by_status"].items())
                     + f" ({100 * s['error_rate']:.1f}%)")
    return "\n".join(lines)


# ---- the run --------------------------------------------------------------------------------------------
def check_fits(specs: list[RequestSpec], max_model_len: int | None) -> None:
    """Refuses a workload whose longest prompt + output exceeds the served model's max_model_len."""
    if not max_model_len or not specs:
        return
    worst = max(specs, key=lambda s: s.prompt_tokens + s.output_tokens)
    if worst.prompt_tokens + worst.output_tokens > max_model_len:
        raise ConfigError(f"bench: request {worst.index} needs {worst.prompt_tokens} prompt + {worst.output_tokens} "
                          f"output tokens > the model's max_model_len {max_model_len} (--prompt-tokens, "
                          "--output-tokens)")


def run(cfg: BenchConfig, endpoint: Any) -> tuple[list[Record], bool]:
    """Sends the workload through `endpoint` (common/bench_endpoints.py) on schedule, at most
    --max-concurrency at once. Returns the records of every request sent and whether the run was
    interrupted (Ctrl-C: requests in flight are cancelled, unsent ones dropped)."""
    info = endpoint.info
    specs = workload(cfg)
    check_fits(specs, info.max_model_len)
    records = [Record(s.index, s.arrival_s, s.prompt_tokens, s.output_tokens) for s in specs]
    stopping = threading.Event()
    start = time.monotonic()

    def one(rec: Record) -> None:
        if stopping.is_set():
            return
        rec.sent_s = time.monotonic() - start
        if cfg.api == "chat":
            prompt: list[int] | str = word_prompt(cfg.seed, rec.index, rec.prompt_tokens_requested)
        else:
            prompt = token_prompt(cfg.seed, rec.index, rec.prompt_tokens_requested, info.vocab_size,
                                  info.special_ids)
        endpoint.send(rec, prompt, stopping)
        rec.end_s = time.monotonic() - start

    workers = min(len(records), cfg.max_concurrency or len(records)) or 1
    interrupted = False
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench") as pool:
        futures = []
        try:
            for rec in records:
                delay = start + rec.scheduled_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(one, rec))
            for f in futures:
                f.result()
        except KeyboardInterrupt:
            interrupted = True
            stopping.set()
            endpoint.cancel_all()
            pool.shutdown(wait=True, cancel_futures=True)
    return [r for r in records if r.sent_s is not None], interrupted


def report(cfg: BenchConfig, info: Any, records: list[Record], out: TextIO = sys.stdout) -> dict:
    """Prints the table and writes --json; the report object."""
    summary = summarize(records, cfg.ttft_slo_s, cfg.tbt_slo_s)
    doc = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "api_key"}, "model": dataclasses.asdict(info), "summary": summary,
           "requests": [r.to_dict() for r in records]}
    out.write(table(summary, cfg) + "\n")
    out.flush()
    if cfg.json_path:
        with open(cfg.json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return doc


def main(args: argparse.Namespace) -> int:
    """`mnemosyne bench serve`: exit status 0, or 130 when interrupted (after reporting what ran)."""
    from common.bench_endpoints import open_endpoint
    cfg = config_from_args(args)
    endpoint = open_endpoint(cfg)
    try:
        records, interrupted = run(cfg, endpoint)
        report(cfg, endpoint.info, records)
    finally:
        endpoint.close()
    return 130 if interrupted else 0
