"""`mnemosyne bench serve`'s pure logic (common/bench_serve.py): length distributions, the seeded
Poisson schedule, prompts, percentiles, goodput and the table; endpoint parsing; the CLI's flags.
No server: records are built by hand."""
from __future__ import annotations

import math
import random
import statistics

import pytest

from common.bench_endpoints import parse_endpoint
from common.bench_serve import (BenchConfig, Dist, Record, arrivals, check_fits, meets_slo, parse_dist,
                                percentile, summarize, table, token_prompt, word_prompt, workload)
from common.cli import build_parser
from common.errors import ConfigError


# ---- distributions -----------------------------------------------------------------------------------
def test_parse_fixed_range_and_mix():
    assert parse_dist("512") == Dist(((512, 512),), (1.0,))
    assert parse_dist(" 300-800 ") == Dist(((300, 800),), (1.0,))
    d = parse_dist("300-800:0.7,2000-3800:0.3")
    assert d.parts == ((300, 800), (2000, 3800))
    assert d.weights == pytest.approx((0.7, 0.3))
    assert parse_dist("16:1,32:3").weights == pytest.approx((0.25, 0.75))     # normalized
    assert d.max == 3800
    assert d.mean == pytest.approx(0.7 * 550 + 0.3 * 2900)


@pytest.mark.parametrize("bad", ["", "abc", "0", "800-300", "10-x", "1-5:0", "1-5:-1", "1-5:nan", "1-5:",
                                 "1-5,,6", "-5"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        parse_dist(bad)


def test_samples_stay_in_range_and_follow_weights():
    d = parse_dist("10-20:0.8,1000-1001:0.2")
    rng = random.Random(0)
    xs = [d.sample(rng) for _ in range(5000)]
    assert all(10 <= x <= 20 or 1000 <= x <= 1001 for x in xs)
    assert sum(x >= 1000 for x in xs) / len(xs) == pytest.approx(0.2, abs=0.03)
    assert set(x for x in xs if x < 1000) == set(range(10, 21))
    assert {parse_dist("7").sample(rng) for _ in range(10)} == {7}


# ---- schedule ------------------------------------------------------------------------------------------
def test_poisson_schedule_is_seeded_and_has_the_rate():
    a = arrivals(4.0, seed=1, num_requests=4000)
    assert a == arrivals(4.0, seed=1, num_requests=4000)
    assert a != arrivals(4.0, seed=2, num_requests=4000)
    assert a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.06)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.08)          # exponential: sd = mean


def test_rate_zero_sends_all_at_once_and_duration_bounds_arrivals():
    assert arrivals(0.0, seed=0, num_requests=5) == [0.0] * 5
    assert arrivals(math.inf, seed=0, num_requests=3) == [0.0] * 3
    a = arrivals(10.0, seed=3, duration_s=5.0)
    assert a and max(a) < 5.0 and len(a) == pytest.approx(50, abs=25)


def test_workload_lengths_do_not_depend_on_the_rate():
    cfg = BenchConfig(endpoint="h:1", rate=2.0, num_requests=20, prompt_tokens="10-100", output_tokens="4-8", seed=5)
    w = workload(cfg)
    assert [s.index for s in w] == list(range(20))
    assert all(10 <= s.prompt_tokens <= 100 and 4 <= s.output_tokens <= 8 for s in w)
    burst = workload(BenchConfig(endpoint="h:1", rate=0.0, num_requests=20, prompt_tokens="10-100",
                                 output_tokens="4-8", seed=5))
    assert [(s.prompt_tokens, s.output_tokens) for s in w] == [(s.prompt_tokens, s.output_tokens) for s in burst]
    assert all(s.arrival_s == 0 for s in burst)
    assert len(workload(BenchConfig(endpoint="h:1"))) == 100                  # the default size


def test_check_fits_names_the_request():
    w = workload(BenchConfig(endpoint="h:1", num_requests=3, prompt_tokens="100", output_tokens="28"))
    check_fits(w, 128)
    check_fits(w, None)
    with pytest.raises(ConfigError, match="max_model_len 127"):
        check_fits(w, 127)


