"""Tensor parallelism as a transform of the plain model (the model file has no distributed code).

Rank r of a TP group of size T holds query heads [r*Hq/T, (r+1)*Hq/T), the KV heads those queries read
(KV heads are replicated when T > Hkv, and may be shared by two ranks when the split falls inside a
GQA group), MLP columns [r*I/T, (r+1)*I/T), and a vocab slice of the embedding and LM head.
Column-parallel linears need no communication; row-parallel ones (o_proj, down_proj) all-reduce;
the embedding all-reduces its masked lookup; the LM head all-gathers its logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ModelConfig
from common.errors import ConfigError
from common.model.llama import Linear, LlamaModel, meta_weight, to_empty, transposed_by_default
from common.model.packed_cache import PackedCache, shard_key
from common.model import host_memory


@dataclass(frozen=True)
class TPShard:
    rank: int
    size: int
    q_heads: tuple[int, int]       # [lo, hi) global query heads
    kv_heads: tuple[int, int]      # [lo, hi) global kv heads held here
    inter: tuple[int, int]         # [lo, hi) MLP intermediate columns
    vocab: tuple[int, int]         # [lo, hi) vocab rows
    vocab_per_rank: int            # padded slice length (all-gather needs equal parts)
    kv_map: tuple[tuple[int, int, int], ...] | None  # (q_lo, q_hi, kv) local, when not uniform GQA

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def _split(n: int, size: int, rank: int) -> tuple[int, int]:
    per = -(-n // size)
    return min(rank * per, n), min((rank + 1) * per, n)


def tp_shard(cfg: ModelConfig, rank: int, size: int) -> TPShard:
    if cfg.num_heads % size:
        raise ConfigError(f"tp={size} must divide the number of attention heads ({cfg.num_heads})")
    if cfg.intermediate_size % size:
        raise ConfigError(f"tp={size} must divide intermediate_size ({cfg.intermediate_size})")
    per_q = cfg.num_heads // size
    q_lo, q_hi = rank * per_q, (rank + 1) * per_q
    g = cfg.q_per_kv
    kv_lo, kv_hi = q_lo // g, (q_hi - 1) // g + 1
    kv_map = None
    uniform = (per_q % g == 0 and q_lo % g == 0) or (kv_hi - kv_lo == 1)
    if not uniform:
        runs = []
        for kv in range(kv_lo, kv_hi):
            lo, hi = max(q_lo, kv * g), min(q_hi, (kv + 1) * g)
            runs.append((lo - q_lo, hi - q_lo, kv - kv_lo))
        kv_map = tuple(runs)
    per_i = cfg.intermediate_size // size
    v_lo, v_hi = _split(cfg.vocab_size, size, rank)
    return TPShard(rank, size, (q_lo, q_hi), (kv_lo, kv_hi), (rank * per_i, (rank + 1) * per_i),
                   (v_lo, v_hi), -(-cfg.vocab_size // size), kv_map)


def slice_weight(shard: TPShard, cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """The part of checkpoint tensor `name` (HF naming) that this rank holds."""
    d = cfg.head_dim
    if shard.size == 1:
        return t
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return t[shard.q_heads[0] * d:shard.q_heads[1] * d]
    if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
        return t[shard.kv_heads[0] * d:shard.kv_heads[1] * d]
    if name.endswith("o_proj.weight"):
        return t[:, shard.q_heads[0] * d:shard.q_heads[1] * d]
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return t[shard.inter[0]:shard.inter[1]]
    if name.endswith("down_proj.weight"):
        return t[:, shard.inter[0]:shard.inter[1]]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return t[shard.vocab[0]:shard.vocab[1]]
    return t


class RowParallelLinear(Linear):
    """Each rank multiplies its input slice; the partial sums are all-reduced over the TP group."""

    def __init__(self, in_features: int, out_features: int, groups) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.groups.all_reduce_tp(super().forward(x))


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, num: int, dim: int, vocab_lo: int, groups) -> None:
        super().__init__(num, dim, _weight=meta_weight(num, dim))
        self.vocab_lo = vocab_lo
        self.groups = groups

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_lo
        mine = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        out = out * mine[:, None].to(out.dtype)               # zero rows owned by other ranks
        return self.groups.all_reduce_tp(out)


class VocabParallelHead(Linear):
    float_out = True                  # as LlamaModel's head: bfloat16 logits of the kernel's rows unrounded

    def __init__(self, dim: int, num: int, per_rank: int, vocab_size: int, groups) -> None:
        super().__init__(dim, num, bias=False)
        self.per_rank = per_rank
        self.vocab_size = vocab_size
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = super().forward(x)                                        # [N, local vocab]
        if part.shape[1] < self.per_rank:
            part = F.pad(part, (0, self.per_rank - part.shape[1]))
        return torch.cat(self.groups.all_gather_tp(part), dim=1)[:, :self.vocab_size]


def apply_tp(model: LlamaModel, shard: TPShard, groups) -> None:
    """Replaces the model's linears by their TP slices (call on a meta-device model before it is made real: to_empty)."""
    if shard.size == 1:
        return
    cfg = model.cfg
    d, h = cfg.head_dim, cfg.hidden_size
    nq = (shard.q_heads[1] - shard.q_heads[0]) * d
    nkv = shard.num_kv_heads * d
    ni = shard.inter[1] - shard.inter[0]
    for layer in model.layers.values():
        a = layer.self_attn
        a.q_proj = Linear(h, nq, bias=cfg.qkv_bias)
        a.k_proj = Linear(h, nkv, bias=cfg.qkv_bias)
        a.v_proj = Linear(h, nkv, bias=cfg.qkv_bias)
        a.o_proj = RowParallelLinear(nq, h, groups)
        m = layer.mlp
        m.gate_proj = Linear(h, ni, bias=False)
        m.up_proj = Linear(h, ni, bias=False)
        m.down_proj = RowParallelLinear(ni, h, groups)
    nv = shard.vocab[1] - shard.vocab[0]
    if model.embed_tokens is not None:
        model.embed_tokens = VocabParallelEmbedding(nv, h, shard.vocab[0], groups)
    if model.lm_head is not None:
        model.lm_head = VocabParallelHead(h, nv, shard.vocab_per_rank, cfg.vocab_size, groups)


