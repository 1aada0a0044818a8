"""Prefix caching's bookkeeping without a model: hash chains, the block pool's named blocks (shared
references, LRU cache of unreferenced ones, eviction never of a block in use, `check()`), the KVP
manager's mapping of a cached prefix onto groups, and the scheduler starting after a cached prefix."""
from __future__ import annotations

import random

import pytest

from common.config import SchedulerConfig
from common.kv_cache.block_pool import BlockPool
from common.kv_cache.kvp_blocks import KVPBlockManager
from common.kv_cache.prefix import block_hash, extend_hashes, root_hash
from common.sampling_params import SamplingParams
from common.scheduler.request import Request
from common.scheduler.scheduler import Scheduler, SchedulerOutput

BS = 4


def hashes(tokens: list[int], bs: int = BS, root: bytes | None = None) -> list[bytes]:
    return extend_hashes([], root or root_hash(f"|block_size={bs}"), bs, len(tokens),
                         lambda a, b: tokens[a:b])


# ---- hashes ------------------------------------------------------------------------------------------
def test_hash_chain_names_a_block_by_everything_before_it():
    a, b = list(range(12)), list(range(12))
    b[1] = 99                                        # differs in block 0 only
    ha, hb = hashes(a), hashes(b)
    assert len(ha) == 3 and len(set(ha)) == 3
    assert all(x != y for x, y in zip(ha, hb))       # every later block differs too (chained)
    assert hashes(a[:11]) == ha[:2]                  # a partial block has no name
    assert hashes(a, root=root_hash("other model")) != ha
    assert block_hash(ha[0], a[4:8]) == ha[1]
    assert hashes(list(range(1000, 1012))) != ha


# ---- block pool ------------------------------------------------------------------------------------
def filled(pool: BlockPool, rid: str, tokens: list[int]) -> list[bytes]:
    """A request that computed `tokens`: blocks allocated and its full ones named."""
    h = hashes(tokens, pool.block_size)
    pool.allocate(rid, len(tokens))
    pool.register(rid, h)
    pool.check()
    return h


def test_finished_blocks_stay_cached_and_a_new_request_shares_them():
    pool = BlockPool(8, BS, prefix_caching=True)
    h = filled(pool, "a", list(range(10)))            # 3 blocks, 2 full (named)
    table = list(pool.table("a"))
    assert pool.free("a") == 3
    assert pool.num_cached == 2 and pool.num_free == 8 and pool.num_used == 0
    pool.check()
    assert pool.lookup(h) == 2 and pool.lookup(hashes(list(range(1, 9)))) == 0
    assert pool.acquire("b", h) == 2 and pool.table("b") == table[:2]
    assert pool.num_cached == 0 and pool.num_used == 2 and pool.ref_counts[table[0]] == 1
    assert pool.acquire("c", h[:1]) == 1 and pool.ref_counts[table[0]] == 2     # shared while live
    pool.check()
    pool.free("b")
    assert pool.num_cached == 1 and pool.ref_counts[table[0]] == 1              # c still holds block 0
    pool.free("c")
    assert pool.num_cached == 2
    pool.check()


def test_eviction_takes_the_least_recently_used_and_never_a_block_in_use():
    pool = BlockPool(6, BS, prefix_caching=True)
    ha = filled(pool, "a", list(range(8)))            # 2 named blocks
    hb = filled(pool, "b", list(range(100, 108)))     # 2 named blocks
    pool.free("a")                                    # a's blocks cached first (least recent)
    assert pool.acquire("c", ha) == 2                 # ... and in use again
    pool.free("b")
    in_use = set(pool.table("c"))
    pool.allocate("d", 3 * BS)                        # 2 free + 1 evicted: b's tail block
    assert not in_use & set(pool.table("d")) and pool.evictions == 1
    assert pool.lookup(hb) == 1 and pool.lookup(ha) == 2
    pool.check()
    pool.allocate("e", BS)                            # evicts b's head
    assert pool.lookup(hb) == 0 and pool.evictions == 2
    with pytest.raises(Exception):                    # only c's blocks are left, and they are in use
        pool.allocate("f", BS)
    assert pool.lookup(ha) == 2 and set(pool.table("c")) == in_use
    pool.check()


