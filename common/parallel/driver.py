"""The driver of a TP x SPP x KVP grid (rank 0): runs the scheduler, sends step plans to stage 0 of
every KVP group, keeps up to `spp` steps in flight, and receives sampled tokens from the reporter.

It has the same request interface as the single-process LLMEngine, which it must reproduce exactly.
It schedules as LLMEngine does (any policy and chunking, LARS and adaptive chunks included), with a
performance model of the grid's layout (see `grid_perf_model`) and the pipeline depth `spp`.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import time
from collections import deque

import torch.distributed as dist
import torch.multiprocessing as mp

from common.config import EngineConfig, SchedulerConfig, engine_config_to_dict
from common.engine.engine import GenerationResult, StepOutput, generate_all, validate_prompt
from common.engine.kv_sink import GroupSink, KVSink
from common.engine.profile import hardware_id, load_perf_model
from common.errors import ConfigError, WorkerFailedError
from common.kv_cache.kvp_blocks import KVPBlockManager
from common.model.loader import load_checkpoint
from common.parallel import comm
from common.parallel.groups import DRIVER_RANK, Groups, init_world, world_size
from common.parallel.disagg import GridDisaggregation
from common.parallel.plan import SeqPlan, StepPlan, StepResult, decode_result, encode_plan
from common.parallel.worker import WorkerArgs, worker_main
from common.perf_model.base import PerfModel
from common.perf_model.calibrated import ProfileKey
from common.sampling_params import SamplingParams
from common.scheduler.request import Request
from common.scheduler.scheduler import Scheduler, SchedulerOutput

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needs_perf_model(cfg: SchedulerConfig) -> bool:
    return cfg.chunking == "adaptive" or cfg.policy == "lars"


def grid_perf_model(engine, threads_per_worker: int) -> PerfModel:
    """The performance model of a grid (`engine`: anything with `cfg` and `model_config`): the
    calibrated profile saved for exactly this hardware (the workers' thread count), model, dtype and
    parallel layout (ProfileKey, tag e.g. tp1-spp2-kvp2-M64), else the analytic roofline of the
    layout (layers per stage, TP split, the slowest KVP group's shard); online-corrected, as in
    LLMEngine. Remote workers choose their own threads (and may run on other processors): their
    profile is looked up under this machine's processor and `threads_per_worker`."""
    cfg = engine.cfg
    key = ProfileKey.make(hardware_id(cfg.device, threads_per_worker), engine.model_config, cfg.dtype,
                          cfg.parallel)
    return load_perf_model(engine, key=key)


class ParallelEngine:
    """Owns the worker processes it spawned (local mode) or joins workers started elsewhere."""

    def __init__(self, cfg: EngineConfig, master_addr: str = "127.0.0.1", master_port: int | None = None,
                 spawn_workers: bool = True, timeout_s: float = 30.0, threads_per_worker: int = 1,
                 control_port: int | None = None, load_timeout_s: float = 600.0,
                 extra_eos_ids: tuple[int, ...] = (), perf_model: PerfModel | None = None) -> None:
        """`perf_model`: predicts one iteration's time (slowest stage, slowest KVP group) for adaptive
        chunking and LARS; when they are configured and none is given, `grid_perf_model`."""
        self.cfg = cfg
        pcfg = cfg.parallel
        self.pcfg = pcfg
        self.timeout_s = timeout_s
        self.model_config = load_checkpoint(cfg.model).config
        mc = self.model_config
        self.max_model_len = cfg.max_model_len or mc.max_position
        m = pcfg.kvp_tokens if pcfg.kvp > 1 else self.max_model_len
        if pcfg.kvp > 1 and pcfg.kvp * m < self.max_model_len:
            self.max_model_len = pcfg.kvp * m          # the grid cannot hold more than kvp * M tokens
        blocks_per_group = cfg.cache.total_blocks()
        self.blocks = KVPBlockManager(pcfg.kvp, m, blocks_per_group, cfg.cache.block_size)
        if perf_model is None and needs_perf_model(cfg.scheduler):
            perf_model = grid_perf_model(self, threads_per_worker)
        self.perf_model = perf_model
        self.scheduler = Scheduler(cfg.scheduler, self.blocks, kvp_tokens=m if pcfg.kvp > 1 else None,
                                   perf_model=perf_model, pipeline_depth=pcfg.spp)
        self.master_port = master_port or free_port()
        self.control = comm.ControlServer(master_addr if spawn_workers else "0.0.0.0",
                                          control_port if control_port is not None else
                                          (0 if spawn_workers else self.master_port + 1))
        self.procs: list = []
        if spawn_workers:
            ctx = mp.get_context("spawn")
            for rank in range(1, world_size(pcfg)):
                args = WorkerArgs(rank, cfg, master_addr, self.master_port, self.control.port, timeout_s,
                                  threads_per_worker, blocks_per_group, local=True)
                p = ctx.Process(target=worker_main, args=(args,), daemon=True, name=f"mnemosyne-worker-{rank}")
                p.start()
                self.procs.append(p)
        else:                                   # workers run elsewhere: `mnemosyne worker --driver ...`
            log.warning("waiting for %d workers: mnemosyne worker --driver HOST:%d --rank R (R = 1..%d)",
                        world_size(pcfg) - 1, self.control.port, world_size(pcfg) - 1)
            self.control.serve_joins(list(range(1, world_size(pcfg))), {
                "engine": engine_config_to_dict(cfg), "master_addr": master_addr,
                "master_port": self.master_port, "timeout_s": timeout_s, "blocks_per_group": blocks_per_group,
            }, load_timeout_s)
        init_world(pcfg, DRIVER_RANK, "0.0.0.0" if not spawn_workers else master_addr, self.master_port,
                   timeout_s)
        self.groups = Groups(pcfg, DRIVER_RANK)
        self.control.accept(list(range(1, world_size(pcfg))), load_timeout_s, self._dead_worker)
        self.inflight: deque[tuple[int, SchedulerOutput]] = deque()
        self.forget: list[str] = []
        self.step_ids = itertools.count()
        self.req_ids = itertools.count()
        self.timelines: list[list[tuple[int, float, float]]] = []
        self.record_timeline = False
        self.results: dict[int, StepResult] = {}
        self.eos_ids = frozenset(mc.eos_token_ids) | frozenset(int(i) for i in extra_eos_ids)
        self.disagg = GridDisaggregation(self)
        self.comm_s = 0.0                 # the reporter's cumulative time in communication
        self.closed = False

    # ---- requests (same interface as LLMEngine) ------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    arrival_s: float | None = None, ttft_deadline_s: float | None = None,
                    kv_sink: KVSink | None = None) -> str:
        validate_prompt(prompt_ids, self.model_config.vocab_size, self.max_model_len, params.max_tokens)
        rid = request_id or f"req-{next(self.req_ids)}"
        if kv_sink is not None:
            self.disagg.attach(rid, kv_sink)
        self.scheduler.add(self.make_request(rid, prompt_ids, params, arrival_s, ttft_deadline_s))
        return rid

    def make_request(self, rid: str, prompt_ids: list[int], params: SamplingParams, arrival_s: float | None = None,
                     ttft_deadline_s: float | None = None) -> Request:
        return Request(rid, list(prompt_ids), params, arrival_s if arrival_s is not None else time.monotonic(),
                       eos_ids=self.eos_ids, max_model_len=self.max_model_len, ttft_deadline_s=ttft_deadline_s)

    def abort(self, request_id: str) -> bool:
        found = self.scheduler.abort(request_id) is not None
        if found:
            self.forget.append(request_id)
        return self.disagg.abort(request_id) or found

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.inflight) or bool(self.disagg.awaiting)

    # ---- disaggregation (common/parallel/disagg.py) -------------------------------------------------
    def prepare_receive(self, request_id: str, num_prompt_tokens: int, max_new_tokens: int) -> list[GroupSink]:
        return self.disagg.prepare_receive(request_id, num_prompt_tokens, max_new_tokens)

    def add_prefilled(self, prompt_ids: list[int], params: SamplingParams, request_id: str, first_token: int,
                      first_logprob: float, kv_timeout_s: float = 60.0) -> str:
        return self.disagg.add_prefilled(prompt_ids, params, request_id, first_token, first_logprob, kv_timeout_s)

    def kv_status(self, request_id: str) -> tuple[str, str | None]:
        return self.disagg.kv_status(request_id)

    @property
    def kv_backend(self) -> str:
        return self.cfg.kv_backend

    @property
    def kv_layout(self):
        return self.disagg.layout

    # ---- control plane -------------------------------------------------------------------------------
    def pump(self, timeout_s: float) -> bool:
        """Handles one message from any worker; False when none came within `timeout_s`."""
        got = self.control.recv_any(timeout_s, self._dead_worker)
        if got is None:
            return False
        rank, raw = got
        msg = json.loads(raw)
        if "step_id" in msg:
            self.results[msg["step_id"]] = decode_result(raw)
        else:
            self.disagg.on_message(rank, msg)
        return True

    def drain(self) -> None:
        while self.pump(0.0):
            pass

    def _result(self, step_id: int) -> StepResult:
        deadline = time.monotonic() + self.timeout_s
        while step_id not in self.results:
            if time.monotonic() > deadline:
                raise WorkerFailedError(f"no result for step {step_id} within {self.timeout_s:.0f} s")
            self.pump(min(0.5, max(0.0, deadline - time.monotonic())))
        return self.results.pop(step_id)

    # ---- one iteration -------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Fills the pipeline (at most spp steps in flight), then completes the oldest step."""
        self._check_open()
        early = self.disagg.admit_arrived()
        while len(self.inflight) < self.pcfg.spp:
            sched = self.scheduler.schedule()
            if not sched.items:
                break
            self._send(sched)
        if not self.inflight:
            return early
        step_id, sched = self.inflight.popleft()
        res = self._result(step_id)
        self.comm_s += res.comm_s
        if self.record_timeline:
            self.timelines.append(res.timeline)
        self.scheduler.postprocess(sched, res.tokens)
        self._observe(sched, res)
        outs = []
        for it in sched.items:
            req = it.request
            tok = res.tokens.get(req.request_id) if it.sample else None
            if req.finished:
                self.forget.append(req.request_id)
                self.disagg.finished(req.request_id)
            outs.append(StepOutput(req.request_id, tok[0] if tok else None, tok[1] if tok else None,
                                   req.num_computed, req.prompt_len, req.finish_reason))
        return early + outs

    def _observe(self, sched: SchedulerOutput, res: StepResult) -> None:
        """Feeds the model's online correction with this step's service time. Not the wall time from
        send to result: with spp > 1 that includes waiting behind the steps ahead in the pipeline.
        Each stage stamps (start, end) of its own work on this step (after its input arrived, before
        it hands the output on), so the longest span is the slowest stage's time, what the model
        predicts; the reporter's KVP group waits for the others in every layer's merge, so it is the
        slowest group's too. It leaves out the last stage's LM head and sampling (stamped before
        them) and the driver's scheduling (overlapped with the pipeline when spp > 1)."""
        observe = getattr(self.perf_model, "observe", None)
        if observe is not None and sched.batch is not None and res.timeline:
            observe(sched.batch, max(end - start for _, start, end in res.timeline))

    def _send(self, sched: SchedulerOutput) -> None:
        seqs = []
        for it in sched.items:
            req, p = it.request, it.request.params
            seqs.append(SeqPlan(req.request_id, it.start, req.token_ids(it.start, it.start + it.num_tokens),
                                it.sample, self.blocks.table(req.request_id), p.temperature, p.top_p, p.top_k,
                                p.seed, self.disagg.sink_for(req.request_id, it.start), it.output_index))
        step_id = next(self.step_ids)
        data = encode_plan(StepPlan(step_id, seqs, self.forget))
        self.forget = []
        self.control.broadcast(data)
        self.inflight.append((step_id, sched))

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationResult]:
        return generate_all(self, prompts, params)

    def dump_kv(self, request_id: str, directory: str, timeout_s: float = 60.0) -> list[str]:
        """Debug/test hook: every worker writes the K/V it holds for a running request to `directory`.
        Returns the file paths once all exist."""
        req = self.scheduler.requests[request_id]
        spec = {"dir": directory, "tables": self.blocks.table(request_id), "num_tokens": req.num_computed}
        self.control.broadcast(encode_plan(StepPlan(-1, [], dump=spec)))
        paths = [os.path.join(directory, f"kv-g{k}-s{s}-t{t}.safetensors") for k in range(self.pcfg.kvp)
                 for s in range(self.pcfg.spp) for t in range(self.pcfg.tp)]
        deadline = time.monotonic() + timeout_s
        while not all(os.path.exists(p) for p in paths):
            if time.monotonic() > deadline:
                raise WorkerFailedError("workers did not dump their KV in time")
            time.sleep(0.05)
        return paths

    # ---- lifecycle -----------------------------------------------------------------------------------
    def _dead_worker(self) -> str | None:
        for p in self.procs:
            if not p.is_alive():
                return f"worker {p.name} exited with code {p.exitcode}"
        return None

    def _check_open(self) -> None:
        if self.closed:
            raise WorkerFailedError("the engine is shut down")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.control.broadcast(encode_plan(StepPlan(-1, [], stop=True)))
        except (OSError, WorkerFailedError):
            pass                                   # a worker already gone: it will not need telling
        finally:
            self.control.close()
            deadline = time.monotonic() + timeout_s
            for p in self.procs:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(1.0)
            dist.destroy_process_group()

    def __enter__(self) -> "ParallelEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def make_engine(cfg: EngineConfig, **kwargs):
    """The single-process engine for a 1x1x1 grid, else a ParallelEngine."""
    if cfg.parallel.world_size == 1:
        from common.engine.engine import LLMEngine
        return LLMEngine(cfg)
    if cfg.device != "cpu":
        raise ConfigError("the multi-process grid runs on CPU (gloo) in this build")
    return ParallelEngine(cfg, **kwargs)
