"""The long-context TEST model (`mnemosyne make-test-model`): a complete HF checkpoint whose weights
depend only on the seed, sized and RoPE'd for a million tokens, that the engine loads and runs."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from common.cli import main
from common.engine.engine import LLMEngine
from common.config import CacheConfig, EngineConfig
from common.model.loader import load_checkpoint
from common.model.random_hf import LONGCTX_TEST_MODEL, write_longctx_test_model
from common.model.tokenizer import load_tokenizer
from common.sampling_params import SamplingParams

MILLION = 1 << 20


def test_make_test_model_is_deterministic_loads_and_runs(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["make-test-model", str(a), "--seed", "3"]) == 0          # the CLI, as users run it
    assert capsys.readouterr().out.strip() == str(a)
    write_longctx_test_model(b, seed=3)
    write_longctx_test_model(c, seed=4)
    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert LONGCTX_TEST_MODEL in (a / "README.md").read_text() and "TEST MODEL" in (a / "README.md").read_text()

    ck = load_checkpoint(str(a), max_model_len=MILLION + 64)
    cfg = ck.config
    assert cfg.num_kv_heads == 1 and 16 <= cfg.head_dim <= 32 and cfg.num_layers <= 4
    assert cfg.rope_theta >= 1e6 and cfg.max_position >= MILLION
    tok = load_tokenizer(str(a))
    ids = tok.encode("a long context, exactly")
    assert tok.decode(ids, skip_special_tokens=True) == "a long context, exactly"

    engine = LLMEngine(EngineConfig(model=str(a), max_model_len=4096, dtype="float32", perf_model="analytic",
                                    cache=CacheConfig(block_size=16, num_blocks=64)))
    out = engine.generate([ids * 20], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and all(0 <= t < cfg.vocab_size for t in out.token_ids)
