"""A decode step through all of a stage's layers in one call of the CPU kernels (`mn_decode_layers`
in common/model/cpu_kernels.cpp), where the step is one the per-op kernels would run anyway.

A decode step of the built-in model calls ~15 Python functions and allocates ~10 tensors per layer
around the kernels (RMSNorm, the fused q/k/v product, RoPE, the KV write, decode attention, the o
product, the residual sums, the MLP): ~2.9 ms of a 10 ms bfloat16 step at 1K tokens on the AVX-512
host of bench/results/cpu_kernels_layers.md (2 cores), none of it reading weights. `run` hands the whole
stack to one C++ call that runs the same kernel functions in the same order with the same roundings,
so the hidden states (and so the logits) are the per-op path's bit for bit
(tests/unit/test_cpu_kernels.py compares them).

It applies when every piece of the per-op path would have taken its kernel: a CPU float32/bfloat16
model on an AVX-512 or AVX2 build, up to the kernels' row limit of rows each decoding one token in row order
with nothing else in the batch (ForwardContext.in_place_decode: no prefill chunk, no tensor-parallel
head map), plain modules (no tensor-parallel linears, which all-reduce),
fused q/k/v and gate/up weights without biases, [out, in] contiguous weights, a head dim the attention
kernel takes. Anything else returns None and the modules run as before. The layers are checked once
per model (`forget` when its parameters change: LlamaModel calls it), the cache's per-layer
pointers once per cache. `disabled()` turns it off (the benchmark's A/B and the tests' reference).

Under KV-cache parallelism (a grid worker whose context has `combine`), the step runs in one call as
well: after each layer's attention over this group's keys the kernel calls back into Python
(`cpu_kernels.COMBINE`), which merges the groups' partial outputs through `combine` (the same
all-gather and merge as the per-op path, so the same bits) into the buffer the kernel goes on from;
rows with no keys in this group attend to nothing (zeros, lse -inf), rows another group stores are not
written here. An exception in the callback stops the kernel and is raised again here.
"""
from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass, field
from typing import Iterator

import torch

from common.model import cpu_kernels, fused