def test_register_keeps_the_first_block_of_a_name_and_counts_cached_blocks_as_free():
    pool = BlockPool(4, BS, prefix_caching=True)
    tokens = list(range(8))
    filled(pool, "a", tokens)
    filled(pool, "b", tokens)                         # computed the same blocks concurrently
    assert len(pool.block_hash) == 2 and set(pool.by_hash.values()) == set(pool.table("a"))
    assert pool.can_allocate("x", 1) is False
    pool.free("b")                                    # b's copies are unnamed: plain free blocks
    assert pool.num_cached == 0 and pool.num_free == 2
    pool.free("a")
    assert pool.num_cached == 2 and pool.num_free == 4 and pool.can_allocate("x", 4 * BS)
    pool.check()


def test_check_detects_a_corrupt_cache():
    pool = BlockPool(4, BS, prefix_caching=True)
    filled(pool, "a", list(range(8)))
    pool.free("a")
    block = next(iter(pool.cached))
    pool.free_ids.append(block)                       # both free and cached
    with pytest.raises(AssertionError):
        pool.check()
    pool.free_ids.pop()
    pool.ref_counts[block] = 1                        # referenced while in the cache
    with pytest.raises(AssertionError):
        pool.check()
    pool.ref_counts[block] = 0
    del pool.by_hash[pool.block_hash[block]]          # names not one-to-one
    with pytest.raises(AssertionError):
        pool.check()


def test_caching_off_names_nothing():
    pool = BlockPool(4, BS)
    h = filled(pool, "a", list(range(8)))
    pool.free("a")
    assert pool.num_cached == 0 and pool.lookup(h) == 0 and pool.acquire("b", h) == 0
    pool.check()


