"""The control plane of a TP x SPP x KVP grid: `GridExecutor` (rank 0) sends step plans to stage 0
of every KVP group, keeps up to `spp` steps in flight and receives the sampled tokens from the
reporter; it also carries the KV connector's commands to the workers and their KVEvents back.

The step loop, the scheduler, the blocks and the KV connector's scheduler side are the one
engine's (common/engine/engine.py); `ParallelEngine(cfg, ...)` only builds that engine with a
GridExecutor.
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
from multiprocessing import connection as mp_connection

from common.config import EngineConfig, engine_config_to_dict
from common.engine.executor import ExecResult, Executor
from common.errors import ConfigError, WorkerFailedError
from common.kv_cache.kvp_blocks import KVPBlockManager
from common.kv_connector.types import KVAck, KVEvent, KVSink
from common.parallel import comm
from common.parallel.forkserver import worker_context
from common.parallel.groups import (DRIVER_RANK, Coord, Groups, coord_of, init_world, master_store, worker_rank,
                                   world_size)
from common.parallel.plan import SeqPlan, StepPlan, StepResult, TableDelta, decode_result, encode_plan
from common.parallel.worker import WorkerArgs, worker_main
from common.scheduler.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

#: after a worker died, how long shutdown waits for the others to exit before it kills them: a
#: survivor that reads the stop exits within ~0.1 s (a decode grid's), one blocked on the dead peer
#: never does (a prefill stage's pipeline send)
DEAD_PEER_GRACE_S = 0.3
#: a repair waits this long for the worker whose loss failed a step to be seen dead (its peers see
#: its sockets close before the forkserver has reaped it)
REAP_WAIT_S = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GridExecutor(Executor):
    """Owns the worker processes it spawned (local mode) or joins workers started elsewhere.
    `blocks`: the engine's block manager (the plans carry its per-group block tables)."""

    def __init__(self, cfg: EngineConfig, blocks: KVPBlockManager, master_addr: str = "127.0.0.1",
                 master_port: int | None = None, spawn_workers: bool = True, timeout_s: float = 30.0,
                 threads_per_worker: int = 1, control_port: int | None = None,
                 load_timeout_s: float = 600.0) -> None:
        if cfg.device != "cpu":
            raise ConfigError("the multi-process grid runs on CPU (gloo) in this build")
        self.cfg = cfg
        pcfg = self.pcfg = cfg.parallel
        self.blocks = blocks
        self.depth = pcfg.spp
        self.kv_holders = pcfg.world_size
        self.threads = threads_per_worker
        self.timeout_s = timeout_s
        self.master_addr = master_addr
        self.load_timeout_s = load_timeout_s
        self.spawn_workers = spawn_workers
        self.blocks_per_group = blocks_per_group = blocks.pools[0].num_blocks
        self.store = master_store("0.0.0.0" if not spawn_workers else master_addr, master_port or 0, pcfg, timeout_s)
        self.master_port = self.store.port
        self.control = comm.ControlServer(master_addr if spawn_workers else "0.0.0.0",
                                          control_port if control_port is not None else
                                          (0 if spawn_workers else self.master_port + 1))
        self.procs: list = []
        self.closed = False
        ranks = list(range(1, world_size(pcfg)))
        try:
            if spawn_workers:
                for rank in ranks:
                    self.procs.append(self._spawn(rank))
            else:                               # workers run elsewhere: `mnemosyne worker --driver ...`
                log.warning("waiting for %d workers: mnemosyne worker --driver HOST:%d --rank R (R = 1..%d)",
                            len(ranks), self.control.port, len(ranks))
                self.control.serve_joins(ranks, {
                    "engine": engine_config_to_dict(cfg), "master_addr": master_addr,
                    "master_port": self.master_port, "timeout_s": timeout_s, "blocks_per_group": blocks_per_group,
                }, load_timeout_s)
            init_world(pcfg, DRIVER_RANK, master_addr, self.master_port, timeout_s, store=self.store,
                       join_timeout_s=load_timeout_s)
            self.groups = Groups(pcfg, DRIVER_RANK)
            self.control.accept(ranks, load_timeout_s, self._dead_worker)
        except BaseException:
            self._stop_workers(5.0)
            raise
        self.inflight: deque[int] = deque()
        self.forgotten: list[str] = []
        self.step_ids = itertools.count()
        self.table_delta = TableDelta()   # block tables in plans: what changed since the last one
        self.results: dict[int, StepResult] = {}
        self.acks: dict[str, dict[int, KVAck]] = {}
        self.cancelled: dict[str, dict[int, tuple[int, list[int]]]] = {}   # rid -> holder -> (group, poisoned)
        self.events: list[KVEvent] = []
        self.timelines: list[list[tuple[int, float, float]]] = []
        self.step_failures: dict[int, str] = {}   # step id -> a survivor's report that it failed
        self.first_step = 0                       # results of earlier steps are stale (a repair)
        self.repairs: list[tuple[list[int], float]] = []   # (ranks replaced, seconds it took)
        self.record_timeline = False
        self.comm_s = 0.0                 # the reporter's cumulative time in communication

    # ---- steps ---------------------------------------------------------------------------------------
    def submit(self, sched: SchedulerOutput, sinks: dict[str, KVSink]) -> None:
        self._check_open()
        seqs = []
        for it in sched.items:
            req, p = it.request, it.request.params
            sink = sinks.get(req.request_id)
            seqs.append(SeqPlan(req.request_id, it.start, req.token_ids(it.start, it.start + it.num_tokens),
                                it.sample, self.blocks.table(req.request_id), p.temperature, p.top_p, p.top_k,
                                p.seed, sink.to_dict() if sink is not None else None, it.output_index,
                                p.top_logprobs))
        step_id = next(self.step_ids)
        for rid in self.forgotten:
            self.table_delta.forget(rid)
        seqs = [self.table_delta.seq(step_id, s) for s in seqs]
        self.table_delta.prune(step_id)
        data = encode_plan(StepPlan(step_id, seqs, self.forgotten))
        self.forgotten = []
        self.control.broadcast(data)
        self.inflight.append(step_id)

    def collect(self) -> ExecResult:
        """The oldest step's tokens. Its service time is not the wall time from send to result (with
        spp > 1 that includes waiting behind the steps ahead in the pipeline): each stage stamps
        (start, end) of its own work on this step (after its input arrived, before it hands the
        output on), so the longest span is the slowest stage's time, what the model predicts; the
        reporter's KVP group waits for the others in every layer's merge, so it is the slowest
        group's too. It leaves out the last stage's LM head and sampling (stamped before them) and
        the driver's scheduling (overlapped with the pipeline when spp > 1)."""
        step_id = self.inflight.popleft()
        deadline = time.monotonic() + self.timeout_s
        while step_id not in self.results:
            if step_id in self.step_failures:
                raise WorkerFailedError(f"step {step_id} failed on a worker: {self.step_failures[step_id]}")
            if time.monotonic() > deadline:
                raise WorkerFailedError(f"no result for step {step_id} within {self.timeout_s:.0f} s")
            self._pump(min(0.5, max(0.0, deadline - time.monotonic())))
        res = self.results.pop(step_id)
        self.comm_s += res.comm_s
        if self.record_timeline:
            self.timelines.append(res.timeline)
        service = max((end - start for _, start, end in res.timeline), default=None)
        return ExecResult(res.tokens, service, top_logprobs=res.top_logprobs)

    def forget(self, request_id: str) -> None:
        self.forgotten.append(request_id)

    # ---- control plane -------------------------------------------------------------------------------
    def _pump(self, timeout_s: float) -> bool:
        """Handles one message from any worker; False when none came within `timeout_s`."""
        got = self.control.recv_any(timeout_s, self._dead_worker)
        if got is None:
            return False
        _, raw = got
        msg = json.loads(raw)
        kind = msg.get("type")
        if kind == "kv_event":
            self.events.append(KVEvent.from_dict(msg))
        elif kind == "kv_ack":
            ack = KVAck.from_dict(msg)
            self.acks.setdefault(ack.request_id, {})[ack.holder] = ack
        elif kind == "kv_cancelled":
            self.cancelled.setdefault(msg["rid"], {})[int(msg["holder"])] = (int(msg["group"]), list(msg["blocks"]))
        elif kind == "step_failed":
            if msg["step_id"] >= self.first_step:
                self.step_failures.setdefault(msg["step_id"], f"rank {msg['rank']}: {msg['error']}")
        elif msg["step_id"] >= self.first_step:    # (a step from before a repair: nobody waits for it)
            self.results[msg["step_id"]] = decode_result(raw)
        return True

    def _drain(self) -> None:
        while self._pump(0.0):
            pass

    # ---- the KV connector's worker side --------------------------------------------------------------
    def kv_expect(self, request_id: str, tables: list[list[int]], num_tokens: int, epoch: int = 0,
                  cached: int | list[int] = 0, timeout_s: float = 30.0) -> list[KVAck]:
        self._check_open()
        self.control.broadcast(json.dumps({"cmd": "expect", "rid": request_id, "tables": tables,
                                           "num_tokens": num_tokens, "epoch": epoch, "cached": cached}).encode())
        deadline = time.monotonic() + timeout_s
        while len(self.acks.get(request_id, {})) < self.kv_holders:
            if time.monotonic() > deadline:
                self.acks.pop(request_id, None)
                raise WorkerFailedError(f"workers did not register request {request_id} within {timeout_s:.0f} s")
            self._pump(min(0.5, max(0.0, deadline - time.monotonic())))
        return list(self.acks.pop(request_id).values())

    def kv_cancel(self, request_id: str) -> dict[int, list[int]]:
        """Waits for every worker's answer (within the grid's timeout), as kv_expect does: a
        request's blocks are freed only once no holder can still write into them, and those a late
        NIXL write may land in come back to be withheld."""
        if self.closed:
            return {}
        self.control.broadcast(json.dumps({"cmd": "cancel", "rid": request_id}).encode())
        deadline = time.monotonic() + self.timeout_s
        while len(self.cancelled.get(request_id, {})) < self.kv_holders:
            if time.monotonic() > deadline:
                self.cancelled.pop(request_id, None)
                raise WorkerFailedError(f"workers did not cancel request {request_id} within {self.timeout_s:.0f} s")
            self._pump(min(0.5, max(0.0, deadline - time.monotonic())))
        poisoned: dict[int, set[int]] = {}
        for group, blocks in self.cancelled.pop(request_id).values():
            if blocks:                         # (a group's TP ranks name the same blocks)
                poisoned.setdefault(group, set()).update(blocks)
        return {group: sorted(blocks) for group, blocks in poisoned.items()}

    def kv_events(self) -> list[KVEvent]:
        """The reports that arrived; a dead worker raises only once the survivors' reports are
        out (its closed connection stays readable: the next call, or the next step, finds it)."""
        failure = None
        if not self.closed:
            try:
                self._drain()
            except WorkerFailedError as e:
                failure = e
        events, self.events = self.events, []
        if failure is not None and not events:
            raise failure
        return events

    def kv_addresses(self, group: int) -> list[str]:
        return [self.control.hello[worker_rank(self.pcfg, Coord(group, 0, t))]["kv_address"]
                for t in range(self.pcfg.tp)]

    def kv_group_holders(self, group: int) -> list[int]:
        return [worker_rank(self.pcfg, Coord(group, 0, t)) for t in range(self.pcfg.tp)]

    def dump_kv(self, tables: list[list[int]], num_tokens: int, directory: str, timeout_s: float = 60.0) -> list[str]:
        spec = {"dir": directory, "tables": tables, "num_tokens": num_tokens}
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
    def _spawn(self, rank: int):
        args = WorkerArgs(rank, self.cfg, self.master_addr, self.master_port, self.control.port, self.timeout_s,
                          self.threads, self.blocks_per_group, local=True, env=dict(os.environ))
        p = worker_context().Process(target=worker_main, args=(args,), daemon=True, name=f"mnemosyne-worker-{rank}")
        p.start()
        return p

    @property
    def repairable(self) -> bool:
        """A grid whose dead worker can be replaced in place: one this driver spawned, without a
        sequence pipeline (each rank's KV is its own, no step is between stages), not streaming KV
        out (a prefill pool's: it rebuilds whole, and the router retries its requests)."""
        return (self.spawn_workers and self.pcfg.spp == 1 and self.cfg.scheduler.role != "prefill"
                and not self.closed)

    def repair(self) -> set[int]:
        """Replaces the workers that died, keeping the others and what they hold (weights, KV,
        receivers): the survivors finish or fail the step in flight (a collective with the dead rank
        raises within ~50 ms), then every rank joins a new world on a new rendezvous, with the dead
        ranks started afresh (an empty KV cache and a new KV receiver, which kv_addresses then
        gives). Returns the KVP groups whose KV is lost (a dead rank's group: its heads of every
        token it held); steps in flight are dropped (the engine submits them again).
        WorkerFailedError when the grid cannot be repaired or no worker died."""
        if not self.repairable:
            raise WorkerFailedError("this grid cannot replace a worker in place (a pipeline, a prefill "
                                    "pool's grid, or workers started elsewhere)")
        t0 = time.monotonic()
        deadline = t0 + REAP_WAIT_S
        while not (dead := [r for r, p in enumerate(self.procs, start=1) if not p.is_alive()]):
            if time.monotonic() > deadline:
                raise WorkerFailedError("a step failed, but no worker died: nothing to replace")
            time.sleep(0.01)
        for r in dead:
            log.error("worker rank %d exited with code %s: replacing it", r, self.procs[r - 1].exitcode)
            conn = self.control.peers.pop(r, None)
            if conn is not None:
                conn.close()
            self.control.hello.pop(r, None)
            self.procs[r - 1].join(1.0)
        lost = {coord_of(self.pcfg, r).kvp for r in dead}
        if dist.is_initialized():
            dist.destroy_process_group()
        self.store = master_store(self.master_addr, 0, self.pcfg, self.timeout_s)
        self.master_port = self.store.port
        try:
            for r in dead:
                self.procs[r - 1] = self._spawn(r)
            self.control.broadcast(json.dumps({"cmd": "regroup", "master_port": self.master_port}).encode())
            init_world(self.pcfg, DRIVER_RANK, self.master_addr, self.master_port, self.timeout_s, store=self.store,
                       join_timeout_s=self.load_timeout_s)
            self.groups = Groups(self.pcfg, DRIVER_RANK)
            self.control.accept(list(range(1, world_size(self.pcfg))), self.load_timeout_s, self._dead_worker)
        except BaseException as e:             # the grid is lost: nothing is left to shut down after this
            self.closed = True
            self._stop_workers(5.0)
            if dist.is_initialized():
                dist.destroy_process_group()       # (the owner's next grid builds its own)
            self.store = None
            if isinstance(e, Exception) and not isinstance(e, WorkerFailedError):
                raise WorkerFailedError(f"replacing worker rank(s) {dead} failed: {e}") from e
            raise
        self.inflight.clear()
        self.first_step = next(self.step_ids)
        self.results.clear()
        self.step_failures.clear()
        self.table_delta = TableDelta()            # the survivors dropped their copies of the tables
        took = time.monotonic() - t0
        self.repairs.append((dead, took))
        log.warning("replaced worker rank(s) %s in %.2f s; KV of KVP group(s) %s is lost", dead, took, sorted(lost))
        return lost

    def _dead_worker(self) -> str | None:
        for p in self.procs:
            if not p.is_alive():
                return f"worker {p.name} exited with code {p.exitcode}"
        return None

    def check_alive(self) -> None:
        dead = None if self.closed else self._dead_worker()
        if dead is not None:
            raise WorkerFailedError(dead)

    def _check_open(self) -> None:
        if self.closed:
            raise WorkerFailedError("the engine is shut down")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Tells the workers to stop and joins them, killing what has not exited after `timeout_s`."""
        if self.closed:
            return
        self.closed = True
        try:
            self.control.broadcast(encode_plan(StepPlan(-1, [], stop=True)))
        except (OSError, WorkerFailedError):
            pass                                   # a worker already gone: it will not need telling
        finally:
            self._stop_workers(timeout_s)
            if dist.is_initialized():
                dist.destroy_process_group()
            self.store = None                      # closes the rendezvous port

    def _stop_workers(self, timeout_s: float) -> None:
        """Waits for every worker to exit, then kills the rest: at `timeout_s`, or DEAD_PEER_GRACE_S
        after one is seen dead (killed, or failed), whichever comes first. The survivors of a dead
        worker may be blocked in a collective or a pipeline send to it that never returns, and never
        read the stop: a prefill instance that lost a stage waited the whole 10 s before it could
        rebuild. (Seen dead while waiting, not only before: the control connection breaks before the
        forkserver has reaped the killed worker, so at the start of a shutdown it may still look
        alive.)"""
        self.control.close()
        deadline = time.monotonic() + timeout_s
        graced = False
        while True:
            alive = [p for p in self.procs if p.is_alive()]
            now = time.monotonic()
            if not alive or now >= deadline:
                break
            if not graced and any(p.exitcode not in (None, 0) for p in self.procs):
                graced, deadline = True, min(deadline, now + DEAD_PEER_GRACE_S)
            mp_connection.wait([p.sentinel for p in alive], min(0.1, max(0.0, deadline - now)))
        for p in alive:
            log.warning("worker %s did not exit: killed", p.name)
            p.kill()
            p.join(1.0)


def ParallelEngine(cfg: EngineConfig, checkpoint=None, extra_eos_ids: tuple[int, ...] = (), perf_model=None,
                   **grid_kwargs):
    """The one engine (common/engine/engine.py LLMEngine) on a grid: a GridExecutor built with
    `grid_kwargs` (master_addr, master_port, spawn_workers, timeout_s, threads_per_worker,
    control_port, load_timeout_s)."""
    from common.engine.engine import LLMEngine
    return LLMEngine(cfg, checkpoint, extra_eos_ids=extra_eos_ids, perf_model=perf_model,
                     executor=lambda e: GridExecutor(e.cfg, e.blocks, **grid_kwargs))
