"""GGUF checkpoints (llama.cpp format): metadata → ModelConfig, tensors → HF-named float32.

Dequantizing is done once per file and cached as one float32 safetensors file whose metadata also
holds the ModelConfig, so a warm load reads one small header and nothing else until weights() runs.
Cache: <cache_dir>/gguf/<stem>-<key>.safetensors, key = hash(format version, real path, size, mtime).

RoPE layout: llama.cpp's converter permutes the rows of Q and K (per head) from HF's rotate-half
order [x_0 .. x_{d/2-1}, x_{d/2} .. x_{d-1}] to the interleaved order [x_0, x_{d/2}, x_1, ...]
(convert_hf_to_gguf.py, LlamaModel.permute). `unpermute_rope` undoes it. Qwen2 GGUFs use NEOX
(rotate-half) RoPE in llama.cpp and are stored unpermuted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from common.config import ModelConfig, RopeScaling
from common.errors import ModelLoadError
from common.model.loader import (NameFilter, WeightSource, check_weight_names,
                                 safetensors_weights)

log = logging.getLogger(__name__)

CACHE_FORMAT = "gguf-f32-v1"     # bump when the conversion changes: old cache files are ignored
SUPPORTED_ARCHS = ("llama", "qwen2")
_PERMUTED_ARCHS = ("llama",)     # archs whose Q/K rows llama.cpp interleaves

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def default_cache_dir() -> Path:
    """$MNEMOSYNE_CACHE, else ~/.cache/mnemosyne. Read here only, at the top of a load."""
    return Path(os.environ.get("MNEMOSYNE_CACHE") or Path.home() / ".cache" / "mnemosyne")


def cache_key(path: Path) -> str:
    """Identifies one version of one file: changes when the file is replaced or modified."""
    st = path.stat()
    raw = f"{CACHE_FORMAT}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def load_gguf(path: Path, cache_dir: str | Path | None = None) -> tuple[ModelConfig, WeightSource]:
    """Config and weights of a GGUF file, through the float32 cache (built on first use).

    Falls back to dequantizing on every weights() call if the cache cannot be written.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = root / "gguf" / f"{path.stem}-{cache_key(path)}.safetensors"
    if cached.is_file():
        try:
            return _open_cache(cached, path)
        except ModelLoadError as e:
            log.warning("ignoring unreadable GGUF cache %s: %s", cached, e)
    reader = _reader(path)
    config = gguf_config(reader, path)
    check_weight_names(config, [hf_name(t.name) for t in reader.tensors], path)
    try:
        _write_cache(cached, reader, config, path)
    except OSError as e:
        log.warning("cannot write GGUF cache %s (%s); dequantizing on every load", cached, e)
        return config, _direct_weights(path, config)
    return _open_cache(cached, path)