def load_shard(ckpt, shard: TPShard, groups, first_layer: int = 0, last_layer: int | None = None) -> LlamaModel:
    """Layers [first_layer, last_layer) of checkpoint `ckpt` as TP rank `shard` holds them: built on
    the meta device, its linears replaced by their slices (apply_tp), then only this rank's slice of
    each weight loaded (slice_weight). In the checkpoint's dtype, unpacked (the caller casts and
    packs); `groups` are used only in forward."""
    cfg = ckpt.config
    with torch.device("meta"):
        model = LlamaModel(cfg, first_layer, last_layer)
        apply_tp(model, shard, groups)
    model = to_empty(model, "cpu")
    model.load_weights(ckpt.weights(model.wanted), transform=lambda n, t: slice_weight(shard, cfg, n, t))
    return model


def build_shard(ckpt, shard: TPShard, groups, first_layer: int, last_layer: int, dtype: torch.dtype,
                cache: "PackedCache | None" = None) -> LlamaModel:
    """load_shard, cast to `dtype` and packed (the CPU layout): what a grid worker serves. With
    `cache` (common/model/packed_cache.py), mapped from the shard's file when an earlier build saved
    it (a rebuilt grid, a restarted instance, another KVP rank of the same shard)."""
    host_memory.tune()                       # a CPU engine's process: its ops' memory reused, not faulted in again
    def build() -> LlamaModel:
        model = load_shard(ckpt, shard, groups, first_layer, last_layer).to(dtype).eval()
        model.pack_weights()
        return model

    if cache is None:
        return build()

    def empty() -> LlamaModel:
        with torch.device("meta"):
            model = LlamaModel(ckpt.config, first_layer, last_layer)
            apply_tp(model, shard, groups)
        return model

    # a TP group of one holds the whole model: the single-process engine's file
    key = shard_key(ckpt.source, ckpt.config, dtype, first_layer, last_layer, shard if shard.size > 1 else None,
                    transposed_by_default(torch.empty(0, dtype=dtype)))
    return cache.model(key, build, empty)
