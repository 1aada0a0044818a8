"""Prefill -> decode KV streaming at the engine level, against the single-process engine.

A prefill engine (one process, or an spp=2 grid in a child process) streams each chunk's KV over TCP or
NIXL into the reserved blocks of a decode engine (one process, or a kvp=2 grid); the decode must produce
exactly the tokens of one process that did everything.
"""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine, make_engine
from common.kv_connector.types import KVSink
from common.kv_transfer import KVChunk, KVDest
from common.kv_transfer.nixl import NixlSender
from common.sampling_params import SamplingParams
from tests.fixtures.disagg import engine_config, prefill_streaming, small_llama

pytestmark = pytest.mark.timeout(300)
PROMPT = [(7 * i + 3) % 300 + 10 for i in range(90)]      # spans both decode groups at M=64
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def config(model: str, backend: str, **parallel) -> EngineConfig:
    return engine_config(model, backend, **parallel)


def run_prefill(engine, sink: KVSink) -> tuple[tuple[int, float], tuple[str, str | None]]:
    return prefill_streaming(engine, "r1", PROMPT, sink)


def prefill_child(model, backend, q_in, q_out):
    engine = make_engine(config(model, backend, spp=2))
    try:
        q_out.put(run_prefill(engine, q_in.get(timeout=120)))
    finally:
        engine.shutdown()


def decode(engine, first) -> tuple[list[int], list[float]]:
    engine.add_prefilled(PROMPT, PARAMS, "r1", first[0], first[1], kv_timeout_s=30)
    toks, lps = [first[0]], [first[1]]
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None, o.error
            if o.token_id is not None:
                toks.append(o.token_id)
                lps.append(o.logprob)
    return toks, lps


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_llama(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def reference(model):
    return LLMEngine(config(model, "tcp")).generate([PROMPT], PARAMS)[0]


def check(reference, toks, lps):
    assert toks == reference.token_ids
    assert max(abs(a - b) for a, b in zip(lps, reference.logprobs)) < 1e-5


@pytest.mark.parametrize("backend", ["tcp", "nixl"])
def test_single_process_prefill_to_decode(model, reference, backend):
    pre, dec = LLMEngine(config(model, backend)), LLMEngine(config(model, backend))
    groups = dec.prepare_receive("r1", len(PROMPT), PARAMS.max_tokens)
    first, status = run_prefill(pre, KVSink(backend, 1 << 30, groups))
    assert status == ("done", None)
    check(reference, *decode(dec, first))
    for e in (pre, dec):
        e.pool.check()
        assert e.pool.num_used == 0


def test_streaming_request_preempted_and_recomputed_sends_each_token_once(model, reference):
    """A tiny prefill cache: a request that decodes (arrived first) outgrows it and preempts the
    streaming request mid-prefill. Its recompute must not resend the tokens already streamed (the
    receiver refuses a duplicate cell and would fail the transfer); the rest follows, and decode
    gives the single-process tokens."""
    cfg = config(model, "tcp")
    pre = LLMEngine(EngineConfig(model=model, cache=CacheConfig(block_size=16, num_blocks=9),
                                 scheduler=SchedulerConfig(chunk_size=24), kv_backend="tcp"))
    dec = LLMEngine(cfg)
    preempted = []
    schedule = pre.scheduler.schedule

    def recording():
        out = schedule()
        preempted.extend(out.preempted)
        return out
    pre.scheduler.schedule = recording
    pre.add_request([(5 * i + 1) % 290 + 10 for i in range(47)], SamplingParams(max_tokens=60, ignore_eos=True),
                    request_id="hog")
    groups = dec.prepare_receive("r1", len(PROMPT), PARAMS.max_tokens)
    first, status = run_prefill(pre, KVSink("tcp", 1 << 30, groups))
    assert "r1" in preempted, "the test did not preempt the streaming request"
    assert status == ("done", None), status
    check(reference, *decode(dec, first))
    for e in (pre, dec):
        e.pool.check()
        assert e.pool.num_used == 0


def test_prefill_reuses_its_prefix_cache_and_streams_the_reused_prefix(model, reference):
    """The prefill engine first serves a request sharing PROMPT's first 85 tokens: 5 full blocks (80
    tokens) stay cached. r1 reuses them, computes only tokens 80..89, and still streams the KV of all
    90 tokens (the prefix from the shared blocks): the decode gives the single-process tokens."""
    pre, dec = LLMEngine(config(model, "tcp")), LLMEngine(config(model, "tcp"))
    pre.generate([PROMPT[:85] + [3, 4]], SamplingParams(max_tokens=1, ignore_eos=True))
    items = []
    run = pre.executor.runner.run

    def recording(batch):
        items.extend((it.request.request_id, it.start, it.num_tokens) for it in batch)
        return run(batch)
    pre.executor.runner.run = recording
    groups = dec.prepare_receive("r1", len(PROMPT), PARAMS.max_tokens)
    first, status = run_prefill(pre, KVSink("tcp", 1 << 30, groups))
    assert status == ("done", None), status
    assert [(s, n) for rid, s, n in items if rid == "r1"] == [(80, 10)]
    check(reference, *decode(dec, first))
    for e in (pre, dec):
        e.pool.check()
        assert e.pool.num_used == 0


@pytest.mark.parametrize("backend", ["tcp", "nixl"])
def test_spp_grid_streams_to_kvp_grid(model, reference, backend):
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=prefill_child, args=(model, backend, q_in, q_out))
    child.start()
    try:
        with make_engine(config(model, backend, kvp=2, kvp_tokens=64)) as dec:
            groups = dec.prepare_receive("r1", len(PROMPT), PARAMS.max_tokens)
            assert [(g.group, g.token_start) for g in groups] == [(0, 0), (1, 64)]
            q_in.put(KVSink(backend, 64, groups))
            first, status = q_out.get(timeout=180)
            assert status == ("done", None)
            check(reference, *decode(dec, first))
            dec.blocks.check()
            assert dec.blocks.num_used == 0
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()


