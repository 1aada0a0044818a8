"""Calibrating the performance model on this machine: time the real engine on synthetic batches.

`calibrate(engine)` runs synthetic batches through the engine's own executor (one process: the
ModelRunner + Sampler; a grid: its workers, timed by the reporter's timeline as the step loop's
online correction is; what one engine step costs besides Python bookkeeping) — prefill chunks of several sizes over several
context lengths, decode batches of several sizes and context lengths, and mixes of both — fits
`CalibratedModel` on a training split, reports the median relative error on the held-out split, and
saves the model as JSON under its `ProfileKey` (hardware incl. CPU model and torch thread count,
model shape, dtype, parallel layout). A later call with the same key reuses the file.

Timing on a shared machine: every batch is run `repeats` times, round-robin over all batches (so a
burst of background load hits many batches once rather than one batch every time), after a short
warm-up; its time is the median of its repeats. Both wall-clock and process CPU time are recorded:
the model is fitted on the wall clock (what an iteration takes, what the scheduler budgets) unless
the spec says `clock="cpu"`; the CPU-time fit's error is reported too, since it shows the model's
accuracy without the other processes that share the machine.

Anchoring at the budget: the start-up spec times small batches (chunks of 8-64 tokens), but the
adaptive chunker runs chunks that fill the iteration budget, often 100x larger and at contexts of up to
max_model_len, where a linear fit on small batches can be off by 10x or more (a budget-sized chunk
then runs many budgets long, and a short prompt waits behind it). `anchor` times, for a few contexts
up to max_model_len, the chunk the model says fills the engine's budget, and refits with those
batches weighted up until the model predicts them within ANCHOR_TOLERANCE (at most ANCHOR_ROUNDS).
A saved profile keeps its samples and anchors; reusing it re-anchors at the engine's own budget and
length (a few budget-long steps at start).

Block tables are deliberately scattered (every sequence's blocks interleaved with others'), as they
are in a cache that has served many requests: the KV gather then copies, as it does in serving. The
cache contents are whatever the blocks hold: cost does not depend on them. Profiling needs an idle
engine (its blocks are borrowed and returned).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import random
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from common.errors import CapacityError, ConfigError
from common.model import cpu_kernels
from common.perf_model.analytic import DTYPE_BYTES, HARDWARE, AnalyticModel, Hardware, hardware
from common.perf_model.base import PerfModel
from common.perf_model.calibrated import (CalibratedModel, ProfileKey, Sample, fit_from_samples,
                                          held_out_error, load_or_fallback, split_samples)
from common.perf_model.online import OnlineCorrection
from common.sampling_params import SamplingParams
from common.scheduler.request import Request
from common.scheduler.scheduler import ScheduledItem, SchedulerOutput
from common.scheduler.types import BatchShape

if TYPE_CHECKING:
    from common.engine.engine import LLMEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileSpec:
    """Which synthetic batches to time. Sizes beyond the engine's cache or max_model_len are dropped."""
    chunk_sizes: tuple[int, ...] = (32, 64, 128, 256)
    contexts: tuple[int, ...] = (0, 512, 1024, 2048)
    decode_sizes: tuple[int, ...] = (1, 2, 4, 8)
    decode_contexts: tuple[int, ...] = (64, 512, 1024, 2048)
    num_prefill: int = 16          # single prefill chunks, drawn from the grid
    num_decode: int = 12           # decode-only batches
    num_mixed: int = 20            # decodes + one or two prefill chunks
    repeats: int = 3
    warmup: int = 1                # untimed passes over all batches first
    holdout: float = 0.25
    seed: int = 0
    clock: str = "wall"            # wall | cpu: which time the model is fitted on

    def __post_init__(self) -> None:
        if min(self.chunk_sizes + self.decode_sizes, default=0) <= 0 or not self.contexts \
                or not self.decode_contexts or min(self.contexts + self.decode_contexts) < 0:
            raise ConfigError(f"profile spec: sizes must be positive and contexts >= 0: {self}")
        if self.repeats < 1 or self.warmup < 0 or min(self.num_prefill, self.num_decode,
                                                       self.num_mixed) < 0:
            raise ConfigError(f"profile spec: repeats must be >= 1 and counts >= 0: {self}")
        if self.clock not in ("wall", "cpu"):
            raise ConfigError(f"profile spec: clock must be 'wall' or 'cpu', got {self.clock!r}")


