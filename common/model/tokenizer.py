"""Tokenizer: a transformers fast tokenizer loaded offline, plus incremental detokenization.

HF directories load directly. A GGUF's tokenizer is rebuilt by transformers from the GGUF metadata
(seconds), so it is saved once with save_pretrained under
<cache_dir>/tokenizers/<stem>-<key>/ (same key as the weight cache) and loaded from there.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from common.config import ModelConfig
from common.errors import InvalidRequestError, ModelLoadError

log = logging.getLogger(__name__)


class Tokenizer:
    """Text ↔ token ids for one checkpoint. `extra_eos_ids` (e.g. from the model config) are
    merged with the tokenizer's own eos token into `eos_token_ids`."""

    def __init__(self, hf: Any, extra_eos_ids: Sequence[int] = ()) -> None:
        self.hf = hf
        own = [hf.eos_token_id] if hf.eos_token_id is not None else []
        self._eos = tuple(dict.fromkeys(int(i) for i in [*extra_eos_ids, *own]))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (base vocab plus added tokens)."""
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` rendered with the checkpoint's chat template."""
        if not self.hf.chat_template:
            raise InvalidRequestError("this model has no chat template; send a plain prompt")
        ids = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                          tokenize=True, return_dict=False)
        return [int(i) for i in ids]


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas: `tokenizers`' DecodeStream (Rust, constant work
    per token), which keeps context-dependent text (leading spaces) exact and holds back a character
    split across tokens until its last byte arrives. The concatenated deltas (plus flush()) equal
    tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        from tokenizers.decoders import DecodeStream
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._backend = tokenizer.hf.backend_tokenizer          # every tokenizer we load is a fast one
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self._pending: list[int] = []      # ids whose text is not emitted yet (an unfinished character)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the newly completed text ('' while a character is pending)."""
        self.ids.append(int(token_id))
        self._pending.append(int(token_id))
        text = self._stream.step(self._backend, int(token_id))
        if text is None:
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        """Emits whatever is still held back (an incomplete character becomes U+FFFD)."""
        pending, self._pending = self._pending, []
        return self.tokenizer.decode(pending, skip_special_tokens=self.skip_special_tokens) if pending else ""


def load_tokenizer(path: str | None, config: ModelConfig | None = None,
                   cache_dir: str | None = None) -> Tokenizer:
    """Tokenizer of a checkpoint (HF dir or .gguf file; None = the built-in model).

    eos_token_ids = tokenizer eos ∪ `config.eos_token_ids` (when `config` is None and `path` is
    an HF dir, config.json and generation_config.json are read for it). Never uses the network.
    """
    if path is None:
        from common.model.builtin import builtin_model_path
        path = builtin_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"tokenizer path {path!r} does not exist")
    if p.is_dir():
        hf = _from_pretrained(p)
        extra = config.eos_token_ids if config is not None else _hf_dir_eos(p)
    elif p.suffix.lower() == ".gguf":
        hf = _gguf_tokenizer(p, cache_dir)
        extra = config.eos_token_ids if config is not None else ()
    else:
        raise ModelLoadError(f"tokenizer path {path!r} is neither a directory nor a .gguf file")
    return Tokenizer(hf, extra_eos_ids=extra)


def _from_pretrained(d: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load the tokenizer from {d}: {e}") from e


def _gguf_tokenizer(path: Path, cache_dir: str | None) -> Any:
    from common.model.gguf_loader import cache_key, default_cache_dir
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = root / "tokenizers" / f"{path.stem}-{cache_key(path)}"
    if (cached / "tokenizer.json").is_file():
        try:
            return _from_pretrained(cached)
        except ModelLoadError as e:
            log.warning("ignoring unreadable tokenizer cache %s: %s", cached, e)
    hf = _from_pretrained(path.parent, gguf_file=path.name)
    try:
        _save_atomically(hf, cached)
    except OSError as e:
        log.warning("cannot cache the GGUF tokenizer in %s: %s", cached, e)
    return hf


def _save_atomically(hf: Any, cached: Path) -> None:
    """save_pretrained into a temp dir, then rename: readers see a complete dir or none."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cached.parent)
    try:
        hf.save_pretrained(tmp)
        if cached.exists():      # another process won the race; its copy is identical
            return
        os.chmod(tmp, 0o755)     # mkdtemp makes 0700
        try:
            os.rename(tmp, cached)
        except OSError:
            if not cached.exists():
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _hf_dir_eos(d: Path) -> tuple[int, ...]:
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        f = d / name
        if not f.is_file():
            continue
        try:
            eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    return tuple(int(i) for i in ids)
