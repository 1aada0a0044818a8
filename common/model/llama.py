"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2) over a flat batch of tokens.

The model is plain torch: no torch.distributed here. Tensor parallelism is applied as a transform
(common/parallel/tp.py) that shards the linears; attention reads the local head count from the
projection outputs. Attention itself is delegated to a forward context (`ctx.attend`) that owns the
paged KV cache, the attention backend and, under KV-cache parallelism, the cross-group LSE merge.

Activations are flat: all sequences of a batch are concatenated, [T, hidden], with absolute positions
[T]. Parameter names follow Hugging Face exactly so checkpoints load by name.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ModelConfig
from common.model import cpu_kernels, decode_layers, fused
from common.model.rope import Rope, apply_rope


class AttendFn(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (already rotated) -> attention output [T, Hq, D]."""


def _laid_out(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The values of `w` [out, in], stored [in, out] row-major when `transposed`, [out, in] row-major
    otherwise (a copy only when the storage changes, so packing again with the other layout works)."""
    return w.t().contiguous().t() if transposed else w.contiguous()


def _fuse(weights: list[torch.Tensor], transposed: bool) -> torch.Tensor:
    """[out_i, in] weights -> their concatenation [sum out_i, in], stored as [in, sum out_i] row-major
    when `transposed`."""
    return _laid_out(torch.cat(weights), transposed)


def _fused_of(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The fused tensor `parts` were split from (_fuse, then split along dim 0), when they are still
    consecutive blocks of one storage (parameters assigned from a saved packed model), else None."""
    first = parts[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for p in parts:
        if (p.untyped_storage().data_ptr() != storage or p.stride() != first.stride()
                or p.shape[1:] != first.shape[1:] or p.storage_offset() != offset):
            return None
        offset += p.shape[0] * p.stride(0)
    rows = sum(p.shape[0] for p in parts)
    try:
        return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())
    except RuntimeError:            # beyond the storage: not views of one fused tensor
        return None


def _set_storage(linear: nn.Linear, transposed: bool) -> None:
    """Same values, [in, out] row-major storage when `transposed` (F.linear then multiplies without a
    transpose), else [out, in] row-major."""
    w = linear.weight.detach()
    laid = _laid_out(w, transposed)
    if laid is not w:
        linear.weight = nn.Parameter(laid, requires_grad=False)


def transposed_by_default(weight: torch.Tensor) -> bool:
    """The measured layout choice: [out, in] wherever the CPU decode kernel runs (common/model/cpu_kernels.py
    streams rows of that layout, 2x MKL's rate on either); without it, [in, out] storage for float32 on
    the CPU, where MKL's matrix-vector product streams it faster (bench/results/cpu_layout_ab.md);
    never for bfloat16 (this CPU's bf16 kernels are many times slower with it) nor off the CPU (not
    measured there)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and cpu_kernels.library() is None)


class Linear(nn.Linear):
    """nn.Linear whose product goes through `cpu_kernels.linear`: the CPU decode kernel for a few rows,
    F.linear otherwise. Same parameters and names. `float_out` (the LM head): bfloat16 logits of the
    kernel's rows not rounded to bfloat16 (float32, as the engine samples them anyway)."""

    float_out = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear(x, self.weight, self.bias, self.float_out)


def weights_transposed(linear: nn.Linear) -> bool:
    """Whether this linear's [out, in] weight is stored [in, out] row-major (see pack_weights)."""
    w = linear.weight
    return w.dim() == 2 and w.shape[0] > 1 and w.stride() == (1, w.shape[0])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.enabled_for(x) and fused.rms_norm_supported(x, self.weight):
            return fused.rms_norm(x, self.weight, self.eps)
        lib = cpu_kernels.elementwise(x)
        if lib is not None:
            out = cpu_kernels.rms_norm(lib, x, self.weight, self.eps)
            if out is not None:
                return out
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.head_dim = cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.qkv: tuple[torch.Tensor, torch.Tensor | None, list[int]] | None = None  # set by pack()

    def pack(self, transposed: bool) -> None:
        """Fuses q, k, v into one [Nq + 2 Nkv, hidden] matrix (see LlamaModel.pack_weights)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        w = _fuse([p.weight for p in projs], transposed)                           # [Nq + 2 Nkv, hidden]
        b = None if self.q_proj.bias is None else torch.cat([p.bias for p in projs])
        sizes = [p.out_features for p in projs]
        for p, wp, bp in zip(projs, w.split(sizes), [None] * 3 if b is None else b.split(sizes)):
            p.weight = nn.Parameter(wp, requires_grad=False)                     # views: loading still works
            if bp is not None:
                p.bias = nn.Parameter(bp, requires_grad=False)
        self.qkv = (w, b, sizes)
        _set_storage(self.o_proj, transposed)

    def adopt_packed(self) -> bool:
        """Takes q, k, v as the views of one fused matrix they are after pack() (their tensors assigned
        from a saved packed model); False when they are not."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        w = _fused_of([p.weight.detach() for p in projs])
        b = None if self.q_proj.bias is None else _fused_of([p.bias.detach() for p in projs])
        if w is None or (self.q_proj.bias is not None and b is None):
            return False
        self.qkv = (w, b, [p.out_features for p in projs])
        return True

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttendFn) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv is not None:
            w, b, sizes = self.qkv
            q, k, v = cpu_kernels.linear(x, w, b).split(sizes, dim=-1)                     # strided views
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, -1, self.head_dim)                   # [T, Hq_local, D]
        k = k.view(t, -1, self.head_dim)                   # [T, Hkv_local, D]
        v = v.view(t, -1, self.head_dim)
        lib = cpu_kernels.elementwise(q)
        if fused.enabled_for(q) and fused.rope_supported(q, k, cos):
            q, k = fused.rope_qk(q, k, cos, sin)
        elif lib is not None and (qr := cpu_kernels.rope(lib, q, cos, sin)) is not None \
                and (kr := cpu_kernels.rope(lib, k, cos, sin)) is not None:
            q, k = qr, kr
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = ctx.attend(self.layer, q, k, v)                # [T, Hq_local, D]
        return self.o_proj(o.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: torch.Tensor | None = None          # [2 I, hidden], set by pack()

    def pack(self, transposed: bool) -> None:
        """Fuses gate and up into one [2 I, hidden] matrix (see LlamaModel.pack_weights)."""
        w = _fuse([self.gate_proj.weight, self.up_proj.weight], transposed)
        gate, up = w.split([self.gate_proj.out_features, self.up_proj.out_features])
        self.gate_proj.weight = nn.Parameter(gate, requires_grad=False)
        self.up_proj.weight = nn.Parameter(up, requires_grad=False)
        self.gate_up = w
        _set_storage(self.down_proj, transposed)

    def adopt_packed(self) -> bool:
        """Takes gate and up as the views of one fused matrix (see Attention.adopt_packed)."""
        w = _fused_of([self.gate_proj.weight.detach(), self.up_proj.weight.detach()])
        self.gate_up = w
        return w is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate_up = cpu_kernels.linear(x, self.gate_up)                                    # [T, 2 I]
            lib = cpu_kernels.elementwise(gate_up)
            if lib is not None and (act := cpu_kernels.silu_mul(lib, gate_up)) is not None:
                return self.down_proj(act)
            gate, up = gate_up.chunk(2, dim=-1)                                               # [T, I] each
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttendFn) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


