"""The TP x SPP x KVP grid against the single-process engine: real processes, gloo, real checkpoints.

Every layout must give identical greedy tokens and logprobs within 1e-5 of one process.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from common.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.errors import ConfigError
from common.parallel.driver import ParallelEngine
from common.sampling_params import SamplingParams
from tests.fixtures.hf_models import write_random_hf_model

pytestmark = pytest.mark.timeout(300)

# 100 tokens span both KVP groups at M=64; 60 tokens + 10 decodes activate group 1 during decode;
# chunks of 16 end exactly on the group boundary at 64.
PROMPTS = [[(7 * i + 3) % 300 + 10 for i in range(100)], [(5 * i + 1) % 290 + 10 for i in range(60)],
           [11, 12, 13, 14, 15, 16, 17]]
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


def engine_config(model, tp=1, spp=1, kvp=1, m=64, chunk=16) -> EngineConfig:
    return EngineConfig(model=str(model), cache=CacheConfig(block_size=16, num_blocks=32),
                        scheduler=SchedulerConfig(chunk_size=chunk),
                        parallel=ParallelConfig(tp=tp, spp=spp, kvp=kvp, kvp_tokens=m if kvp > 1 else None))


@pytest.fixture(scope="module")
def gqa_uneven(tmp_path_factory):
    """12 query heads over 3 KV heads: with tp=2 each rank's 6 heads straddle a GQA group."""
    return write_random_hf_model(tmp_path_factory.mktemp("gqa12_3"), "llama", num_attention_heads=12,
                                 num_key_value_heads=3, num_hidden_layers=4, seed=3)


@pytest.fixture(scope="module")
def reference(gqa_uneven):
    return LLMEngine(engine_config(gqa_uneven)).generate(PROMPTS, PARAMS)


def assert_same(ref, got):
    for a, b in zip(ref, got):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


@pytest.mark.parametrize("tp,spp,kvp", list(itertools.product([1, 2], repeat=3)))
def test_grid_matches_single_process(gqa_uneven, reference, tp, spp, kvp):
    if (tp, spp, kvp) == (1, 1, 1):
        pytest.skip("the reference itself")
    with ParallelEngine(engine_config(gqa_uneven, tp, spp, kvp)) as eng:
        got = eng.generate(PROMPTS, PARAMS)
        eng.blocks.check()
        assert eng.blocks.num_used == 0
    assert_same(reference, got)


def test_grid_reports_the_single_process_top_logprobs(gqa_uneven, reference):
    """The top lists cross the worker -> driver boundary (StepResult) with the tokens."""
    params = replace(PARAMS, top_logprobs=3)
    ref = LLMEngine(engine_config(gqa_uneven)).generate(PROMPTS[:2], params)
    with ParallelEngine(engine_config(gqa_uneven, tp=2)) as eng:
        got = eng.generate(PROMPTS[:2], params)
    assert_same(reference[:2], got)                                     # asking changes no token
    for a, b in zip(ref, got):
        assert len(b.top_logprobs) == len(b.token_ids) == PARAMS.max_tokens
        for ta, tb in zip(a.top_logprobs, b.top_logprobs):
            assert [t for t, _ in tb] == [t for t, _ in ta]
            assert max(abs(x - y) for (_, x), (_, y) in zip(ta, tb)) < 1e-5


def test_tp_with_uniform_gqa_split(tmp_path):
    model = write_random_hf_model(tmp_path / "m", "qwen2", num_attention_heads=6, num_key_value_heads=2,
                                  num_hidden_layers=2, seed=5)
    ref = LLMEngine(engine_config(model)).generate(PROMPTS, PARAMS)
    with ParallelEngine(engine_config(model, tp=2)) as eng:
        assert_same(ref, eng.generate(PROMPTS, PARAMS))


def test_kvp_three_groups_and_shard_contents(gqa_uneven, reference, tmp_path):
    """M=40: the 100-token prompt spans 3 groups, chunks of 16 are clipped at 40 and 80, and each
    group's cache holds exactly its token range of the single-process KV."""
    with ParallelEngine(engine_config(gqa_uneven, kvp=3, m=40)) as eng:
        # first, on fresh blocks: slots past a group's range were never written (an idle pool hands
        # its freed blocks out again in id order, with an earlier request's K/V in them)
        rid = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))
        while eng.scheduler.requests[rid].num_computed < len(PROMPTS[0]):
            eng.step()
        paths = eng.dump_kv(rid, str(tmp_path))
        while eng.has_unfinished():
            eng.step()
        assert_same(reference, eng.generate(PROMPTS, PARAMS))
        assert eng.blocks.num_used == 0
    single = LLMEngine(engine_config(gqa_uneven))
    srid = single.add_request(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))
    while single.scheduler.requests[srid].num_computed < len(PROMPTS[0]):
        single.step()
    n = single.scheduler.requests[srid].num_computed
    table = single.pool.table(srid)
    for g, path in enumerate(paths):
        got = load_file(path)
        held = int(got["num_tokens"])
        assert held == min(40, n - 40 * g)                          # its range, no more, no less
        assert int(got["num_blocks"]) == -(-held // 16)
        for layer in range(4):
            k_ref, v_ref = single.executor.cache.gather(layer, table, n)
            k, v = got[f"k.{layer}"], got[f"v.{layer}"]
            # layer 0's KV depends on the embeddings alone: bitwise; deeper layers see merged attention
            close = torch.equal if layer == 0 else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5))
            assert close(k[:held], k_ref[40 * g:40 * g + held].float())
            assert close(v[:held], v_ref[40 * g:40 * g + held].float())
            assert not k[held:].any() and not v[held:].any()         # nothing beyond its range