def test_missing_kv_times_out_and_frees(model):
    dec = LLMEngine(config(model, "tcp"))
    dec.prepare_receive("r1", len(PROMPT), 4)
    assert dec.pool.num_used > 0
    dec.add_prefilled(PROMPT, PARAMS, "r1", 5, -1.0, kv_timeout_s=0.3)
    outs = []
    deadline = time.monotonic() + 10
    while dec.has_unfinished() and time.monotonic() < deadline:
        outs += dec.step()
        time.sleep(0.05)
    assert [o.error for o in outs if o.error] and "stopped arriving" in outs[-1].error
    dec.pool.check()
    assert dec.pool.num_used == 0


def test_abort_prepared_request_frees_blocks(model):
    dec = LLMEngine(config(model, "tcp"))
    dec.prepare_receive("r1", len(PROMPT), 4)
    assert dec.abort("r1")
    dec.pool.check()
    assert dec.pool.num_used == 0


class StalledSender(NixlSender):
    """A real NIXL sender whose granted writes are never posted: a one-sided write stuck in flight,
    which the receiver can neither wait out nor recall."""

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.granted: list[int] = []

    def _on_grant(self, seq: int) -> None:
        self.granted.append(seq)


def _send_stalled_chunk(layout, sink, tokens: tuple[int, int]):
    """Connects a stalled sender to `sink`'s receiver and gets one chunk of `tokens` granted."""
    s = StalledSender(layout)
    s.connect(sink.addresses[0], timeout=10)
    n = tokens[1] - tokens[0]
    shape = (layout.num_layers, n, layout.num_kv_heads, layout.head_dim)
    s.send(KVChunk("r1", (0, layout.num_layers), tokens, torch.zeros(shape), torch.zeros(shape), 0),
           KVDest(sink.block_table, sink.token_start))
    deadline = time.monotonic() + 10
    while not s.granted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.granted, "the decode side never granted the chunk"
    return s


@pytest.mark.parametrize("kvp", [1, 2], ids=["one-process", "kvp2-grid"])
def test_blocks_a_stuck_nixl_write_may_land_in_are_withheld_after_abort(model, kvp):
    """A request aborted while a granted NIXL write into its blocks neither finished nor can be
    recalled (the receiver waits 5 s for it): its other blocks are freed, those the write may land
    in are withheld for good, and later requests never get them. On a grid the worker that holds the
    receiver answers the cancel with them (group 1 here)."""
    parallel = dict(kvp=2, kvp_tokens=64) if kvp == 2 else {}
    with make_engine(config(model, "nixl", **parallel)) as dec:
        groups = dec.prepare_receive("r1", len(PROMPT), 4)
        sink = groups[-1]                                    # group 1 (tokens 64-89) on the grid
        lo = sink.token_start
        chunk = (lo + 16, min(lo + 48, len(PROMPT)))         # the sink's 2nd block on
        bs = 16
        stuck = set(sink.block_table[(chunk[0] - lo) // bs:-(-(chunk[1] - lo) // bs)])
        sender = _send_stalled_chunk(dec.kv_layout, sink, chunk)
        try:
            assert dec.abort("r1")
        finally:
            sender.close()
        pool = dec.blocks.pools[sink.group]
        dec.blocks.check()
        assert pool.quarantined == stuck and dec.blocks.num_used == len(stuck)
        for i in range(3):                                  # later requests: never a withheld block
            for g in dec.prepare_receive(f"n{i}", len(PROMPT), 4):
                assert not set(g.block_table) & (stuck if g.group == sink.group else set())
            assert dec.abort(f"n{i}")
        dec.blocks.check()
        assert dec.blocks.num_used == len(stuck)