def test_random_operations_keep_the_cache_consistent():
    rng = random.Random(0)
    pool = BlockPool(16, BS, prefix_caching=True)
    docs = [[rng.randrange(50) for _ in range(24)] for _ in range(3)]
    live: dict[str, list[int]] = {}
    for i in range(400):
        if live and rng.random() < 0.4:
            rid = rng.choice(list(live))
            pool.free(rid)
            del live[rid]
        else:
            rid = f"r{i}"
            tokens = rng.choice(docs)[:rng.randrange(1, 25)] + [rng.randrange(50) for _ in range(rng.randrange(6))]
            h = hashes(tokens)
            k = pool.acquire(rid, h[:(len(tokens) - 1) // BS])
            if not pool.can_allocate(rid, len(tokens)):
                pool.free(rid)
                continue
            pool.allocate(rid, len(tokens))
            assert all(pool.by_hash[x] == b for x, b in zip(h[:k], pool.table(rid)))
            pool.register(rid, h)
            live[rid] = tokens
        pool.check()
        for rid, tokens in live.items():              # a live request's named blocks keep their names
            for x, b in zip(hashes(tokens), pool.table(rid)):
                assert pool.block_hash.get(b, x) == x


# ---- KVP groups ---------------------------------------------------------------------------------------
def test_a_cached_prefix_spans_kvp_groups_like_a_live_one():
    """M = 8 tokens per group, blocks of 4: global block j lives in group j // 2."""
    m = KVPBlockManager(3, 8, 6, BS, prefix_caching=True)
    tokens = list(range(22))                          # groups hold 8, 8, 6 tokens
    h = extend_hashes([], m.hash_root, BS, 22, lambda a, b: tokens[a:b])
    assert len(h) == 5
    m.allocate("a", 22)
    m.register("a", h)
    tables = m.table("a")
    m.check()
    m.free("a")
    assert m.num_cached == 5 and m.num_free == m.num_blocks
    follow = tokens + [7, 7]
    hf = extend_hashes([], m.hash_root, BS, len(follow) - 1, lambda a, b: follow[a:b])
    assert m.lookup(hf) == 5 and m.acquire("b", hf) == 5
    assert m.table("b") == [tables[0], tables[1], tables[2][:1]]   # the same blocks, group by group
    m.allocate("b", len(follow))                       # appends after the prefix, in the last group
    assert m.table("b")[2][:1] == tables[2][:1] and len(m.table("b")[2]) == 2
    m.check()
    other = [1] + tokens[1:]
    ho = extend_hashes([], m.hash_root, BS, 21, lambda a, b: other[a:b])
    assert m.lookup(ho) == 0


def test_kvp_groups_not_a_multiple_of_the_block_size_turn_caching_off():
    assert not KVPBlockManager(2, 10, 8, BS, prefix_caching=True).prefix_caching
    assert KVPBlockManager(1, 10, 8, BS, prefix_caching=True).prefix_caching
    assert KVPBlockManager(1, 10, 8, BS, prefix_caching=True).hash_root != \
        KVPBlockManager(2, 8, 8, BS, prefix_caching=True).hash_root


# ---- scheduler -----------------------------------------------------------------------------------------
def make_sched(blocks: int = 32, chunk: int = 8, planned: bool = False, kvp_tokens: int | None = None) -> Scheduler:
    kw = dict(policy="lars", chunking="fixed") if planned else {}
    cfg = SchedulerConfig(chunk_size=chunk, max_batch_tokens=1024, max_num_seqs=16, **kw)
    pool = (KVPBlockManager(4, kvp_tokens, blocks, BS, prefix_caching=True) if kvp_tokens
            else BlockPool(blocks, BS, prefix_caching=True))
    perf = _Flat() if planned else None
    return Scheduler(cfg, pool, kvp_tokens=kvp_tokens, perf_model=perf)


class _Flat:
    def predict(self, batch) -> float:
        return 1e-4 * batch.num_tokens


def req(rid: str, tokens: list[int], max_tokens: int = 2) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_s=0.0)


def run_all(s: Scheduler) -> list[list[tuple[str, int, int]]]:
    steps = []
    while s.has_unfinished():
        out: SchedulerOutput = s.schedule()
        assert out.items
        steps.append([(it.request.request_id, it.start, it.num_tokens) for it in out.items])
        s.postprocess(out, {it.request.request_id: (5, -1.0) for it in out.items if it.sample})
        s.pool.check()
    return steps


@pytest.mark.parametrize("planned", [False, True], ids=["core", "planned"])
def test_a_follow_up_starts_after_its_cached_prefix(planned):
    s = make_sched(planned=planned)
    prompt = list(range(100, 128))                    # 28 tokens: 7 full blocks
    a = req("a", prompt, max_tokens=6)
    s.add(a)
    run_all(s)
    assert a.num_cached_tokens == 0 and a.output_ids == [5] * 6
    # the next turn: a's prompt + its answer + a question; a computed 33 tokens (8 full blocks,
    # the last one holding 4 generated tokens)
    b = req("b", prompt + [5] * 6 + [3, 4])
    s.add(b)
    steps = run_all(s)
    assert steps[0] == [("b", 32, 4)] and b.num_cached_tokens == 32
    # the same prompt again: never all of it, the last token is computed (here a whole block)
    c = req("c", prompt)
    s.add(c)
    assert run_all(s)[0] == [("c", 24, 4)] and c.num_cached_tokens == 24
    # a different first token: nothing matches
    d = req("d", [1] + prompt[1:])
    s.add(d)
    assert run_all(s)[0] == [("d", 0, 8)] and d.num_cached_tokens == 0
    assert s.pool.num_used == 0


@pytest.mark.parametrize("planned", [False, True], ids=["core", "planned"])
def test_a_prefix_held_by_a_running_request_is_shared(planned):
    s = make_sched(planned=planned, chunk=16)
    doc = list(range(200, 232))
    a = req("a", doc + [1], max_tokens=4)
    s.add(a)
    while not a.output_ids:
        out = s.schedule()
        s.postprocess(out, {it.request.request_id: (5, -1.0) for it in out.items if it.sample})
    assert a.num_computed == 33
    b = req("b", doc + [2, 3])
    s.add(b)
    out = s.schedule()
    items = {it.request.request_id: (it.start, it.num_tokens) for it in out.items}
    assert items == {"a": (33, 1), "b": (32, 2)}
    assert s.pool.table("b")[:8] == s.pool.table("a")[:8]
    assert all(s.pool.ref_counts[blk] == 2 for blk in s.pool.table("a")[:8])
    s.postprocess(out, {it.request.request_id: (5, -1.0) for it in out.items if it.sample})
    run_all(s)
    assert s.pool.num_used == 0


def test_a_follow_up_on_kvp_groups_starts_in_the_group_after_the_prefix():
    """M = 16: a 40-token prompt fills groups 0, 1 and half of 2; the follow-up reuses 40 tokens and
    its chunks still never cross a group boundary."""
    s = make_sched(blocks=8, chunk=32, kvp_tokens=16)
    doc = list(range(300, 340))
    s.add(req("a", doc, max_tokens=1))
    run_all(s)
    b = req("b", doc + list(range(20)))
    s.add(b)
    steps = run_all(s)
    assert steps[0] == [("b", 40, 8)] and steps[1] == [("b", 48, 12)]
    assert b.num_cached_tokens == 40


def test_a_prefix_whose_chunk_cannot_be_scheduled_goes_back_to_the_cache():
    """8 blocks of 4. `a`'s 5 full blocks are cached; `big` (in flight, not preemptible) holds the
    rest, so `b` takes its prefix, cannot get the one more block it needs, and gives the prefix back."""
    s = make_sched(blocks=8)
    doc = list(range(20))
    s.add(req("a", doc, max_tokens=2))
    run_all(s)
    assert s.pool.num_cached == 5
    s.add(req("big", list(range(500, 512)), max_tokens=1))
    out1 = s.schedule()                              # big's first chunk, still in flight
    b = req("b", doc + [1])
    s.add(b)
    acquired, acquire = [], s.pool.acquire
    s.pool.acquire = lambda rid, h: acquired.append((rid, acquire(rid, h))) or acquired[-1][1]
    out2 = s.schedule()                              # big's second chunk; b cannot fit
    assert acquired == [("b", 5)]
    assert [(it.request.request_id, it.start) for it in out1.items + out2.items] == [("big", 0), ("big", 8)]
    assert b.num_computed == 0 and not s.pool.table("b") and s.pool.num_cached == 5
    s.pool.check()
    for out in (out1, out2):
        s.postprocess(out, {it.request.request_id: (5, -1.0) for it in out.items if it.sample})
    steps = run_all(s)
    assert steps[0] == [("b", 20, 1)] and b.num_cached_tokens == 20
    assert s.pool.num_used == 0


def test_a_waiting_request_with_received_kv_keeps_it_when_it_cannot_run():
    """A decode-role request (its prompt's KV received: computed, waiting to decode) that gets no room
    this step keeps its blocks: only a prefix taken from the cache in this step is given back."""
    s = make_sched(blocks=8, chunk=24)
    s.add(req("big", list(range(500, 524)), max_tokens=1))
    out1 = s.schedule()                              # big: 6 blocks, in flight (not preemptible)
    r = req("r", list(range(8)), max_tokens=4)
    s.pool.allocate("r", 8)                          # what prepare_receive reserved
    r.num_computed = 8
    r.append(5, -1.0)
    s.add(r)
    out2 = s.schedule()                              # r's decode needs a third block: none is free
    assert not out2.items and r.num_computed == 8 and len(s.pool.table("r")) == 2
    s.pool.check()
    s.postprocess(out1, {"big": (5, -1.0)})
    run_all(s)
    assert r.output_ids == [5] * 4 and s.pool.num_used == 0


# ---- a prefix shared by concurrent requests is computed once -------------------------------------------
def computed(steps: list[list[tuple[str, int, int]]]) -> dict[str, int]:
    """Tokens each request ran through the model (prompt and decode steps)."""
    out: dict[str, int] = {}
    for step in steps:
        for rid, _, n in step:
            out[rid] = out.get(rid, 0) + n
    return out


@pytest.mark.parametrize("planned", [False, True], ids=["core", "planned"])
def test_concurrent_requests_compute_a_shared_prefix_once(planned):
    """Four questions about one 32-token document (8 full blocks), added together: the first computes
    the document, the others wait for it (not one of its blocks is computed twice), then each reuses
    it and computes only its question."""
    s = make_sched(planned=planned, chunk=8)
    doc = list(range(400, 432))
    rs = [req(f"q{i}", doc + [i + 1] * (i + 2), max_tokens=2) for i in range(4)]
    for r in rs:
        s.add(r)
    steps = run_all(s)
    assert [r.num_cached_tokens for r in rs] == [0, 32, 32, 32]
    assert computed(steps) == {"q0": 32 + 2 + 1, "q1": 3 + 1, "q2": 4 + 1, "q3": 5 + 1}
    # nobody started while q0 computed the document's blocks
    first = {rid: i for i, step in reversed(list(enumerate(steps))) for rid, _, _ in step}
    assert all(first[f"q{i}"] >= 3 for i in (1, 2, 3))
    assert s.pool.num_used == 0


def test_a_later_arrival_waits_for_the_rest_of_a_prefix_in_progress():
    """b arrives when a has computed 2 of the document's 8 blocks: it waits for the other 6 (in flight
    or ahead of a) and starts after all 8, never computing one of them."""
    s = make_sched(chunk=8)
    doc = list(range(600, 632))
    a = req("a", doc + [1], max_tokens=1)
    s.add(a)
    out = s.schedule()
    s.postprocess(out, {})
    b = req("b", doc + [2, 3], max_tokens=1)
    s.add(b)
    steps = run_all(s)
    b_items = [(rid, start, n) for st in steps for rid, start, n in st if rid == "b"]
    assert b_items[0] == ("b", 32, 2) and b.num_cached_tokens == 32
    assert computed(steps) == {"a": 32 - 8 + 1, "b": 2}
    assert s.pool.num_used == 0


@pytest.mark.parametrize("how", ["abort", "preempt"])
def test_a_waiter_is_not_held_by_a_computer_that_went_away(how):
    """b waits for a's document blocks; a goes away after 2 of 8. Aborted: b reuses the 2 that were
    named and computes the other 6 itself. Preempted: a is first in line again, resumes after its 2
    named blocks and b waits for it once more; either way the document is computed once."""
    s = make_sched(chunk=8)
    doc = list(range(700, 732))
    a, b = req("a", doc + [1], max_tokens=1), req("b", doc + [2], max_tokens=1)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [it.request.request_id for it in out.items] == ["a"]
    s.postprocess(out, {})
    if how == "abort":
        s.abort("a")
    else:
        s._preempt(a, SchedulerOutput())
    out = s.schedule()
    first = ("b", 8) if how == "abort" else ("a", 8)
    assert [(it.request.request_id, it.start) for it in out.items] == [first]
    s.postprocess(out, {})
    steps = run_all(s)
    if how == "abort":
        assert b.num_cached_tokens == 8 and computed(steps) == {"b": 33 - 16}
    else:
        assert b.num_cached_tokens == 32 and computed(steps) == {"a": 33 - 16, "b": 1}
        assert a.num_cached_tokens == 0 and a.output_ids == [5]
    assert b.output_ids == [5] and s.pool.num_used == 0


def test_concurrent_requests_on_kvp_groups_compute_a_shared_prefix_once():
    """M = 16 (4 blocks a group): the 40-token document spans groups 0, 1 and half of 2; the second
    request waits for it and starts at token 40, in group 2."""
    s = make_sched(blocks=8, chunk=32, kvp_tokens=16)
    doc = list(range(800, 840))
    a, b = req("a", doc + [1], max_tokens=1), req("b", doc + list(range(10)), max_tokens=1)
    s.add(a)
    s.add(b)
    steps = run_all(s)
    assert computed(steps) == {"a": 41, "b": 10}
    assert [st for st in steps if any(rid == "b" for rid, _, _ in st)][0] == [("b", 40, 8)]
    assert b.num_cached_tokens == 40 and s.pool.num_used == 0
