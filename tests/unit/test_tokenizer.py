"""Tokenizer: the built-in GGUF tokenizer (cached) behaves exactly like transformers' own GGUF
tokenizer; HF-dir tokenizers load offline; incremental decoding never splits a character."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.errors import InvalidRequestError, ModelLoadError
from common.model.builtin import builtin_model_path
from common.model.gguf_loader import cache_key
from common.model.tokenizer import IncrementalDecoder, Tokenizer, load_tokenizer
from tests.fixtures.hf_models import EOS_ID, IM_END_ID, build_tokenizer, write_random_hf_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MULTILINGUAL = "Grüße aus München! 東京は日本の首都です。Привет 🙂🚀 👩‍💻 ok, ça va?"
SMOLLM_PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                 "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                 "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tok_cache")


@pytest.fixture(scope="module")
def cold(gguf_cache) -> Tokenizer:
    """First load: transformers builds the tokenizer from the GGUF metadata (a few seconds), and
    our loader caches it. Its `.hf` is transformers' own GGUF tokenizer: the reference."""
    return load_tokenizer(None, cache_dir=str(gguf_cache))


@pytest.fixture(scope="module")
def builtin(cold, gguf_cache) -> Tokenizer:
    path = Path(builtin_model_path())
    assert (gguf_cache / "tokenizers" / f"{path.stem}-{cache_key(path)}" / "tokenizer.json").is_file()
    start = time.perf_counter()
    tok = load_tokenizer(None, cache_dir=str(gguf_cache))
    assert time.perf_counter() - start < 2.0
    return tok


def test_builtin_chat_template_matches_transformers(cold, builtin):
    ref = cold.hf.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
    ids = builtin.apply_chat_template(QUESTION)
    assert ids == list(ref)
    assert builtin.decode(ids) == SMOLLM_PROMPT
    assert ids[:3] == [1, 9690, 198] and ids[-4:] == [1, 520, 9531, 198]


def test_builtin_encode_decode_and_ids(cold, builtin):
    assert builtin.encode(MULTILINGUAL) == cold.hf.encode(MULTILINGUAL)
    assert builtin.decode(builtin.encode(MULTILINGUAL)) == MULTILINGUAL
    assert builtin.vocab_size == 49152
    assert 2 in builtin.eos_token_ids and builtin.decode([2]) == "<|im_end|>"


def test_incremental_decoding_reassembles_exactly(builtin):
    ids = builtin.encode(MULTILINGUAL, add_special_tokens=False)
    dec = IncrementalDecoder(builtin)
    deltas = [dec.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas                       # some characters span several byte tokens
    assert "".join(deltas) + dec.flush() == MULTILINGUAL


def test_incremental_decoder_holds_back_partial_character(builtin):
    ids = builtin.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1                       # the emoji is split into byte-level tokens
    dec = IncrementalDecoder(builtin)
    assert dec.push(ids[0]) == ""
    assert dec.flush() == "\ufffd"            # an unfinished character is only emitted on flush


def test_hf_dir_tokenizer(tmp_path):
    path = write_random_hf_model(tmp_path / "m", "llama")
    tok = load_tokenizer(str(path))
    assert tok.eos_token_ids == (EOS_ID, IM_END_ID)      # config eos ∪ tokenizer eos
    assert tok.vocab_size <= 320
    ids = tok.encode("hello world")
    assert ids[0] == tok.bos_token_id == 0 and tok.decode(ids[1:]) == "hello world"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    dec = IncrementalDecoder(tok)
    text = "Grüße 東京 🚀👩‍💻"
    assert "".join(dec.push(i) for i in tok.encode(text, add_special_tokens=False)) == text


def test_no_chat_template_and_bad_paths(tmp_path):
    hf = build_tokenizer()
    hf.chat_template = None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer(hf).apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer"):
        load_tokenizer(str(empty))
