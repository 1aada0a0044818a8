"""What an instance heartbeats (common/pool_load.py LoadSampler, common/client.py Membership): the
engine's stats and counters as a LoadReport, the recent mean iteration time, and a heartbeat with
the load at registration and then every interval. No engine, no kvstore: fakes."""
from __future__ import annotations

import asyncio

import pytest

from common.client import Membership
from common.engine.engine import EngineStats
from common.errors import PlacementError
from common.metadata.types import Instance, LoadReport
from common.pool_load import LoadSampler

IDLE = EngineStats(total_blocks=(100, 100), free_blocks=(100, 100))
BUSY = EngineStats(running=2, waiting=1, total_blocks=(100, 100), free_blocks=(60, 90),
                   queued_prefill_tokens=300, running_decodes=1, model_scale=1.25)


def test_the_report_holds_the_gauges_admission_reads():
    r = LoadSampler(16, 4096).sample(3, BUSY, (0.0, 0))
    assert r == LoadReport(active_requests=3, queued_prefill_tokens=300, running_decodes=1,
                           kv_free_blocks=(60, 90), kv_used_blocks=(40, 10), kv_block_size=16,
                           kvp_tokens=4096, iteration_s=None, model_scale=1.25)
    assert LoadSampler(16, 0).sample(0, IDLE, (0.0, 0)).model_scale is None      # no online model


def test_iteration_time_is_the_mean_since_the_last_heartbeat():
    s = LoadSampler(16, 0)
    assert s.sample(0, IDLE, (0.0, 0)).iteration_s is None                      # nothing measured
    assert s.sample(1, BUSY, (0.3, 3)).iteration_s == pytest.approx(0.1)
    assert s.sample(1, BUSY, (0.9, 5)).iteration_s == pytest.approx(0.3)        # (0.9 - 0.3) / 2
    # one long iteration still under way: the last mean holds while busy
    assert s.sample(1, BUSY, (0.9, 5)).iteration_s == pytest.approx(0.3)
    assert s.sample(0, IDLE, (0.9, 5)).iteration_s is None                      # idle: unknown
    # a rebuilt engine counts from zero again
    assert s.sample(1, BUSY, (0.05, 1)).iteration_s == pytest.approx(0.05)


class FakeKVStore:
    address = "fake:1"

    def __init__(self, expire_once: bool = False):
        self.beats: list[tuple[str, tuple[int, ...], LoadReport | None]] = []
        self.registered = 0
        self.expire_once = expire_once

    async def register(self, inst: Instance) -> float:
        self.registered += 1
        return 3.0                                   # the kvstore asks for a third of a 9 s TTL

    async def heartbeat(self, instance_id, free, load=None, prefix=None):
        if self.expire_once:
            self.expire_once = False
            raise PlacementError("expired")
        self.beats.append((instance_id, free, load))
        return False

    async def deregister(self, instance_id):
        pass


def test_membership_heartbeats_the_load_at_once_and_every_interval():
    load = LoadReport(running_decodes=2)

    async def run():
        kv = FakeKVStore()
        m = Membership(kv, lambda: Instance("p0", "prefill", "h:1"), lambda: (), lambda: load, max_interval_s=0.05)
        await m.start()
        assert kv.beats == [("p0", (), load)]                   # before the instance serves
        await asyncio.sleep(0.18)
        await m.stop()
        assert m.interval_s == 0.05 and 3 <= len(kv.beats) <= 5
        assert all(b[2] == load for b in kv.beats)

    asyncio.run(run())


def test_membership_registers_again_when_its_registration_expired():
    async def run():
        kv = FakeKVStore(expire_once=True)
        m = Membership(kv, lambda: Instance("p0", "prefill", "h:1"), max_interval_s=0.02)
        await m.start()
        assert kv.registered == 2 and kv.beats == []
        await asyncio.sleep(0.05)
        await m.stop()
        assert kv.beats and kv.beats[0] == ("p0", (), None)

    asyncio.run(run())


def test_a_heartbeat_at_a_request_end_goes_at_once_and_shares_one_under_way():
    """beat_now: a heartbeat now (not at the end of a 10 s interval), returned once sent; requests
    that end before a heartbeat begins share it, one that ends while it is under way gets the next;
    no heartbeat before start or after stop."""
    class Slow(FakeKVStore):
        async def heartbeat(self, instance_id, free, load=None, prefix=None):
            await asyncio.sleep(0.05)                    # one round trip to the kvstore
            return await super().heartbeat(instance_id, free, load, prefix)

    async def run():
        kv = Slow()
        m = Membership(kv, lambda: Instance("p0", "prefill", "h:1"), max_interval_s=10.0)
        await m.beat_now()
        assert kv.beats == []                            # not started: nothing to send
        await m.start()
        assert len(kv.beats) == 1
        await m.beat_now()
        assert len(kv.beats) == 2                        # sent, and done when it returns
        await asyncio.gather(m.beat_now(), m.beat_now(), m.beat_now())
        assert len(kv.beats) == 3                        # three ends before it began: one heartbeat
        first = asyncio.create_task(m.beat_now())
        await asyncio.sleep(0.02)                        # under way: an end now needs one more
        await asyncio.gather(first, m.beat_now())
        assert len(kv.beats) == 5
        await m.stop()
        await m.beat_now()
        assert len(kv.beats) == 5

    asyncio.run(run())


def test_a_failed_heartbeat_at_a_request_end_is_logged_not_raised(caplog):
    """The request that ended has already streamed its answer: a heartbeat that breaks (a bug, not a
    kvstore error, which the heartbeat handles itself) must not turn it into an error."""
    class Broken(FakeKVStore):
        async def heartbeat(self, instance_id, free, load=None, prefix=None):
            if self.beats:
                raise RuntimeError("broken")
            return await super().heartbeat(instance_id, free, load, prefix)

    async def run():
        m = Membership(Broken(), lambda: Instance("p0", "prefill", "h:1"), max_interval_s=10.0)
        await m.start()
        await m.beat_now()
        await m.stop()

    with caplog.at_level("ERROR"):
        asyncio.run(run())
    assert "heartbeat at a request's end failed" in caplog.text
