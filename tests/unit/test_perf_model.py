"""Performance models: analytic roofline, calibrated (NNLS fit, JSON with key), prefill-time table,
and the rule that the scheduler and the performance model never import torch."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.config import ModelConfig, ParallelConfig
from common.errors import ConfigError
from common.perf_model.analytic import HARDWARE, AnalyticModel, hardware
from common.perf_model.base import PerfModel
from common.perf_model.calibrated import (FEATURES, CalibratedModel, ProfileKey, fit_from_samples,
                                          held_out_error, load_or_fallback, nnls, split_samples)
from common.perf_model.prefill_table import PrefillTable
from common.scheduler.types import BatchShape, ReqView

LLAMA3_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                        num_heads=32, num_kv_heads=8, head_dim=128)
TINY = ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8,
                   num_kv_heads=2, head_dim=32)
TRUE = [2e-5, 3e-10, 5e-9, 1e-4, 2e-3]          # token, attn_pair, kv_token, seq, const


def prefill(n, ctx=0):
    return BatchShape(((n, ctx),))


# ---- torch-free ----------------------------------------------------------------------------------
def test_scheduler_and_perf_model_never_import_torch():
    mods = ["common.scheduler.types", "common.scheduler.policy", "common.scheduler.chunking",
            "common.scheduler.planner", "common.scheduler.simulate", "common.perf_model.base",
            "common.perf_model.analytic", "common.perf_model.calibrated",
            "common.perf_model.prefill_table", "common.perf_model.online", "common.scheduler.scheduler",
            "common.perf_model.published", "common.metadata.types", "common.admission"]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={"PYTHONPATH": str(root), "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- analytic ------------------------------------------------------------------------------------
def test_analytic_is_a_perf_model_and_monotone():
    m = AnalyticModel(LLAMA3_8B, hardware("h100-bfloat16"), dtype_bytes=2)
    assert isinstance(m, PerfModel)
    assert m.predict(BatchShape()) == 0.0
    times = [m.predict(prefill(n, 100_000)) for n in (32, 64, 512, 2048, 8192)]
    assert times == sorted(times)
    times = [m.predict(prefill(512, c)) for c in (0, 10_000, 100_000, 1_000_000)]
    assert times == sorted(times) and times[-1] > 5 * times[0]          # attention dominates late
    decodes = [m.predict(BatchShape(decodes=(c,))) for c in (0, 100_000, 1_000_000)]
    assert decodes == sorted(decodes)


def test_analytic_magnitudes_llama3_8b_h100():
    m = AnalyticModel(LLAMA3_8B, hardware("h100-bfloat16"), dtype_bytes=2)
    one_decode = m.predict(BatchShape(decodes=(1000,)))
    weights_s = (32 * m.layer_params + m.head_params) * 2 / 2.8e12       # memory-bound: read weights
    assert weights_s < one_decode < weights_s + 5e-3
    big = m.predict(prefill(8192))
    assert 0.1 < big < 0.3                                               # ~2 * 7.5e9 * 8192 flops


def test_analytic_parallel_layouts():
    hw = hardware("h100-bfloat16")
    base = AnalyticModel(LLAMA3_8B, hw, dtype_bytes=2)
    tp2 = AnalyticModel(LLAMA3_8B, hw, ParallelConfig(tp=2), dtype_bytes=2)
    spp4 = AnalyticModel(LLAMA3_8B, hw, ParallelConfig(spp=4), dtype_bytes=2)
    kvp = AnalyticModel(LLAMA3_8B, hw, ParallelConfig(kvp=4, kvp_tokens=250_000), dtype_bytes=2)
    b = prefill(2048, 500_000)
    over = hw.iter_overhead_s + 32 * hw.layer_overhead_s
    assert tp2.predict(b) - over == pytest.approx((base.predict(b) - over) / 2, rel=0.02)
    assert spp4.predict(b) < base.predict(b) / 3
    assert kvp.predict(b) < base.predict(b)
    # the slowest KVP group holds at most M tokens
    assert kvp.predict(prefill(2048, 1_000_000)) == kvp.predict(prefill(2048, 250_000))


def test_hardware_presets_and_validation():
    assert {"cpu-float32", "cpu-bfloat16"} <= set(HARDWARE)
    assert hardware("cpu-float32").flops == pytest.approx(190e9)
    with pytest.raises(ConfigError):
        hardware("tpu-v9")


# ---- calibrated ----------------------------------------------------------------------------------
def random_batch(rng: random.Random) -> BatchShape:
    b = BatchShape()
    for _ in range(rng.randint(0, 3)):
        b = b.with_prefill(rng.choice([32, 64, 128, 256, 512, 1024, 2048]), rng.randint(0, 64_000))
    for _ in range(rng.randint(0 if b.prefills else 1, 32)):
        b = b.with_decode(rng.randint(1, 64_000))
    return b


def synthetic(n, noise=0.02, seed=0):
    rng = random.Random(seed)
    truth = CalibratedModel(TRUE)
    batches = [random_batch(rng) for _ in range(n)]
    return [(b, truth.predict(b) * (1 + rng.gauss(0, noise))) for b in batches]


def test_nnls_matches_known_solution_and_clips_negative():
    rng = np.random.default_rng(0)
    a = rng.random((40, 4))
    assert np.allclose(nnls(a, a @ np.array([1.0, 0.0, 2.0, 0.5])), [1.0, 0.0, 2.0, 0.5], atol=1e-8)
    x = nnls(a, a @ np.array([1.0, -1.0, 2.0, 0.5]))
    assert (x >= 0).all() and x[1] == 0.0


def test_fit_recovers_known_coefficients():
    train, test = split_samples(synthetic(300), holdout=0.2, seed=1)
    model = fit_from_samples(train)
    assert isinstance(model, PerfModel)
    assert held_out_error(model, test) < 0.03
    assert model.fit_info["num_samples"] == len(train)
    for got, want, name in zip(model.coefficients, TRUE, FEATURES):
        if name in ("token", "attn_pair", "kv_token"):      # the well-determined ones
            assert got == pytest.approx(want, rel=0.1), name
    exact = fit_from_samples(synthetic(100, noise=0.0))
    assert held_out_error(exact, synthetic(50, noise=0.0, seed=7)) < 1e-6


def test_fit_needs_enough_samples():
    with pytest.raises(ConfigError):
        fit_from_samples(synthetic(3))


def test_json_round_trip_and_mismatch_refused(tmp_path):
    key = ProfileKey.make("cpu-test", TINY, "float32")
    model = fit_from_samples(synthetic(50), key=key)
    with pytest.raises(ConfigError):
        fit_from_samples(synthetic(50)).save(tmp_path / "nokey.json")     # a profile needs its key
    path = tmp_path / "profile.json"
    model.save(path)
    loaded = CalibratedModel.load(path, key)
    b = prefill(512, 4096).with_decode(100)
    assert loaded.predict(b) == pytest.approx(model.predict(b))
    other_model = ModelConfig(**{**TINY.__dict__, "num_layers": 8})
    for bad in (ProfileKey.make("cpu-other", TINY, "float32"),
                ProfileKey.make("cpu-test", TINY, "bfloat16"),
                ProfileKey.make("cpu-test", other_model, "float32"),
                ProfileKey.make("cpu-test", TINY, "float32", ParallelConfig(tp=2))):
        with pytest.raises(ConfigError, match="profile was made for"):
            CalibratedModel.load(path, bad)
    fallback = AnalyticModel(TINY, hardware("cpu-float32"))
    assert load_or_fallback(path, key, fallback).predict(b) == pytest.approx(model.predict(b))
    assert load_or_fallback(path, ProfileKey.make("x", TINY, "float32"), fallback) is fallback
    assert load_or_fallback(tmp_path / "missing.json", key, fallback) is fallback
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError):
        CalibratedModel.load(path, key)


def test_profile_key_fingerprints():
    assert ProfileKey.make("h", TINY, "float32") == ProfileKey.make("h", TINY, "float32")
    assert ProfileKey.make("h", TINY, "float32").parallel == "tp1-spp1-kvp1"
    assert ProfileKey.make("h", TINY, "float32", ParallelConfig(kvp=2, kvp_tokens=4096)).parallel \
        == "tp1-spp1-kvp2-M4096"
    assert ProfileKey.make("h", TINY, "f").model != ProfileKey.make("h", LLAMA3_8B, "f").model


def test_calibrated_rejects_bad_coefficients():
    with pytest.raises(ConfigError):
        CalibratedModel([1.0, 2.0])
    with pytest.raises(ConfigError):
        CalibratedModel([1.0, -2.0, 0, 0, 0])


# ---- prefill table -------------------------------------------------------------------------------
def test_prefill_table_linear_model_is_exact():
    a = 1e-5
    table = PrefillTable(CalibratedModel([a, 0, 0, 0, 0]), budget_s=0.05, max_len=100_000)
    for l in (0, 1, 777, 5000, 100_000):
        assert table.time(l) == pytest.approx(a * l)
    assert table.remaining(100_000, 40_000) == pytest.approx(a * 60_000)
    assert table.time(250_000) == pytest.approx(a * 250_000)            # grows on demand
    r = ReqView("r", 0.0, 10_000, num_computed=2500)
    assert table.work(r) == pytest.approx((a * 7500, a * 10_000))


def test_prefill_table_sums_adaptive_chunks():
    model = CalibratedModel(TRUE)
    table = PrefillTable(model, budget_s=0.05, max_len=200_000)
    # the table's points are the adaptive chunk boundaries; check against a manual walk
    from common.scheduler.chunking import AdaptiveChunker
    ch, req, t = AdaptiveChunker(model.predict), ReqView("x", 0.0, 1 << 40), 0.0
    while req.num_computed < 200_000:
        n = ch.chunk(BatchShape(), 0.05, req)
        t += model.predict(prefill(n, req.num_computed))
        req = req.advanced(n)
        assert table.time(req.num_computed) == pytest.approx(t)
    ts = [table.time(l) for l in range(0, 200_001, 10_000)]
    incr = [b - a for a, b in zip(ts, ts[1:])]
    assert incr == sorted(incr)                                           # quadratic attention: convex


def test_prefill_table_answers_at_the_models_scale_now():
    """A table over an online-corrected model answers at its current scale, also for the stretch it
    walked while the scale was different (the decode pool's table kept its warm-up's 1.7x, and its
    LARS moved a short prompt ahead of a started one that admission had predicted first)."""
    from common.perf_model.online import OnlineCorrection
    from common.scheduler.policy import LARS
    base = CalibratedModel(TRUE)
    online = OnlineCorrection(base, alpha=1.0)
    unscaled = PrefillTable(base, budget_s=0.05)
    table = PrefillTable(online, budget_s=0.05)
    online.observe(prefill(64, 0), 1.7 * base.predict(prefill(64, 0)))      # warm-up beside a prefill
    assert online.scale == pytest.approx(1.7)
    assert table.time(192) == pytest.approx(1.7 * unscaled.time(192))      # walked now, at 1.7
    online.observe(prefill(64, 0), base.predict(prefill(64, 0)))            # the machine is quiet again
    assert online.scale == pytest.approx(1.0)
    for n in (117, 192, 5000):                                              # old stretch and new
        assert table.time(n) == pytest.approx(unscaled.time(n))
    assert table.work(ReqView("r", 0.0, 192, 32)) == pytest.approx(unscaled.work(ReqView("r", 0.0, 192, 32)))
    # the pair of the admission benchmark: a 192-token prompt started (32 done), a 117-token one
    # arriving, their deadlines as the bench's pool saw them (1.38 and 2.09 x the pair's work at the
    # true speed): LARS keeps the started one first by rho and both meet; at the stale 1.7x the short
    # one seems to miss behind it and slack stealing moves it ahead
    work = unscaled.remaining(192, 32) + unscaled.time(117)
    long = ReqView("long", 0.0, 192, 32, ttft_deadline_s=2.09 * work, started=True)
    short = ReqView("short", 0.0, 117, 0, ttft_deadline_s=1.38 * work)

    def first(tab):
        return LARS().arrange([(r, *tab.work(r)) for r in (short, long)], 0.0)[0][0].request_id
    assert first(table) == "long"
    stale = PrefillTable(OnlineCorrection(base, alpha=1.0), budget_s=0.05)
    stale.scaled.observe(prefill(64, 0), 1.7 * base.predict(prefill(64, 0)))
    assert first(stale) == "short"


def test_prefill_chunk_and_context_features():
    """Format 2 adds a per-chunk cost and a cost per cached token a chunk reads; format-1 (five
    coefficient) models and files still work, with those at 0."""
    m = CalibratedModel([0, 0, 0, 0, 0, 2e-3, 1e-6])
    assert m.predict(prefill(64, 1000)) == pytest.approx(2e-3 + 1e-6 * 1000)
    assert m.predict(BatchShape(decodes=(1000,))) == 0.0
    two = BatchShape(((32, 0), (32, 500)))
    assert m.predict(two) == pytest.approx(2 * 2e-3 + 1e-6 * 500)
    assert CalibratedModel(TRUE).coefficients == tuple(TRUE) + (0.0, 0.0)


def test_format_1_profile_still_loads(tmp_path):
    key = ProfileKey.make("cpu-test", TINY, "float32")
    path = tmp_path / "v1.json"
    path.write_text(json.dumps({"version": 1, "key": key.__dict__, "features": list(FEATURES[:5]),
                                "coefficients": TRUE, "kvp_tokens": None, "fit": {}}))
    b = prefill(512, 4096).with_decode(100)
    assert CalibratedModel.load(path, key).predict(b) == pytest.approx(CalibratedModel(TRUE).predict(b))


def test_online_correction_follows_the_machine():
    from common.perf_model.online import OnlineCorrection
    base = CalibratedModel(TRUE)
    m = OnlineCorrection(base, alpha=0.2)
    b = prefill(256, 1000).with_decode(500)
    assert m.predict(b) == base.predict(b) and m.scale == 1.0
    for _ in range(60):                                  # the machine became 1.5x slower
        m.observe(b, 1.5 * base.predict(b))
    assert m.scale == pytest.approx(1.5, rel=1e-3)
    assert m.predict(prefill(32)) == pytest.approx(1.5 * base.predict(prefill(32)), rel=1e-3)
    for _ in range(200):                                 # one stall per iteration: clipped
        m.observe(b, 100 * base.predict(b))
    assert m.scale == pytest.approx(4.0)
    m.observe(BatchShape(), 1.0)                         # nothing predicted: ignored
    with pytest.raises(ConfigError):
        OnlineCorrection(base, alpha=0.0)


# ---- published (what a pool sends the router) -----------------------------------------------------
def _batches():
    rng = random.Random(3)
    out = [prefill(n, c) for n in (1, 32, 512, 4096) for c in (0, 1000, 30000)]
    out += [BatchShape(((rng.randrange(1, 2000), rng.randrange(0, 50000)),),
                       tuple(rng.randrange(1, 40000) for _ in range(rng.randrange(0, 20))))
            for _ in range(30)]
    return out


@pytest.mark.parametrize("name", ["calibrated", "calibrated-kvp", "analytic", "analytic-grid", "online"])
def test_published_model_rebuilds_the_same_predictions_and_round_trips(name):
    from common.perf_model.online import OnlineCorrection
    from common.perf_model.published import PublishedModel, publish
    model = {"calibrated": lambda: CalibratedModel(TRUE + [1e-4, 1e-9]),
             "calibrated-kvp": lambda: CalibratedModel(TRUE, kvp_tokens=4096),
             "analytic": lambda: AnalyticModel(LLAMA3_8B, hardware("h100-bfloat16"), dtype_bytes=2),
             "analytic-grid": lambda: AnalyticModel(TINY, hardware("cpu-float32"),
                                                    ParallelConfig(tp=2, spp=2, kvp=2, kvp_tokens=1024)),
             "online": lambda: OnlineCorrection(CalibratedModel(TRUE))}[name]()
    if name == "online":
        for _ in range(20):
            model.observe(prefill(256), 2.0 * model.base.predict(prefill(256)))
        assert model.scale > 1.5
    pub = publish(model)
    again = PublishedModel.from_dict(json.loads(json.dumps(pub.to_dict())))
    assert again == pub
    rebuilt = again.build()
    for b in _batches():
        assert rebuilt.predict(b) == pytest.approx(model.predict(b), rel=1e-12, abs=1e-15)


def test_published_model_refuses_what_it_cannot_rebuild():
    from common.perf_model.published import PublishedModel, publish

    class Odd:
        def predict(self, b):
            return 0.0
    with pytest.raises(ConfigError, match="Odd"):
        publish(Odd())
    with pytest.raises(ConfigError, match="kind"):
        PublishedModel("roofline", {})
    with pytest.raises(ConfigError, match="lacks"):
        PublishedModel("calibrated", {"token": 1.0})


def test_prefill_table_with_fixed_chunks_sums_the_fixed_chunks():
    m = CalibratedModel(TRUE)
    t = PrefillTable(m, 0.05, fixed_chunk=512)
    def alone(n):
        return sum(m.predict(prefill(min(512, n - c), c)) for c in range(0, n, 512))
    assert t.time(2048) == pytest.approx(alone(2048), rel=1e-12)
    assert t.time(2000) == pytest.approx(alone(2000), rel=1e-2)    # interpolated inside the last chunk