def test_prompts_are_seeded_exact_and_avoid_special_ids():
    p = token_prompt(1, 3, 500, vocab_size=49152, special_ids=(0, 1, 2))
    assert len(p) == 500 and p == token_prompt(1, 3, 500, 49152, (0, 1, 2)) != token_prompt(1, 4, 500, 49152, ())
    assert all(1000 <= t < 32000 for t in p)
    tiny = token_prompt(0, 0, 300, vocab_size=64, special_ids=(5,))
    assert all(0 <= t < 64 and t != 5 for t in tiny)
    assert all(1000 <= t < 32000 for t in token_prompt(0, 0, 100, None, ()))          # HTTP: unknown vocab
    assert len(word_prompt(0, 0, 40).split()) == 40


# ---- config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, msg", [
    ({"rate": -1.0}, "rate"), ({"num_requests": 0}, "num_requests"),
    ({"num_requests": 5, "duration_s": 2.0}, "not both"), ({"duration_s": 2.0}, "rate > 0"),
    ({"ttft_slo_s": 0.0}, "ttft_slo_s"), ({"max_concurrency": 0}, "max_concurrency"),
    ({"prompt_tokens": "5-1"}, "prompt_tokens"), ({"endpoint": " "}, "endpoint"),
])
def test_config_errors_name_the_value(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        BenchConfig(**{"endpoint": "h:1", **kw})


def test_cli_flags_build_the_config_and_name_bad_flags():
    p = build_parser()
    args = p.parse_args(["bench", "serve", "--endpoint", "grpc://127.0.0.1:50051", "--rate", "2", "--num-requests",
                         "6", "--prompt-tokens", "300-800:0.7,2000-3800:0.3", "--ttft-slo-s", "1.5",
                         "--no-ignore-eos", "--json", "out.json"])
    from common.bench_serve import config_from_args
    cfg = config_from_args(args)
    assert (cfg.rate, cfg.num_requests, cfg.ttft_slo_s, cfg.ignore_eos, cfg.json_path) == (2.0, 6, 1.5, False,
                                                                                           "out.json")
    with pytest.raises(ConfigError, match="--prompt-tokens"):
        config_from_args(p.parse_args(["bench", "serve", "--endpoint", "h:1", "--prompt-tokens", "9-1"]))


@pytest.mark.parametrize("url, want", [
    ("grpc://127.0.0.1:50051", ("grpc", "127.0.0.1:50051")), ("localhost:50051", ("grpc", "localhost:50051")),
    ("http://127.0.0.1:8000/v1", ("http", "http://127.0.0.1:8000/v1")),
    ("http://127.0.0.1:8000", ("http", "http://127.0.0.1:8000/v1")),
    ("https://api.example.com/v1/", ("http", "https://api.example.com/v1")),
])
def test_parse_endpoint(url, want):
    assert parse_endpoint(url) == want


@pytest.mark.parametrize("bad", ["ftp://x:1", "nohost", "host:port", "http://"])
def test_parse_endpoint_rejects(bad):
    with pytest.raises(ConfigError, match="endpoint"):
        parse_endpoint(bad)


# ---- summary --------------------------------------------------------------------------------------------
def test_percentile_interpolates_like_numpy():
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0 and percentile([], 50) is None


def ok(i, ttft, gaps, end, out=None, prompt=10) -> Record:
    return Record(i, 0.0, prompt, out or len(gaps) + 1, sent_s=0.0, end_s=end, outcome="ok", prompt_tokens=prompt,
                  output_tokens=out or len(gaps) + 1, ttft_s=ttft, tbt_s=list(gaps), e2e_s=end)


def test_goodput_counts_every_sent_request_and_uses_p99_tbt():
    recs = [
        ok(0, 0.1, [0.02, 0.02], end=1.0),
        ok(1, 0.5, [0.02], end=2.0),                  # TTFT over the SLO
        ok(2, 0.1, [0.02] * 200 + [0.9], end=4.0),    # one slow gap among 200: p99 within the SLO
        ok(3, 0.1, [0.02, 0.9], end=3.0),             # 2 gaps: p99 ~ max, over the SLO
        Record(4, 0.0, 10, 3, sent_s=0.0, end_s=0.01, outcome="rejected", status="RESOURCE_EXHAUSTED",
               reason="ttft_slo"),
        Record(5, 0.0, 10, 3, sent_s=0.0, end_s=0.02, outcome="rejected", status="429", reason="ttft_slo"),
        Record(6, 0.0, 10, 3, sent_s=0.0, end_s=0.03, outcome="error", status="UNAVAILABLE", reason="unavailable"),
        ok(7, 0.1, [], end=0.5, out=1),               # one token: no gaps, passes the TBT SLO
    ]
    assert [meets_slo(r, 0.3, 0.1) for r in recs] == [True, False, True, False, False, False, False, True]
    s = summarize(recs, ttft_slo_s=0.3, tbt_slo_s=0.1)
    assert (s["requests"], s["ok"], s["rejected"], s["error"], s["cancelled"]) == (8, 5, 2, 1, 0)
    assert s["goodput"] == 3 / 8 and s["goodput_rps"] == pytest.approx(3 / 4.0)
    assert s["rejections_by_reason"] == {"ttft_slo": 2} and s["rejection_rate"] == 0.25
    assert s["errors_by_status"] == {"UNAVAILABLE": 1} and s["error_rate"] == 0.125
    assert "p99" in s["goodput_criterion"] and "TTFT <= 0.3 s" in s["goodput_criterion"]
    assert s["duration_s"] == 4.0 and s["throughput_rps"] == 5 / 4.0
    assert s["output_tokens_per_s"] == (3 + 2 + 202 + 3 + 1) / 4.0
    ttfts = [0.1, 0.5, 0.1, 0.1, 0.1]
    assert s["ttft_s"]["p50"] == percentile(ttfts, 50) and s["ttft_s"]["mean"] == pytest.approx(sum(ttfts) / 5)
    gaps = [g for r in recs if r.outcome == "ok" for g in r.tbt_s]
    assert s["tbt_s"]["p99"] == percentile(gaps, 99) and s["tbt_s"]["p90"] == percentile(gaps, 90)
    assert set(s["e2e_s"]) == {"mean", "p50", "p90"}
    # Without SLOs, goodput is the completed fraction.
    assert summarize(recs)["goodput"] == 5 / 8 and summarize(recs)["goodput_criterion"] == "completed"


def test_empty_and_all_rejected_runs_summarize():
    s = summarize([])
    assert s["requests"] == 0 and s["goodput"] == 0.0 and s["ttft_s"]["p50"] is None
    rej = [Record(0, 0.0, 1, 1, sent_s=0.0, end_s=0.1, outcome="rejected", reason="queue_timeout")]
    s = summarize(rej, ttft_slo_s=1.0)
    assert s["rejection_rate"] == 1.0 and s["throughput_rps"] == 0.0 and s["tbt_s"]["mean"] is None
    text = table(s, BenchConfig(endpoint="grpc://h:1", ttft_slo_s=1.0))
    assert "queue_timeout 1 (100.0%)" in text and "-" in text


def test_table_is_aligned():
    recs = [ok(i, 0.1 * (i + 1), [0.02, 0.03], end=1.0 + i) for i in range(4)]
    text = table(summarize(recs, 1.0, 0.1), BenchConfig(endpoint="http://h:8000/v1", rate=2.0, ttft_slo_s=1.0,
                                                        tbt_slo_s=0.1))
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("ms"))
    rows = [line for line in lines if line.split()[:1] in (["TTFT"], ["TBT"], ["E2E"])]
    assert len(rows) == 3 and all(len(r) == len(head) for r in rows[:2])
    assert "2 req/s Poisson" in text and "goodput" in text and "p99" in text


def test_admission_error_compares_the_servers_prediction_with_its_own_ttft():
    from common.bench_serve import Record, admission_error
    recs = [Record(0, 0.0, 10, 4, outcome="ok", server_ttft_s=1.0, predicted_ttft_s=1.5),
            Record(1, 0.0, 10, 4, outcome="ok", server_ttft_s=2.0, predicted_ttft_s=1.0),
            Record(2, 0.0, 10, 4, outcome="ok", server_ttft_s=2.0)]          # no prediction: left out
    e = admission_error(recs)
    assert e["n"] == 2 and e["p50"] == pytest.approx(0.5) and e["signed_mean"] == pytest.approx(0.0)
    assert admission_error([]) == {"n": 0}
