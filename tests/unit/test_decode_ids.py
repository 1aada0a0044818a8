"""The decode instance's one-call-per-id rule, on its own logic (services/decode/instance.py): a second
Decode with the id of a running one is refused before it touches anything. Fuzzing found the engine
refused it, but the refused call's clean-up then dropped the first call's lease, so nobody renewed the
first request's placement while it decoded. The engine and kvstore are stand-ins exposing only what
the instance calls; the served path is tests/integration/test_fuzz.py's."""
from __future__ import annotations

import asyncio

import pytest

from common.engine.engine import StepOutput
from common.scheduler.request import FinishReason
from common.errors import InvalidRequestError
from common.metadata.types import GroupRange, Placement
from common.sampling_params import SamplingParams
from services.decode.instance import DecodeInstance, DecodeJob

PLACEMENT = Placement("r1", "decode-1", "127.0.0.1:1", (GroupRange(0, 0, 3, 1),), 3, 4, 5.0, epoch=7)


class _Engine:
    def __init__(self) -> None:
        self.outputs: asyncio.Queue = asyncio.Queue()

    def generate(self, prompt_ids, params, rid, **kwargs):
        async def stream():
            while True:
                out = await self.outputs.get()
                yield out
                if out.finish_reason is not None:
                    return
        return stream()


class _KVStore:
    async def get_placement(self, rid: str) -> Placement | None:
        return PLACEMENT if rid == PLACEMENT.request_id else None


def test_a_second_decode_with_a_running_id_is_refused_and_leaves_the_first_lease():
    async def main():
        engine = _Engine()
        inst = DecodeInstance("decode-1", engine, _KVStore(), kv_timeout_s=5.0)
        job = DecodeJob("r1", [1, 2, 3], SamplingParams(max_tokens=4), PLACEMENT, None)
        first = inst.decode(job)
        await engine.outputs.put(StepOutput("r1", 9, -0.1, 4, 3, None))
        assert (await first.__anext__()).token_id == 9
        assert "r1" in inst.leases

        with pytest.raises(InvalidRequestError, match="already running"):
            await inst.decode(job).__anext__()
        assert inst.leases.get("r1") == PLACEMENT          # still renewed for the first call

        await engine.outputs.put(StepOutput("r1", 10, -0.2, 5, 3, FinishReason.LENGTH))
        assert (await first.__anext__()).finish_reason == FinishReason.LENGTH
        with pytest.raises(StopAsyncIteration):
            await first.__anext__()
        assert "r1" not in inst.leases
        # the id is free again once its call ended
        again = inst.decode(job)
        await engine.outputs.put(StepOutput("r1", 11, -0.3, 4, 3, FinishReason.LENGTH))
        assert (await again.__anext__()).token_id == 11
        await again.aclose()

    asyncio.run(asyncio.wait_for(main(), 10))
