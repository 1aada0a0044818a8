"""Online correction of predicted TTFTs by measured ones (torch-free), one per pool.

A pool's performance model predicts its iterations; a request's TTFT also holds what the model does
not see: RPC hops, the engine thread's wake-ups, KV transfer set-up, other processes on the host.
Those are partly fixed per request (an overhead) and partly proportional (a slower machine), so
the correction is affine:  corrected = overhead + ratio * predicted.

`observe(predicted, measured, clean)` keeps the last `window` pairs; after each, three fits are tried
on them and the one with the smallest mean squared relative error wins (relative: what admission is
judged on). The fits use the clean pairs alone when the window holds at least MIN_CLEAN of them: a
clean pair is a request predicted on an idle instance (nothing queued ahead, no decodes running, no
neighbour busy), so the pair measures the model's error and nothing else; a request admitted beside
others is also delayed by what arrives after it, which no prediction at its admission can know, and
fitting those pairs would skew every idle prediction (seen on make up's pools: a 0.2 s overhead
learned from interference, on prompts that take 0.2-0.9 s alone):
  ratio      overhead 0,  ratio = geometric mean of measured / predicted
  overhead   ratio 1,     overhead = median of measured - predicted
  affine     both, non-negative least squares on relative errors (needs >= 3 pairs whose
             predictions span at least 1.5x, else it is not identifiable)
ratio is clipped to [min_ratio, max_ratio] and overhead to [0, max_overhead_s]. Before any
observation the correction is the identity.
"""
from __future__ import annotations

import math
import statistics
from collections import deque

import numpy as np

from common.errors import ConfigError
from common.perf_model.calibrated import nnls


class TTFTCorrection:
    def __init__(self, window: int = 64, min_ratio: float = 0.25, max_ratio: float = 50.0,
                 max_overhead_s: float = 5.0) -> None:
        if window < 1 or not 0 < min_ratio <= 1 <= max_ratio or max_overhead_s < 0:
            raise ConfigError(f"TTFT correction: need window >= 1 (got {window}), 0 < min_ratio "
                              f"({min_ratio}) <= 1 <= max_ratio ({max_ratio}), max_overhead_s >= 0 "
                              f"({max_overhead_s})")
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)
        self.clean: deque[bool] = deque(maxlen=window)
        self.min_ratio, self.max_ratio, self.max_overhead_s = min_ratio, max_ratio, max_overhead_s
        self.overhead_s = 0.0
        self.ratio = 1.0

    def __call__(self, predicted_s: float) -> float:
        return self.overhead_s + self.ratio * predicted_s

    MIN_CLEAN = 3

    def observe(self, predicted_s: float, measured_s: float, clean: bool = True) -> None:
        if not predicted_s > 0 or not measured_s > 0:
            return
        self.samples.append((predicted_s, measured_s))
        self.clean.append(clean)
        pairs = [p for p, c in zip(self.samples, self.clean) if c]
        if len(pairs) < self.MIN_CLEAN:
            pairs = list(self.samples)
        fits = [self._clip(0.0, math.exp(statistics.fmean(math.log(y / m) for m, y in pairs))),
                self._clip(statistics.median(y - m for m, y in pairs), 1.0)]
        preds = [m for m, _ in pairs]
        if len(pairs) >= 3 and max(preds) >= 1.5 * min(preds):
            rows = np.asarray([[1.0 / y, m / y] for m, y in pairs])
            a, b = nnls(rows, np.ones(len(pairs)))
            fits.append(self._clip(a, b))
        self.overhead_s, self.ratio = min(fits, key=lambda f: self._error(f, pairs))

    def _clip(self, overhead_s: float, ratio: float) -> tuple[float, float]:
        return (min(max(float(overhead_s), 0.0), self.max_overhead_s),
                min(max(float(ratio), self.min_ratio), self.max_ratio))

    @staticmethod
    def _error(fit: tuple[float, float], pairs: list[tuple[float, float]]) -> float:
        a, b = fit
        return statistics.fmean(((a + b * m - y) / y) ** 2 for m, y in pairs)


