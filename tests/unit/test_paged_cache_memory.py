"""The CPU KV cache starts as zeros without writing them: its memory is taken as KV is written."""
import psutil
import torch

from common.kv_cache.paged import PagedKVCache


def test_a_large_cache_costs_no_memory_until_written_and_reads_zeros():
    rss = psutil.Process().memory_info().rss
    cache = PagedKVCache(range(4), 16384, 16, 2, 64, torch.float32)          # 1 GiB
    assert cache.data.numel() * 4 == 1 << 30
    assert psutil.Process().memory_info().rss - rss < 64 << 20
    k = cache.k(2)
    assert float(k[1000].abs().sum()) == 0.0 and float(cache.v(3)[16383].abs().sum()) == 0.0
    slots = torch.tensor([5, 16 * 9000 + 3])
    kv = torch.randn(2, 2, 64)
    cache.write(1, slots, kv, -kv)
    assert torch.equal(cache.k(1).view(-1, 2, 64)[slots], kv)
    assert torch.equal(cache.v(1).view(-1, 2, 64)[slots], -kv)
    assert psutil.Process().memory_info().rss - rss < 64 << 20                # two pages touched


def test_the_cache_outlives_its_owner_through_views_in_every_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        cache = PagedKVCache(range(2, 4), 8, 16, 1, 16, dtype)
        assert cache.data.dtype is dtype and cache.data.shape == (2, 2, 8, 16, 1, 16)
        k = cache.k(3)
        del cache
        k[7, 15] = 1.5                      # the memory stays mapped while a view of it lives
        assert float(k.float().sum()) == 1.5 * 16