def meta_weight(num: int, dim: int) -> torch.Tensor | None:
    """An uninitialised (num, dim) weight when modules are being built on the meta device (`with
    torch.device("meta")`, before the checkpoint's tensors are loaded), else None (a normal init).
    nn.Embedding's own init of a meta tensor goes through torch._refs, which imports torch._dynamo:
    ~2 s of every engine's and grid worker's start on this machine, for values that are replaced."""
    return torch.empty(num, dim) if torch.get_default_device().type == "meta" else None


def embedding(num: int, dim: int) -> nn.Embedding:
    return nn.Embedding(num, dim, _weight=meta_weight(num, dim))


def to_empty(model: nn.Module, device: str | torch.device) -> nn.Module:
    """`model.to_empty(device=device)` for a model built on the meta device: every parameter and
    buffer replaced by an uninitialised tensor of its shape and dtype on `device` (a parameter shared
    by two modules stays shared). torch's own goes through the meta tensors' Python empty_like,
    which imports torch.fx's symbolic shapes: ~0.5 s of every grid worker's start here."""
    made: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for table, wrap in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in list(table.items()):
                if t is None:
                    continue
                if id(t) not in made:
                    new = torch.empty(t.shape, dtype=t.dtype, device=device)
                    made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if wrap else new
                table[name] = made[id(t)]
    return model


