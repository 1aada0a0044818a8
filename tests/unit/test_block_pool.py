"""Block pool: allocation, growth, free, fork/refcounts, capacity errors, invariant checks."""
from __future__ import annotations

import copy
import random

import pytest

from common.errors import CapacityError
from common.kv_cache.block_pool import BlockPool


def snapshot(pool: BlockPool) -> tuple:
    return (list(pool.ref_counts), list(pool.free_ids), copy.deepcopy(pool.tables))


def test_allocate_grows_table_and_counts_blocks():
    pool = BlockPool(8, 4)
    assert pool.blocks_for(0) == 0 and pool.blocks_for(1) == 1 and pool.blocks_for(4) == 1
    assert pool.blocks_for(5) == 2
    t = pool.allocate("a", 5)                 # 2 blocks
    assert len(t) == 2 and pool.num_used == 2 and pool.num_free == 6
    pool.check()
    assert pool.allocate("a", 8) == t and len(t) == 2      # still fits: nothing new
    assert len(pool.allocate("a", 9)) == 3                   # one more block
    assert pool.allocate("a", 1) == pool.table("a")          # shrinking asks never free
    pool.check()
    assert pool.table("nobody") == []


def test_free_returns_blocks_and_is_idempotent():
    pool = BlockPool(4, 2)
    pool.allocate("a", 3)
    pool.allocate("b", 4)
    assert pool.num_free == 0
    assert pool.free("a") == 2
    pool.check()
    assert pool.free("a") == 0 and pool.free("unknown") == 0
    assert pool.free("b") == 2
    assert pool.num_used == 0 and pool.num_free == 4
    pool.check()


def test_capacity_error_leaves_state_unchanged():
    pool = BlockPool(4, 4)
    pool.allocate("a", 8)
    before = snapshot(pool)
    assert not pool.can_allocate("b", 9)
    with pytest.raises(CapacityError, match="needs 3 more blocks"):
        pool.allocate("b", 9)                 # new request: no empty table left behind
    assert snapshot(pool) == before and "b" not in pool.tables
    with pytest.raises(CapacityError):
        pool.allocate("a", 8 + 4 * 3)         # growing request: its table keeps its blocks
    assert snapshot(pool) == before
    pool.check()
    assert pool.can_allocate("a", 16) and pool.can_allocate("b", 8)


def test_fork_shares_blocks_with_reference_counts():
    pool = BlockPool(6, 4)
    src = list(pool.allocate("a", 8))
    shared = pool.fork("a", "b")
    assert shared == src and pool.num_used == 2
    assert all(pool.ref_counts[b] == 2 for b in src)
    pool.check()
    with pytest.raises(ValueError):
        pool.fork("a", "b")                   # destination already has blocks
    assert pool.free("a") == 0                # b still holds them
    pool.check()
    assert all(pool.ref_counts[b] == 1 for b in src)
    pool.allocate("b", 12)                    # b grows with a private block
    assert pool.num_used == 3
    assert pool.free("b") == 3 and pool.num_used == 0
    pool.check()


def test_fork_of_unknown_request_is_empty():
    pool = BlockPool(2, 4)
    assert pool.fork("nobody", "x") == []
    assert pool.free("x") == 0
    pool.check()


def test_check_detects_corruption():
    pool = BlockPool(4, 4)
    pool.allocate("a", 4)
    pool.ref_counts[pool.table("a")[0]] = 2
    with pytest.raises(AssertionError, match="reference counts"):
        pool.check()
    pool = BlockPool(4, 4)
    pool.allocate("a", 4)
    pool.free_ids.append(pool.table("a")[0])
    with pytest.raises(AssertionError):
        pool.check()
    pool = BlockPool(4, 4)
    pool.free_ids.append(0)
    with pytest.raises(AssertionError, match="twice"):
        pool.check()


@pytest.mark.parametrize("bad", [(0, 4), (4, 0), (-1, 4)])
def test_rejects_empty_pool(bad):
    with pytest.raises(ValueError):
        BlockPool(*bad)


def test_random_operations_keep_invariants():
    rng = random.Random(0)
    pool = BlockPool(32, 4)
    tokens: dict[str, int] = {}
    for step in range(2000):
        op = rng.random()
        rid = f"r{rng.randrange(12)}"
        if op < 0.5:
            n = tokens.get(rid, 0) + rng.randrange(1, 12)
            if pool.can_allocate(rid, n):
                pool.allocate(rid, n)
                tokens[rid] = n
            else:
                before = snapshot(pool)
                with pytest.raises(CapacityError):
                    pool.allocate(rid, n)
                assert snapshot(pool) == before
        elif op < 0.6 and rid in pool.tables:
            dst = f"f{step}"
            pool.fork(rid, dst)
            tokens[dst] = tokens[rid]
        else:
            pool.free(rid)
            tokens.pop(rid, None)
        pool.check()
        for r, n in tokens.items():
            assert len(pool.table(r)) == pool.blocks_for(n)
    for r in list(pool.tables):
        pool.free(r)
    pool.check()
    assert pool.num_used == 0 and pool.num_free == 32


