"""AsyncEngine: its KV watches when their waiter leaves: a prefill request whose client cancels (or whose
wait times out) while its KV is in flight must not fail the engine when the transfer then finishes;
and a decode reservation shows in the engine's load as soon as it is made.

The engine here is a stand-in exposing only what the watch logic touches (pure thread/future logic);
the served path is covered by tests/integration/test_router.py and test_faults.py on real services."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from common.engine.async_engine import AsyncEngine
from common.engine.engine import EngineStats
from common.errors import KVTransferError


class _KVEngine:
    def __init__(self) -> None:
        self.state: dict[str, str] = {}
        self.progress: dict[str, float] = {}          # rid -> last KV progress (time.monotonic())
        self.lock = threading.Lock()

    def stats(self) -> EngineStats:
        return EngineStats()

    def has_unfinished(self) -> bool:
        return False

    def check_alive(self) -> list:
        return []

    def step(self) -> list:
        return []

    def kv_status(self, rid: str) -> tuple[str, str]:
        with self.lock:
            return self.state.get(rid, "pending"), ""

    def kv_progress(self, rid: str) -> float | None:
        with self.lock:
            return self.progress.get(rid)

    def abort(self, rid: str) -> bool:
        return False

    def shutdown(self) -> None:
        pass


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.mark.parametrize("leave", ["cancel", "timeout"])
def test_kv_finishing_after_its_waiter_left_does_not_fail_the_engine(leave):
    fake = _KVEngine()

    async def main():
        ae = await AsyncEngine.start(lambda: fake, name="prefill-engine")
        try:
            if leave == "cancel":
                task = asyncio.create_task(ae.wait_kv("r1", timeout_s=60))
                await asyncio.sleep(0.05)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                ae_wait = ae.wait_kv("r1", timeout_s=0.0)
                # the engine-side deadline (0 s) answers first: a KVTransferError, not a hang
                with pytest.raises(KVTransferError):
                    await ae_wait
            with fake.lock:
                fake.state["r1"] = "done"        # the transfer completes after the waiter left
            await asyncio.sleep(0.1)              # several engine iterations
            assert ae.failed is None
            # the engine still answers, and a new watch still resolves
            with fake.lock:
                fake.state["r2"] = "done"
            await ae.wait_kv("r2", timeout_s=5)
            assert await ae.call(lambda e: len(ae._watches)) == 0
        finally:
            await ae.shutdown()

    _run(main())


def test_a_watch_settled_while_its_waiter_cancels_is_not_an_engine_fault():
    """The race itself: the loop cancels the future between the engine's check and its set."""
    fake = _KVEngine()

    async def main():
        ae = await AsyncEngine.start(lambda: fake, name="prefill-engine")
        try:
            for i in range(50):
                rid = f"r{i}"
                task = asyncio.create_task(ae.wait_kv(rid, timeout_s=60))
                await asyncio.sleep(0.002)
                with fake.lock:
                    fake.state[rid] = "done"
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            t0 = time.monotonic()
            while time.monotonic() - t0 < 0.2:
                await asyncio.sleep(0.01)
            assert ae.failed is None
        finally:
            await ae.shutdown()

    _run(main())


def test_kv_that_keeps_moving_is_waited_for_and_a_stalled_one_fails_fast():
    """The timeout counts from the last confirmed chunk: 1 s of tail with a chunk every 0.1 s passes
    a 0.3 s timeout; a tail that stops fails about 0.3 s after it stopped."""
    fake = _KVEngine()

    async def tail(rid: str, seconds: float, then: str | None) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with fake.lock:
                fake.progress[rid] = time.monotonic()
            await asyncio.sleep(0.1)
        if then:
            with fake.lock:
                fake.state[rid] = then

    async def main():
        ae = await AsyncEngine.start(lambda: fake, name="prefill-engine")
        try:
            t0 = time.monotonic()
            mover = asyncio.create_task(tail("long", 1.0, "done"))
            await ae.wait_kv("long", timeout_s=0.3)
            assert time.monotonic() - t0 >= 1.0
            await mover
            staller = asyncio.create_task(tail("stalls", 0.5, None))
            t0 = time.monotonic()
            with pytest.raises(KVTransferError, match="nothing new for 0.3 s"):
                await ae.wait_kv("stalls", timeout_s=0.3)
            assert 0.7 <= time.monotonic() - t0 < 3.0
            await staller
        finally:
            await ae.shutdown()

    _run(main())


class _PrepEngine(_KVEngine):
    """prepare_receive reserves 4 of 10 blocks; the next step blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.free = 10
        self.prepared = False
        self.release = threading.Event()

    def stats(self) -> EngineStats:
        return EngineStats(total_blocks=(10,), free_blocks=(self.free,))

    def prepare_receive(self, rid, num_tokens, max_new_tokens, epoch, prompt_ids=None):
        self.free -= 4
        self.prepared = True
        return []

    def has_unfinished(self) -> bool:
        return self.prepared

    def check_alive(self) -> list:
        return []

    def step(self) -> list:
        self.release.wait(10)
        return []


def test_a_reservation_shows_in_the_load_when_prepare_receive_returns():
    """Stats (what heartbeats and admission read) count a prepared request's blocks at once, not after
    the engine's next iteration (which may be long: here it waits)."""
    fake = _PrepEngine()

    async def main():
        ae = await AsyncEngine.start(lambda: fake, name="decode-engine")
        try:
            assert ae.stats.free_blocks == (10,)
            await ae.prepare_receive("r1", 40, 4, epoch=3)
            assert ae.stats.free_blocks == (6,)
        finally:
            fake.release.set()
            await ae.shutdown()

    _run(main())
