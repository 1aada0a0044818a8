"""glibc's allocator kept from returning a CPU engine's working memory to the kernel between ops.

Every torch op on the CPU allocates its output; a prefill chunk's activations are megabytes each
([1024, 1536] float32 is 6 MB). glibc serves such sizes with mmap, or from the heap and then trims
the heap's free top back to the kernel, so the next op's output is fresh pages again, each a page
fault on first touch. Under a hypervisor that is expensive: the elementwise steps of 30 layers of a
1K-token chunk (RMSNorm, RoPE, SiLU-and-multiply, residual sums) took 650-700 ms with ~160,000
minor faults and 178-370 ms with ~1,000 once the allocator keeps its memory
(bench/results/host_memory.md has the engine's prefill and decode both ways).

`tune()` sets glibc's mmap threshold to MMAP_THRESHOLD (allocations below it come from the heap
and are reused) and its trim threshold to TRIM_THRESHOLD (free memory up to it stays mapped): a
process keeps up to that much of its peak transient memory, the usual trade of a serving allocator.
Called once when a CPU model is built (common/parallel/tp.py build_shard: the local engine and every
grid worker); a no-op off glibc, and where MNEMOSYNE_HOST_MALLOC=0 (a process-wide variable) leaves
the allocator as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # glibc's mallopt parameters
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30

_done: list[bool] = []


def tune() -> bool:
    """Sets the thresholds once per process; True where they are set (now or before)."""
    if _done:
        return _done[0]
    ok = False
    if os.environ.get("MNEMOSYNE_HOST_MALLOC", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError):        # not glibc: its allocator as it is
            ok = False
        log.debug("host allocator thresholds %s", "set" if ok else "left as they are")
    _done.append(ok)
    return ok