def _runs(table: list[int]) -> int:
    return 1 + sum(b != a + 1 for a, b in zip(table, table[1:]))


def test_one_allocation_gets_its_blocks_in_id_order():
    """free() releases a table's tail first, so a later request takes those blocks descending; each
    allocation sorts what it takes: a 3-block chunk is one run of consecutive blocks."""
    pool = BlockPool(16, 4)
    pool.allocate("keep", 4)                      # the pool is not idle: no reordering on free
    pool.allocate("a", 24)                        # blocks 1..6
    pool.free("a")                                # free list: 7..15, then 6, 5, ..., 1
    pool.allocate("b", 36)                        # 9 blocks: 7..15
    assert pool.table("b") == list(range(7, 16))
    pool.allocate("b", 48)                        # 3 more, taken as 6, 5, 4
    assert pool.table("b")[9:] == [4, 5, 6]
    pool.check()


def test_an_idle_pool_hands_out_consecutive_blocks_after_a_calibration_churn():
    """A pool's start-up calibration allocates a block at a time for interleaved sequences and frees
    them: when no table is left, the free list is put back in id order, so the next long prompt gets
    one run of consecutive blocks (before: one run per block, gathered for every chunk)."""
    pool = BlockPool(64, 4)
    for k in range(1, 9):                         # as common/engine/profile.py does
        for rid in ("p0", "p1", "spacer"):
            pool.allocate(rid, 4 * k)
    pool.free("spacer")
    pool.free("p1")
    assert _runs(list(pool.free_ids)) > 8         # not idle yet: tails first, scattered
    pool.free("p0")
    assert list(pool.free_ids) == list(range(64))
    table = []
    for n in range(16, 257, 16):                  # a long prompt, chunk by chunk
        table = pool.allocate("long", n)
    assert table == list(range(64))
    pool.check()


def test_idle_reordering_leaves_cached_prefix_blocks_alone():
    """With prefix caching, freed named blocks stay in the LRU cache (reclaimable, in eviction order);
    only the free list is reordered."""
    pool = BlockPool(8, 2, prefix_caching=True)
    pool.allocate("a", 6)
    pool.register("a", [b"h1", b"h2"])
    pool.free("a")                                # blocks 0, 1 named, 2 not; the tail goes first
    assert list(pool.cached) == [1, 0]            # evicted 1 before 0: the prefix outlives its tail
    assert list(pool.free_ids) == [2, 3, 4, 5, 6, 7]   # was 3..7, 2
    assert pool.acquire("b", [b"h1", b"h2"]) == 2
    pool.check()


def test_quarantined_blocks_never_come_back_free_cached_or_shared():
    """A block a late KV write may land in leaves circulation for good: a free one at once, a cached
    (named) one with its name, a referenced one when its last holder frees it; the pool's counts and
    invariants hold, and nothing later is handed one of them."""
    from common.kv_cache.prefix import extend_hashes
    pool = BlockPool(8, 4, prefix_caching=True)
    ids = list(range(12))
    hashes = extend_hashes([], pool.hash_root, 4, 12, lambda a, b: ids[a:b])
    a = list(pool.allocate("a", 12))                 # blocks 0-2, named
    pool.register("a", hashes)
    b = list(pool.allocate("b", 8))                  # blocks 3-4, referenced
    pool.free("a")                                   # 0-2 cached
    assert pool.num_cached == 3
    assert pool.quarantine([a[1], b[0], 7]) == 3 and pool.quarantine([7]) == 0
    pool.check()
    assert pool.num_cached == 2 and pool.num_quarantined == 3 and pool.num_free == 4   # 0, 2 cached; 5, 6 free
    assert pool.lookup(hashes) == 1                  # the name of a[1] is gone: the prefix stops there
    assert pool.free("b") == 1                       # b[1] comes back, b[0] does not
    pool.check()
    assert pool.num_used == 3 and pool.num_free == 5
    got = pool.allocate("c", 20)                     # everything that is left
    assert not set(got) & {a[1], b[0], 7} and len(got) == 5
    with pytest.raises(CapacityError):
        pool.allocate("d", 1)
    pool.free("c")
    pool.check()
    assert pool.num_free == 5 and sorted(pool.free_ids) == sorted(set(range(8)) - {a[1], b[0], 7})


def test_drop_names_forgets_every_name_and_frees_the_cached_blocks():
    """A pool whose worker was replaced: its cached blocks go back to the free list, no name is left
    to serve a prefix from, and the invariants hold."""
    pool = BlockPool(8, 4, prefix_caching=True)
    names = [bytes([i]) * 16 for i in range(3)]
    pool.allocate("a", 12)
    pool.register("a", names)
    pool.free("a")
    pool.quarantine([7])
    assert pool.num_cached == 3
    assert pool.drop_names() == 3
    assert pool.num_cached == 0 and pool.num_free == 7 and pool.lookup(names) == 0
    pool.check()
