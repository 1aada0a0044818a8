"""The CPU weight layout of LlamaModel.pack_weights against Hugging Face transformers.

In float32 on the CPU every linear (the fused q/k/v and gate/up, o_proj, down_proj, the LM head,
tied or not) is stored [in, out] row-major by default; in bfloat16 none is. With the layout on and
off, the model's float32 logits of a whole prompt must match transformers' within float32 rounding,
and give the same greedy tokens. TP shards (row-parallel linears, a vocab slice of the head with an
odd vocab) are laid out the same way and hold the checkpoint's slices. Engines and grids with the
default layout are compared with transformers in test_engine_hf.py and
tests/distributed/test_tied_grids.py.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from common.engine.executor import build_model
from common.model.llama import LlamaModel, transposed_by_default, weights_transposed
from common.model.loader import load_checkpoint
from common.parallel.tp import load_shard, slice_weight, tp_shard
from tests.fixtures.hf_models import write_random_hf_model

# float32's CPU layout: [out, in] where the decode kernel runs (common/model/cpu_kernels.py), else [in, out]
F32_DEFAULT = transposed_by_default(torch.empty(0))

VOCAB = 321                        # odd: a TP=2 vocab split leaves the last slice one row short
CHECKPOINTS = {
    "untied": dict(arch="llama", seed=31, tie_word_embeddings=False),
    "tied-qwen2": dict(arch="qwen2", seed=32, tie_word_embeddings=True),     # q/k/v bias
}
_rng = random.Random(5)
PROMPT = [_rng.randrange(4, VOCAB) for _ in range(37)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = str(write_random_hf_model(tmp_path_factory.mktemp(name), vocab_size=VOCAB,
                                                    tokenizer=False, **CHECKPOINTS[name]))
        return cache[name]

    return get


class CausalAttend:
    """One sequence, all of it in this forward: causal attention over its own k/v (GQA by repetition)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)            # [T, Hq, D]
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           is_causal=True)                          # [Hq, T, D]
        return o.transpose(0, 1)


@torch.inference_mode()
def logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """float32 logits [T, vocab] of every position of `ids`."""
    t = torch.tensor(ids)
    return model.logits(model(model.embed(t), torch.arange(len(ids)), CausalAttend()))


@torch.inference_mode()
def hf_logits(path: str, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf(torch.tensor([ids])).logits[0].float()


def linears(model: LlamaModel) -> dict[str, torch.nn.Linear]:
    out = {"lm_head": model.lm_head}
    for i, layer in model.layers.items():
        out[f"{i}.o_proj"], out[f"{i}.down_proj"] = layer.self_attn.o_proj, layer.mlp.down_proj
    return out


def fused(model: LlamaModel) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in model.layers.items():
        out[f"{i}.qkv"], out[f"{i}.gate_up"] = layer.self_attn.qkv[0], layer.mlp.gate_up
    return out


def assert_layout(model: LlamaModel, transposed: bool) -> None:
    for name, lin in linears(model).items():
        assert weights_transposed(lin) == transposed, name
    for name, w in fused(model).items():
        n = w.shape[0]
        assert w.stride() == ((1, n) if transposed else (w.shape[1], 1)), name
    for layer in model.layers.values():                 # the HF-named parameters are views of the fused matrix
        a, m = layer.self_attn, layer.mlp
        assert a.k_proj.weight.untyped_storage().data_ptr() == a.qkv[0].untyped_storage().data_ptr()
        assert m.up_proj.weight.untyped_storage().data_ptr() == m.gate_up.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_float32_layout_matches_transformers_on_and_off(checkpoints, name):
    path = checkpoints(name)
    ckpt = load_checkpoint(path)
    assert ckpt.config.tie_word_embeddings == (name == "tied-qwen2")
    model = build_model(ckpt.config, ckpt, torch.float32, "cpu")
    assert_layout(model, transposed=F32_DEFAULT)         # the default for float32 on the CPU
    ref = hf_logits(path, PROMPT)                        # [T, vocab]
    on = logits(model, PROMPT)
    torch.testing.assert_close(on, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(on.argmax(-1), ref.argmax(-1))

    model.pack_weights(transposed=not F32_DEFAULT)       # the other layout, same values
    assert_layout(model, transposed=not F32_DEFAULT)
    off = logits(model, PROMPT)
    torch.testing.assert_close(off, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)
    model.pack_weights(transposed=F32_DEFAULT)           # and back
    assert_layout(model, transposed=F32_DEFAULT)
    torch.testing.assert_close(logits(model, PROMPT), on, rtol=0, atol=0)


def test_bfloat16_keeps_the_checkpoint_layout(checkpoints):
    """bfloat16 GEMV on this CPU is many times slower on [in, out] storage: never transposed."""
    ckpt = load_checkpoint(checkpoints("untied"))
    model = build_model(ckpt.config, ckpt, torch.bfloat16, "cpu")
    assert_layout(model, transposed=False)
    f32 = build_model(ckpt.config, ckpt, torch.float32, "cpu")
    torch.testing.assert_close(logits(model, PROMPT), logits(f32, PROMPT), rtol=0.05, atol=0.1)


@pytest.mark.parametrize("rank", [0, 1])
def test_tp_shards_are_laid_out_and_hold_their_slices(checkpoints, rank):
    """A TP=2 worker's model (as common/parallel/worker.py builds it): row-parallel o_proj/down_proj
    and the vocab-sliced head of a tied checkpoint are laid out as the single process's and hold the
    checkpoint's slices."""
    ckpt = load_checkpoint(checkpoints("tied-qwen2"))
    cfg = ckpt.config
    shard = tp_shard(cfg, rank, 2)
    model = load_shard(ckpt, shard, groups=None).to(torch.float32).eval()     # as a worker loads its slice
    model.pack_weights()
    assert_layout(model, transposed=F32_DEFAULT)
    full = dict(ckpt.weights())
    lo, hi = shard.vocab
    assert model.lm_head.weight.shape == (hi - lo, cfg.hidden_size) == ((161 if rank == 0 else 160), cfg.hidden_size)
    assert torch.equal(model.lm_head.weight, full["model.embed_tokens.weight"][lo:hi])
    assert torch.equal(model.embed_tokens.weight, full["model.embed_tokens.weight"][lo:hi])
    assert model.embed_tokens.weight.is_contiguous()     # the lookup keeps [vocab, hidden] rows
    for i, layer in model.layers.items():
        pre = f"model.layers.{i}."
        for hf_name, param in ((pre + "self_attn.o_proj.weight", layer.self_attn.o_proj.weight),
                               (pre + "self_attn.q_proj.weight", layer.self_attn.q_proj.weight),
                               (pre + "self_attn.v_proj.bias", layer.self_attn.v_proj.bias),
                               (pre + "mlp.down_proj.weight", layer.mlp.down_proj.weight),
                               (pre + "mlp.up_proj.weight", layer.mlp.up_proj.weight)):
            assert torch.equal(param, slice_weight(shard, cfg, hf_name, full[hf_name])), hf_name
