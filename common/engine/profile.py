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

Block tables are deliberately scattered (every sequence's blocks interleaved with others'), as they
are in a cache that has served many requests: the KV gather then copies, as it does in serving. The
cache contents are whatever the blocks hold: cost does not depend on them. Profiling needs an idle
engine (its blocks are borrowed and returned).
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from common.errors import CapacityError, ConfigError
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
    """What the timings depend on besides the model: the processor and how many threads torch uses
    (`threads`: those of the processes that run the model, e.g. a grid's workers; default this one's)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "cuda-" + torch.cuda.get_device_name(dev).replace(" ", "_")
    cpu = _cpu_name() or platform.machine() or "unknown"
    return f"cpu-{cpu.replace(' ', '_')}-{threads or torch.get_num_threads()}t"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


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
        return checked(engine, cal.model, spec) if cal.reused else OnlineCorrection(cal.model)
    path = Path(mode)
    if not path.is_file():
        raise ConfigError(f"perf_model: {mode!r} is not saved | calibrate | analytic nor a profile file")
    return checked(engine, CalibratedModel.load(path, profile_key(engine)), spec)


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


def checked(engine: "LLMEngine", model: PerfModel, spec: ProfileSpec = STARTUP_SPEC) -> OnlineCorrection:
    """`model` online-corrected, its correction starting at what a spot check measures now."""
    online = OnlineCorrection(model)
    ratio = spot_check(engine, model, spec)
    if ratio is not None:
        online.start_at(ratio)
        (log.warning if not 0.8 <= ratio <= 1.25 else log.info)(
            "performance model: spot check on this machine now: measured / predicted = %.2f "
            "(median of %d batches); the online correction starts there", ratio, SPOT_CHECK_BATCHES)
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
    """Profiles (or reuses the saved profile for this engine's key), fits, reports, saves.
    Any layout: the batches go through the engine's executor."""
    key = profile_key(engine)
    path = Path(path) if path else default_profile_path(key)
    if reuse and path.exists():
        try:
            model = CalibratedModel.load(path, key)
            log.info("reusing performance profile %s (%s)", path, key)
            return Calibration(model, float(model.fit_info.get("held_out_median_rel_err", float("nan"))),
                               path, True)
        except (ConfigError, KeyError, ValueError) as e:
            log.warning("not reusing %s: %s", path, e)
    t0 = time.monotonic()
    timings = profile(engine, spec)
    kvp_tokens = engine.cfg.parallel.kvp_tokens if engine.cfg.parallel.kvp > 1 else None
    has_cpu = all(t.cpu_s is not None for t in timings)
    errors: dict[str, float | None] = {"cpu": None}
    clock = spec.clock if has_cpu else "wall"
    for c in ("wall", "cpu") if has_cpu else ("wall",):
        train, held = split_samples([t.sample(c) for t in timings], spec.holdout, spec.seed)
        fitted = fit_from_samples(train, key, kvp_tokens)
        errors[c] = held_out_error(fitted, held)
        if c == clock:
            model, held_out = fitted, held
    model.fit_info.update(held_out_median_rel_err=errors[clock], num_held_out=len(held_out),
                          wall_held_out_median_rel_err=errors["wall"],
                          cpu_held_out_median_rel_err=errors["cpu"],
                          profile_seconds=round(time.monotonic() - t0, 1), spec=asdict(spec))
    model.save(path)
    log.info("performance profile %s: %d batches in %.1f s, held-out median error %.1f%% (%s clock)",
             path, len(timings), time.monotonic() - t0, 100 * errors[clock], clock)
    return Calibration(model, errors[clock], path, False, timings, held_out, errors["cpu"])
