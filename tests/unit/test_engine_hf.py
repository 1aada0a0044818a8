"""The single-process engine against Hugging Face transformers on the same weights (float32).

Random-weight Llama (untied; tied with llama3 RoPE scaling), Mistral and Qwen2 (q/k/v bias)
checkpoints are written as real HF directories. For every model: identical greedy tokens for 32
steps and logprobs within 1e-4 of log_softmax(HF logits), with one-shot prefill, chunks of 1, 7, 64
and 24 (crossing 16-token blocks), requests alone and four of different lengths batched together,
on both CPU attention backends. The block pool's invariants are checked after every step, also
with aborts (mid-prefill, mid-decode) and with a cache so small that requests are preempted.
"""
from __future__ import annotations

import random

import pytest
import torch

from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.model import cpu_kernels
from common.model.llama import weights_transposed
from common.sampling_params import SamplingParams
from tests.fixtures.hf_models import write_random_hf_model

STEPS = 32
LOGPROB_TOL = 1e-4
PROMPT_LENS = (5, 23, 40, 61)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
MODELS = {
    "llama": dict(arch="llama", seed=1),                                 # untied, GQA 2:1
    "llama3-tied": dict(arch="llama", seed=2, tie_word_embeddings=True, rope_theta=500000.0,
                        rope_scaling=LLAMA3_ROPE, num_attention_heads=6, num_key_value_heads=2),
    "mistral": dict(arch="mistral", seed=3, num_key_value_heads=1),      # multi-query
    "qwen2": dict(arch="qwen2", seed=4, tie_word_embeddings=True),       # q/k/v bias
}
# (chunk size, block size, batched)
LAYOUTS = {
    "oneshot-alone": (4096, 16, False),
    "oneshot-batched": (4096, 16, True),
    "chunk1": (1, 16, True),
    "chunk7": (7, 16, True),
    "chunk64": (64, 16, True),
    "chunk24-block16": (24, 16, True),
}
GREEDY = SamplingParams(max_tokens=STEPS, ignore_eos=True)


def prompts(vocab: int = 320, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in PROMPT_LENS]


def hf_greedy(model, prompt: list[int], steps: int = STEPS) -> tuple[list[int], list[float]]:
    """HF greedy tokens and the logprob of each: log_softmax(raw logits)[token]."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, tokens)]
    return tokens, logprobs


class HFModel:
    def __init__(self, name: str, path, refs: list[tuple[list[int], list[float]]]) -> None:
        self.name, self.path, self.refs = name, str(path), refs


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> HFModel, each written and run through HF once for the whole module."""
    cache: dict[str, HFModel] = {}

    def get(name: str) -> HFModel:
        if name not in cache:
            from transformers import AutoModelForCausalLM
            path = write_random_hf_model(tmp_path_factory.mktemp(name), **MODELS[name])
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            model.generation_config.eos_token_id = None    # never stop early: compare all STEPS tokens
            with torch.inference_mode():
                cache[name] = HFModel(name, path, [hf_greedy(model, p) for p in prompts()])
        return cache[name]

    return get


@pytest.fixture(params=list(MODELS))
def hf(request, hf_models) -> HFModel:
    return hf_models(request.param)


@pytest.fixture
def hf_llama(hf_models) -> HFModel:
    return hf_models("llama")


@pytest.fixture
def hf_qwen2(hf_models) -> HFModel:
    return hf_models("qwen2")


def make_engine(path: str, chunk: int = 4096, block: int = 16, backend: str = "reference",
                dtype: str = "float32", num_blocks: int | None = None, eos=()) -> LLMEngine:
    cfg = EngineConfig(model=path, dtype=dtype, attention_backend=backend,
                       cache=CacheConfig(block_size=block, num_blocks=num_blocks, max_kv_tokens=1024),
                       scheduler=SchedulerConfig(chunk_size=chunk))
    return LLMEngine(cfg, extra_eos_ids=eos)


def run_checked(engine: LLMEngine, batch: list[list[int]], params: SamplingParams = GREEDY,
                on_step=None) -> list[tuple[list[int], list[float]]]:
    """Runs the prompts together step by step; checks the pool after every step, and at the end that
    every block came back. `on_step(step, rids, results)` may abort requests."""
    rids = [engine.add_request(p, params) for p in batch]
    res = {r: ([], []) for r in rids}
    step = 0
    while engine.has_unfinished():
        outs = engine.step()
        assert outs, "no progress"
        engine.pool.check()
        for o in outs:
            if o.token_id is not None:
                res[o.request_id][0].append(o.token_id)
                res[o.request_id][1].append(o.logprob)
        step += 1
        if on_step is not None:
            on_step(step, rids, res)
            engine.pool.check()
    assert engine.pool.num_used == 0 and engine.pool.num_free == engine.pool.num_blocks
    return [res[r] for r in rids]


def assert_matches(got: tuple[list[int], list[float]], ref: tuple[list[int], list[float]], what: str) -> None:
    tokens, logprobs = got
    ref_tokens, ref_logprobs = ref
    assert tokens == ref_tokens, f"{what}: greedy tokens differ from HF"
    diff = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs))
    assert diff <= LOGPROB_TOL, f"{what}: logprobs differ from HF by {diff:.2e}"