#: What a pool calibrating at start times: few, small batches (well under a minute on 2 CPU cores
#: with the built-in model, any layout); `mnemosyne profile` or bench/ use the full default spec.
STARTUP_SPEC = ProfileSpec(chunk_sizes=(8, 32, 64), contexts=(0, 256, 1024), decode_sizes=(1, 4, 8),
                           decode_contexts=(64, 512, 1024), num_prefill=6, num_decode=5, num_mixed=6,
                           repeats=2, warmup=0)


#: Anchoring (see the module docstring): rounds at most, relative error accepted, weight of an anchor
#: in the refit (its row repeated), contexts timed (fractions of the longest context a chunk can start at).
ANCHOR_ROUNDS = 3
ANCHOR_TOLERANCE = 0.25
ANCHOR_WEIGHT = 4
ANCHOR_CONTEXTS = (0.0, 0.25, 0.5)


@dataclass(frozen=True)
class Timing:
    batch: BatchShape
    wall_s: float                  # medians over the repeats
    cpu_s: float | None            # process CPU time (all threads; None for a grid's workers)

    def sample(self, clock: str) -> Sample:
        return self.batch, self.cpu_s if clock == "cpu" and self.cpu_s is not None else self.wall_s


@dataclass
class Calibration:
    model: CalibratedModel
    held_out_error: float          # median |predicted - measured| / measured on held-out batches
    path: Path
    reused: bool                   # loaded from `path` instead of profiled now
    timings: list[Timing] = field(default_factory=list)    # if profiled now
    held_out: list[Sample] = field(default_factory=list)
    cpu_held_out_error: float | None = None                 # the same fit on CPU time


