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
    """Turns a stream of token ids into text deltas.

    Decodes a small window of recent tokens and emits only what the newest tokens added, so
    tokenizers that change a token's text by context (leading spaces) stay exact. A character
    split across tokens decodes to a trailing U+FFFD until its last byte arrives: that text is
    held back, never emitted half-made. The concatenated deltas (plus flush()) equal
    tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0   # window start: text of ids[_prefix:_read] was already emitted
        self._read = 0     # ids before this index are fully emitted

    def push(self, token_id: int) -> str:
        """Adds one token; returns the newly completed text ('' while a character is pending)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if text.endswith("\ufffd") or len(text) <= len(prefix_text):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """Emits whatever is still held back (an incomplete character becomes U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


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
