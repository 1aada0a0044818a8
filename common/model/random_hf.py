"""Tiny, real Hugging Face checkpoints with random weights, written by transformers itself (no hub).

`write_random_hf_model` saves config.json + safetensors (optionally sharded, optionally bf16) and a
byte-level BPE tokenizer trained from scratch on a fixed corpus, so the directory is complete and
loads with AutoModelForCausalLM / AutoTokenizer like a downloaded one. The tests use it; so does
`write_longctx_test_model` (`mnemosyne make-test-model`), the long-context TEST model that lets a
million-token prompt go through the services on a CPU. Weights are a function of the seed alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")   # ids 0, 1, 2, 3
BOS_ID, EOS_ID, IM_END_ID = 0, 1, 3
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Long context serving needs exact attention over millions of tokens.",
    "Grüße aus München, ça va très bien, 東京は日本の首都です。",
    "Привет, как дела? 🙂 🚀 👩‍💻",
] * 4

_DEFAULTS: dict[str, Any] = dict(
    vocab_size=320, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
    tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
)
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)     # byte alphabet + specials


def write_random_hf_model(path: str | Path, arch: str = "llama", *, seed: int = 0,
                          shard: bool = False, dtype: str = "float32", tokenizer: bool = True,
                          rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                          **overrides: Any) -> Path:
    """Writes a random `arch` ("llama" | "mistral" | "qwen2") checkpoint into `path`; returns it.

    `overrides` are HF config fields (num_attention_heads=9, num_key_value_heads=3,
    tie_word_embeddings=True, ...); hidden_size defaults to heads × head_dim. `rope_scaling` is an
    HF rope dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}. `shard` writes several
    safetensors files with an index; `dtype` "bfloat16"/"float16" saves the weights in that type.
    Norm weights and biases are randomised too, so a mix-up between them is visible.
    """
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(classes)}")
    fields = {**_DEFAULTS, **overrides}
    fields.setdefault("hidden_size", fields["num_attention_heads"] * fields["head_dim"])
    fields["rope_parameters"] = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    if arch == "mistral":
        fields.setdefault("sliding_window", None)
    if tokenizer and fields["vocab_size"] < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} for the byte-level tokenizer")
    config_cls, model_cls = classes[arch]
    config = config_cls(**fields)

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model = model.to(getattr(torch, dtype))
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="100KB" if shard else "5GB")
    if tokenizer:
        build_tokenizer(fields["vocab_size"]).save_pretrained(out)
    return out


def build_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer trained from scratch on CORPUS (deterministic), with ChatML-like
    specials, BOS prepended on encode, eos = <|im_end|>, and CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="</s>", chat_template=CHAT_TEMPLATE)


#: The long-context test model: small enough that attention over 10^6 tokens runs on a CPU, with
#: RoPE and max positions for contexts past a million tokens. Random weights: it is for testing the
#: serving path (exactness, transfer, timeouts at length), its text is noise.
LONGCTX_TEST_MODEL = "mnemosyne-longctx-test"
LONGCTX_FIELDS: dict[str, Any] = dict(
    vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, max_position_embeddings=2 * 1024 * 1024,
)
LONGCTX_ROPE_THETA = 1e7             # longest RoPE wavelength 2*pi*theta^(14/16) ~ 9e6 positions >> 1M


def write_longctx_test_model(path: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Writes the long-context TEST model (LONGCTX_FIELDS, overridable) into `path`, with a README
    saying what it is; returns `path`. The same seed writes the same weights."""
    fields = {**LONGCTX_FIELDS, **overrides}
    out = write_random_hf_model(path, "llama", seed=seed, rope_theta=LONGCTX_ROPE_THETA, **fields)
    (out / "README.md").write_text(
        f"# {LONGCTX_TEST_MODEL} (TEST MODEL, random weights, seed {seed})\n\n"
        "Written by `mnemosyne make-test-model` (common/model/random_hf.py) to test Mnemosyne's serving path\n"
        "at long context on a CPU. Its weights are random: its output is noise, not language.\n\n"
        f"Llama, {fields['num_hidden_layers']} layers, {fields['num_attention_heads']} heads / "
        f"{fields['num_key_value_heads']} KV heads of dim {fields['head_dim']}, rope_theta {LONGCTX_ROPE_THETA:g}, "
        f"max_position_embeddings {fields['max_position_embeddings']}.\n")
    return out