def gguf_config(reader: Any, path: Path) -> ModelConfig:
    """ModelConfig from GGUF metadata (`{arch}.*` and `tokenizer.ggml.*` keys)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r} "
                             f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        # Llama 3.1-style scaling is stored as a per-frequency factor tensor, not as metadata.
        raise ModelLoadError(f"{path}: GGUF per-frequency RoPE factors (rope_freqs.weight, llama3 "
                             f"scaling) are not supported; load the Hugging Face checkpoint instead")

    def meta(key: str, default: Any = _MISSING) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    num_heads = int(meta("attention.head_count"))
    num_kv_heads = _uniform(meta("attention.head_count_kv", num_heads), "head_count_kv", path)
    hidden = int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", hidden // num_heads))
    rope_dim = int(meta("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ModelLoadError(f"{path}: partial RoPE (rope.dimension_count={rope_dim}, "
                             f"head_dim={head_dim}) is not supported")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = int(meta("vocab_size", len(tokens.data) if tokens is not None else 0))
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: no token_embd.weight tensor")
    embd_rows = int(tensors["token_embd.weight"].shape[-1])   # GGUF shape is [hidden, vocab]
    if vocab != embd_rows:
        raise ModelLoadError(f"{path}: vocab_size {vocab} != token_embd rows {embd_rows}")
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, path),
        max_position=int(meta("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        architecture=arch,
    )


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name → HF Llama name; unknown names pass through (the name check rejects them)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return gguf_name


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: per head, rows [r0, r_{d/2}, r1, r_{d/2+1}, ...] (interleaved
    pairs) go back to [r0 .. r_{d/2-1}, r_{d/2} .. r_{d-1}] (rotate-half). w: [n_head * d, ...]."""
    d_half = w.shape[0] // n_head // 2
    return w.reshape(n_head, d_half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(reader: Any, config: ModelConfig,
                 names_filter: NameFilter | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantizes in file order; the filter runs before a tensor is dequantized."""
    from gguf.quants import dequantize
    for t in reader.tensors:
        name = hf_name(t.name)
        if names_filter is not None and not names_filter(name):
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))   # GGUF lists ne0 (columns) first
        try:
            w = dequantize(t.data, t.tensor_type).reshape(shape)
        except NotImplementedError as e:
            raise ModelLoadError(f"{t.name}: cannot dequantize {t.tensor_type.name}: {e}") from e
        if config.architecture in _PERMUTED_ARCHS:
            if ".self_attn.q_proj." in name:
                w = unpermute_rope(w, config.num_heads)
            elif ".self_attn.k_proj." in name:
                w = unpermute_rope(w, config.num_kv_heads)
        # F32 tensors come back as read-only views of the mmap: copy those (and only those).
        yield name, torch.from_numpy(np.require(w, np.float32, ["C", "W", "O"]))


_MISSING = object()


def _field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    f = reader.get_field(key)
    if f is None:
        if default is _MISSING:
            raise ModelLoadError(f"GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def _uniform(value: Any, key: str, path: Path) -> int:
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ModelLoadError(f"{path}: per-layer {key} {value} is not supported")
        value = value[0]
    return int(value)


def _rope_scaling(meta: Any, path: Path) -> RopeScaling:
    kind = meta("rope.scaling.type", "none")
    if kind == "none":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(meta("rope.scaling.factor")))
    raise ModelLoadError(f"{path}: GGUF rope scaling type {kind!r} is not supported (none, linear)")


def _reader(path: Path) -> Any:
    from gguf import GGUFReader
    try:
        return GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e


def _direct_weights(path: Path, config: ModelConfig) -> WeightSource:
    def weights(names_filter: NameFilter | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        yield from gguf_tensors(_reader(path), config, names_filter)
    return weights


def _write_cache(cached: Path, reader: Any, config: ModelConfig, path: Path) -> None:
    """Dequantizes everything into one safetensors file: written to a temp file, then renamed,
    so a reader never sees a partial file and concurrent writers simply race to the same result."""
    from safetensors.torch import save_file
    start = time.perf_counter()
    tensors = dict(gguf_tensors(reader, config))
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{cached.name}.", suffix=".tmp", dir=cached.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": CACHE_FORMAT, "source": str(path),
                                          "config": _config_to_json(config)})
        os.chmod(tmp, 0o644)        # mkstemp makes 0600; the cache is shared like any file
        os.replace(tmp, cached)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("cached dequantized %s as %s in %.1fs", path.name, cached, time.perf_counter() - start)


def _open_cache(cached: Path, path: Path) -> tuple[ModelConfig, WeightSource]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(cached), framework="pt") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
        if meta.get("format") != CACHE_FORMAT:
            raise ModelLoadError(f"cache format {meta.get('format')!r} != {CACHE_FORMAT!r}")
        config = _config_from_json(meta["config"])
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot read {cached}: {e}") from e
    ordered = check_weight_names(config, names, path)
    return config, safetensors_weights({n: cached for n in ordered}, ordered)


def _config_to_json(config: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def _config_from_json(text: str) -> ModelConfig:
    d = json.loads(text)
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_token_ids"] = tuple(d["eos_token_ids"])
    return ModelConfig(**d)
