"""A pool's main starts its grid's forkserver before it imports torch (common/pool_config.py
start_worker_server), so the forkserver's own imports run beside the main's: checked in a fresh
interpreter, as `python -m services.decode` starts."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import os, sys
    from common.pool_config import start_worker_server
    from services.decode.config import DecodeConfig
    from services.prefill.config import PrefillConfig

    def forkservers():
        me, out = str(os.getpid()), []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                cmd = open(f"/proc/{pid}/cmdline").read()
            except OSError:
                continue
            if stat[1] == me and "forkserver" in cmd:
                out.append(pid)
        return out

    base = ["--kvstore", "127.0.0.1:1"]
    assert not start_worker_server(DecodeConfig, base)                    # one process: no grid
    assert not start_worker_server(DecodeConfig, base + ["--no-such-flag"])  # left to the real parse
    assert not start_worker_server(PrefillConfig, base + ["--spp", "0"])
    assert not forkservers()
    assert start_worker_server(DecodeConfig, base + ["--kvp", "2", "--kvp-tokens", "1024"])
    assert "torch" not in sys.modules, "started after torch was imported"
    assert len(forkservers()) == 1
    assert start_worker_server(PrefillConfig, base + ["--spp", "2"])        # idempotent: the same one
    assert len(forkservers()) == 1
    print("ok")
""")


def test_a_grid_pool_starts_its_forkserver_before_importing_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
