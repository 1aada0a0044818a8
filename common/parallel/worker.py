"""One worker of a TP x SPP x KVP grid: a model stage (its layers, its TP slice), the KV cache of its
KVP group for those layers, and a loop that runs step plans strictly in the order they arrive.

Per step: receive the plan (from the driver at stage 0, else from the previous stage, together with
the hidden states), run the stage, pass plan + hidden on, or at the last stage compute logits and (one
reporter rank) sample and report to the driver. Stage 0 starts step i+1 as soon as it has handed step
i on: that is the sequence pipeline.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.attention.merge import merge_stacked
from common.attention.registry import get_backend
from common.config import EngineConfig, ParallelConfig
from common.engine.executor import TORCH_DTYPES, dump_kv_file
from common.engine.forward_context import ForwardContext, SeqAttn
from common.errors import MnemosyneError
from common.engine.sampler import Sampler
from common.kv_cache.paged import PagedKVCache
from common.kv_connector.types import KVEvent, KVSink, kv_layout
from common.kv_connector.worker import KVWorker
from common.model.loader import load_checkpoint
from common.model.packed_cache import PackedCache
from common.parallel import comm
from common.parallel.groups import Groups, init_world, stage_layers
from common.parallel.plan import StepPlan, StepResult, TableCache, decode_plan, encode_result
from common.parallel.tp import build_shard, tp_shard
from common.sampling_params import SamplingParams, TopLogprobs

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 7 * 24 * 3600.0     # a serving worker may idle; it still exits when its driver dies


@dataclass(frozen=True)
class WorkerArgs:
    rank: int
    engine: EngineConfig
    master_addr: str
    master_port: int
    control_port: int
    timeout_s: float = 120.0
    threads: int = 1
    blocks_per_group: int = 0
    local: bool = True               # started by a local driver (exit when it dies)
    env: dict[str, str] | None = None    # a local driver's environment when it started this worker


class Worker:
    def __init__(self, args: WorkerArgs) -> None:
        cfg = args.engine
        self.args = args
        self.pcfg: ParallelConfig = cfg.parallel
        self.groups = Groups(self.pcfg, args.rank)
        ckpt = load_checkpoint(cfg.model)
        mc = ckpt.config
        self.mc = mc
        self.dtype = TORCH_DTYPES[cfg.dtype]
        c = self.groups.coord
        self.layers = stage_layers(mc.num_layers, self.pcfg.spp, c.stage)
        self.shard = tp_shard(mc, c.tp, self.pcfg.tp)
        self.model = build_shard(ckpt, self.shard, self.groups, self.layers.start, self.layers.stop, self.dtype,
                                 PackedCache() if cfg.weight_cache else None)
        self.cache = PagedKVCache(self.layers, args.blocks_per_group, cfg.cache.block_size,
                                  self.shard.num_kv_heads, mc.head_dim, self.dtype)
        self.backend = get_backend(cfg.attention_backend, "cpu")
        self.sampler = Sampler() if self.groups.is_reporter else None
        self.kvp_tokens = self.pcfg.kvp_tokens or (1 << 62)
        layout = kv_layout(mc, cfg.cache, cfg.dtype, self.shard.num_kv_heads)
        self.kv = KVWorker(args.rank, layout, self.cache, cfg.kv_backend, cfg.kv_host, c.tp, c.kvp,
                           self.kvp_tokens, receive=self.pcfg.spp == 1)
        self.send_lock = threading.Lock()

    # ---- the loop ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self) -> None:
        ctl = comm.connect(self.args.master_addr, self.args.control_port, self.args.rank, self.args.timeout_s,
                           kv_address=self.kv.address)
        self.ctl = ctl
        self.kv.report_to(self.notify)
        ppid = os.getppid()

        # A local worker exits with its driver: its parent is the driver's forkserver, which exits when
        # the driver does (its pipe to the driver closes), so the parent changes.
        def driver_alive() -> str | None:
            return "driver process exited" if self.args.local and os.getppid() != ppid else None

        pending: list = []                        # in-flight sends to the next stage (one step)
        self.tables = TableCache()
        try:
            while True:
                raw = comm.recv_msg(ctl, IDLE_TIMEOUT_S, driver_alive, "the driver")
                if raw.startswith(b'{"cmd"'):
                    self.command(json.loads(raw))
                    continue
                plan = decode_plan(raw)
                if plan.stop:
                    return
                if plan.dump is not None:
                    self.dump(plan.dump)
                    continue
                plan = self.tables.apply(plan)        # whole block tables (plans carry what changed)
                if not plan.seqs:
                    continue
                try:
                    pending = self.step(ctl, plan, pending)
                except RuntimeError as e:
                    if not self.repairable:
                        raise
                    # A peer died in a collective (gloo: the connection closed). This rank's KV and
                    # weights are intact: it tells the driver and waits for `regroup` (the dead rank
                    # replaced) or `stop`.
                    log.warning("worker rank %d: step %d failed (%s); waiting for the driver", self.args.rank,
                                plan.step_id, str(e).splitlines()[0] if str(e) else type(e).__name__)
                    self.send({"type": "step_failed", "step_id": plan.step_id, "rank": self.args.rank,
                               "error": str(e).splitlines()[0] if str(e) else type(e).__name__})
        finally:
            for w in pending:
                w.wait()
            self.kv.close()
            ctl.close()

    @property
    def repairable(self) -> bool:
        """A grid without a sequence pipeline that streams no KV out (a decode grid) survives a lost
        peer: no step is half-way between stages, and every rank's KV is its own
        (GridExecutor.repairable)."""
        return self.pcfg.spp == 1 and self.args.engine.scheduler.role != "prefill"

    def step(self, ctl, plan: StepPlan, pending: list) -> list:
        """Runs one plan on this rank: receives the previous stage's hidden states, runs the layers,
        streams the KV it wrote, then hands the output on (returned: the sends in flight) or, on the
        last stage, computes the logits and (the reporter) samples and reports."""
        g = self.groups
        timeline = torch.zeros(2 * g.coord.stage + 2, dtype=torch.float64)
        hidden = None
        comm0 = g.comm_s
        if not g.is_first_stage:             # announced by the plan: arrives promptly
            hidden = torch.empty(plan.num_tokens, self.mc.hidden_size, dtype=self.dtype)
            t_recv = time.perf_counter()
            dist.recv(hidden, g.prev_rank)
            dist.recv(timeline[:-2], g.prev_rank)
            g.comm_s += time.perf_counter() - t_recv
        timeline[-2] = time.monotonic()
        hidden, logits_rows = self.forward(plan, hidden)
        self.stream_kv(plan)
        timeline[-1] = time.monotonic()
        if g.next_rank is not None:
            for w in pending:
                w.wait()                      # at most one step buffered per link
            return [dist.isend(hidden.contiguous(), g.next_rank), dist.isend(timeline, g.next_rank)]
        logits = self.model.logits(hidden.index_select(0, logits_rows)) if logits_rows.numel() else None
        if g.is_reporter:
            t = timeline.tolist()
            self.report(ctl, plan, logits, [(i, t[2 * i], t[2 * i + 1]) for i in range(len(t) // 2)],
                        g.comm_s - comm0)
        return pending

    def regroup(self, master_port: int) -> None:
        """Joins the grid again after the driver replaced a dead rank (GridExecutor.repair): a new
        default group on the driver's new rendezvous, this rank's groups rebuilt in place, and the
        block tables sent whole again. Its KV cache, receiver and weights stay as they are."""
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the old group's peer is gone; it is dropped either way
            log.debug("destroying the old process group", exc_info=True)
        init_world(self.pcfg, self.args.rank, self.args.master_addr, master_port, self.args.timeout_s)
        self.groups.build()
        self.tables = TableCache()

    def command(self, msg: dict) -> None:
        """The KV connector's commands between steps: expect (decode: register a request's KV; answered
        with a KVAck), cancel (answered with the blocks a late write may still land in); and regroup
        (the driver replaced a dead rank)."""
        if msg["cmd"] == "regroup":
            self.regroup(int(msg["master_port"]))
            return
        rid = msg["rid"]
        if msg["cmd"] == "expect":
            cached = msg.get("cached", 0)
            self.send(self.kv.expect(rid, msg["tables"], msg["num_tokens"], int(msg.get("epoch", 0)),
                                     [int(c) for c in cached] if isinstance(cached, list) else int(cached)).to_dict())
        elif msg["cmd"] == "cancel":
            blocks = self.kv.cancel(rid)
            self.send({"type": "kv_cancelled", "rid": rid, "holder": self.args.rank,
                       "group": self.groups.coord.kvp, "blocks": blocks})

    def send(self, msg: dict) -> None:
        with self.send_lock:
            comm.send_msg(self.ctl, json.dumps(msg).encode())

    def notify(self, event: KVEvent) -> None:
        """The KV watcher thread's report of a terminal transfer state to the driver."""
        try:
            self.send(event.to_dict())
        except OSError:
            log.warning("cannot tell the driver about %s", event)

    def stream_kv(self, plan: StepPlan) -> None:
        """Prefill role: sends the KV this stage just computed for requests that have a sink."""
        for s in plan.seqs:
            sink = KVSink.from_dict(s.sink) if s.sink is not None else None
            if sink is not None or s.request_id in self.kv.sinks:
                self.kv.stream(s.request_id, s.start, s.num_tokens, s.tables[0], s.sample, sink)

    def forward(self, plan: StepPlan, hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        c, m = self.groups.coord, self.kvp_tokens
        ids, positions, seqs, sample_rows, w_rows, w_slots = [], [], [], [], [], []
        row = 0
        for s in plan.seqs:
            n = s.num_tokens
            ids += s.token_ids
            positions += range(s.start, s.start + n)
            group = s.start // m                          # the group that holds (and stores) this chunk
            g0 = c.kvp * m
            table = s.tables[c.kvp] if c.kvp < len(s.tables) else []
            if c.kvp < group:                             # an earlier shard: all of it precedes the chunk
                seqs.append(SeqAttn(slice(row, row + n), s.start, g0, m, table))
            elif c.kvp == group:                          # the last shard: causal, and it stores the KV
                seqs.append(SeqAttn(slice(row, row + n), s.start, g0, s.start + n - g0, table))
                w_rows += range(row, row + n)
                w_slots += self.cache.slots(table, s.start - g0, s.start + n - g0)
            if s.sample:
                sample_rows.append(row + n - 1)
            row += n
        if hidden is None:
            hidden = self.model.embed(torch.tensor(ids, dtype=torch.long))
        combine = self._combine if self.pcfg.kvp > 1 else None
        ctx = ForwardContext(self.cache, self.backend, seqs, self.mc.head_dim ** -0.5,
                             torch.tensor(w_rows, dtype=torch.long), torch.tensor(w_slots, dtype=torch.long),
                             combine=combine, kv_map=self.shard.kv_map)
        hidden = self.model(hidden, torch.tensor(positions, dtype=torch.long), ctx)
        return hidden, torch.tensor(sample_rows, dtype=torch.long)

    def dump(self, spec: dict) -> None:
        """Debug/test hook: writes the K/V this worker holds for one request (its KVP group's token
        range, its layers, its TP heads) to spec["dir"]/kv-g{kvp}-s{stage}-t{tp}.safetensors."""
        c, m = self.groups.coord, self.kvp_tokens
        n = max(0, min(spec["num_tokens"] - c.kvp * m, m))
        dump_kv_file(self.cache, spec["tables"][c.kvp], n,
                     os.path.join(spec["dir"], f"kv-g{c.kvp}-s{c.stage}-t{c.tp}.safetensors"))

    def _combine(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """Merges the partial attention of every KVP group: out [T, H, D], lse [T, H]. One all-gather
        per layer: out and lse travel packed in one buffer."""
        gathered = self.groups.all_gather_kvp(pack_partials(out, lse))    # [kvp, T, H * D + H]
        outs, lses = unpack_partials(gathered, out.shape[1], out.dtype)   # [kvp, T, H, D], [kvp, T, H]
        return merge_stacked(outs, lses)[0]

    def report(self, ctl, plan: StepPlan, logits: torch.Tensor | None, timeline, comm_s: float) -> None:
        tokens: dict[str, tuple[int, float]] = {}
        tops: dict[str, TopLogprobs] = {}
        for rid in plan.forget:
            self.sampler.forget(rid)
        samplers = [s for s in plan.seqs if s.sample]
        if samplers:
            params = [SamplingParams(max_tokens=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                     seed=s.seed, top_logprobs=s.top_logprobs) for s in samplers]
            toks, lps, by_row = self.sampler.sample(logits, [s.request_id for s in samplers], params,
                                                    [s.output_index for s in samplers])
            tokens = {s.request_id: (t, lp) for s, t, lp in zip(samplers, toks, lps)}
            tops = {samplers[b].request_id: top for b, top in by_row.items()}
        with self.send_lock:
            comm.send_msg(ctl, encode_result(StepResult(plan.step_id, tokens, timeline, comm_s,
                                                        top_logprobs=tops)))


def pack_partials(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """A partial attention result as one buffer for the KVP all-gather: out [T, H, D], lse [T, H] ->
    [T, H * D + H] (row t: out[t] flattened, then lse[t]) in the wider of the two dtypes (float32 for
    float32 or bfloat16 out, float64 for float64), so that both round-trip bit for bit."""
    t, h, d = out.shape
    dtype = torch.promote_types(out.dtype, lse.dtype)
    return torch.cat([out.reshape(t, h * d).to(dtype), lse.to(dtype)], dim=1)


def unpack_partials(packed: torch.Tensor, heads: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_partials over stacked buffers: [S, T, H * D + H] -> out [S, T, H, D] in
    out_dtype, lse [S, T, H] in the packed dtype."""
    s, t, width = packed.shape
    d = (width - heads) // heads
    return packed[..., :heads * d].reshape(s, t, heads, d).to(out_dtype), packed[..., heads * d:]


def name_process(name: str) -> None:
    """Names this process for ps/top (Linux: the first 15 bytes of `name`, its comm), so that an
    operator (or a fault test) tells a grid's ranks apart; elsewhere nothing happens."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)     # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def worker_main(args: WorkerArgs) -> None:
    """Entry point of a worker process (forked by a local driver's forkserver, or `mnemosyne worker` on
    another machine)."""
    if args.env is not None:                  # the forkserver's environment is that of its own start
        os.environ.clear()
        os.environ.update(args.env)
    logging.basicConfig(level=os.environ.get("MNEMOSYNE_LOG", "WARNING"))
    name_process(f"mnemosyne-w{args.rank}")
    torch.set_num_threads(args.threads)
    init_world(args.engine.parallel, args.rank, args.master_addr, args.master_port, args.timeout_s)
    try:
        Worker(args).run()
    except (MnemosyneError, RuntimeError, OSError) as e:
        # A peer died or the driver went away: the driver reports the failure to its caller.
        log.error("worker rank %d stops: %s", args.rank, str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise SystemExit(1)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """`mnemosyne worker --driver HOST:PORT --rank R`: one rank of a grid whose driver runs elsewhere.
    The configuration comes from the driver, so every rank runs the same model and layout."""
    import argparse
    from common.config import engine_config_from_dict
    from common.flags import HelpFormatter
    p = argparse.ArgumentParser(prog="mnemosyne worker", description=main.__doc__, formatter_class=HelpFormatter)
    p.add_argument("--driver", required=True, metavar="HOST:PORT", help="the driver's control address")
    p.add_argument("--rank", required=True, type=int, help="this worker's rank, 1 .. tp*spp*kvp")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2), help="torch threads")
    p.add_argument("--join-timeout", type=float, default=600.0, help="seconds to wait for the driver")
    a = p.parse_args(argv)
    host, _, port = a.driver.rpartition(":")
    sock = comm.connect(host, int(port), a.rank, a.join_timeout, join=True)
    with sock:
        payload = json.loads(comm.recv_msg(sock, a.join_timeout, what="the driver"))
    if "error" in payload:
        raise SystemExit(f"mnemosyne worker: error: {payload['error']}")
    worker_main(WorkerArgs(a.rank, engine_config_from_dict(payload["engine"]), payload["master_addr"],
                           payload["master_port"], int(port), payload["timeout_s"], a.threads,
                           payload["blocks_per_group"], local=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
