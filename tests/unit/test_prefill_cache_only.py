"""A cache_only prefill needs the instance's prefix cache: without it, it is refused before the engine."""
import asyncio

import pytest

from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams
from services.prefill.instance import PrefillInstance, PrefillJob


def test_cache_only_without_prefix_caching_is_refused_and_forgotten():
    inst = PrefillInstance("p", engine=None, kv_timeout_s=1.0, prefix_caching=False)
    job = PrefillJob("r1", [1, 2, 3], SamplingParams(max_tokens=1), None, None)

    async def run():
        async for _ in inst.prefill(job):
            pass

    with pytest.raises(InvalidRequestError, match="without prefix caching"):
        asyncio.run(run())
    assert not inst.running and not inst.busy
