"""The built-in model (SmolLM2-135M-Instruct, GGUF) through the engine, against Hugging Face
transformers loading the same GGUF file (float32), and answering a factual question."""
from __future__ import annotations

import pytest
import torch

from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.model.loader import load_checkpoint
from common.model.tokenizer import load_tokenizer
from common.sampling_params import SamplingParams
from tests.fixtures.hf_models import builtin_hf_model

STEPS = 32
LOGPROB_TOL = 1e-4
GREEDY = SamplingParams(max_tokens=STEPS, ignore_eos=True)
QUESTION = "What is the capital of France?"
TEXT = ("The Roman Empire was the post-Republican state of ancient Rome. It included large territorial "
        "holdings around the Mediterranean Sea in Europe, North Africa, and Western Asia, and was")


@pytest.fixture(scope="module")
def builtin():
    checkpoint = load_checkpoint(None)
    return checkpoint, load_tokenizer(None, checkpoint.config)


@pytest.fixture(scope="module")
def prompts(builtin):
    _, tok = builtin
    return [tok.apply_chat_template([{"role": "user", "content": QUESTION}]), tok.encode(TEXT)]


@pytest.fixture(scope="module")
def hf_refs(prompts):
    """HF transformers on the same GGUF file (dequantized by transformers): greedy tokens + logprobs."""
    model = builtin_hf_model()
    model.generation_config.eos_token_id = None         # the shared model's only other user reads weights
    refs = []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
            tokens = out.sequences[0, len(p):].tolist()
            refs.append((tokens, [torch.log_softmax(lg[0].float(), -1)[t].item()
                                  for lg, t in zip(out.logits, tokens)]))
    return refs


def make_engine(builtin, chunk: int = 512, block: int = 16, backend: str = "auto",
                dtype: str = "float32") -> LLMEngine:
    checkpoint, tok = builtin
    cfg = EngineConfig(dtype=dtype, attention_backend=backend,
                       cache=CacheConfig(block_size=block, max_kv_tokens=512),
                       scheduler=SchedulerConfig(chunk_size=chunk))
    return LLMEngine(cfg, checkpoint, extra_eos_ids=tok.eos_token_ids)


def run_checked(engine: LLMEngine, batch, params=GREEDY):
    """Runs the prompts together; checks the block pool after every step and at the end."""
    rids = [engine.add_request(p, params) for p in batch]
    res = {r: ([], []) for r in rids}
    while engine.has_unfinished():
        outs = engine.step()
        assert outs
        engine.pool.check()
        for o in outs:
            if o.token_id is not None:
                res[o.request_id][0].append(o.token_id)
                res[o.request_id][1].append(o.logprob)
    assert engine.pool.num_used == 0
    return [res[r] for r in rids]


def test_answers_the_capital_of_france(builtin, prompts):
    engine = make_engine(builtin)
    _, tok = builtin
    res = engine.generate([prompts[0]], SamplingParams(max_tokens=STEPS))[0]
    text = tok.decode(res.token_ids, skip_special_tokens=True)
    assert "Paris" in text, text
    assert res.finish_reason == "stop" and res.token_ids[-1] in tok.eos_token_ids   # ends its turn


# (chunk, block, backend, batched). Chunks of 1, 7 and 64 are covered on the small random models
# (test_engine_hf.py); here one-shot and 24-token chunks over 16-token blocks, batched.
LAYOUTS = {
    "oneshot-alone-reference": (512, 16, "reference", False),
    "chunk24-block16-batched-cpu_flash": (24, 16, "cpu_flash", True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_hf_on_the_same_gguf(builtin, prompts, hf_refs, layout):
    chunk, block, backend, batched = LAYOUTS[layout]
    engine = make_engine(builtin, chunk=chunk, block=block, backend=backend)
    results = run_checked(engine, prompts) if batched else [run_checked(engine, [p])[0] for p in prompts]
    for i, ((tokens, logprobs), (ref_tokens, ref_logprobs)) in enumerate(zip(results, hf_refs)):
        assert tokens == ref_tokens, f"{layout}: prompt {i} greedy tokens differ from HF"
        diff = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs))
        assert diff <= LOGPROB_TOL, f"{layout}: prompt {i} logprobs differ by {diff:.2e}"


# bf16 rounds activations to 8 mantissa bits at every layer boundary; how the 30 layers' errors add
# up depends on the CPU's bf16 matmul path: within 0.1 on AVX-512-BF16 machines, 0.15 measured on an
# AVX2-only AMD EPYC (oneDNN's emulated bf16 kernels round in another order). fp32 stays at 1e-4.
BF16_LOGPROB_TOL = 0.25


def test_bf16_engine_tracks_fp32_hf(builtin, prompts, hf_refs):
    """bf16 engine vs float32 HF. Asserted: the answer still names Paris; the first 4 greedy tokens
    of each prompt agree; until the first divergence logprobs stay within BF16_LOGPROB_TOL."""
    _, tok = builtin
    engine = make_engine(builtin, chunk=16, dtype="bfloat16")
    results = run_checked(engine, prompts)
    for i, ((tokens, logprobs), (ref_tokens, ref_logprobs)) in enumerate(zip(results, hf_refs)):
        assert tokens[:4] == ref_tokens[:4], f"bf16 prompt {i}: {tokens[:4]} vs {ref_tokens[:4]}"
        prefix = next((j for j, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        for j in range(prefix):
            assert abs(logprobs[j] - ref_logprobs[j]) < BF16_LOGPROB_TOL, f"bf16 prompt {i} step {j}"
    answer = tok.decode(results[0][0], skip_special_tokens=True)
    assert "Paris" in answer, answer