# ---- keys and paths --------------------------------------------------------------------------------
def hardware_id(device: str | torch.device = "cpu", threads: int | None = None) -> str:
    """What the timings depend on besides the model: the processor, how many threads torch uses
    (`threads`: those of the processes that run the model, e.g. a grid's workers; default this one's)
    and, on the CPU, which build of common/model/cpu_kernels.py's kernels runs ("-k<hash>"): a profile
    measured without them is ~2x slow at decode, and an edited kernel may change any iteration's time."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "cuda-" + torch.cuda.get_device_name(dev).replace(" ", "_")
    cpu = _cpu_name() or platform.machine() or "unknown"
    kernel = f"-k{cpu_kernels.fingerprint()}" if cpu_kernels.library() is not None else ""
    return f"cpu-{cpu.replace(' ', '_')}-{threads or torch.get_num_threads()}t{kernel}"


def _cpu_name() -> str:
    return cpu_kernels.cpuinfo("model name") or platform.processor()


def profile_key(engine: "LLMEngine") -> ProfileKey:
    """Hardware (incl. the model processes' torch threads: a grid's workers choose their own, and
    their profile is looked up under this machine's processor), model, dtype and layout."""
    return ProfileKey.make(hardware_id(engine.cfg.device, engine.executor.threads), engine.model_config,
                           engine.cfg.dtype, engine.cfg.parallel)


def default_profile_path(key: ProfileKey) -> Path:
    """<cache dir>/perf/<hash of the key>.json (cache dir: $MNEMOSYNE_CACHE or ~/.cache/mnemosyne)."""
    from common.model.gguf_loader import default_cache_dir
    digest = hashlib.sha256(json.dumps(asdict(key), sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_dir() / "perf" / f"{digest}.json"


def analytic_model(engine: "LLMEngine") -> AnalyticModel:
    """The roofline fallback for this engine's model, dtype and layout (CPU presets on CPU)."""
    dev = torch.device(engine.cfg.device).type
    name = f"{dev}-{engine.cfg.dtype}"
    hw: Hardware = HARDWARE.get(name) or hardware(f"cpu-{engine.cfg.dtype}")
    return AnalyticModel(engine.model_config, hw, engine.cfg.parallel, DTYPE_BYTES[engine.cfg.dtype])


def load_perf_model(engine: "LLMEngine", path: str | Path | None = None, online: bool = True,
                    key: ProfileKey | None = None) -> PerfModel:
    """The saved calibrated model for this engine's key, else the analytic roofline (logged);
    `online`: wrapped in OnlineCorrection, which the engine feeds with every step's measured time.
    `engine`: anything with `cfg`, `model_config` and `executor` (default key: profile_key(engine))."""
    key = key or profile_key(engine)
    model = load_or_fallback(Path(path) if path else default_profile_path(key), key, analytic_model(engine))
    return OnlineCorrection(model) if online else model


def engine_perf_model(engine: "LLMEngine", spec: ProfileSpec = STARTUP_SPEC) -> PerfModel:
    """The performance model cfg.perf_model asks for, online-corrected:
    "saved": the profile saved for this engine's key, else the analytic roofline;
    "calibrate": the saved profile, else calibrate now through the engine's executor (`spec`) and save;
    "analytic": the analytic roofline only;
    any other value: the profile at that path, which must match the engine's key (ConfigError)."""
    mode = engine.cfg.perf_model
    if mode == "saved":
        return load_perf_model(engine)
    if mode == "analytic":
        return OnlineCorrection(analytic_model(engine))
    if mode == "calibrate":
        try:
            cal = calibrate(engine, spec)
        except ConfigError as e:
            # A cache or max_model_len too small for enough distinct synthetic batches to fit the
            # model: schedule on the roofline rather than refuse to start.
            log.warning("performance model: cannot calibrate this engine (%s); using the analytic "
                        "roofline", e)
            return OnlineCorrection(analytic_model(engine))
        log.info("performance model: %s profile %s (held-out median error %.1f%%)",
                 "reused" if cal.reused else "calibrated", cal.path, 100 * cal.held_out_error)
        return checked(engine, cal.model, spec, spot_record(cal.path)) if cal.reused else OnlineCorrection(cal.model)
    path = Path(mode)
    if not path.is_file():
        raise ConfigError(f"perf_model: {mode!r} is not saved | calibrate | analytic nor a profile file")
    return checked(engine, CalibratedModel.load(path, profile_key(engine)), spec, spot_record(path))


SPOT_CHECK_BATCHES = 4


def spot_check(engine: "LLMEngine", model: PerfModel, spec: ProfileSpec = STARTUP_SPEC,
               batches: int = SPOT_CHECK_BATCHES) -> float | None:
    """measured / predicted on this machine now: the median over `batches` of the spec's synthetic
    batches (prefill, decode and mixed ones, spread over the list), timed through the engine's
    executor once each after one untimed pass. None when none fits. Well under a second on the
    built-in model; a saved profile is the same machine type, not the same machine state (a shared
    host can run several times slower or faster than on the day it was profiled)."""
    p = engine.cfg.parallel
    max_kv = engine.blocks.num_blocks * engine.blocks.block_size
    try:
        pool = synthetic_batches(spec, engine.max_model_len, max_kv, p.kvp_tokens if p.kvp > 1 else None)
    except ConfigError:
        return None
    step = max(1, len(pool) // batches)
    timings = measure(engine, pool[::step][:batches], repeats=1, warmup=1)
    ratios = [t.wall_s / pred for t in timings if (pred := model.predict(t.batch)) > 0 and t.wall_s > 0]
    return statistics.median(ratios) if ratios else None


#: a spot check of the same model on this host younger than this is reused at start instead of run
#: again (a restarted instance serves ~2 s sooner; the online correction follows the machine from there)
SPOT_CHECK_REUSE_S = 300.0


def spot_record(profile_path: Path) -> Path:
    """Where the latest spot check of a profile's model is kept: beside it, <name>.spot.json."""
    return profile_path.with_name(profile_path.stem + ".spot.json")


def _model_digest(model: PerfModel) -> str:
    what = [getattr(model, "coefficients", None) or repr(model), str(getattr(model, "key", None)),
            getattr(model, "kvp_tokens", None)]
    return hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:16]


def recent_spot_check(record: Path, model: PerfModel, max_age_s: float = SPOT_CHECK_REUSE_S) -> tuple[float, float] | None:
    """(ratio, age in seconds) of the spot check kept in `record` when it measured this very model
    (its coefficients' digest) on this host within `max_age_s`; else None."""
    try:
        data = json.loads(record.read_text())
        age = time.time() - float(data["at"])
        if data.get("model") != _model_digest(model) or data.get("host") != socket.gethostname() \
                or not 0 <= age <= max_age_s:
            return None
        return float(data["ratio"]), age
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_spot_check(record: Path, model: PerfModel, ratio: float) -> None:
    """Keeps a spot check's result for the next start on this host (atomically; a cache directory
    that cannot be written only costs the next start its check)."""
    tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"model": _model_digest(model), "host": socket.gethostname(),
                                   "at": time.time(), "ratio": ratio}))
        os.replace(tmp, record)
    except OSError as e:
        log.debug("spot check not kept in %s: %s", record, e)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)                # a partly written one


