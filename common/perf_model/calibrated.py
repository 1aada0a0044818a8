"""A performance model fitted on profiled iterations of the real engine (numpy, no torch).

time = a * tokens + b * attention pairs + c * decode KV tokens + d * sequences + e
       + f * prefill chunks + g * prefill context tokens                       (all coefficients >= 0)
  tokens          prefill chunk tokens + decodes (the linears' work)
  attention pairs sum over chunks of n * (ctx + n/2) (query-key pairs a chunk computes)
  decode KV tokens sum over decodes of ctx + 1 (KV read by decode attention)
  sequences       one LM-head row, sampling and bookkeeping per sequence
  constant        per-iteration overhead (only for a non-empty batch)
  prefill chunks  what a chunk costs beyond a decode (more attention calls and merges per layer)
  prefill context sum over chunks of ctx: reading (gathering) the cached KV, whatever the chunk size
ctx is what the slowest KVP group holds (min(ctx, M)) when the model was fitted with kvp_tokens.
The first five are the format-1 model; a 5-coefficient model leaves the last two at 0.
The coefficients come from non-negative least squares on relative errors (every row divided by its
measured time), so small and large batches count alike, as the held-out metric does.

A fitted model is saved as JSON under a `ProfileKey` (hardware, model, dtype, parallel layout);
`load` refuses a file whose key differs from the one the caller runs with.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from common.config import ModelConfig, ParallelConfig
from common.errors import ConfigError
from common.perf_model.base import PerfModel
from common.scheduler.types import BatchShape

log = logging.getLogger(__name__)

FEATURES = ("token", "attn_pair", "kv_token", "seq", "const", "prefill_seq", "prefill_ctx")
LEGACY_FEATURES = 5                        # format 1: the first five
FORMAT_VERSION = 2

Sample = tuple[BatchShape, float]          # (batch, measured seconds)


@dataclass(frozen=True)
class ProfileKey:
    """What a profile is valid for. Build it with `ProfileKey.make` so both sides spell it alike."""
    hardware: str
    model: str
    dtype: str
    parallel: str = "tp1-spp1-kvp1"

    @classmethod
    def make(cls, hardware: str, model: ModelConfig | str, dtype: str,
             parallel: ParallelConfig = ParallelConfig()) -> "ProfileKey":
        name = model if isinstance(model, str) else model_fingerprint(model)
        return cls(hardware, name, dtype, parallel_tag(parallel))


def model_fingerprint(cfg: ModelConfig) -> str:
    """Architecture name, shape and a hash of every field (two checkpoints of one shape share it:
    time depends on shapes, not weights)."""
    digest = hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()
    return f"{cfg.architecture}-{cfg.num_layers}L-{cfg.hidden_size}h-{digest[:10]}"


def parallel_tag(p: ParallelConfig) -> str:
    tag = f"tp{p.tp}-spp{p.spp}-kvp{p.kvp}"
    return tag + (f"-M{p.kvp_tokens}" if p.kvp > 1 and p.kvp_tokens else "")


def features(batch: BatchShape, kvp_tokens: int | None = None) -> list[float]:
    """The regression row of one batch (order: FEATURES)."""
    if batch.is_empty:
        return [0.0] * len(FEATURES)

    def shard(ctx: int) -> int:
        return min(ctx, kvp_tokens) if kvp_tokens else ctx

    pairs = sum(n * (shard(c) + n / 2) for n, c in batch.prefills)
    kv = sum(shard(c) + 1 for c in batch.decodes)
    ctx = sum(shard(c) for _, c in batch.prefills)
    return [float(batch.num_tokens), float(pairs), float(kv), float(batch.num_seqs), 1.0,
            float(len(batch.prefills)), float(ctx)]


class CalibratedModel:
    def __init__(self, coefficients: Sequence[float], key: ProfileKey | None = None,
                 kvp_tokens: int | None = None, fit_info: dict | None = None) -> None:
        if len(coefficients) not in (LEGACY_FEATURES, len(FEATURES)):
            raise ConfigError(f"calibrated model needs {len(FEATURES)} coefficients "
                              f"({', '.join(FEATURES)}) or the first {LEGACY_FEATURES}, "
                              f"got {len(coefficients)}")
        coefficients = list(coefficients) + [0.0] * (len(FEATURES) - len(coefficients))
        if any(c < 0 for c in coefficients):
            raise ConfigError(f"calibrated model coefficients must be >= 0, got {list(coefficients)}")
        self.coefficients = tuple(float(c) for c in coefficients)
        self.key = key
        self.kvp_tokens = kvp_tokens
        self.fit_info = dict(fit_info or {})

    def predict(self, batch: BatchShape) -> float:
        return sum(c * f for c, f in zip(self.coefficients, features(batch, self.kvp_tokens)))

    def with_key(self, key: ProfileKey) -> "CalibratedModel":
        return CalibratedModel(self.coefficients, key, self.kvp_tokens, self.fit_info)

    # ---- persistence -----------------------------------------------------------------------------
    def to_json(self) -> dict:
        if self.key is None:
            raise ConfigError("a calibrated model needs a ProfileKey before it is saved (with_key)")
        return {"version": FORMAT_VERSION, "key": asdict(self.key), "features": list(FEATURES),
                "coefficients": list(self.coefficients), "kvp_tokens": self.kvp_tokens,
                "fit": self.fit_info}

    def save(self, path: str | os.PathLike) -> None:
        """Writes atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, expected: ProfileKey) -> "CalibratedModel":
        """Reads a saved model; ConfigError if it was profiled for another key or format."""
        data = json.loads(Path(path).read_text())
        names = tuple(data.get("features", ()))
        if data.get("version") not in (1, FORMAT_VERSION) or names not in (FEATURES,
                                                                          FEATURES[:LEGACY_FEATURES]):
            raise ConfigError(f"{path}: performance profile format {data.get('version')} / features "
                              f"{data.get('features')} is not {FORMAT_VERSION} / {list(FEATURES)}")
        key = ProfileKey(**data["key"])
        if key != expected:
            raise ConfigError(f"{path}: performance profile was made for {key}, "
                              f"this engine runs {expected}; re-profile or remove the file")
        return cls(data["coefficients"], key, data.get("kvp_tokens"), data.get("fit"))