@pytest.mark.parametrize("backend", ["reference", "cpu_flash"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_tokens_and_logprobs_match_hf(hf, layout, backend):
    chunk, block, batched = LAYOUTS[layout]
    engine = make_engine(hf.path, chunk=chunk, block=block, backend=backend)
    if batched:
        results = run_checked(engine, prompts())
    else:
        results = [run_checked(engine, [p])[0] for p in prompts()]
    for n, got, ref in zip(PROMPT_LENS, results, hf.refs):
        assert_matches(got, ref, f"{hf.name} {layout} {backend} prompt of {n}")


def test_generate_api_matches_hf_and_reports_timing(hf):
    """Also pins the float32 CPU weight layout these comparisons run with: every linear, the tied LM
    head included, stored [out, in] for the CPU decode kernel (common/model/cpu_kernels.py), [in, out]
    where it is unavailable (LlamaModel.pack_weights; on and off in test_weight_layout.py)."""
    engine = make_engine(hf.path, chunk=16, backend="cpu_flash")
    model = engine.executor.model
    transposed = cpu_kernels.library() is None
    assert weights_transposed(model.lm_head) == transposed and all(
        weights_transposed(layer.self_attn.o_proj) == transposed
        and weights_transposed(layer.mlp.down_proj) == transposed for layer in model.layers.values())
    results = engine.generate(prompts(), GREEDY)
    for n, res, ref in zip(PROMPT_LENS, results, hf.refs):
        assert_matches((res.token_ids, res.logprobs), ref, f"{hf.name} generate() prompt of {n}")
        assert res.finish_reason == "length" and res.ttft_s > 0 and len(res.tbt_s) == STEPS - 1
    assert engine.pool.num_used == 0


def test_bf16_engine_tracks_fp32_hf(hf):
    """bf16 weights, activations and KV against float32 HF. Asserted: the first greedy token of every
    prompt agrees, at least 3/4 of all tokens agree, and until the first divergence the bf16
    logprobs stay within 0.05 (bf16 has 8 mantissa bits; after a divergence the sequences differ)."""
    engine = make_engine(hf.path, chunk=16, backend="cpu_flash", dtype="bfloat16")
    results = run_checked(engine, prompts())
    agree = total = 0
    for n, (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(PROMPT_LENS, results, hf.refs):
        assert tokens[0] == ref_tokens[0], f"{hf.name} bf16 prompt of {n}: first token differs"
        same = sum(a == b for a, b in zip(tokens, ref_tokens))
        agree, total = agree + same, total + len(ref_tokens)
        prefix = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        for i in range(prefix):
            assert abs(logprobs[i] - ref_logprobs[i]) < 0.05, f"{hf.name} bf16 step {i}"
    assert agree >= 0.75 * total, f"{hf.name} bf16: only {agree}/{total} tokens agree with fp32 HF"


def test_aborts_mid_prefill_and_mid_decode_free_everything(hf_llama):
    """Aborting one request mid-prefill and one mid-decode leaves the others exact and the pool empty."""
    hf = hf_llama
    engine = make_engine(hf.path, chunk=7, backend="cpu_flash")
    batch = prompts()
    aborted: dict[str, int] = {}

    def on_step(step, rids, res):
        long_prefill = rids[3]                    # 61 tokens in chunks of 7: still in prefill at step 2
        if step == 2 and long_prefill not in aborted:
            req = engine.scheduler.requests[long_prefill]
            assert req.num_computed < req.prompt_len and engine.pool.table(long_prefill)
            assert engine.abort(long_prefill)
            aborted[long_prefill] = step
        decoding = rids[0]
        if len(res[decoding][0]) == 5 and decoding not in aborted:
            assert engine.abort(decoding)
            aborted[decoding] = step
        assert long_prefill not in engine.pool.tables or long_prefill not in aborted

    results = run_checked(engine, batch, on_step=on_step)
    assert len(aborted) == 2
    assert results[3][0] == [] and len(results[0][0]) == 5
    assert results[0][0] == hf.refs[0][0][:5]
    for i in (1, 2):
        assert_matches(results[i], hf.refs[i], f"survivor {i}")
    assert not engine.abort("req-0") and not engine.abort("unknown")


def test_preemption_in_a_tiny_cache_gives_the_same_tokens(hf_llama):
    """8 blocks of 16 tokens for requests needing 3+4+5+6 blocks: the scheduler must preempt and
    recompute, and the tokens stay exactly those of HF."""
    hf = hf_llama
    engine = make_engine(hf.path, chunk=16, block=16, backend="cpu_flash", num_blocks=8)
    batch = prompts()
    requests = []
    orig_add = engine.scheduler.add

    def add(req):
        requests.append(req)
        orig_add(req)

    engine.scheduler.add = add
    results = run_checked(engine, batch)
    assert sum(r.num_preemptions for r in requests) > 0, "the cache was not small enough to preempt"
    for n, got, ref in zip(PROMPT_LENS, results, hf.refs):
        assert_matches(got, ref, f"{hf.name} preempted prompt of {n}")


def test_extra_eos_ids_stop_generation(hf_qwen2):
    """A stop token given to the engine (as the CLI passes the tokenizer's) ends the request there."""
    hf = hf_qwen2
    ref_tokens = hf.refs[1][0]
    stop = ref_tokens[3]
    first = ref_tokens.index(stop)
    engine = make_engine(hf.path, backend="cpu_flash", eos=[stop])
    res = engine.generate([prompts()[1]], SamplingParams(max_tokens=STEPS))[0]
    assert res.token_ids == ref_tokens[:first + 1] and res.finish_reason == "stop"
    res = engine.generate([prompts()[1]], GREEDY)[0]              # ignore_eos keeps going
    assert res.token_ids == ref_tokens