def checked(engine: "LLMEngine", model: PerfModel, spec: ProfileSpec = STARTUP_SPEC,
            record: Path | None = None) -> OnlineCorrection:
    """`model` online-corrected, its correction starting at what a spot check measures now, or at
    what one measured on this host in the last SPOT_CHECK_REUSE_S (kept in `record`)."""
    online = OnlineCorrection(model)
    recent = recent_spot_check(record, model) if record is not None else None
    if recent is not None:
        online.start_at(recent[0])
        log.info("performance model: the spot check of %.0f s ago on this host (measured / predicted "
                 "= %.2f) is reused; the online correction starts there", recent[1], recent[0])
        return online
    ratio = spot_check(engine, model, spec)
    if ratio is not None:
        online.start_at(ratio)
        (log.warning if not 0.8 <= ratio <= 1.25 else log.info)(
            "performance model: spot check on this machine now: measured / predicted = %.2f "
            "(median of %d batches); the online correction starts there", ratio, SPOT_CHECK_BATCHES)
        if record is not None:
            save_spot_check(record, model, ratio)
    return online


# ---- synthetic batches -----------------------------------------------------------------------------
def synthetic_batches(spec: ProfileSpec, max_len: int, max_kv_tokens: int,
                      kvp_tokens: int | None = None) -> list[BatchShape]:
    """Deterministic draws from the spec's grid that fit max_len (per sequence) and the cache; with
    KVP groups of `kvp_tokens`, no prefill chunk crosses a group boundary (as the scheduler's)."""
    rng = random.Random(spec.seed)
    m = kvp_tokens or max_len
    chunks = [n for n in spec.chunk_sizes if n < max_len and n <= m]
    ctxs = [c for c in spec.contexts if min(chunks, default=max_len) + c < max_len]
    dctxs = [c for c in spec.decode_contexts if c + 1 < max_len]
    if not chunks or not ctxs or not dctxs:
        raise ConfigError(f"profile spec has no batch that fits max_model_len {max_len}")

    def prefill() -> tuple[int, int]:
        n = rng.choice(chunks)
        return n, rng.choice([c for c in ctxs if n + c < max_len and c % m + n <= m] or [0])

    def decodes(k: int) -> list[int]:
        return [rng.choice(dctxs) for _ in range(k)]

    out: list[BatchShape] = []
    for _ in range(spec.num_prefill):
        out.append(BatchShape((prefill(),)))
    for _ in range(spec.num_decode):
        out.append(BatchShape(decodes=tuple(decodes(rng.choice(spec.decode_sizes)))))
    for _ in range(spec.num_mixed):
        pre = tuple(prefill() for _ in range(rng.choice((1, 1, 2))))
        out.append(BatchShape(pre, tuple(decodes(rng.choice(spec.decode_sizes)))))
    return [b for b in out if kv_tokens(b) <= max_kv_tokens]


def kv_tokens(batch: BatchShape) -> int:
    return sum(n + c for n, c in batch.prefills) + sum(c + 1 for c in batch.decodes)


