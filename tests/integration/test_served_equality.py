"""The same request gives the same tokens offline, on a grid and served, with LARS + adaptive chunking.

Built-in model (SmolLM2-135M GGUF), float32, greedy, 8 tokens, the scheduler set explicitly to
policy=lars, chunking=adaptive everywhere:
  offline  LLMEngine, one process (the reference);
  grid     the engine factory on an spp=2 and on a kvp=2 grid (the long prompt spans both KVP groups);
  served   scripts/up.py's Cluster: router -> prefill pool (spp=2) -> decode pool (kvp=2) for the long
           prompt (>= the router's short_prompt_tokens), the decode pool prefilling the short one itself.
Tokens must be identical and logprobs within 1e-4 of the offline engine. Adaptive chunking cuts the
300-token prompt differently in each layout (its budget depends on the role and the pipeline depth:
on CPU with the analytic model, ~128-token chunks offline and in the decode role, ~64 in the prefill
pool); exact attention must make that invisible.

The performance model is the analytic roofline everywhere (`perf_model="analytic"`, `--perf-model
analytic`): the chunk sizes it picks only have to be legal, and a calibration run per pool would
take minutes here and write a profile into the user's cache.
"""
from __future__ import annotations

import uuid

import pytest

from common.client import RouterClient
from common.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from common.engine.engine import LLMEngine, make_engine
from common.model.tokenizer import load_tokenizer
from common.rpc.protos import router_pb2
from common.sampling_params import SamplingParams
from scripts.up import Cluster, ClusterConfig

pytestmark = pytest.mark.timeout(900)

SHORT_PROMPT_TOKENS = 64       # the router sends prompts at least this long to the prefill pool
KVP_TOKENS = 256               # M of the kvp=2 grids: the long prompt spans both groups
MAX_TOKENS = 8
LOGPROB_TOL = 1e-4
SCHEDULER = dict(policy="lars", chunking="adaptive")
POOL_FLAGS = ["--policy", "lars", "--chunking", "adaptive", "--perf-model", "analytic"]


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[int]]:
    tok = load_tokenizer(None)
    text = ("The World Almanac. Paris is the capital of France, on the Seine; Berlin is the capital of "
            "Germany, on the Spree; Rome is the capital of Italy, on the Tiber. ")
    ids = tok.encode(text * 20)
    long, short = ids[:300], ids[:20]
    assert len(long) == 300 and KVP_TOKENS < len(long) <= 2 * KVP_TOKENS and len(long) >= SHORT_PROMPT_TOKENS
    assert len(short) < SHORT_PROMPT_TOKENS
    return {"long": long, "short": short}


def engine_config(spp: int = 1, kvp: int = 1) -> EngineConfig:
    return EngineConfig(model=None, dtype="float32", perf_model="analytic",
                        cache=CacheConfig(block_size=16, num_blocks=64),
                        scheduler=SchedulerConfig(**SCHEDULER),
                        parallel=ParallelConfig(spp=spp, kvp=kvp, kvp_tokens=KVP_TOKENS if kvp > 1 else None))


def run_engine(engine, prompts: dict[str, list[int]]) -> dict[str, tuple[list[int], list[float]]]:
    params = SamplingParams(max_tokens=MAX_TOKENS)
    outs = engine.generate(list(prompts.values()), params)
    return {name: (list(o.token_ids), list(o.logprobs)) for name, o in zip(prompts, outs)}


@pytest.fixture(scope="module")
def offline(prompts):
    engine = LLMEngine(engine_config(), extra_eos_ids=load_tokenizer(None).eos_token_ids)
    assert (engine.scheduler.cfg.policy, engine.scheduler.cfg.chunking) == ("lars", "adaptive")
    ref = run_engine(engine, prompts)
    assert all(len(toks) == MAX_TOKENS for toks, _ in ref.values()), ref    # no early EOS: 8 tokens compared
    return ref


def assert_same(ref, got, what: str) -> None:
    tokens, logprobs = got
    assert tokens == ref[0], f"{what}: tokens {tokens} != offline {ref[0]}"
    diff = max(abs(a - b) for a, b in zip(logprobs, ref[1]))
    assert len(logprobs) == len(ref[1]) and diff <= LOGPROB_TOL, f"{what}: logprobs differ by {diff:.2e}"


@pytest.mark.parametrize("spp,kvp", [(2, 1), (1, 2)], ids=["spp2", "kvp2"])
def test_grid_equals_offline(prompts, offline, spp, kvp):
    engine = make_engine(engine_config(spp, kvp), extra_eos_ids=load_tokenizer(None).eos_token_ids)
    try:
        got = run_engine(engine, prompts)
    finally:
        engine.shutdown()
    for name in prompts:
        assert_same(offline[name], got[name], f"{name} prompt on spp={spp} kvp={kvp}")


def test_served_equals_offline(prompts, offline, tmp_path):
    cfg = ClusterConfig(model=None, kv_backend="tcp", router_port=0, dtype="float32", prefill_spp=2, decode_kvp=2,
                        kvp_tokens=KVP_TOKENS, short_prompt_tokens=SHORT_PROMPT_TOKENS,
                        deployment=f"eq-{uuid.uuid4().hex[:8]}", log_dir=str(tmp_path),
                        extra={"prefill": POOL_FLAGS, "decode": POOL_FLAGS})
    routes = {"long": router_pb2.ROUTE_DISAGGREGATED, "short": router_pb2.ROUTE_DECODE_ONLY}
    with Cluster(cfg) as cluster:
        for name, ids in prompts.items():
            with RouterClient(cluster.router_address, timeout_s=300) as client:
                # A generous TTFT SLO: admission stays on (the served path), but a loaded CI machine
                # must not turn this equality test into a timing test.
                evs = list(client.stream(client.request(token_ids=ids, max_tokens=MAX_TOKENS, ttft_slo_s=600.0,
                                                        tbt_slo_s=600.0)))
            assert evs[0].started.route == routes[name], f"{name} prompt took route {evs[0].started.route}"
            deltas = [e.delta for e in evs if e.HasField("delta")]
            got = ([t for d in deltas for t in d.token_ids], [lp for d in deltas for lp in d.logprobs])
            assert_same(offline[name], got, f"{name} prompt served")
        for svc in ("prefill", "decode"):
            log = cluster.services[svc].log_path.read_text(errors="replace")
            assert "Traceback" not in log, f"{svc} log:\n{log[-3000:]}"
