"""The router's lease keeper (no gRPC, no kvstore): a lost lease fails the request at once, with
its reason, instead of letting the prefill run to a Decode call the decode instance must refuse."""
from __future__ import annotations

import asyncio

from common.errors import PlacementError
from common.metadata.types import GroupRange, Placement
from common.sampling_params import SamplingParams
from services.router.config import RouterConfig
from services.router.frontend import Job
from services.router.router import Router, _Active


EPOCH = 7
PLACEMENT = Placement("r1", "decode-1", "127.0.0.1:1", (GroupRange(0, 0, 3, 1),), 3, 2, 0.15, epoch=EPOCH)


class FakeKVStore:
    def __init__(self, renewals: int) -> None:
        self.renewals = renewals                  # how many succeed before the placement is gone

    async def renew(self, rid: str, epoch: int = 0) -> int:
        assert epoch == EPOCH, epoch                  # renewals carry the placement's epoch
        if self.renewals <= 0:
            raise PlacementError(f"no placement for request {rid}")
        self.renewals -= 1
        return 0


class FakeCall:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def keep(renewals: int, reason: str | None = None) -> tuple[_Active, FakeCall]:
    st = _Active(Job("r1", [1, 2, 3], SamplingParams(max_tokens=2), False))
    st.placement = PLACEMENT
    st.reason, call = reason, FakeCall()
    st.calls.append(call)
    router = Router(RouterConfig(kvstore="127.0.0.1:1"), None, FakeKVStore(renewals), discovery=object())
    asyncio.run(asyncio.wait_for(router._keep_lease(st, 0.15), 5))
    return st, call


def test_a_lost_lease_fails_the_request_and_cancels_its_calls():
    st, call = keep(renewals=2)
    assert isinstance(st.failure, PlacementError) and "lease" in str(st.failure)
    assert call.cancelled


def test_a_lease_lost_after_the_decode_finished_fails_nothing():
    st, call = keep(renewals=0, reason="length")
    assert st.failure is None and not call.cancelled
