"""The forkserver that local grid workers are forked from. Standard library only, so a pool's main
can start it before it imports torch (start_worker_server)."""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver

PRELOAD = ["common.parallel.worker"]


def worker_context():
    """How local workers start: forked from a forkserver that imported the worker module (torch and the
    model code) once per driver process, so a worker starts without seconds of imports, and a later grid
    of the same process (a rebuilt instance, the next test) reuses it. The forkserver never runs torch
    ops, so a fork of it carries no OpenMP or CUDA state; each worker takes the driver's environment of
    the moment it starts (WorkerArgs.env), as a spawned interpreter would."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_worker_server() -> None:
    """Starts the forkserver now: its imports (torch and the worker module, over a second on this
    2-core machine) then run beside the caller's own imports and model load, not after them, when
    the grid forks its workers. Idempotent."""
    worker_context()
    multiprocessing.forkserver.ensure_running()
