"""services/router/frontend.py: the request's stop tokens are its own plus the model's EOS ids, unless
it asks to ignore EOS (then the pools' engines are told so too, through SamplingParams.ignore_eos)."""
from __future__ import annotations

from types import SimpleNamespace

from services.router.frontend import Frontend, PromptInput


def frontend() -> Frontend:
    config = SimpleNamespace(vocab_size=100, eos_token_ids=(2,), bos_token_id=1)
    tokenizer = SimpleNamespace(eos_token_ids=(3,), encode=lambda text: [5] * len(text))
    return Frontend(tokenizer, config, name="m", source="m.gguf", max_model_len=64, max_prompt_tokens=0,
                    default_max_tokens=8)


def test_stop_tokens_hold_the_eos_ids_unless_ignore_eos():
    f = frontend()
    job = f.prepare(PromptInput(text="hi", sampling={"stop_token_ids": (9,)}))
    assert job.params.stop_token_ids == (9, 2, 3) and not job.params.ignore_eos
    job = f.prepare(PromptInput(text="hi", sampling={"stop_token_ids": (9,)}, ignore_eos=True))
    assert job.params.stop_token_ids == (9,) and job.params.ignore_eos
    assert job.params.max_tokens == 8
