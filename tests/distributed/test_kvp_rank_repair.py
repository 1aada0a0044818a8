"""A decode grid that loses one KVP rank replaces it in place (GridExecutor.repair, LLMEngine._recover).

The other ranks keep their processes, weights and KV. Requests the scheduler holds resume with exactly
the single-process tokens: those with KV in the lost group compute it again from that group's first
token, the others decode on. One whose KV was still arriving ends with a retryable error; its retry,
prepared on the same instance, finds the surviving groups' share in their prefix caches, so only the
lost group's share travels again.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import psutil
import pytest

from common.config import EngineConfig
from common.engine.engine import LLMEngine, make_engine
from common.errors import KVTransferError, WorkerFailedError
from common.kv_connector.types import KVSink
from common.sampling_params import SamplingParams
from tests.fixtures.disagg import engine_config, prefill_streaming, record_sends, small_llama

pytestmark = pytest.mark.timeout(300)
M = 64
PROMPT = [(7 * i + 3) % 300 + 10 for i in range(90)]      # tokens 0..63 in group 0, 64..89 in group 1
SHORT = [(5 * i + 1) % 300 + 10 for i in range(30)]       # group 0 only
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


def config(model: str, **parallel) -> EngineConfig:
    return engine_config(model, **parallel)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_llama(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def reference(model):
    one = LLMEngine(config(model))
    return {name: one.generate([p], PARAMS)[0] for name, p in (("long", PROMPT), ("short", SHORT))}


def kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)


@pytest.mark.parametrize("group", [1, 0], ids=["group-1", "group-0-the-reporter"])
def test_a_lost_kvp_rank_is_replaced_in_place_and_its_requests_resume_exactly(model, reference, group):
    """`long` has KV in both groups, `short` in group 0 only. The worker of `group` is killed while
    both decode: it is replaced, the other keeps its process, and both requests finish with exactly
    the single-process tokens: what lost KV computes it again from the lost group's first token
    (group 1: long's tokens 64..; group 0: everything), the rest decodes on."""
    with make_engine(config(model, kvp=2, kvp_tokens=M)) as eng:
        procs = list(eng.executor.procs)
        eng.add_request(PROMPT, PARAMS, request_id="long")
        eng.add_request(SHORT, PARAMS, request_id="short")
        toks: dict[str, list[int]] = {"long": [], "short": []}
        lps: dict[str, list[float]] = {"long": [], "short": []}
        while min(len(t) for t in toks.values()) < 3:
            for o in eng.step():
                if o.token_id is not None:
                    toks[o.request_id].append(o.token_id)
                    lps[o.request_id].append(o.logprob)
        computed = {rid: eng.scheduler.requests[rid].num_computed for rid in toks}
        kill(procs[group])
        t0, gaps, rewound = time.monotonic(), {}, {}
        while eng.has_unfinished():
            for o in eng.step():
                assert o.error is None, o.error
                rewound.setdefault(o.request_id, o.num_computed)
                if o.token_id is not None:
                    gaps.setdefault(o.request_id, time.monotonic() - t0)
                    toks[o.request_id].append(o.token_id)
                    lps[o.request_id].append(o.logprob)
        for rid in toks:
            assert toks[rid] == reference[rid].token_ids, rid
            assert max(abs(a - b) for a, b in zip(lps[rid], reference[rid].logprobs)) < 1e-5, rid
            assert gaps[rid] < 5, f"{rid} waited {gaps[rid]:.1f} s for its next token"
        # What was recomputed: long from its lost group's first token (group 1 at 64), short not at
        # all when group 1 died; both from 0 when group 0 did.
        first_chunk = eng.cfg.scheduler.chunk_size
        if group == 1:
            assert rewound["long"] == M + first_chunk and rewound["short"] == computed["short"] + 1
        else:
            assert rewound["long"] == first_chunk and rewound["short"] == first_chunk
        survivor = 1 - group
        assert eng.executor.procs[survivor] is procs[survivor] and procs[survivor].is_alive()
        assert eng.executor.procs[group].pid != procs[group].pid and eng.executor.procs[group].is_alive()
        assert len(eng.repairs) == 1 and eng.repairs[0] < 5
        assert [psutil.Process(p.pid).name() for p in eng.executor.procs] == ["mnemosyne-w1", "mnemosyne-w2"]
        eng.blocks.check()
        assert eng.blocks.num_used == 0


def run_prefill(engine, rid: str, sink: KVSink, prompt: list[int] = PROMPT) -> tuple[int, float]:
    first, status = prefill_streaming(engine, rid, prompt, sink)
    assert status == ("done", None)
    return first


PROMPT2 = [(3 * i + 7) % 300 + 10 for i in range(90)]


def test_a_received_request_resumes_and_a_receiving_one_is_retried_with_only_the_lost_share(model, reference):
    ref2 = LLMEngine(config(model)).generate([PROMPT2], PARAMS)[0].token_ids

    pre = LLMEngine(config(model))
    sent = record_sends(pre)
    with make_engine(config(model, kvp=2, kvp_tokens=M)) as dec:
        # 1. Received and decoding: r1 resumes, its group-1 KV computed again on the decode grid.
        groups = dec.prepare_receive("r1", len(PROMPT), PARAMS.max_tokens, prompt_ids=PROMPT)
        first = run_prefill(pre, "r1", KVSink("tcp", M, groups))
        dec.add_prefilled(PROMPT, PARAMS, "r1", first[0], first[1], kv_timeout_s=30)
        toks = [first[0]]
        while len(toks) < 4:
            toks += [o.token_id for o in dec.step() if o.token_id is not None]
        kill(dec.executor.procs[1])
        while dec.has_unfinished():
            for o in dec.step():
                assert o.error is None, o.error
                if o.token_id is not None:
                    toks.append(o.token_id)
        assert toks == reference["long"].token_ids
        assert sorted(t for rid, t in sent if rid == "r1") == [(0, 24), (24, 48), (48, 64), (64, 72), (72, 90)]

        # 2. Received, not yet decoding (its first token still on the way): r2 ends; group 0 keeps
        # its share, named, and a later Decode of r2 fails with a retryable error.
        groups = dec.prepare_receive("r2", len(PROMPT2), PARAMS.max_tokens, prompt_ids=PROMPT2)
        first = run_prefill(pre, "r2", KVSink("tcp", M, groups), PROMPT2)
        cached0 = dec.blocks.pools[0].num_cached
        kill(dec.executor.procs[1])
        assert dec.check_alive() == [] and len(dec.repairs) == 2
        assert dec.blocks.pools[0].num_cached == cached0 + 4 and dec.blocks.num_used == 0
        with pytest.raises(KVTransferError, match="KVP group 1"):
            dec.add_prefilled(PROMPT2, PARAMS, "r2", first[0], first[1], kv_timeout_s=30)

        # 3. The retry, on the same instance: group 0 is held, only group 1's 26 tokens travel.
        groups = dec.prepare_receive("r3", len(PROMPT2), PARAMS.max_tokens, prompt_ids=PROMPT2)
        assert [(g.group, g.cached) for g in groups] == [(0, M), (1, 0)]
        first3 = run_prefill(pre, "r3", KVSink("tcp", M, groups), PROMPT2)
        # the prefill's own prefix cache served most of the prompt this time, so its last rows went
        # through the decode kernels (a few rows): the same token, its logprob to rounding
        assert first3[0] == first[0] and first3[1] == pytest.approx(first[1], abs=1e-5)
        assert [t for rid, t in sent if rid == "r3"] == [(64, 90)]
        dec.add_prefilled(PROMPT2, PARAMS, "r3", first3[0], first3[1], kv_timeout_s=30)
        toks = [first3[0]]
        while dec.has_unfinished():
            for o in dec.step():
                assert o.error is None, o.error
                if o.token_id is not None:
                    toks.append(o.token_id)
        assert toks == ref2
        dec.blocks.check()
        assert dec.blocks.num_used == 0


def test_an_abort_that_finds_a_worker_dead_frees_its_blocks_once_the_grid_is_repaired(model):
    """r1 awaits KV in both groups when the worker of group 1 dies; its abort reaches only the
    survivor, so its blocks stay held (a holder that did not answer may still write) until the idle
    engine's next look replaces the worker and cancels again: then all of them are free and a new
    request with the same id is accepted."""
    with make_engine(config(model, kvp=2, kvp_tokens=M)) as dec:
        dec.prepare_receive("r1", len(PROMPT), PARAMS.max_tokens, prompt_ids=PROMPT)
        used = dec.blocks.num_used
        kill(dec.executor.procs[1])
        assert dec.abort("r1")
        assert dec.blocks.num_used == used and dec.kv.unsettled == {"r1"}
        assert dec.check_alive() == [] and len(dec.repairs) == 1
        assert dec.blocks.num_used == 0 and not dec.kv.unsettled
        dec.blocks.check()
        dec.prepare_receive("r1", len(PROMPT), PARAMS.max_tokens)
        assert dec.abort("r1") and dec.blocks.num_used == 0


def test_a_receive_prepared_after_a_worker_died_repairs_the_grid_first(model):
    """The worker of group 1 dies while r1 awaits KV and the engine has not looked since: the next
    prepare_receive finds it dead, the grid is repaired there and then (r1 ends, its output goes out
    with the next step), and r2 is prepared on the repaired grid."""
    with make_engine(config(model, kvp=2, kvp_tokens=M)) as dec:
        dec.prepare_receive("r1", len(PROMPT), PARAMS.max_tokens, prompt_ids=PROMPT)
        dec.add_prefilled(PROMPT, PARAMS, "r1", 5, -1.0, kv_timeout_s=30)
        kill(dec.executor.procs[1])
        groups = dec.prepare_receive("r2", len(PROMPT), PARAMS.max_tokens, prompt_ids=PROMPT)
        assert len(dec.repairs) == 1 and [g.group for g in groups] == [0, 1]
        assert dec.has_unfinished()
        outs = dec.step()
        assert [(o.request_id, "KVP group 1" in (o.error or "")) for o in outs] == [("r1", True)]
        assert dec.abort("r2") and dec.blocks.num_used == 0
        dec.blocks.check()


def test_an_intake_aborted_before_the_grid_noticed_its_lost_worker_keeps_the_whole_groups(model):
    """The router's clean-up of the failed attempt can reach the decode instance before its engine
    noticed the dead worker: the abort still reads what the survivors reported (group 0 received its
    share whole) before it finds the dead one, so group 0's blocks stay named and the retry takes
    them."""
    pre = LLMEngine(config(model))
    with make_engine(config(model, kvp=2, kvp_tokens=M)) as dec:
        groups = dec.prepare_receive("r1", len(PROMPT), PARAMS.max_tokens, prompt_ids=PROMPT)
        run_prefill(pre, "r1", KVSink("tcp", M, groups))
        time.sleep(0.2)                                   # (the holders' reports are in; nobody read them)
        kill(dec.executor.procs[1])
        assert dec.abort("r1") and dec.kv.unsettled == {"r1"}
        assert dec.check_alive() == [] and len(dec.repairs) == 1
        assert dec.blocks.pools[0].num_cached == 4 and dec.blocks.num_used == 0
        groups = dec.prepare_receive("r2", len(PROMPT), PARAMS.max_tokens, prompt_ids=PROMPT)
        assert [(g.group, g.cached) for g in groups] == [(0, M), (1, 0)]
        assert dec.abort("r2")
        dec.blocks.check()


def fails_after_a_lost_worker(eng) -> None:
    """A request runs a step, the worker of rank 2 is killed: the engine's next steps raise."""
    eng.add_request(SHORT, PARAMS, request_id="r")
    eng.step()
    kill(eng.executor.procs[1])
    with pytest.raises(WorkerFailedError):
        while eng.has_unfinished():
            eng.step()


def test_a_prefill_role_grid_is_not_repaired_in_place(model):
    """A prefill pool's grid streams its KV out: a lost worker fails the engine as before (its owner
    rebuilds it whole and the router retries the requests), it is not replaced in place."""
    cfg = config(model, tp=2)
    with make_engine(replace(cfg, scheduler=replace(cfg.scheduler, role="prefill"))) as eng:
        assert not eng.executor.repairable
        fails_after_a_lost_worker(eng)
        assert eng.repairs == []


def test_a_repair_that_fails_leaves_nothing_behind_and_the_next_grid_starts(model, reference):
    """The replacement never joins (here: it exits at once): the repair gives up after the join
    timeout, the engine fails as before (its owner rebuilds it), and a new grid in the same process
    starts and serves exactly (no process group or worker is left over)."""
    with make_engine(config(model, kvp=2, kvp_tokens=M), timeout_s=5.0, load_timeout_s=5.0) as eng:
        ctx_spawn = eng.executor._spawn

        def stillborn(rank):
            p = ctx_spawn(rank)
            kill(p)
            return p
        eng.executor._spawn = stillborn
        fails_after_a_lost_worker(eng)
        assert eng.executor.closed and not any(p.is_alive() for p in eng.executor.procs)
    with make_engine(config(model, kvp=2, kvp_tokens=M)) as again:
        assert again.generate([SHORT], PARAMS)[0].token_ids == reference["short"].token_ids
