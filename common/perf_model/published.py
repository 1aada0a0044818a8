"""A pool's performance model as it travels to the router (kvstore registration), torch-free.

A pool instance publishes the PerfModel it schedules with so that admission predicts with the
very same numbers: `publish(model)` -> PublishedModel, `PublishedModel.build()` -> a PerfModel whose
predictions equal the original's (exactly: the same formula with the same parameters).

    kind        params (names -> numbers)
    calibrated  the CalibratedModel coefficients by feature name (calibrated.FEATURES), kvp_tokens
    analytic    the AnalyticModel's shapes (vocab_size, hidden_size, intermediate_size, num_layers,
                num_heads, num_kv_heads, head_dim), hardware (flops, mem_bw, iter_overhead_s,
                layer_overhead_s), layout (tp, spp, kvp, kvp_tokens) and dtype_bytes
`scale` is an OnlineCorrection's scale at publication (1.0 without one); build() applies it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from common.config import ModelConfig, ParallelConfig
from common.errors import ConfigError
from common.perf_model.analytic import AnalyticModel, Hardware
from common.perf_model.base import PerfModel
from common.perf_model.calibrated import FEATURES, CalibratedModel
from common.perf_model.online import OnlineCorrection
from common.scheduler.types import BatchShape

KINDS = ("calibrated", "analytic")
_SHAPES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
           "head_dim")
_HW = ("flops", "mem_bw", "iter_overhead_s", "layer_overhead_s")
_LAYOUT = ("tp", "spp", "kvp", "kvp_tokens")


@dataclass(frozen=True)
class PublishedModel:
    kind: str
    params: Mapping[str, float] = field(default_factory=dict)
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"published performance model: kind must be one of {KINDS}, got {self.kind!r}")
        need = FEATURES if self.kind == "calibrated" else _SHAPES + _HW + _LAYOUT + ("dtype_bytes",)
        missing = [n for n in need if n not in self.params]
        if missing:
            raise ConfigError(f"published {self.kind} model lacks {missing}")
        if not self.scale > 0:
            raise ConfigError(f"published performance model: scale must be positive, got {self.scale}")

    def build(self) -> PerfModel:
        p = self.params
        if self.kind == "calibrated":
            base: PerfModel = CalibratedModel([p[f] for f in FEATURES], kvp_tokens=int(p.get("kvp_tokens", 0)) or None)
        else:
            shapes = {n: int(p[n]) for n in _SHAPES}
            model = ModelConfig(**shapes)
            hw = Hardware("published", *(float(p[n]) for n in _HW))
            layout = ParallelConfig(**_layout(p))
            base = AnalyticModel(model, hw, layout, int(p["dtype_bytes"]))
        return base if self.scale == 1.0 else _Scaled(base, self.scale)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params": dict(self.params), "scale": self.scale}

    @classmethod
    def from_dict(cls, d: Mapping) -> "PublishedModel":
        return cls(d["kind"], {str(k): float(v) for k, v in d.get("params", {}).items()},
                   float(d.get("scale", 1.0)))


class _Scaled:
    def __init__(self, base: PerfModel, scale: float) -> None:
        self.base, self.scale = base, scale

    def predict(self, batch: BatchShape) -> float:
        return self.scale * self.base.predict(batch)


def _layout(p: Mapping[str, float]) -> dict:
    out = {n: int(p[n]) for n in _LAYOUT}
    if out["kvp"] <= 1:
        out.pop("kvp_tokens")          # ParallelConfig's default; only meaningful with kvp > 1
    return out


def publish(model: PerfModel) -> PublishedModel:
    """The published form of a CalibratedModel or AnalyticModel (optionally in an OnlineCorrection).
    ConfigError for any other model (nothing the router could rebuild)."""
    scale = 1.0
    if isinstance(model, OnlineCorrection):
        model, scale = model.base, model.scale
    if isinstance(model, CalibratedModel):
        params = dict(zip(FEATURES, model.coefficients))
        params["kvp_tokens"] = float(model.kvp_tokens or 0)
        return PublishedModel("calibrated", params, scale)
    if isinstance(model, AnalyticModel):
        m, hw, par = model.model, model.hw, model.parallel
        params = {n: float(getattr(m, n)) for n in _SHAPES}
        params.update({n: float(getattr(hw, n)) for n in _HW})
        params.update({n: float(getattr(par, n) or 0) for n in _LAYOUT})
        params["dtype_bytes"] = float(model.dtype_bytes)
        return PublishedModel("analytic", params, scale)
    raise ConfigError(f"cannot publish a performance model of type {type(model).__name__}")