class LlamaModel(nn.Module):
    """Holds layers [first_layer, last_layer) (a pipeline stage) or all of them.

    Only the first stage owns the embedding; only the last owns the final norm and LM head.
    """

    def __init__(self, cfg: ModelConfig, first_layer: int = 0, last_layer: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.first_layer = first_layer
        self.last_layer = cfg.num_layers if last_layer is None else last_layer
        self.is_first = first_layer == 0
        self.is_last = self.last_layer == cfg.num_layers
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size) if self.is_first else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i)
                                     for i in range(self.first_layer, self.last_layer)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if self.is_last else None
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if self.is_last else None
        if self.lm_head is not None:
            self.lm_head.float_out = True

    def _apply(self, fn, recurse: bool = True):
        decode_layers.forget(self)                  # .to(), .float(), ...: new parameters
        return super()._apply(fn, recurse)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> hidden [T, hidden]."""
        return self.embed_tokens(input_ids)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, ctx: AttendFn) -> torch.Tensor:
        """hidden [T, hidden] entering this stage, positions [T] -> hidden leaving it."""
        cos, sin = self.rope.cos_sin(positions, hidden.dtype)
        out = decode_layers.run(self, hidden, cos, sin, ctx)      # a CPU decode step in one kernel call
        if out is not None:
            return out
        for layer in self.layers.values():
            hidden = layer(hidden, cos, sin, ctx)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (rows to sample) -> float32 logits [N, vocab]."""
        return self.lm_head(self.norm(hidden)).float()

    # ---- weights ---------------------------------------------------------------------------------
    def pack_weights(self, transposed: bool | None = None) -> None:
        """The CPU weight layout; call after load_weights and after any dtype cast (a cast or a move
        copies each parameter alone and undoes the fusion). May be called again to change the layout.

        q/k/v and gate/up are fused into one matrix each (the parameters become views of it, so names,
        shapes and load_weights are unchanged): one product per fused matrix instead of two or three.
        In float32 every linear's weight is also stored transposed, [in, out] row-major (again behind an
        [out, in] view): at decode (one row) a linear is a matrix-vector product that only streams its
        weight, and MKL streams that layout faster than [out, in]; the bfloat16 kernels of this CPU are
        the other way round (measured, bench/results/cpu_profile.md). Same products, so results agree
        with the unpacked model to rounding.

        `transposed`: None picks `transposed_by_default` (float32 on the CPU: on; A/B in
        bench/results/cpu_layout_ab.md); True/False force it (the A/B benchmark). The tied LM head is
        its own parameter (load_weights copies the embedding into it), so the embedding keeps [vocab,
        hidden] rows for the lookup while the head is transposed."""
        if transposed is None:
            transposed = transposed_by_default(next(self.parameters()))     # one dtype and device
        decode_layers.forget(self)
        for layer in self.layers.values():
            layer.self_attn.pack(transposed)
            layer.mlp.pack(transposed)
        if self.lm_head is not None:
            _set_storage(self.lm_head, transposed)

    def adopt_packed(self) -> None:
        """After its tensors were assigned from a saved packed model (common/model/packed_cache.py):
        the fused q/k/v and gate/up matrices taken from their views; ValueError when a layer's
        tensors are not the views pack_weights makes (a file of another layout)."""
        decode_layers.forget(self)
        for i, layer in self.layers.items():
            if not (layer.self_attn.adopt_packed() and layer.mlp.adopt_packed()):
                raise ValueError(f"layer {i}: the tensors are not a packed layout")

    def wanted(self, name: str) -> bool:
        """Whether the checkpoint tensor `name` belongs to this stage."""
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            return self.first_layer <= layer < self.last_layer
        if name == "model.embed_tokens.weight":
            return self.is_first or (self.is_last and self.cfg.tie_word_embeddings)
        if name in ("model.norm.weight", "lm_head.weight"):
            return self.is_last
        return False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Copies checkpoint tensors (HF names) into this stage's parameters; checks none is missing.

        `transform(target_name, tensor)` may cut each tensor first (tensor-parallel slices); it is
        called once per target parameter, always with the full checkpoint tensor."""
        decode_layers.forget(self)
        params = dict(self._param_names())
        loaded: set[str] = set()
        for name, tensor in weights:
            if not self.wanted(name):
                continue
            targets = [name]
            if name == "model.embed_tokens.weight" and self.cfg.tie_word_embeddings and self.is_last:
                targets = ([name] if self.is_first else []) + ["lm_head.weight"]
            for target in targets:
                param = params[target]
                # Cut each target from the full checkpoint tensor: a tied embedding feeds both
                # embed_tokens and lm_head, and slicing the already-sliced copy again (rank r > 0 of
                # a vocab split) would leave lm_head with no rows.
                part = tensor if transform is None else transform(target, tensor)
                if param.shape != part.shape:
                    raise ValueError(f"{target}: checkpoint shape {tuple(part.shape)} != model "
                                     f"{tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(part)
                loaded.add(target)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")

    def _param_names(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in self.named_parameters():
            if name.startswith("layers."):
                yield "model." + name, param
            elif name.startswith(("embed_tokens.", "norm.")):
                yield "model." + name, param
            else:
                yield name, param
