"""Checkpoint loading: HF directories and GGUF files give HF-named float32 weights equal to what
transformers itself loads from the same files."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import RopeScaling
from common.errors import ModelLoadError
from common.model.builtin import builtin_model_path
from common.model.gguf_loader import cache_key
from common.model.loader import hf_weight_names, load_checkpoint
from tests.fixtures.hf_models import builtin_hf_model, write_random_hf_model

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _assert_same_as_hf(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tied: bool,
                       atol: float = 0.0) -> None:
    if tied:   # transformers exposes the tied head; we omit it
        torch.testing.assert_close(ref.pop("lm_head.weight"), ours["model.embed_tokens.weight"])
    assert set(ours) == set(ref)
    for name, w in ours.items():
        assert w.dtype == torch.float32 and w.device.type == "cpu", name
        torch.testing.assert_close(w, ref[name], rtol=0, atol=atol, msg=name)


CASES = {
    "llama": dict(arch="llama"),
    "mistral": dict(arch="mistral"),
    "qwen2": dict(arch="qwen2"),
    "llama-sharded": dict(arch="llama", shard=True),
    "qwen2-sharded-tied": dict(arch="qwen2", shard=True, tie_word_embeddings=True),
    "llama-tied-gqa6x2": dict(arch="llama", tie_word_embeddings=True, num_attention_heads=6,
                              num_key_value_heads=2),
    "mistral-gqa9x3-bf16": dict(arch="mistral", num_attention_heads=9, num_key_value_heads=3,
                                dtype="bfloat16"),
    "llama-llama3-rope-fp16": dict(arch="llama", rope_scaling=LLAMA3, dtype="float16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_dir_matches_transformers(tmp_path, case):
    kwargs = CASES[case]
    path = write_random_hf_model(tmp_path / case, tokenizer=False, **kwargs)
    ckpt = load_checkpoint(str(path))
    names = [name for name, _ in ckpt.weights()]
    assert names == hf_weight_names(ckpt.config)          # canonical order, each name once
    _assert_same_as_hf(dict(ckpt.weights()), _hf_state_dict(path),
                       tied=kwargs.get("tie_word_embeddings", False))
    assert ckpt.source == str(path.resolve())


def test_config_fields(tmp_path):
    cfg = load_checkpoint(str(write_random_hf_model(
        tmp_path / "a", "llama", tokenizer=False, num_attention_heads=6, num_key_value_heads=2,
        tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3))).config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.hidden_size) == (6, 2, 3, 16, 96)
    assert cfg.tie_word_embeddings and not cfg.qkv_bias
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position=64)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.architecture) == (0, (1,), "llama")

    cfg = load_checkpoint(str(write_random_hf_model(
        tmp_path / "q", "qwen2", tokenizer=False, num_attention_heads=9, num_key_value_heads=3))).config
    assert cfg.qkv_bias and not cfg.tie_word_embeddings
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.architecture) == (9, 3, "qwen2")
    assert cfg.rope_scaling.kind == "default"


def test_generation_config_eos_merged_and_max_model_len(tmp_path):
    path = write_random_hf_model(tmp_path / "m", tokenizer=False)
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [1, 3]
    (path / "generation_config.json").write_text(json.dumps(gen))
    ckpt = load_checkpoint(str(path), max_model_len=100_000)
    assert ckpt.config.eos_token_ids == (1, 3)
    assert ckpt.config.max_position == 100_000


def test_names_filter_reads_only_selected(tmp_path):
    ckpt = load_checkpoint(str(write_random_hf_model(tmp_path / "m", shard=True, tokenizer=False)))
    seen: list[str] = []

    def layer1(name: str) -> bool:
        seen.append(name)
        return name.startswith("model.layers.1.")

    got = [name for name, _ in ckpt.weights(layer1)]
    assert seen == hf_weight_names(ckpt.config)
    assert got and all(n.startswith("model.layers.1.") for n in got)


def test_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_checkpoint(str(tmp_path / "weights.bin"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_checkpoint(str(empty))

    path = write_random_hf_model(tmp_path / "m", tokenizer=False)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="no model.safetensors.*pytorch_model.bin"):
        load_checkpoint(str(path))

    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'gpt2'"):
        load_checkpoint(str(path))


def test_missing_tensor_and_missing_shard(tmp_path):
    from safetensors.torch import load_file, save_file
    path = write_random_hf_model(tmp_path / "m", tokenizer=False)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing model.layers.1.mlp.up_proj.weight"):
        load_checkpoint(str(path))

    sharded = write_random_hf_model(tmp_path / "s", shard=True, tokenizer=False)
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="shards that are missing"):
        load_checkpoint(str(sharded))


# ---- GGUF --------------------------------------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows → interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(hf_dir: Path, out: Path, arch: str) -> Path:
    """Converts a tiny HF checkpoint to GGUF the way llama.cpp does (permuting Q/K for llama);
    the embedding is stored as F16, everything else as F32."""
    import gguf
    from safetensors.torch import load_file
    cfg = json.loads((hf_dir / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), arch=arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a.astype(np.float16))
            continue
        if name in ("model.norm.weight", "lm_head.weight"):
            w.add_tensor({"model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}[name], a)
            continue
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        if arch == "llama" and module == "self_attn.q_proj":
            a = llama_cpp_permute(a, heads)
        elif arch == "llama" and module == "self_attn.k_proj":
            a = llama_cpp_permute(a, kv_heads)
        w.add_tensor(f"blk.{layer}.{_TO_GGUF[module]}.{kind}", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("arch,extra", [("llama", dict(num_attention_heads=6, num_key_value_heads=2)),
                                        ("qwen2", dict(tie_word_embeddings=True))])
def test_gguf_roundtrip_and_cache(tmp_path, arch, extra):
    hf_dir = write_random_hf_model(tmp_path / "hf", arch, tokenizer=False, **extra)
    gguf_file = write_gguf(hf_dir, tmp_path / "tiny.gguf", arch)
    ref = _hf_state_dict(hf_dir)
    ref["model.embed_tokens.weight"] = ref["model.embed_tokens.weight"].half().float()
    if extra.get("tie_word_embeddings"):
        ref["lm_head.weight"] = ref["model.embed_tokens.weight"]
    cache = tmp_path / "cache"

    cold = load_checkpoint(str(gguf_file), cache_dir=str(cache))
    hf_cfg = load_checkpoint(str(hf_dir)).config
    assert cold.config.rms_norm_eps == pytest.approx(hf_cfg.rms_norm_eps, rel=1e-7)  # GGUF: float32
    assert dataclasses.replace(cold.config, rms_norm_eps=hf_cfg.rms_norm_eps) == hf_cfg
    _assert_same_as_hf(dict(cold.weights()), dict(ref), tied=hf_cfg.tie_word_embeddings)
    cached = list((cache / "gguf").glob("tiny-*.safetensors"))
    assert [p.name for p in cached] == [f"tiny-{cache_key(gguf_file)}.safetensors"]

    warm = load_checkpoint(str(gguf_file), cache_dir=str(cache))
    assert warm.config == cold.config
    _assert_same_as_hf(dict(warm.weights()), dict(ref), tied=hf_cfg.tie_word_embeddings)

    # A cache dir that cannot be created: dequantize directly, same result.
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a directory")
    direct = load_checkpoint(str(gguf_file), cache_dir=str(blocked))
    _assert_same_as_hf(dict(direct.weights()), dict(ref), tied=hf_cfg.tie_word_embeddings)


def test_gguf_cache_key_follows_file_version(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"abc")
    before = cache_key(f)
    os.utime(f, ns=(1, 1))
    assert cache_key(f) != before


@pytest.fixture(scope="module")
def builtin_reference() -> dict[str, torch.Tensor]:
    """transformers' own GGUF loading of the built-in model (dequantized + un-permuted), ~20 s."""
    return {k: v.detach() for k, v in builtin_hf_model().state_dict().items()}


def test_builtin_gguf_matches_transformers(builtin_reference):
    ckpt = load_checkpoint(None)     # default cache dir: cold on the very first run only
    cfg = ckpt.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.max_position == 8192
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    assert ckpt.source == builtin_model_path()
    _assert_same_as_hf(dict(ckpt.weights()), dict(builtin_reference), tied=True, atol=1e-6)


def test_builtin_warm_load_is_fast():
    load_checkpoint(None)            # make sure the cache exists
    start = time.perf_counter()
    ckpt = load_checkpoint(None, max_model_len=32768)
    layer = dict(ckpt.weights(lambda n: n.startswith("model.layers.7.")))
    assert time.perf_counter() - start < 2.0
    assert ckpt.config.max_position == 32768
    assert len(layer) == 9 and layer["model.layers.7.self_attn.k_proj.weight"].shape == (192, 576)
