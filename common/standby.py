"""A service process kept ready by make up's supervisor (scripts/supervisor.py): started with
MNEMOSYNE_STANDBY_PROCESS=1 and its service's arguments, it imports what the service needs (torch and the
engine for a pool: ~2 s on this machine, more while the machine is busy), then waits. When the
process it stands in for exits, the supervisor writes "go" on its stdin and it starts at once: a
restart costs the service's own start (model mapped, engine built, registration), not the
interpreter's imports. Any other line, or the end of stdin (the launcher gone, the cluster
stopping), makes it exit without starting.

Like MNEMOSYNE_LAUNCHER_PID, the variable is the launcher's protocol with its processes, not a
setting (common/flags.py RESERVED_ENV).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

STANDBY_ENV = "MNEMOSYNE_STANDBY_PROCESS"
GO = "go"


def standing_by() -> bool:
    return os.environ.get(STANDBY_ENV) == "1"


def hold(preload: Callable[[], object], name: str) -> None:
    """In a standby process: `preload()` (the imports), then block until the supervisor's "go";
    exits the process on anything else. Elsewhere: returns at once."""
    if not standing_by():
        return
    preload()
    os.environ.pop(STANDBY_ENV, None)                 # not inherited by what this process starts
    print(f"{name} standing by (pid {os.getpid()})", flush=True)
    line = sys.stdin.readline()
    if line.strip() != GO:
        raise SystemExit(0)
    print(f"{name} taking over at {time.strftime('%H:%M:%S')}", flush=True)