class HostContention:
    """How much slower an instance runs while another instance on the same host is computing.

    Admission predicts each instance from its own performance model; two instances that share a
    host's cores (make up's prefill and decode pools on one machine) slow each other down, which no
    per-instance model sees: a short prompt prefilled on an idle decode instance while the prefill
    instance beside it works through a long prompt takes ~1.7x its prediction on 2 cores.

    Model: for the `busy_s` seconds the neighbour is predicted to keep computing, this instance runs
    `factor` times slower; after that at its own speed. A request predicted to take `alone_s`
    (already corrected by the pool's TTFTCorrection) then takes
        alone_s * factor                        if that ends within busy_s
        busy_s + (alone_s - busy_s / factor)    else (the rest runs alone)
    `factor` is fitted online on measured TTFTs of requests admitted while a neighbour was busy
    (observe; the last `window`), minimizing the mean squared relative error over a grid in
    [1, max_factor]; 1 (no effect) before any such request.
    """

    GRID_STEP = 0.01

    def __init__(self, window: int = 64, max_factor: float = 4.0) -> None:
        if window < 1 or max_factor < 1:
            raise ConfigError(f"host contention: need window >= 1 (got {window}), max_factor >= 1 "
                              f"(got {max_factor})")
        self.samples: deque[tuple[float, float, float]] = deque(maxlen=window)
        self.max_factor = max_factor
        self.factor = 1.0

    @staticmethod
    def stretch(alone_s: float, busy_s: float, factor: float) -> float:
        if busy_s <= 0 or factor <= 1:
            return alone_s
        if alone_s * factor <= busy_s:
            return alone_s * factor
        return busy_s + alone_s - busy_s / factor

    def __call__(self, alone_s: float, busy_s: float) -> float:
        return self.stretch(alone_s, busy_s, self.factor)

    def observe(self, alone_s: float, busy_s: float, measured_s: float) -> None:
        if not (alone_s > 0 and busy_s > 0 and measured_s > 0):
            return
        self.samples.append((alone_s, busy_s, measured_s))
        grid = np.arange(1.0, self.max_factor + self.GRID_STEP / 2, self.GRID_STEP)
        a = np.asarray([s[0] for s in self.samples])[None, :]
        b = np.asarray([s[1] for s in self.samples])[None, :]
        y = np.asarray([s[2] for s in self.samples])[None, :]
        f = grid[:, None]
        pred = np.where(a * f <= b, a * f, b + a - b / f)
        err = (((pred - y) / y) ** 2).mean(axis=1)
        self.factor = float(grid[int(np.argmin(err))])


class LoadFactor:
    """How much longer a request admitted to a loaded instance takes than its corrected prediction.

    The pool's TTFTCorrection learns from requests predicted on an idle instance only; a request
    admitted beside others is also delayed by what arrives after it (a decode instance packs the
    prompts queued at each iteration's start into that iteration, and every one of them gets its
    first token at its end; LARS runs a later prompt with less slack first) and, on a shared host,
    by the load's own CPU (the clients, the router): a burst of 96 prompts of 200 tokens on 2 cores
    took ~2x its corrected prediction, the first at once, before any loaded iteration had been
    measured (the slowdown term sees an instance's iterations only from its next load sample).

    Model: on a loaded candidate (work queued ahead, decodes running or an iteration in flight) the
    corrected prediction is multiplied by `factor`, the geometric mean of measured / predicted
    (before the factor) over the last `window` requests admitted in that state, clipped to
    [1, max_factor]: an online, statistical account of the load this deployment sees, not a
    prediction of one burst; 1 (no effect) until MIN_SAMPLES such requests were measured.
    """

    MIN_SAMPLES = 3

    def __init__(self, window: int = 64, max_factor: float = 4.0) -> None:
        if window < 1 or max_factor < 1:
            raise ConfigError(f"load factor: need window >= 1 (got {window}), max_factor >= 1 "
                              f"(got {max_factor})")
        self.samples: deque[float] = deque(maxlen=window)
        self.max_factor = max_factor
        self.factor = 1.0

    def observe(self, predicted_s: float, measured_s: float) -> None:
        if not (predicted_s > 0 and measured_s > 0):
            return
        self.samples.append(math.log(measured_s / predicted_s))
        if len(self.samples) < self.MIN_SAMPLES:
            return
        self.factor = min(max(math.exp(statistics.fmean(self.samples)), 1.0), self.max_factor)
