"""The router's watchdog on a Prefill stream before the first token: a prefill that keeps reporting
progress is followed however long it takes; one that goes silent for --progress-timeout-s is
cancelled and fails the request (long before the stream's request_timeout_s)."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from common.errors import ConfigError, WorkerFailedError
from services.router.config import RouterConfig
from services.router.router import Router


class Call:
    """A stream call stand-in: read() answers after the given delays, then never."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = list(delays)
        self.cancelled = False

    async def read(self):
        if not self.delays:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delays.pop(0))
        return "progress"

    def cancel(self) -> None:
        self.cancelled = True


def test_progress_keeps_a_long_prefill_alive_and_silence_fails_it():
    router = SimpleNamespace(config=RouterConfig(kvstore="k:1", progress_timeout_s=0.3))

    async def main():
        call = Call([0.2] * 5)                      # 1 s in all, never 0.3 s silent
        t0 = time.monotonic()
        for _ in range(5):
            assert await Router._read_progress(router, call, "prefill p") == "progress"
        assert time.monotonic() - t0 >= 1.0 and not call.cancelled
        t0 = time.monotonic()
        with pytest.raises(WorkerFailedError, match=r"prefill p reported no progress for 0.3 s"):
            await Router._read_progress(router, call, "prefill p")
        assert 0.3 <= time.monotonic() - t0 < 2.0 and call.cancelled

    asyncio.run(asyncio.wait_for(main(), 30))


def test_progress_timeout_zero_waits_and_negative_is_refused():
    assert RouterConfig(kvstore="k:1", progress_timeout_s=0).progress_timeout_s == 0
    with pytest.raises(ConfigError, match="progress_timeout_s must be >= 0"):
        RouterConfig(kvstore="k:1", progress_timeout_s=-1)
