"""Roofline model of one iteration of a Llama-family decoder (the fallback where nothing was profiled).

Per layer of the slowest pipeline stage (ceil(layers / spp) layers):
  linears   max(2 * params * tokens / F, params * bytes / B) / tp    (weights read once per iteration)
  attention per sequence max(flops / F, kv bytes / B) / tp, with
            chunk of n over ctx:  flops 4 * n * (ctx + n/2) * Hq * D,  bytes (ctx + n) * 2 * Hkv * D * b
            decode over ctx:      flops 4 * (ctx + 1) * Hq * D,        bytes (ctx + 1) * 2 * Hkv * D * b
            where ctx is what the slowest KVP group holds: min(ctx, M) with kvp > 1
  + a fixed per-layer overhead
plus the LM head (one row of logits per sequence) and a fixed per-iteration overhead.
Layer norms, RoPE, activations and communication are folded into the overheads.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.config import ModelConfig, ParallelConfig
from common.errors import ConfigError
from common.scheduler.types import BatchShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Hardware:
    """Sustained rates of one device (one TP rank) at the serving dtype."""
    name: str
    flops: float                  # dense matmul FLOP/s
    mem_bw: float                 # bytes/s
    iter_overhead_s: float = 0.0  # per iteration (scheduling, launch, sampling)
    layer_overhead_s: float = 0.0 # per layer (norms, RoPE, kernel launches)

    def __post_init__(self) -> None:
        if self.flops <= 0 or self.mem_bw <= 0:
            raise ConfigError(f"hardware {self.name}: flops and mem_bw must be positive")
        if self.iter_overhead_s < 0 or self.layer_overhead_s < 0:
            raise ConfigError(f"hardware {self.name}: overheads must be >= 0")


# Measured on the 2-core development machine (matmul, copy); GPU figures are datasheet rates derated
# to what dense kernels sustain. Keys: "<device>-<dtype>".
HARDWARE: dict[str, Hardware] = {
    h.name: h for h in (
        Hardware("cpu-float32", 190e9, 50e9, iter_overhead_s=2e-3, layer_overhead_s=1e-4),
        Hardware("cpu-bfloat16", 410e9, 50e9, iter_overhead_s=2e-3, layer_overhead_s=1e-4),
        Hardware("a100-bfloat16", 250e12, 1.6e12, iter_overhead_s=3e-3, layer_overhead_s=2e-5),
        Hardware("h100-bfloat16", 700e12, 2.8e12, iter_overhead_s=3e-3, layer_overhead_s=2e-5),
        Hardware("h200-bfloat16", 700e12, 4.0e12, iter_overhead_s=3e-3, layer_overhead_s=2e-5),
    )
}


def hardware(name: str) -> Hardware:
    if name not in HARDWARE:
        raise ConfigError(f"no hardware preset {name!r}; known: {', '.join(HARDWARE)}")
    return HARDWARE[name]


class AnalyticModel:
    """predict(batch) -> seconds, from the model's shapes, the parallel layout and the hardware."""

    def __init__(self, model: ModelConfig, hw: Hardware, parallel: ParallelConfig = ParallelConfig(),
                 dtype_bytes: int = 4) -> None:
        if dtype_bytes <= 0:
            raise ConfigError(f"dtype_bytes must be positive, got {dtype_bytes}")
        self.model, self.hw, self.parallel, self.dtype_bytes = model, hw, parallel, dtype_bytes
        m = model
        q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        self.layer_params = m.hidden_size * (2 * q + 2 * kv) + 3 * m.hidden_size * m.intermediate_size
        self.layers_per_stage = -(-m.num_layers // parallel.spp)
        self.head_params = m.hidden_size * m.vocab_size

    def _shard(self, ctx: int) -> int:
        """Context tokens the slowest KVP group attends to (groups before the last hold M each)."""
        p = self.parallel
        if p.kvp > 1 and p.kvp_tokens:
            return min(ctx, p.kvp_tokens)
        return ctx

    def _roof(self, flops: float, nbytes: float) -> float:
        return max(flops / self.hw.flops, nbytes / self.hw.mem_bw)

    def predict(self, batch: BatchShape) -> float:
        if batch.is_empty:
            return 0.0
        m, tp, b = self.model, self.parallel.tp, self.dtype_bytes
        qd, kvd = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        linear = self._roof(2.0 * self.layer_params * batch.num_tokens, self.layer_params * b) / tp
        attn = 0.0
        for n, ctx in batch.prefills:
            c = self._shard(ctx)
            attn += self._roof(4.0 * n * (c + n / 2) * qd, (c + n) * 2.0 * kvd * b)
        for ctx in batch.decodes:
            c = self._shard(ctx) + 1
            attn += self._roof(4.0 * c * qd, c * 2.0 * kvd * b)
        layer = linear + attn / tp + self.hw.layer_overhead_s
        head = self._roof(2.0 * self.head_params * batch.num_seqs, self.head_params * b) / tp
        return self.layers_per_stage * layer + head + self.hw.iter_overhead_s
