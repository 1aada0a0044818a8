"""The kvstore's prefix-cache index (common/metadata/prefix_index.py) and the instances' reporter
(common/prefix_report.py), against a real redis-server."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from common.kv_cache.block_pool import BlockPool
from common.kv_cache.prefix import extend_hashes
from common.metadata.prefix_index import PrefixIndex
from common.metadata.store import MetadataStore
from common.metadata.types import Instance, PrefixReport
from common.prefix_report import PrefixReporter


@pytest.fixture
def store(redis_url):
    s = MetadataStore(redis_url, deployment=f"t-{uuid.uuid4().hex[:12]}")
    yield s
    s.close()


@pytest.fixture
def index(store):
    return PrefixIndex(store)


def register(store, iid, ttl_s=30.0):
    store.register_instance(Instance(iid, "decode", "127.0.0.1:1", 4, 0, (64,)), ttl_s)


def chain(tokens, block_size=4, root=b"r" * 16):
    return extend_hashes([], root, block_size, len(tokens), lambda s, e: tokens[s:e])


def test_full_report_then_deltas_match_the_longest_prefix(store, index):
    register(store, "d0")
    register(store, "d1")
    doc = chain(list(range(40)))                       # 10 blocks
    assert index.apply("d0", PrefixReport(7, 1, True, tuple(doc)))
    assert index.apply("d1", PrefixReport(9, 1, True, tuple(doc[:3])))
    other = chain(list(range(40)) [:8] + [99] * 32)   # same first 2 blocks, then different
    assert index.match(doc) == {"d0": 10, "d1": 3}
    assert index.match(other) == {"d0": 2, "d1": 2}
    assert index.match(chain([5] * 8)) == {}
    assert index.match([]) == {}
    # d0 evicts the tail (the block pool evicts a table's tail first)
    assert index.apply("d0", PrefixReport(7, 2, False, (), tuple(doc[6:])))
    assert index.match(doc) == {"d0": 6, "d1": 3}
    assert index.held("d0") == set(doc[:6]) and index.holders(doc[7]) == set()
    # d1 caches more
    assert index.apply("d1", PrefixReport(9, 2, False, tuple(doc[3:8]), ()))
    assert index.match(doc) == {"d0": 6, "d1": 8}
    assert index.num_entries() == 14


def test_a_delta_that_does_not_follow_the_index_asks_for_a_resync(store, index):
    register(store, "d0")
    h = chain(list(range(16)))
    assert index.apply("d0", PrefixReport(1, 1, False, tuple(h))) is False       # no state: full first
    assert index.apply("d0", PrefixReport(1, 1, True, tuple(h[:2])))
    assert index.apply("d0", PrefixReport(1, 3, False, tuple(h[2:]))) is False   # seq 2 was missed
    assert index.apply("d0", PrefixReport(2, 2, False, tuple(h[2:]))) is False   # another epoch
    assert index.held("d0") == set(h[:2])                                         # nothing applied
    assert index.apply("d0", PrefixReport(2, 5, True, tuple(h[1:])))             # full: replaces
    assert index.held("d0") == set(h[1:]) and index.holders(h[0]) == set()
    assert index.apply("d0", PrefixReport(2, 6, False, (h[0],)))
    assert index.match(h) == {"d0": 4}
    assert index.apply("ghost", PrefixReport(1, 1, True, tuple(h))) is None      # not registered
    assert index.holders(h[0]) == {"d0"}


def test_leaving_and_expiring_instances_are_cleaned(store, index):
    register(store, "d0")
    register(store, "short", ttl_s=0.3)
    h = chain(list(range(12)))
    assert index.apply("d0", PrefixReport(1, 1, True, tuple(h)))
    assert index.apply("short", PrefixReport(1, 1, True, tuple(h)))
    assert index.match(h) == {"d0": 3, "short": 3}
    time.sleep(0.45)                                  # "short"'s registration expires
    assert index.match(h) == {"d0": 3}               # never returned once its registration is gone
    assert index.holders(h[0]) == {"d0", "short"}     # until the sweep
    assert index.sweep() == ["short"]
    assert index.holders(h[0]) == {"d0"} and index.held("short") == set()
    assert index.drop("d0") == 3
    assert all(index.holders(x) == set() for x in h) and index.num_entries() == 0
    assert index.sweep() == []


def test_concurrent_reports_and_matches_keep_the_two_views_equal(store, index):
    """Reports of several instances applied from threads while others match: every match sees whole
    reports (a holder's run is one of the lengths it reported), and at the end the per-hash and
    per-instance sets agree."""
    ids = [f"d{i}" for i in range(4)]
    for i in ids:
        register(store, i)
    h = chain(list(range(64)))                        # 16 blocks
    lengths = {i: set() for i in ids}
    errors = []

    def reporter(iid, k):
        seq = 1
        index.apply(iid, PrefixReport(k, seq, True, ()))
        lengths[iid].add(0)
        held = 0
        for step in range(30):
            n = (step * (k + 3)) % 17
            seq += 1
            added, evicted = tuple(h[held:n]), tuple(h[n:held])
            lengths[iid].add(n)
            if not index.apply(iid, PrefixReport(k, seq, False, added, evicted)):
                errors.append(f"{iid} refused seq {seq}")
            held = n

    def matcher():
        for _ in range(60):
            for iid, n in index.match(h).items():
                if n not in lengths[iid]:
                    errors.append(f"{iid} matched {n}, never reported")

    threads = [threading.Thread(target=reporter, args=(i, k + 1)) for k, i in enumerate(ids)]
    threads += [threading.Thread(target=matcher) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    for iid in ids:
        assert {x for x in h if iid in index.holders(x)} == index.held(iid)


def test_the_reporter_follows_a_block_pool_and_recovers_from_a_lost_reply(store, index):
    """The instance side: a real BlockPool with prefix caching, its names diffed into reports; a reply
    lost after the index applied a report makes the next delta a resync, never a wrong index."""
    register(store, "d0")
    pool = BlockPool(6, 4, prefix_caching=True, salt="m")
    snapshots = []
    rep = PrefixReporter(lambda: snapshots.append(1) or set(pool.by_hash), epoch=5,
                         version=lambda: (len(pool.by_hash), pool.evictions))

    def beat(lose_reply=False):
        r = rep.report()
        applied = index.apply("d0", r)
        if not lose_reply:
            rep.ack(r, resync=not applied)
        return applied

    def run(rid, tokens):
        hs = extend_hashes([], pool.hash_root, 4, len(tokens), lambda s, e: tokens[s:e])
        pool.allocate(rid, len(tokens))
        pool.register(rid, hs)
        pool.free(rid)
        return hs

    assert beat()                                     # full (empty)
    a = run("a", list(range(16)))                     # 4 named blocks, cached after the request
    assert beat() and index.match(a) == {"d0": 4}
    b = run("b", [7] * 12)                            # needs 3 blocks: 2 free, 1 evicted (a's tail)
    assert pool.evictions == 1
    assert beat(lose_reply=True)                      # applied, but the instance never heard
    assert index.match(a) == {"d0": 3} and index.match(b) == {"d0": 3}
    run("c", [8] * 8)                                 # evicts two more of a's blocks
    assert not beat()                                 # its delta does not follow: resync asked
    assert beat()                                     # the full report
    assert index.held("d0") == set(pool.by_hash)
    assert index.match(a) == {"d0": 1}
    taken = len(snapshots)
    assert beat() and index.held("d0") == set(pool.by_hash)      # empty delta: still in step
    assert len(snapshots) == taken                                # unchanged version: no snapshot taken


def test_a_large_cache_is_indexed_over_several_bounded_reports(store, index):
    register(store, "d0")
    names = set(chain(list(range(40))))                # 10 blocks
    rep = PrefixReporter(lambda: set(names), epoch=2, version=lambda: len(names), max_blocks=3)
    sizes = []
    for _ in range(4):
        r = rep.report()
        sizes.append(len(r.added) + len(r.evicted))
        rep.ack(r, resync=not index.apply("d0", r))
    assert sizes == [3, 3, 3, 1] and index.held("d0") == names
    r = rep.report()
    assert (r.added, r.evicted) == ((), ())                # in step: the snapshot is skipped
    rep.ack(r, resync=not index.apply("d0", r))
    gone = sorted(names)[:5]
    names.difference_update(gone)
    r = rep.report()
    assert r.evicted == tuple(gone[:3]) and not r.added    # evictions first, bounded too
    rep.ack(r, resync=not index.apply("d0", r))
    r = rep.report()
    rep.ack(r, resync=not index.apply("d0", r))
    assert index.held("d0") == names