# ---- timing ----------------------------------------------------------------------------------------
class _Runner:
    """Runs a BatchShape through the engine's executor on borrowed blocks (any layout)."""

    def __init__(self, engine: "LLMEngine") -> None:
        sched = getattr(engine, "scheduler", None)
        if (sched is not None and engine.has_unfinished()) or engine.blocks.num_used > _reserved(engine):
            raise ConfigError("profiling needs an idle engine (no requests, no used KV blocks)")
        self.e = engine
        self.params = SamplingParams(max_tokens=1)

    def items(self, batch: BatchShape, tag: str) -> list[ScheduledItem] | None:
        """The batch's items, their blocks allocated (scattered); None when it does not fit."""
        items = [self._item(f"{tag}-p{i}", ctx, n, False) for i, (n, ctx) in enumerate(batch.prefills)]
        items += [self._item(f"{tag}-d{i}", ctx, 1, True) for i, ctx in enumerate(batch.decodes)]
        # one block at a time for every sequence in turn, plus a spacer block after each round
        blocks, bs = self.e.blocks, self.e.blocks.block_size
        need = {it.request.request_id: it.start + it.num_tokens for it in items}
        if sum(blocks.blocks_for(t) for t in need.values()) > blocks.num_free:
            return None
        spacer = f"{tag}-spacer"
        rounds = max(-(-t // bs) for t in need.values())
        try:
            for k in range(1, rounds + 1):
                for rid, total in need.items():
                    if -(-total // bs) >= k:
                        blocks.allocate(rid, min(k * bs, total))
                held = sum(len(t) for r in need for t in blocks.table(r))
                if blocks.num_free > sum(blocks.blocks_for(t) for t in need.values()) - held:
                    blocks.allocate(spacer, k * bs)
        except CapacityError:
            self.release(items)
            return None
        finally:
            blocks.free(spacer)
        return items

    def _item(self, rid: str, ctx: int, n: int, sample: bool) -> ScheduledItem:
        return ScheduledItem(Request(rid, [1] * (ctx + n), self.params, 0.0), ctx, n, sample)

    def release(self, items: list[ScheduledItem]) -> None:
        for it in items:
            self.e.blocks.free(it.request.request_id)
            self.e.executor.forget(it.request.request_id)

    def time(self, items: list[ScheduledItem]) -> tuple[float, float | None]:
        """(service, CPU) seconds of the step as the executor reports them: one process, its forward
        pass and sampling; a grid, the slowest stage's span (see GridExecutor.collect)."""
        ex = self.e.executor
        ex.submit(SchedulerOutput(items), {})
        res = ex.collect()
        return res.service_s, res.cpu_s

    def run(self, batch: BatchShape, tag: str) -> tuple[float, float | None] | None:
        items = self.items(batch, tag)
        if items is None:
            return None
        try:
            return self.time(items)
        finally:
            self.release(items)


def _reserved(engine) -> int:
    """Blocks the executor keeps for itself (the CUDA-graph scratch block)."""
    from common.engine.executor import GRAPH_SCRATCH_ID
    return sum(len(t) for t in engine.blocks.table(GRAPH_SCRATCH_ID))


def measure(engine: "LLMEngine", batches: Sequence[BatchShape], repeats: int = 3,
            warmup: int = 1) -> list[Timing]:
    """Median service and CPU time over `repeats` of each batch, timed round-robin after `warmup`
    untimed passes (allocator, kernels, caches). Batches the cache cannot hold are left out."""
    runner = _Runner(engine)
    for _ in range(warmup):
        for i, b in enumerate(batches):
            runner.run(b, f"__profile-warm{i}")
    times: list[list[tuple[float, float | None]]] = [[] for _ in batches]
    for _ in range(repeats):
        for i, b in enumerate(batches):
            t = runner.run(b, f"__profile-{i}")
            if t is not None:
                times[i].append(t)
    return [Timing(b, statistics.median(w for w, _ in ts),
                   None if any(c is None for _, c in ts) else statistics.median(c for _, c in ts))
            for b, ts in zip(batches, times) if ts]


def profile(engine: "LLMEngine", spec: ProfileSpec = ProfileSpec()) -> list[Timing]:
    p = engine.cfg.parallel
    max_kv = engine.blocks.num_blocks * engine.blocks.block_size
    batches = synthetic_batches(spec, engine.max_model_len, max_kv, p.kvp_tokens if p.kvp > 1 else None)
    return measure(engine, batches, spec.repeats, spec.warmup)


def calibrate(engine: "LLMEngine", spec: ProfileSpec = ProfileSpec(), path: str | Path | None = None,
              reuse: bool = True) -> Calibration:
    """Profiles (or reuses the saved profile for this engine's key), fits, anchors at the engine's
    budget (`anchor`), reports, saves. Any layout: the batches go through the engine's executor.
    A saved profile without its samples (written before anchoring existed) is profiled again."""
    key = profile_key(engine)
    path = Path(path) if path else default_profile_path(key)
    kvp_tokens = engine.cfg.parallel.kvp_tokens if engine.cfg.parallel.kvp > 1 else None
    if reuse and path.exists():
        try:
            model = CalibratedModel.load(path, key)
            if "train" not in model.fit_info:
                raise ConfigError("it has no samples to re-anchor on (an older format)")
            log.info("reusing performance profile %s (%s)", path, key)
            train = [_sample_of(r) for r in model.fit_info["train"]]
            anchors = [_sample_of(r) for r in model.fit_info.get("anchors", [])]
            seen = list(model.fit_info.get("anchored_at", []))
            refit = anchor(engine, model, train, anchors, key, kvp_tokens)
            if refit.fit_info.get("anchored_at") != seen:
                refit.save(path)
            return Calibration(refit, float(refit.fit_info.get("held_out_median_rel_err", float("nan"))),
                               path, True)
        except (ConfigError, KeyError, ValueError, TypeError) as e:
            log.warning("not reusing %s: %s", path, e)
    t0 = time.monotonic()
    timings = profile(engine, spec)
    has_cpu = all(t.cpu_s is not None for t in timings)
    errors: dict[str, float | None] = {"cpu": None}
    clock = spec.clock if has_cpu else "wall"
    for c in ("wall", "cpu") if has_cpu else ("wall",):
        train, held = split_samples([t.sample(c) for t in timings], spec.holdout, spec.seed)
        fitted = fit_from_samples(train, key, kvp_tokens)
        errors[c] = held_out_error(fitted, held)
        if c == clock:
            model, train_set, held_out = fitted, train, held
    model.fit_info.update(held_out_median_rel_err=errors[clock], num_held_out=len(held_out),
                          wall_held_out_median_rel_err=errors["wall"],
                          cpu_held_out_median_rel_err=errors["cpu"],
                          spec=asdict(spec), train=[_row(s) for s in train_set],
                          held_out=[_row(s) for s in held_out])
    model = anchor(engine, model, train_set, [], key, kvp_tokens)
    model.fit_info.update(profile_seconds=round(time.monotonic() - t0, 1))
    model.save(path)
    held_err = float(model.fit_info["held_out_median_rel_err"])
    log.info("performance profile %s: %d batches in %.1f s, held-out median error %.1f%% (%s clock)",
             path, len(timings), time.monotonic() - t0, 100 * held_err, clock)
    return Calibration(model, held_err, path, False, timings, held_out, errors["cpu"])


# ---- anchoring at the budget -----------------------------------------------------------------------
def _row(sample: Sample) -> list:
    batch, seconds = sample
    return [[list(p) for p in batch.prefills], list(batch.decodes), seconds]


def _sample_of(row: list) -> Sample:
    prefills, decodes, seconds = row
    return BatchShape(tuple((int(n), int(c)) for n, c in prefills), tuple(int(c) for c in decodes)), float(seconds)


def budget_chunk(model: PerfModel, budget_s: float, context: int, room: int, chunking) -> int:
    """The largest chunk (a multiple of chunking.multiple in [min_chunk, min(max_chunk, room)]) that
    `model` predicts within `budget_s` at `context` tokens before it, as the adaptive chunker sizes a
    lone prefill; min_chunk when none does (0 when not even min_chunk has room)."""
    step, lo = chunking.multiple, chunking.min_chunk
    hi = min(chunking.max_chunk, room) // step * step
    if hi < lo:
        return 0
    best = lo
    a, b = lo // step, hi // step                     # in units of `step`
    while a <= b:
        mid = (a + b) // 2
        if model.predict(BatchShape(((mid * step, context),))) <= budget_s:
            best, a = mid * step, mid + 1
        else:
            b = mid - 1
    return best


def anchor_batches(engine: "LLMEngine", model: PerfModel) -> list[BatchShape]:
    """The lone prefill chunk that fills the engine's iteration budget by `model`, at each of
    ANCHOR_CONTEXTS of the longest context a chunk can start at (within one KVP group and the cache)."""
    budget, top = anchor_point(engine)
    chunking = _chunking(engine.cfg.scheduler)
    out: list[BatchShape] = []
    for frac in ANCHOR_CONTEXTS:
        ctx = int(top * frac) // chunking.multiple * chunking.multiple
        n = budget_chunk(model, budget, ctx, top - ctx, chunking)
        if n > 0 and (n, ctx) not in [b.prefills[0] for b in out]:
            out.append(BatchShape(((n, ctx),)))
    return out


def anchor_point(engine: "LLMEngine") -> tuple[float, int]:
    """(the engine's iteration budget, the longest context a chunk can start at): what anchors
    depend on besides the model (a profile anchored at the same point is not anchored again)."""
    p = engine.cfg.parallel
    group = p.kvp_tokens if p.kvp > 1 and p.kvp_tokens else engine.max_model_len
    max_kv = engine.blocks.num_blocks // max(p.kvp, 1) * engine.blocks.block_size
    return (engine.cfg.scheduler.iteration_budget(engine.executor.depth),
            min(group, engine.max_model_len, max_kv) - 1)


def _chunking(sched):
    from common.scheduler.chunking import ChunkingConfig
    return ChunkingConfig(min_chunk=sched.min_chunk, max_chunk=sched.max_chunk)


def anchor(engine: "LLMEngine", model: CalibratedModel, train: list[Sample], anchors: list[Sample],
           key: ProfileKey, kvp_tokens: int | None) -> CalibratedModel:
    """`model`, refitted on `train` plus budget-sized anchor batches (anchor_batches), each timed
    (median of 2) and weighted ANCHOR_WEIGHT, until it predicts every anchor of the last round within
    ANCHOR_TOLERANCE or ANCHOR_ROUNDS pass. `anchors`: earlier anchors (of a saved profile), kept.
    Returns `model` itself when it was anchored at this anchor_point before (a saved profile) or its
    first anchors are within tolerance; fit_info records the anchors, the points anchored at and
    each round's measured / predicted ratios."""
    budget, top = point = anchor_point(engine)
    done = [list(x) for x in model.fit_info.get("anchored_at", [])]
    if [round(budget, 6), top] in done:
        return model
    anchors = list(anchors)
    rounds: list[list[float]] = []
    current = model
    for r in range(ANCHOR_ROUNDS):
        batches = anchor_batches(engine, current)
        if not batches:
            break
        timed = measure(engine, batches, repeats=2, warmup=1 if r == 0 else 0)
        ratios = [round(t.wall_s / current.predict(t.batch), 3) for t in timed if current.predict(t.batch) > 0]
        rounds.append(ratios)
        anchors += [(t.batch, t.wall_s) for t in timed]
        log.info("performance model: anchors at the %.3f s budget (chunk, context) %s: measured / "
                 "predicted %s", budget, [b.prefills[0] for b in batches], ratios)
        if all(abs(x - 1.0) <= ANCHOR_TOLERANCE for x in ratios):
            break
        current = fit_from_samples(train + anchors * ANCHOR_WEIGHT, key, kvp_tokens)
        current.fit_info = dict(model.fit_info)
        held = [_sample_of(row) for row in model.fit_info.get("held_out", [])]
        if held:
            current.fit_info["held_out_median_rel_err"] = held_out_error(current, held)
    current.fit_info.update(anchors=[_row(a) for a in anchors], anchor_rounds=rounds,
                            anchored_at=done + [[round(budget, 6), top]])
    return current
