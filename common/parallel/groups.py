"""The grid of one instance: rank 0 is the driver (scheduler, no weights); ranks 1..N are workers at
(kvp group, pipeline stage, tp rank). Process groups are built here once and passed explicitly.
Collectives are no-ops at size 1.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common.config import ParallelConfig

DRIVER_RANK = 0


@dataclass(frozen=True)
class Coord:
    kvp: int
    stage: int
    tp: int


def worker_rank(cfg: ParallelConfig, c: Coord) -> int:
    return 1 + (c.kvp * cfg.spp + c.stage) * cfg.tp + c.tp


def coord_of(cfg: ParallelConfig, rank: int) -> Coord:
    r = rank - 1
    return Coord(kvp=r // (cfg.spp * cfg.tp), stage=(r // cfg.tp) % cfg.spp, tp=r % cfg.tp)


def world_size(cfg: ParallelConfig) -> int:
    return 1 + cfg.world_size


def stage_layers(num_layers: int, spp: int, stage: int) -> range:
    """Contiguous layer range of a stage; earlier stages take the remainder."""
    base, extra = divmod(num_layers, spp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def master_store(host: str, port: int, cfg: ParallelConfig, timeout_s: float) -> dist.TCPStore:
    """The driver's rendezvous store, bound before any worker starts. Port 0 lets the OS pick a free
    port at bind time (no window between choosing and binding a port for another process to take);
    `store.port` is what the workers are told. torch's own server listens on every interface whatever
    `host` says, so for a specific address (a local grid: 127.0.0.1) the socket is bound here, on that
    address only, and handed to the store; "0.0.0.0" (workers on other machines) keeps torch's."""
    listen_fd = None
    if host not in ("", "0.0.0.0", "::"):
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.bind(addr)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        port, listen_fd = sock.getsockname()[1], sock.detach()      # the store owns the socket from here
    return dist.TCPStore(host, port, world_size(cfg), is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False, master_listen_fd=listen_fd)


JOIN_TIMEOUT_S = 600.0             # how long the rendezvous waits for every rank to start (spawn, import torch)


def init_world(cfg: ParallelConfig, rank: int, master_addr: str, master_port: int, timeout_s: float,
               store: dist.Store | None = None, join_timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Join the grid's default group: the driver passes the store it bound (`master_store`), the
    workers connect to it as clients. The rendezvous waits up to `join_timeout_s` for every rank
    (starting a process and importing torch take tens of seconds on a loaded machine); the group's
    collectives then time out after `timeout_s`. If the rendezvous fails, torch has already counted
    a default group that does not exist; the next grid in this process would then wait under a name
    no fresh worker uses (`default_pg/1` against `default_pg/0`), so the count is put back."""
    join = timedelta(seconds=max(timeout_s, join_timeout_s))
    try:
        if store is None:
            store = dist.TCPStore(master_addr, master_port, world_size(cfg), is_master=False, timeout=join)
        else:
            store.set_timeout(join)
        dist.init_process_group("gloo", store=dist.PrefixStore("mnemosyne", store), rank=rank,
                                world_size=world_size(cfg), timeout=join)
        from torch.distributed.distributed_c10d import _set_pg_timeout   # (no public setter)
        _set_pg_timeout(timedelta(seconds=timeout_s))
    except BaseException:
        if not dist.is_initialized():
            from torch.distributed import distributed_c10d
            distributed_c10d._world.group_count = 0       # no public reset; see the docstring
        raise


class Groups:
    """What one rank needs to talk to its neighbours. Every rank (driver included) must construct it,
    in the same order, because torch.distributed.new_group is collective over the world."""

    def __init__(self, cfg: ParallelConfig, rank: int) -> None:
        self.cfg = cfg
        self.rank = rank
        self.comm_s = 0.0          # seconds spent inside collectives (transfer + waiting for peers)
        self.coord = coord_of(cfg, rank) if rank != DRIVER_RANK else None
        self.build()

    def build(self) -> None:
        """Creates this rank's process groups in the current world. Called again, in place, after
        the world was re-created with a replaced rank (GridExecutor.repair): the model's layers hold
        this object, so they use the new groups from then on."""
        cfg, rank = self.cfg, self.rank
        self.tp_group = self.kvp_group = None
        self.tp_ranks: list[int] = []
        self.kvp_ranks: list[int] = []
        for k in range(cfg.kvp):
            for s in range(cfg.spp):
                ranks = [worker_rank(cfg, Coord(k, s, t)) for t in range(cfg.tp)]
                g = dist.new_group(ranks) if cfg.tp > 1 else None
                if rank in ranks:
                    self.tp_group, self.tp_ranks = g, ranks
        for s in range(cfg.spp):
            for t in range(cfg.tp):
                ranks = [worker_rank(cfg, Coord(k, s, t)) for k in range(cfg.kvp)]
                g = dist.new_group(ranks) if cfg.kvp > 1 else None
                if rank in ranks:
                    self.kvp_group, self.kvp_ranks = g, ranks

    # ---- neighbours ---------------------------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.coord.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coord.stage == self.cfg.spp - 1

    @property
    def prev_rank(self) -> int:
        c = self.coord
        return DRIVER_RANK if c.stage == 0 else worker_rank(self.cfg, Coord(c.kvp, c.stage - 1, c.tp))

    @property
    def next_rank(self) -> int | None:
        c = self.coord
        return None if self.is_last_stage else worker_rank(self.cfg, Coord(c.kvp, c.stage + 1, c.tp))

    @property
    def is_reporter(self) -> bool:
        """The one worker that samples and reports results to the driver."""
        c = self.coord
        return self.is_last_stage and c.kvp == 0 and c.tp == 0

    def first_stage_ranks(self) -> list[int]:
        return [worker_rank(self.cfg, Coord(k, 0, t)) for k in range(self.cfg.kvp) for t in range(self.cfg.tp)]

    def reporter_rank(self) -> int:
        return worker_rank(self.cfg, Coord(0, self.cfg.spp - 1, 0))

    # ---- collectives ----------------------------------------------------------------------------------
    def all_reduce_tp(self, t: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            t0 = time.perf_counter()
            dist.all_reduce(t, group=self.tp_group)
            self.comm_s += time.perf_counter() - t0
        return t

    def all_gather_tp(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.tp_group is None:
            return [t]
        parts = [torch.empty_like(t) for _ in self.tp_ranks]
        t0 = time.perf_counter()
        dist.all_gather(parts, t.contiguous(), group=self.tp_group)
        self.comm_s += time.perf_counter() - t0
        return parts

    def all_gather_kvp(self, t: torch.Tensor) -> torch.Tensor:
        """t [...] -> [kvp, ...] stacked in group order."""
        if self.kvp_group is None:
            return t[None]
        parts = [torch.empty_like(t) for _ in self.kvp_ranks]
        t0 = time.perf_counter()
        dist.all_gather(parts, t.contiguous(), group=self.kvp_group)
        self.comm_s += time.perf_counter() - t0
        return torch.stack(parts)
