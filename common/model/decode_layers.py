"""A decode step through all of a stage's layers in one call of the CPU kernels (`mn_decode_layers`
in common/model/cpu_kernels.cpp), where the step is one the per-op kernels would run anyway.

A decode step of the built-in model calls ~15 Python functions and allocates ~10 tensors per layer
around the kernels (RMSNorm, the fused q/k/v product, RoPE, the KV write, decode attention, the o
product, the residual sums, the MLP): ~2.9 ms of a 10 ms bfloat16 step at 1K tokens on this machine's
2 cores (bench/results/cpu_kernels_layers.md), none of it reading weights. `run` hands the whole stack to one C++ call that runs the same
kernel functions in the same order with the same roundings, so the hidden states (and so the logits)
are the per-op path's bit for bit (tests/unit/test_cpu_kernels.py compares them).

It applies when every piece of the per-op path would have taken its kernel: a CPU float32/bfloat16
model on an AVX-512 build, up to the kernels' row limit of rows each decoding one token in row order
with nothing else in the batch (ForwardContext.in_place_decode: no prefill chunk, no KV-parallel
combine, no tensor-parallel head map), plain modules (no tensor-parallel linears, which all-reduce),
fused q/k/v and gate/up weights without biases, [out, in] contiguous weights, a head dim the attention
kernel takes. Anything else returns None and the modules run as before. `disabled()` turns it off
(the benchmark's A/B and the tests' reference).
"""
from __future__ import annotations

import contextlib
import ctypes
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


def _signature(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    pp = ctypes.POINTER(ctypes.c_void_p)
    lib.mn_decode_layers.restype = ctypes.c_int
    lib.mn_decode_layers.argtypes = [ctypes.c_int, i64, ptr, i64, i64, pp, pp, pp, pp, pp, pp, i64, ctypes.c_float,
                                     ptr, ptr, i64, i64, i64, pp, pp, ptr, ptr, i64, ptr, i64, ctypes.c_float, i64]


def _weight(w: torch.Tensor, out: int, inp: int, dtype: torch.dtype) -> bool:
    """An [out, in] weight the kernel reads as the module's product does (contiguous rows)."""
    return (w.dtype == dtype and w.device.type == "cpu" and tuple(w.shape) == (out, inp)
            and w.stride() == (inp, 1))


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
    tables, lens, slots = plan
    from common.model.llama import Attention, DecoderLayer, Linear, MLP, RMSNorm
    layers = list(model.layers.values())
    if not layers:
        return None
    first = layers[0]
    d, eps = first.self_attn.head_dim, first.input_layernorm.eps
    nq, nkv = first.self_attn.q_proj.out_features, first.self_attn.k_proj.out_features
    inter = first.mlp.down_proj.in_features
    hq, hkv = nq // d, nkv // d
    cache = ctx.cache
    dt = hidden.dtype
    if (cache.data.dtype != dt or tuple(cache.data.shape[-2:]) != (hkv, d) or not cache.data.is_contiguous()
            or cos.dtype != dt or sin.dtype != dt or tuple(cos.shape) != (rows, 1, d) or sin.shape != cos.shape
            or not (cos.is_contiguous() and sin.is_contiguous())
            or not cpu_kernels.attention_applies(lib, hidden.new_empty(rows, hq, d), cache.k(first.self_attn.layer))):
        return None
    arrays = [[] for _ in range(8)]
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
        shapes = ((size,), (nq + 2 * nkv, size), (size, nq), (size,), (2 * inter, size), (size, inter))
        for w, shape in zip(weights, shapes):
            if not (_weight(w, *shape, dt) if len(shape) == 2 else
                    (w.dtype == dt and tuple(w.shape) == shape and w.is_contiguous())):
                return None
        for a, w in zip(arrays, weights):
            a.append(w.data_ptr())
        arrays[6].append(cache.k(attn.layer).data_ptr())
        arrays[7].append(cache.v(attn.layer).data_ptr())
    if not hasattr(lib, "_mn_decode_layers_typed"):
        _signature(lib)
        lib._mn_decode_layers_typed = True
    ptrs = [(_P * len(layers))(*a) for a in arrays]
    x = hidden.clone(memory_format=torch.contiguous_format)
    tables = tables.to(torch.int32).contiguous()
    lens = lens.to(torch.int32).contiguous()
    slots = slots.to(torch.int64).contiguous()
    rc = lib.mn_decode_layers(_CODES[dt], len(layers), x.data_ptr(), rows, size, *ptrs[:6], inter, eps,
                              cos.data_ptr(), sin.data_ptr(), hq, hkv, d, ptrs[6], ptrs[7], slots.data_ptr(),
                              tables.data_ptr(), tables.stride(0), lens.data_ptr(), cache.block_size, ctx.scale,
                              cpu_kernels.span_keys(lens))
    if rc != 0:
        raise RuntimeError(f"decode layers kernel: unsupported shape (rows {rows}, heads {hq}/{hkv}, dim {d})")
    return x
