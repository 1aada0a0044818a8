"""The KVP partial-result buffer (common/parallel/worker.py pack_partials / unpack_partials): one
all-gather per layer carries out and lse, and both come back bit for bit."""
from __future__ import annotations

import pytest
import torch

from common.attention.merge import merge_stacked
from common.parallel.worker import pack_partials, unpack_partials


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("t,h,d", [(1, 9, 64), (7, 3, 5), (0, 4, 8)])
def test_round_trip_is_bitwise(dtype, t, h, d):
    g = torch.Generator().manual_seed(t + h)
    outs = [torch.randn(t, h, d, generator=g).to(dtype) for _ in range(3)]
    lses = [torch.randn(t, h, generator=g) for _ in range(3)]
    lses[1][..., :1] = float("-inf")                               # an empty row of one shard
    packed = torch.stack([pack_partials(o, l) for o, l in zip(outs, lses)])   # what all_gather stacks
    assert packed.shape == (3, t, h * d + h)
    o, l = unpack_partials(packed, h, dtype)
    assert o.dtype == dtype and o.shape == (3, t, h, d) and l.shape == (3, t, h)
    assert torch.equal(o, torch.stack(outs))
    assert torch.equal(l.float(), torch.stack(lses))
    # and the merge sees exactly what the two-gather version gave it
    mo, ml = merge_stacked(o, l)
    ro, rl = merge_stacked(torch.stack(outs), torch.stack(lses))
    assert torch.equal(mo, ro) and torch.equal(ml, rl)
