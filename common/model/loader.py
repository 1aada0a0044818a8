"""Checkpoint loading: a Hugging Face directory or a GGUF file becomes a config plus lazy weights.

Contract: every checkpoint, whatever its format, is presented in Hugging Face Llama naming with
float32 CPU tensors, so the model code has exactly one weight layout to understand:

    model.embed_tokens.weight                                  [vocab, hidden]
    model.layers.{i}.input_layernorm.weight                    [hidden]
    model.layers.{i}.self_attn.q_proj.weight                   [heads * head_dim, hidden]
    model.layers.{i}.self_attn.{k,v}_proj.weight               [kv_heads * head_dim, hidden]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias               (Qwen2 only)
    model.layers.{i}.self_attn.o_proj.weight                   [hidden, heads * head_dim]
    model.layers.{i}.post_attention_layernorm.weight           [hidden]
    model.layers.{i}.mlp.{gate,up}_proj.weight                 [intermediate, hidden]
    model.layers.{i}.mlp.down_proj.weight                      [hidden, intermediate]
    model.norm.weight                                          [hidden]
    lm_head.weight                                             [vocab, hidden] (absent when tied)

Q and K rows use the HF rotate-half RoPE convention (GGUF's interleaved rows are undone).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch

from common.config import ModelConfig
from common.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

NameFilter = Callable[[str], bool]

# Buffers that old checkpoints saved next to the weights; they are recomputed, never loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class WeightSource(Protocol):
    """Yields (HF name, float32 CPU tensor). `names_filter` runs before a tensor is read, so a
    caller that keeps few names (a pipeline stage, a TP rank) never materialises the others."""

    def __call__(self, names_filter: NameFilter | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        ...


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint. `weights` may be called any number of times; each call re-reads."""
    config: ModelConfig
    source: str                     # the resolved path the weights come from
    weights: WeightSource


def served_model_name(path: str | None) -> str:
    """The name a checkpoint is served under by default: its file or directory name without the
    extension (`path` None: the built-in model's), the same for the router and the pools."""
    if path is None:
        from common.model.builtin import builtin_model_path
        path = builtin_model_path()
    return Path(path).expanduser().resolve().name.split(".")[0]


def load_checkpoint(path: str | None, max_model_len: int | None = None,
                    cache_dir: str | None = None) -> Checkpoint:
    """Opens `path` (HF directory or .gguf file; None = the built-in model).

    `max_model_len` replaces the config's max_position (a warning is logged when it exceeds the
    trained context). `cache_dir` is where GGUF dequantization is cached (default: see
    gguf_loader.default_cache_dir). Raises ModelLoadError with the reason on any failure.
    """
    if path is None:
        from common.model.builtin import builtin_model_path
        path = builtin_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path {path!r} does not exist (expected a Hugging Face "
                             f"checkpoint directory or a .gguf file)")
    if p.is_dir():
        config, weights = _load_hf_dir(p)
    elif p.suffix.lower() == ".gguf":
        from common.model.gguf_loader import load_gguf   # imports the gguf package: only if needed
        config, weights = load_gguf(p, cache_dir=cache_dir)
    else:
        raise ModelLoadError(f"model path {path!r} is a file but not a .gguf file; pass a Hugging "
                             f"Face checkpoint directory or a .gguf file")
    if max_model_len is not None:
        if max_model_len <= 0:
            raise ModelLoadError(f"max_model_len must be positive, got {max_model_len}")
        if max_model_len > config.max_position:
            log.warning("max_model_len=%d exceeds the trained context %d of %s",
                        max_model_len, config.max_position, p)
        config = dataclasses.replace(config, max_position=max_model_len)
    return Checkpoint(config=config, source=str(p.resolve()), weights=weights)


def hf_weight_names(config: ModelConfig) -> list[str]:
    """Every tensor name a checkpoint for `config` must provide, in forward order."""
    names = ["model.embed_tokens.weight"]
    for i in range(config.num_layers):
        pre = f"model.layers.{i}."
        names.append(pre + "input_layernorm.weight")
        for proj in ("q", "k", "v", "o"):
            names.append(pre + f"self_attn.{proj}_proj.weight")
        if config.qkv_bias:
            names += [pre + f"self_attn.{proj}_proj.bias" for proj in ("q", "k", "v")]
        names.append(pre + "post_attention_layernorm.weight")
        names += [pre + f"mlp.{proj}_proj.weight" for proj in ("gate", "up", "down")]
    names.append("model.norm.weight")
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def check_weight_names(config: ModelConfig, available: Sequence[str], source: Path) -> list[str]:
    """Returns the names to load; raises ModelLoadError naming missing or unexpected tensors."""
    expected = hf_weight_names(config)
    have = set(available)
    missing = [n for n in expected if n not in have]
    allowed = set(expected) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    unexpected = sorted(n for n in have - allowed if not n.endswith(_IGNORED_SUFFIXES))
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint {source} does not match its config: "
                             f"missing {_few(missing)}, unexpected {_few(unexpected)}")
    return expected


def safetensors_weights(files: Mapping[str, Path], names: Sequence[str]) -> WeightSource:
    """WeightSource over safetensors files. `files` maps each name to the file holding it;
    tensors are yielded in the order of `names`, converted to float32."""

    def weights(names_filter: NameFilter | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open
        with ExitStack() as stack:
            handles: dict[Path, object] = {}
            for name in names:
                if names_filter is not None and not names_filter(name):
                    continue
                file = files[name]
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
                tensor = handles[file].get_tensor(name)  # type: ignore[attr-defined]
                yield name, tensor.to(torch.float32).contiguous()

    return weights


def _load_hf_dir(d: Path) -> tuple[ModelConfig, WeightSource]:
    config = _read_hf_config(d)
    files = _safetensors_index(d)
    names = check_weight_names(config, list(files), d)
    return config, safetensors_weights(files, names)


def _read_hf_config(d: Path) -> ModelConfig:
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{d} has no config.json; is it a Hugging Face checkpoint directory?")
    cfg = _read_json(cfg_file)
    try:
        config = ModelConfig.from_hf(cfg)
    except ConfigError as e:
        raise ModelLoadError(f"{cfg_file}: {e}") from e
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"{cfg_file}: missing or malformed field {e}") from e
    # generation_config.json may list more stop tokens (Llama 3 instruct: <|eot_id|>).
    gen_file = d / "generation_config.json"
    if gen_file.is_file():
        eos = _read_json(gen_file).get("eos_token_id")
        extra = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        merged = tuple(dict.fromkeys(list(config.eos_token_ids) + [int(e) for e in extra]))
        config = dataclasses.replace(config, eos_token_ids=merged)
    return config


def _safetensors_index(d: Path) -> dict[str, Path]:
    """Maps each tensor name to its safetensors file (sharded or single-file checkpoints)."""
    index_file = d / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_file} has no weight_map")
        files = {name: d / fname for name, fname in weight_map.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise ModelLoadError(f"{index_file} lists shards that are missing: {_few(absent)}")
        return files
    single = d / "model.safetensors"
    if not single.is_file():
        others = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {_few(others)}: only safetensors is supported)" if others else ""
        raise ModelLoadError(f"{d} has no model.safetensors or model.safetensors.index.json{hint}")
    from safetensors import safe_open
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def _few(items: Sequence[str], n: int = 5) -> str:
    if not items:
        return "none"
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