_on = [True]
_CODES = {torch.float32: 0, torch.bfloat16: 1}
_P = ctypes.c_void_p


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within it `run` always returns None (the layers run module by module)."""
    saved = _on[0]
    _on[0] = False
    try:
        yield
    finally:
        _on[0] = saved


def _weight(w: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """A weight the kernel reads as the module does: contiguous (an [out, in] linear, a norm's vector)."""
    return w.dtype == dtype and w.device.type == "cpu" and tuple(w.shape) == shape and w.is_contiguous()


@dataclass(frozen=True)
class _Stack:
    """A stage's layers as the kernel takes them, checked once per model, dtype and width (`_stack`)."""
    d: int
    eps: float
    hq: int
    hkv: int
    inter: int
    layer_ids: tuple[int, ...]             # the global layer indices (the KV cache's)
    weights: tuple                         # 6 ctypes arrays: ln1, q/k/v, o, ln2, gate/up, down per layer
    tensors: tuple                         # what they point into, kept alive while this is cached
    kv: dict = field(default_factory=dict)  # a cache's (pointer, shape, first layer) -> its K, V arrays


def _stack(model, dtype: torch.dtype, size: int, lib) -> _Stack | None:
    """The kernel's view of `model`'s layers, None where a layer is not one it runs as the modules
    would: a tensor-parallel or otherwise changed layer, unfused or biased projections, another
    layout, a shape the attention kernel does not take."""
    from common.model.llama import Attention, DecoderLayer, Linear, MLP, RMSNorm
    layers = list(model.layers.values())
    if not layers:
        return None
    first = layers[0]
    d, eps = first.self_attn.head_dim, first.input_layernorm.eps
    nq, nkv = first.self_attn.q_proj.out_features, first.self_attn.k_proj.out_features
    inter = first.mlp.down_proj.in_features
    hq, hkv = nq // d, nkv // d
    if not cpu_kernels.attention_applies(lib, torch.empty(1, hq, d, dtype=dtype), torch.empty(1, 1, hkv, d, dtype=dtype)):
        return None
    shapes = ((size,), (nq + 2 * nkv, size), (size, nq), (size,), (2 * inter, size), (size, inter))
    arrays: list[list[int]] = [[] for _ in shapes]
    tensors: list[torch.Tensor] = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not (type(layer) is DecoderLayer and type(attn) is Attention and type(mlp) is MLP
                and type(layer.input_layernorm) is RMSNorm and type(layer.post_attention_layernorm) is RMSNorm
                and type(attn.o_proj) is Linear and type(mlp.down_proj) is Linear):
            return None                                     # a tensor-parallel or otherwise changed layer
        if attn.qkv is None or attn.qkv[1] is not None or mlp.gate_up is None or attn.head_dim != d \
                or attn.o_proj.bias is not None or mlp.down_proj.bias is not None:
            return None
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        if ln1.eps != eps or ln2.eps != eps:
            return None
        weights = (ln1.weight, attn.qkv[0], attn.o_proj.weight, ln2.weight, mlp.gate_up, mlp.down_proj.weight)
        if not all(_weight(w, shape, dtype) for w, shape in zip(weights, shapes)):
            return None
        for arr, w in zip(arrays, weights):
            arr.append(w.data_ptr())
        tensors += weights
    return _Stack(d, eps, hq, hkv, inter, tuple(layer.self_attn.layer for layer in layers),
                  tuple((_P * len(arr))(*arr) for arr in arrays), tuple(tensors))


def forget(model) -> None:
    """`model`'s parameters changed (packed again, cast, moved, loaded): the next step checks again."""
    model.__dict__.pop("_decode_stack", None)


def _cached_stack(model, dtype: torch.dtype, size: int, lib) -> _Stack | None:
    key = (dtype, size, id(lib))
    cached = model.__dict__.get("_decode_stack")
    if cached is None or cached[0] != key:
        cached = model.__dict__["_decode_stack"] = (key, _stack(model, dtype, size, lib))
    return cached[1]


def run(model, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx) -> torch.Tensor | None:
    """The hidden states leaving `model`'s layers (a common.model.llama.LlamaModel stage) for this
    step, or None where the one-call path does not apply (the caller runs the layers)."""
    if not _on[0] or hidden.device.type != "cpu" or hidden.dtype not in _CODES or hidden.dim() != 2:
        return None
    rows, size = hidden.shape
    lib = cpu_kernels.small(hidden)
    if lib is None or rows > cpu_kernels.max_rows(hidden.dtype) or fused.enabled_for(hidden) \
            or (torch.is_grad_enabled() and hidden.requires_grad):
        return None
    plan = getattr(ctx, "in_place_decode", None)
    plan = plan(rows) if plan is not None else None
    if plan is None:
        return None
    dt = hidden.dtype
    st = _cached_stack(model, dt, size, lib)
    cache = ctx.cache
    if (st is None or cache.data.dtype != dt or tuple(cache.data.shape[-2:]) != (st.hkv, st.d)
            or not cache.data.is_contiguous() or cos.dtype != dt or sin.dtype != dt
            or tuple(cos.shape) != (rows, 1, st.d) or sin.shape != cos.shape
            or not (cos.is_contiguous() and sin.is_contiguous())):
        return None
    where = (cache.data.data_ptr(), tuple(cache.data.shape), cache.layers.start)   # the layers' offsets
    kv = st.kv.get(where)
    if kv is None:
        st.kv.clear()
        kv = st.kv[where] = tuple((_P * len(st.layer_ids))(*(part(i).data_ptr() for i in st.layer_ids))
                                  for part in (cache.k, cache.v))
    tables, lens, slots = plan
    x = hidden.clone(memory_format=torch.contiguous_format)
    tables = tables.to(torch.int32).contiguous()
    lens = lens.to(torch.int32).contiguous()
    slots = slots.to(torch.int64).contiguous()
    merge = getattr(ctx, "combine", None)
    out = lse = callback = None
    failed: list[BaseException] = []
    if merge is not None:                    # KV-cache parallel: each layer's partials merged across groups
        out = torch.empty(rows, st.hq, st.d, dtype=dt)
        lse = torch.empty(rows, st.hq, dtype=torch.float32)

        def combine(layer: int) -> int:
            try:
                out.copy_(merge(out, lse))
                return 0
            except BaseException as e:     # noqa: BLE001 - raised again below, once the kernel returned
                failed.append(e)
                return 1
        callback = cpu_kernels.COMBINE(combine)
    rc = lib.mn_decode_layers(_CODES[dt], len(st.layer_ids), x.data_ptr(), rows, size, *st.weights, st.inter,
                              st.eps, cos.data_ptr(), sin.data_ptr(), st.hq, st.hkv, st.d, *kv, slots.data_ptr(),
                              tables.data_ptr(), tables.stride(0), lens.data_ptr(), cache.block_size, ctx.scale,
                              cpu_kernels.span_keys(lens), None if out is None else out.data_ptr(),
                              None if lse is None else lse.data_ptr(),
                              callback if callback is not None else cpu_kernels.COMBINE())
    if failed:
        raise failed[0]
    if rc != 0:
        raise RuntimeError(f"decode layers kernel: unsupported shape (rows {rows}, heads {st.hq}/{st.hkv}, "
                           f"dim {st.d})")
    return x