def load_or_fallback(path: str | os.PathLike, expected: ProfileKey, fallback: PerfModel) -> PerfModel:
    """The saved calibrated model when `path` exists and matches `expected`, else `fallback`
    (typically the analytic model), logging why."""
    if not Path(path).exists():
        log.info("no performance profile at %s; using %s", path, type(fallback).__name__)
        return fallback
    try:
        return CalibratedModel.load(path, expected)
    except ConfigError as e:
        log.warning("%s; using %s", e, type(fallback).__name__)
        return fallback


# ---- fitting ---------------------------------------------------------------------------------------
def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson-Hanson active set)."""
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(float).eps * np.abs(a).sum(axis=0).max(initial=0.0) * max(m, n)
    max_iter = max_iter or 3 * n
    w = a.T @ (b - a @ x)
    for _ in range(max_iter):
        if passive.all() or w[~passive].max() <= tol:
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while passive.any():
            s = np.zeros(n)
            s[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if s[passive].min() > 0:
                break
            neg = passive & (s <= 0)
            alpha = np.min(x[neg] / (x[neg] - s[neg]))
            x = x + alpha * (s - x)
            passive &= x > tol
            x[~passive] = 0.0
        else:
            s = np.zeros(n)
        x = s
        w = a.T @ (b - a @ x)
    return x


def fit_from_samples(samples: Iterable[Sample], key: ProfileKey | None = None,
                     kvp_tokens: int | None = None) -> CalibratedModel:
    """Fits the coefficients on (batch, measured seconds) samples; needs at least as many non-empty
    samples as features, with positive times."""
    kept: list[Sample] = [(b, float(t)) for b, t in samples if not b.is_empty and t > 0]
    if len(kept) < len(FEATURES):
        raise ConfigError(f"fitting needs at least {len(FEATURES)} non-empty samples with positive "
                          f"times, got {len(kept)}")
    x = np.asarray([features(b, kvp_tokens) for b, _ in kept])
    y = np.asarray([t for _, t in kept])
    a = x / y[:, None]                      # relative errors: row i divided by its time
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0                 # a feature absent from every sample keeps coefficient 0
    coef = nnls(a / scale, np.ones_like(y)) / scale
    model = CalibratedModel(np.maximum(coef, 0.0), key, kvp_tokens)
    model.fit_info = {"num_samples": len(kept), "train_median_rel_err": _median_rel_err(model, kept)}
    return model


def _median_rel_err(model: PerfModel, samples: Sequence[Sample]) -> float:
    errs = sorted(abs(model.predict(b) - t) / t for b, t in samples if t > 0 and not b.is_empty)
    if not errs:
        raise ConfigError("no non-empty samples with a positive time to evaluate on")
    mid = len(errs) // 2
    return errs[mid] if len(errs) % 2 else 0.5 * (errs[mid - 1] + errs[mid])


def held_out_error(model: PerfModel, samples: Iterable[Sample]) -> float:
    """Median relative error |predicted - measured| / measured over the samples."""
    return _median_rel_err(model, list(samples))


def split_samples(samples: Sequence[Sample], holdout: float = 0.2,
                  seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """A deterministic (train, held-out) split."""
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"holdout fraction must be in (0, 1), got {holdout}")
    idx = list(range(len(samples)))
    random.Random(seed).shuffle(idx)
    k = max(1, int(round(len(samples) * holdout)))
    return [samples[i] for i in idx[k:]], [samples[i] for i in idx[:k]]