def test_spp_overlaps_chunks(gqa_uneven):
    """Many chunks through 2 stages: stage 0 starts chunk i+1 before the last stage ends chunk i."""
    prompt = PROMPTS[0]
    ref = LLMEngine(engine_config(gqa_uneven, chunk=8)).generate([prompt], PARAMS)
    with ParallelEngine(engine_config(gqa_uneven, spp=2, chunk=8)) as eng:
        eng.executor.record_timeline = True
        assert_same(ref, eng.generate([prompt], PARAMS))
        lines = eng.executor.timelines
    prefill = lines[:13]                                            # ceil(100 / 8) chunks
    overlaps = sum(1 for a, b in zip(prefill, prefill[1:]) if b[0][1] < a[-1][2])
    assert overlaps >= len(prefill) // 2, f"only {overlaps} of {len(prefill) - 1} chunk pairs overlapped"
    for line in prefill:                                            # each stage in order within a step
        assert [s for s, _, _ in line] == [0, 1]
        assert line[0][2] <= line[1][1]


def test_bad_grid_is_rejected(gqa_uneven):
    with pytest.raises(ConfigError):
        ParallelConfig(tp=1, spp=1, kvp=2, kvp_tokens=None)
    with pytest.raises(ConfigError, match="tp=5"):
        from common.model.loader import load_checkpoint
        from common.parallel.tp import tp_shard
        tp_shard(load_checkpoint(str(gqa_uneven)).config, 0, 5)


