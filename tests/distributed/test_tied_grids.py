"""Every grid layout on tied and untied checkpoints: real processes (gloo), real HF checkpoints.

Tied input/output embeddings (Qwen2-0.5B, Llama-3.2-1B, SmolLM2) feed one checkpoint tensor,
model.embed_tokens.weight, to two parameters. Under TP both are vocab slices; each must be cut from
the full tensor (cutting the embedding's slice again left rank 1's LM head with 0 rows).

Each layout must give identical greedy tokens and logprobs within 1e-5 of the single-process engine;
at tp=2 the tied Qwen2 checkpoint (q/k/v bias) and the untied Llama one must also match Hugging
Face transformers.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from common.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.model.llama import LlamaModel
from common.model.loader import load_checkpoint
from common.parallel.driver import ParallelEngine
from common.parallel.tp import apply_tp, load_shard, slice_weight, tp_shard
from common.sampling_params import SamplingParams
from tests.fixtures.hf_models import write_random_hf_model

pytestmark = pytest.mark.timeout(300)

VOCAB = 321          # odd: the last TP rank's vocab slice is one row short (padded for the all-gather)
KVP_TOKENS = 32      # the 40-token prompt spans both KVP groups; the 28-token one reaches group 1 in decode
_rng = random.Random(11)
PROMPTS = [[_rng.randrange(4, VOCAB) for _ in range(40)], [_rng.randrange(4, VOCAB) for _ in range(28)]]
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
LAYOUTS = {"tp2": (2, 1, 1), "spp2": (1, 2, 1), "kvp2": (1, 1, 2),
           "tp2-spp2": (2, 2, 1), "tp2-kvp2": (2, 1, 2), "spp2-kvp2": (1, 2, 2)}
CHECKPOINTS = {
    "tied": dict(arch="llama", seed=21, tie_word_embeddings=True),
    "untied": dict(arch="llama", seed=22, tie_word_embeddings=False),
    "qwen2-tied": dict(arch="qwen2", seed=23, tie_word_embeddings=True),       # q/k/v bias
}


def engine_config(model, tp: int = 1, spp: int = 1, kvp: int = 1) -> EngineConfig:
    return EngineConfig(model=str(model), dtype="float32", cache=CacheConfig(block_size=16, num_blocks=16),
                        scheduler=SchedulerConfig(chunk_size=16),
                        parallel=ParallelConfig(tp=tp, spp=spp, kvp=kvp,
                                                kvp_tokens=KVP_TOKENS if kvp > 1 else None))


def results(outs) -> list[tuple[list[int], list[float]]]:
    return [(list(o.token_ids), list(o.logprobs)) for o in outs]


def assert_same(ref, got, tol: float, what: str) -> None:
    for i, ((rt, rl), (gt, gl)) in enumerate(zip(ref, got)):
        assert gt == rt, f"{what}: prompt {i} greedy tokens differ"
        diff = max(abs(a - b) for a, b in zip(gl, rl))
        assert diff <= tol, f"{what}: prompt {i} logprobs differ by {diff:.2e}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (path, single-process results), built once per module."""
    cache: dict[str, tuple[str, list]] = {}

    def get(name: str):
        if name not in cache:
            path = write_random_hf_model(tmp_path_factory.mktemp(name), vocab_size=VOCAB, tokenizer=False,
                                         **CHECKPOINTS[name])
            cache[name] = (str(path), results(LLMEngine(engine_config(path)).generate(PROMPTS, PARAMS)))
        return cache[name]

    return get


# ---- the load path alone (no processes): the tied tensor reaches both parameters, cut once ----------

@pytest.mark.parametrize("rank", [0, 1])
def test_tied_embedding_loads_into_both_vocab_slices(checkpoints, rank):
    path, _ = checkpoints("tied")
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    assert cfg.tie_word_embeddings
    shard = tp_shard(cfg, rank, 2)
    model = load_shard(ckpt, shard, groups=None)             # as a worker loads its slice
    full = dict(ckpt.weights(lambda n: n == "model.embed_tokens.weight"))["model.embed_tokens.weight"]
    lo, hi = shard.vocab
    assert hi - lo == (161 if rank == 0 else 160)
    assert torch.equal(model.embed_tokens.weight, full[lo:hi])
    assert torch.equal(model.lm_head.weight, full[lo:hi])


def test_builtin_gguf_tied_output_loads_into_every_tp_rank():
    """The built-in SmolLM2 GGUF has no output.weight (tied); 9 heads allow tp=3. One layer of it,
    rank 2 of 3 (the one that broke: a non-zero vocab offset)."""
    ckpt = load_checkpoint(None)
    assert ckpt.config.tie_word_embeddings
    cfg = dataclasses.replace(ckpt.config, num_layers=1)
    shard = tp_shard(cfg, 2, 3)
    with torch.device("meta"):
        model = LlamaModel(cfg)
        apply_tp(model, shard, groups=None)
    model = model.to_empty(device="cpu")
    model.load_weights(ckpt.weights(model.wanted), transform=lambda n, t: slice_weight(shard, cfg, n, t))
    lo, hi = shard.vocab
    assert (lo, hi) == (2 * 16384, 3 * 16384)
    assert model.lm_head.weight.shape == (hi - lo, cfg.hidden_size)
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight)
    assert model.lm_head.weight.abs().sum() > 0


# ---- every grid on tied and untied checkpoints -----------------------------------------------------

# Untied checkpoints run every layout in test_parallel.py too (4 layers, uneven GQA): slow here.
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ["tied", pytest.param("untied", marks=pytest.mark.slow)])
def test_grid_matches_single_process(checkpoints, name, layout):
    path, ref = checkpoints(name)
    tp, spp, kvp = LAYOUTS[layout]
    with ParallelEngine(engine_config(path, tp, spp, kvp)) as eng:
        got = results(eng.generate(PROMPTS, PARAMS))
        eng.blocks.check()
        assert eng.blocks.num_used == 0
    assert_same(ref, got, 1e-5, f"{name} {layout}")


@pytest.mark.parametrize("name", ["qwen2-tied", "untied"])
def test_tp2_matches_single_process_and_hf(checkpoints, name):
    """tp=2 against one process (1e-5) and HF (1e-4): the tied Qwen2 checkpoint (tied embeddings,
    sliced q/k/v biases) and the untied Llama one, with the workers' float32 weights in the transposed
    CPU layout (LlamaModel.pack_weights; the shards' layout in tests/unit/test_weight_layout.py)."""
    from transformers import AutoModelForCausalLM
    path, ref = checkpoints(name)
    with ParallelEngine(engine_config(path, tp=2)) as eng:
        got = results(eng.generate(PROMPTS, PARAMS))
    assert_same(ref, got, 1e-5, f"{name} tp2 vs one process")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert hf.config.tie_word_embeddings == tied == (name == "qwen2-tied")
    hf.generation_config.eos_token_id = None
    hf_res = []
    with torch.inference_mode():
        for p in PROMPTS:
            out = hf.generate(torch.tensor([p]), max_new_tokens=PARAMS.max_tokens, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            tokens = out.sequences[0, len(p):].tolist()
            hf_res.append((tokens, [torch.log_softmax(lg[0].float(), -1)[t].item()
                                    for lg, t in zip(out.logits, tokens)]))
    assert_same(hf_res, got, 1e-4, f"{name} tp2 vs transformers")
