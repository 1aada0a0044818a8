"""Prefill -> decode KV streaming when the decode instance holds the prompt's prefix in its own cache.

A chat's second turn (the first turn's prompt, its answer, a new question) is prefilled and streamed
to the decode engine (one process, or a kvp=2 grid of worker processes with M = 64) that decoded the
first turn: prepare_receive, given the prompt, attaches the decode side's cached blocks (96 tokens:
the first turn's prompt and the start of its answer), and only the other tokens travel (counted at
the sender). The decode gives the tokens and logprobs of one process with caching off (within 1e-5).
"""
from __future__ import annotations

import pytest

from common.config import EngineConfig
from common.engine.engine import LLMEngine, make_engine
from common.errors import InvalidRequestError
from common.kv_connector.types import KVSink
from common.sampling_params import SamplingParams
from tests.fixtures.disagg import engine_config, prefill_streaming, record_sends, small_llama

pytestmark = pytest.mark.timeout(300)
PROMPT = [(7 * i + 3) % 300 + 10 for i in range(90)]      # spans both decode groups at M=64
QUESTION = [(11 * i + 5) % 280 + 12 for i in range(8)]
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def config(model: str, caching: bool = True, **parallel) -> EngineConfig:
    return engine_config(model, "tcp", caching, **parallel)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_llama(tmp_path_factory.mktemp("m"))


def tokens_sent(sends: list, rid: str) -> int:
    """Tokens of `rid` the prefill engine's KV senders sent (record_sends: over all layers' chunks of
    the one holder, counted once per token range and layer range)."""
    return sum(b - a for r, (a, b) in sends if r == rid)


def turn(pre: LLMEngine, dec: LLMEngine, rid: str, prompt: list[int], kvp_tokens: int) -> tuple[list, list, list]:
    """One disaggregated request: prepare (with the prompt), prefill and stream, decode."""
    groups = dec.prepare_receive(rid, len(prompt), PARAMS.max_tokens, prompt_ids=prompt)
    first, status = prefill_streaming(pre, rid, prompt, KVSink("tcp", kvp_tokens, groups))
    assert status == ("done", None)
    dec.add_prefilled(prompt, PARAMS, rid, first[0], first[1], kv_timeout_s=30)
    toks, lps = [first[0]], [first[1]]
    while dec.has_unfinished():
        for o in dec.step():
            assert o.error is None, o.error
            if o.token_id is not None:
                toks.append(o.token_id)
                lps.append(o.logprob)
    return groups, toks, lps


@pytest.mark.parametrize("kvp", [1, 2], ids=["decode1", "decode_kvp2"])
def test_second_turn_sends_only_what_the_decode_cache_lacks(model, kvp):
    ref_engine = LLMEngine(config(model, caching=False))
    pre = LLMEngine(config(model))
    sent = record_sends(pre)
    parallel = dict(kvp=2, kvp_tokens=64) if kvp == 2 else {}
    with make_engine(config(model, **parallel)) as dec:
        m = 64 if kvp == 2 else 1 << 30
        groups1, toks1, lps1 = turn(pre, dec, "t1", PROMPT, m)
        assert all(g.cached == 0 for g in groups1) and tokens_sent(sent, "t1") == len(PROMPT)
        second = PROMPT + toks1 + QUESTION                 # 110 tokens; the decode side computed 101
        groups2, toks2, lps2 = turn(pre, dec, "t2", second, m)
        # 6 full blocks (96 tokens) are cached at the decode side: group 0's 64 and 32 of group 1's
        assert [g.cached for g in groups2] == ([64, 32] if kvp == 2 else [96])
        assert tokens_sent(sent, "t2") == len(second) - 96
        dec.blocks.check()
        assert dec.blocks.num_used == 0
    for prompt, toks, lps in ((PROMPT, toks1, lps1), (second, toks2, lps2)):
        ref = ref_engine.generate([prompt], PARAMS)[0]
        assert toks == ref.token_ids
        assert max(abs(a - b) for a, b in zip(lps, ref.logprobs)) < 1e-5
    pre.pool.check()
    assert pre.pool.num_used == 0


def test_a_prompt_other_than_the_prepared_one_is_refused(model):
    """The reused blocks hold the prepared prompt's prefix: a Decode that brings another prompt of the
    same length must not decode from them; aborting it gives the blocks back to the cache."""
    dec = LLMEngine(config(model))
    dec.generate([PROMPT], SamplingParams(max_tokens=2, ignore_eos=True))
    groups = dec.prepare_receive("r", len(PROMPT), 4, prompt_ids=PROMPT)
    assert groups[0].cached == 80
    other = [PROMPT[0] + 1] + PROMPT[1:]
    with pytest.raises(InvalidRequestError, match="differs from the one prepared"):
        dec.add_prefilled(other, PARAMS, "r", 5, -1.0)
    assert dec.abort("r")
    dec.pool.check()
    assert dec.pool.num_used == 0 and dec.pool.num_cached >= 5


def test_a_prompt_held_whole_at_the_decode_side_travels_not_at_all(model):
    """A 96-token prompt (6 full blocks) the decode side decoded before: every token is cached there,
    no holder expects anything, the prefill sends nothing, and the request decodes at once to the
    tokens of one process with caching off."""
    prompt = PROMPT[:80] + QUESTION + QUESTION[:8]
    dec, pre = LLMEngine(config(model)), LLMEngine(config(model))
    sent = record_sends(pre)
    dec.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True))
    groups, toks, lps = turn(pre, dec, "whole", prompt, 1 << 30)
    assert [g.cached for g in groups] == [96] and tokens_sent(sent, "whole") == 0
    ref = LLMEngine(config(model, caching=False)).generate([prompt], PARAMS)[0]
    assert toks == ref.token_ids
    assert max(abs(a - b) for a, b in zip(lps, ref.logprobs)) < 1e-5
    dec.pool.check()
    assert dec.pool.num_used == 0