def test_remote_workers_join_through_the_driver(gqa_uneven, reference):
    """Multi-machine mode on one machine: workers started separately fetch their config from the driver."""
    import subprocess
    import sys
    from common.parallel.driver import free_port
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "common.cli", "worker", "--driver", f"127.0.0.1:{port}",
                               "--rank", str(r), "--threads", "1"]) for r in (1, 2)]
    try:
        with ParallelEngine(engine_config(gqa_uneven, spp=2), spawn_workers=False, control_port=port) as eng:
            assert_same(reference, eng.generate(PROMPTS, PARAMS))
        assert [p.wait(30) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow      # the same CLI grid path runs under LARS + adaptive in test_parallel_planned.py
def test_cli_grid_prints_the_single_process_json(gqa_uneven, tmp_path):
    import json
    import subprocess
    import sys
    tokens = tmp_path / "p.json"
    tokens.write_text(json.dumps(PROMPTS[0]))
    base = [sys.executable, "-m", "common.cli", "generate", "--model", str(gqa_uneven), "--prompt-tokens",
            str(tokens), "--max-tokens", "6", "--ignore-eos", "--json", "--chunk-size", "16"]
    one = json.loads(subprocess.run(base, capture_output=True, text=True, check=True).stdout)
    grid = json.loads(subprocess.run(base + ["--tp", "2", "--spp", "2", "--kvp", "2", "--kvp-tokens", "64"],
                                     capture_output=True, text=True, check=True).stdout)
    assert grid["token_ids"] == one["token_ids"]
    assert max(abs(a - b) for a, b in zip(grid["logprobs"], one["logprobs"])) < 1e-5


def shutdown_time(eng) -> float:
    """Seconds `eng.shutdown()` took; every worker is gone after it."""
    import time
    t0 = time.monotonic()
    eng.shutdown()
    took = time.monotonic() - t0
    assert all(not p.is_alive() for p in eng.executor.procs)
    return took


def test_shutdown_after_a_worker_died_does_not_wait_on_the_survivors(gqa_uneven):
    """A grid loses a worker, and a survivor never reads the stop (stopped here with SIGSTOP; in a
    served prefill instance, stage 0 blocked on its send to the dead stage 1): shutdown kills it after
    a short grace instead of waiting its full 10 s, which held every restart of a prefill instance
    that lost a worker."""
    import os
    import signal
    cfg = EngineConfig(model=str(gqa_uneven), cache=CacheConfig(block_size=16, num_blocks=256),
                       parallel=ParallelConfig(spp=2))
    eng = ParallelEngine(cfg)
    try:
        eng.generate([PROMPTS[2]], SamplingParams(max_tokens=2, ignore_eos=True))
        survivor, victim = eng.executor.procs
        os.kill(survivor.pid, signal.SIGSTOP)
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        took = shutdown_time(eng)
    assert took < 4, f"shutdown after a worker died took {took:.1f} s"


def test_dead_worker_fails_fast(gqa_uneven):
    """A worker killed mid-generation: the driver raises WorkerFailedError within seconds, not a hang."""
    import os
    import signal
    import threading
    import time
    from common.errors import WorkerFailedError
    cfg = EngineConfig(model=str(gqa_uneven), cache=CacheConfig(block_size=16, num_blocks=256),
                       scheduler=SchedulerConfig(chunk_size=8),
                       parallel=ParallelConfig(spp=2, kvp=2, kvp_tokens=1024))
    eng = ParallelEngine(cfg)
    try:
        eng.generate([PROMPTS[2]], SamplingParams(max_tokens=2, ignore_eos=True))       # warm
        victim = eng.executor.procs[2]
        threading.Timer(0.5, lambda: os.kill(victim.pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(WorkerFailedError):
            eng.generate([PROMPTS[0]], SamplingParams(max_tokens=1500, ignore_eos=True))
        assert time.monotonic() - t0 < 10
    finally:
        took = shutdown_time(eng)
    assert took < 5, f"shutdown after a worker died took {took:.1f} s"


def test_a_failed_rendezvous_leaves_the_process_able_to_start_the_next_grid(gqa_uneven, reference):
    """A rendezvous that times out (no worker ever joins) must not poison this process: torch counts
    a default group before the rendezvous, and without the reset in init_world the next driver
    waits under `default_pg/1` for workers that publish under `default_pg/0` (CI, stop 18)."""
    import torch.distributed as dist
    from common.config import ParallelConfig
    from common.parallel.groups import DRIVER_RANK, init_world, master_store
    pcfg = ParallelConfig(spp=2)
    store = master_store("127.0.0.1", 0, pcfg, 1.0)
    with pytest.raises(Exception):
        init_world(pcfg, DRIVER_RANK, "127.0.0.1", store.port, 1.0, store=store, join_timeout_s=1.0)
    assert not dist.is_initialized()
    del store
    with ParallelEngine(engine_config(gqa_uneven, spp=2)) as eng:
        assert_same(reference, eng.generate(PROMPTS, PARAMS))


DRIVER = """
import sys, time
from common.config import CacheConfig, EngineConfig, ParallelConfig
from common.parallel.driver import ParallelEngine
if __name__ == "__main__":
    eng = ParallelEngine(EngineConfig(model=sys.argv[1], cache=CacheConfig(block_size=16, num_blocks=32),
                                      parallel=ParallelConfig(spp=2)))
    print(" ".join(str(p.pid) for p in eng.executor.procs), flush=True)
    time.sleep(600)
"""


def test_workers_exit_when_their_driver_is_killed(gqa_uneven, tmp_path):
    """Local workers are forked by the driver's forkserver, not by the driver: SIGKILL of the driver (an
    instance's main process) still ends every worker and the forkserver within seconds, no orphans."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    import psutil
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), str(gqa_uneven)], cwd=root, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        line = proc.stdout.readline()                  # the grid is up (or the driver died: "")
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, f"driver printed {line!r}"         # one per stage (the driver is apart)
        helpers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.pid not in pids]
        workers = [psutil.Process(p) for p in pids]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        gone, alive = psutil.wait_procs(workers + helpers, timeout=15)
        assert not alive, f"still running 15 s after their driver was killed: {alive}"
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("tp,spp,kvp", [(1, 1, 2), (2, 2, 1)])
def test_grid_with_packed_weight_cache(gqa_uneven, reference, tmp_path, monkeypatch, tp, spp, kvp):
    """weight_cache (the pools' default): the first grid saves each distinct shard once (both KVP ranks
    hold the same one), the next maps them; both give the single-process engine's tokens."""
    monkeypatch.setenv("MNEMOSYNE_CACHE", str(tmp_path))       # the workers take the driver's environment
    cfg = replace(engine_config(gqa_uneven, tp, spp, kvp), weight_cache=True)
    seen = {}
    for _ in range(2):
        with ParallelEngine(cfg) as eng:
            got = eng.generate(PROMPTS, PARAMS)
        assert_same(reference, got)
        now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "packed").glob("*.pt")}
        assert len(now) == tp * spp
        for name, (ino, mtime) in seen.items():      # mapped, not written again: same file, touched when used
            assert now[name][0] == ino and now[name][1] > mtime
        seen = now
