"""Every service reports its peak resident memory and its largest child's (a pool's grid workers)."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

from prometheus_client import generate_latest

from common.metrics import Metrics, child_pids, new_registry, peak_rss_bytes

MB = 1 << 20


def _sample(registry, process: str) -> float:
    for family in registry.collect():
        if family.name == "mnemosyne_process_peak_rss_bytes":
            for s in family.samples:
                if s.labels.get("process") == process:
                    return s.value
    raise AssertionError(f"no peak RSS sample for process={process}")


def test_peak_rss_of_this_process_and_of_its_largest_child():
    registry = new_registry()
    Metrics(registry, role="prefill", instance="p0")
    assert b"mnemosyne_process_peak_rss_bytes" in generate_latest(registry)
    assert _sample(registry, "main") >= 10 * MB
    before = _sample(registry, "workers")
    # Started from another thread, as a pool's engine thread starts its grid workers.
    started: list[subprocess.Popen] = []
    checked = threading.Event()                 # the thread lives on (its child stays its own) until then
    thread = threading.Thread(target=lambda: started.append(subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(150 << 20); "
                              "b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)) or checked.wait(30))
    thread.start()
    while not started:
        time.sleep(0.01)
    [child] = started
    try:
        assert child.stdout.readline().strip() == "ready"
        assert child.pid in child_pids()
        assert peak_rss_bytes(child.pid) >= 150 * MB
        assert _sample(registry, "workers") >= max(before, 150 * MB)
    finally:
        checked.set()
        thread.join()
        child.kill()
        child.wait(10)
    time.sleep(0.05)
    assert peak_rss_bytes(child.pid) == 0                # gone: nothing to read
