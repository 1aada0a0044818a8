"""The KV connector's contracts (round trips of what crosses the control socket) and its scheduler
side's block ownership, with a fake executor (no model, no sockets)."""
from __future__ import annotations

import pytest

from common.config import ParallelConfig, SchedulerConfig
from common.errors import CapacityError, ConfigError, InvalidRequestError, KVTransferError
from common.kv_cache.kvp_blocks import KVPBlockManager
from common.kv_connector.scheduler import KVConnectorScheduler
from common.kv_connector.types import GroupSink, KVAck, KVEvent, KVSink
from common.sampling_params import SamplingParams
from common.scheduler.request import Request
from common.scheduler.scheduler import ScheduledItem, Scheduler


def test_kv_messages_round_trip():
    import json
    ev = KVEvent(3, "recv", "r1", "failed", "boom")
    assert KVEvent.from_dict(json.loads(json.dumps(ev.to_dict()))) == ev
    ack = KVAck(2, "r1", False, "no room")
    assert KVAck.from_dict(json.loads(json.dumps(ack.to_dict()))) == ack
    sink = KVSink("tcp", 64, [GroupSink(0, 0, [3, 1], ["h:1", "h:2"], 64), GroupSink(1, 64, [0], ["h:3", "h:4"], 16)])
    assert KVSink.from_dict(json.loads(json.dumps(sink.to_dict()))) == sink
    assert sink.cached_tokens == 80
    assert [sink.skip_cached(p) for p in (0, 63, 64, 79, 80, 100)] == [80, 80, 80, 80, 80, 100]
    # After a lost decode worker: group 1 holds its share, group 0 must be sent whole.
    held = KVSink("tcp", 64, [GroupSink(0, 0, [3, 1], ["h:1"], 0), GroupSink(1, 64, [0, 2], ["h:3"], 26)])
    assert held.cached_tokens == 26
    assert [held.skip_cached(p) for p in (0, 63, 64, 70, 90)] == [0, 63, 90, 90, 90]
    # A group held whole: the sender goes on at the next one's first token not held.
    assert KVSink("tcp", 64, [GroupSink(0, 0, [3], ["h:1"], 64), GroupSink(1, 64, [0], ["h:3"], 0)]).skip_cached(5) == 64
    assert ev.to_dict()["type"] == "kv_event" and ack.to_dict()["type"] == "kv_ack"


class FakeExecutor:
    """Holders answer from `acks`; events are queued by the test."""

    def __init__(self, holders: int = 2) -> None:
        self.kv_holders = holders
        self.events: list[KVEvent] = []
        self.cancelled: list[str] = []
        self.error: str | None = None
        self.poisoned: dict[int, list[int]] = {}     # what the holders answer a cancel with
        self.dead = None                             # a WorkerFailedError every cancel raises

    def kv_expect(self, rid, tables, num_tokens, epoch=0, cached=0):
        self.expected = (rid, cached)
        return [KVAck(h, rid, self.error is None, self.error) for h in range(self.kv_holders)]

    def kv_cancel(self, rid):
        if self.dead is not None:
            raise self.dead
        self.cancelled.append(rid)
        return self.poisoned

    def kv_events(self):
        out, self.events = self.events, []
        return out

    def kv_addresses(self, group):
        return [f"g{group}:1"]

    def kv_group_holders(self, group):
        return [group]


def connector(kvp=2, spp=1, holders=2, caching=False):
    blocks = KVPBlockManager(kvp, 32, 8, 16, prefix_caching=caching)
    sched = Scheduler(SchedulerConfig(), blocks, kvp_tokens=32 if kvp > 1 else None)
    ex = FakeExecutor(holders)
    ended = []
    kv = KVConnectorScheduler(ParallelConfig(kvp=kvp, spp=spp, kvp_tokens=32 if kvp > 1 else None), blocks, sched,
                              ex, 64, lambda req, reason, err: ended.append((req.request_id, reason, err)) or err)
    return kv, blocks, sched, ex, ended


def prefilled(rid: str, n: int) -> Request:
    req = Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=4), 0.0, max_model_len=64)
    req.num_computed = n
    req.append(7, -0.1)
    return req


def test_receive_admits_once_every_expecting_holder_is_done():
    kv, blocks, sched, ex, ended = connector()
    sinks = kv.prepare_receive("r", 40, 4)
    assert [s.group for s in sinks] == [0, 1] and sinks[1].token_start == 32 and sinks[1].addresses == ["g1:1"]
    assert blocks.num_used == 3
    kv.add_prefilled(prefilled("r", 40), 60.0)
    ex.events.append(KVEvent(0, "recv", "r", "done"))
    assert kv.admit_arrived() == [] and "r" not in sched.requests            # holder 1 not yet
    ex.events.append(KVEvent(1, "recv", "r", "done"))
    assert kv.admit_arrived() == [] and "r" in sched.requests and not kv.awaiting
    assert blocks.num_used == 3                                               # the scheduler's now
    sched.abort("r")
    assert blocks.num_used == 0


def test_receive_reuses_the_cached_prefix_of_the_prompt():
    """Request a's received KV is named when it joins the scheduler; b, with the same 40-token prompt,
    shares a's two full blocks (group 0's 32 tokens, M = 32) and expects only group 1's 8 tokens."""
    from common.errors import InvalidRequestError
    kv, blocks, sched, ex, ended = connector(caching=True)
    prompt = list(range(1, 41))
    kv.prepare_receive("a", 40, 4, prompt_ids=prompt)
    assert ex.expected == ("a", [0, 0])
    kv.add_prefilled(prefilled("a", 40), 60.0)
    ex.events += [KVEvent(0, "recv", "a", "done"), KVEvent(1, "recv", "a", "done")]
    kv.admit_arrived()
    a_blocks = blocks.table("a")[0]
    sched.abort("a")
    assert blocks.num_cached == 2 and blocks.num_used == 0
    sinks = kv.prepare_receive("b", 40, 4, prompt_ids=prompt)
    assert [s.cached for s in sinks] == [32, 0] and ex.expected == ("b", [32, 0]) and kv.cached_tokens("b") == 32
    assert sinks[0].block_table == a_blocks and blocks.num_used == 3
    with pytest.raises(InvalidRequestError, match="differs"):
        kv.add_prefilled(_with_prompt(prefilled("b", 40), [9] + prompt[1:]), 60.0)
    with pytest.raises(InvalidRequestError, match="prompt token ids"):
        kv.prepare_receive("c", 40, 4, prompt_ids=prompt[:39])
    assert kv.abort("b") and blocks.num_used == 0 and blocks.num_cached == 2
    blocks.check()


def test_a_request_that_lost_a_group_leaves_the_other_groups_share_for_its_retry():
    """Request a awaits its 40 tokens (M = 32); group 0's holder has all of its share when the worker
    of group 1 dies. lose() names group 0's blocks before freeing them; a retry of the same prompt
    takes them (group 0 held whole, group 1 expected: sent again) and a late add_prefilled of a fails
    with a retryable error that says why."""
    kv, blocks, sched, ex, ended = connector(caching=True)
    prompt = list(range(1, 41))
    kv.prepare_receive("a", 40, 4, prompt_ids=prompt)
    ex.events.append(KVEvent(0, "recv", "a", "done"))
    kv.lose("a", {1}, "group 1's worker died")
    assert blocks.num_used == 0 and blocks.pools[0].num_cached == 2 and blocks.pools[1].num_cached == 0
    with pytest.raises(KVTransferError, match="group 1's worker died"):
        kv.add_prefilled(prefilled("a", 40), 60.0)
    sinks = kv.prepare_receive("b", 40, 4, prompt_ids=prompt)
    assert [s.cached for s in sinks] == [32, 0] and ex.expected == ("b", [32, 0])
    assert kv.abort("b")
    # A group whose holder had not received all of its share names nothing.
    kv.prepare_receive("c", 40, 4, prompt_ids=[5] + prompt[1:])
    kv.lose("c", {1}, "again")
    assert blocks.pools[0].num_cached == 2 and blocks.num_used == 0
    blocks.check()


def test_a_later_groups_cached_share_is_reused_without_the_earlier_groups():
    """Group 1 holds its share of the prompt (named), group 0 lost its own (its worker was replaced):
    the receive takes group 1's block and expects all of group 0 and the rest of group 1; a prompt
    that differs in group 0 names other blocks and takes nothing."""
    from common.kv_cache.prefix import extend_hashes
    kv, blocks, sched, ex, ended = connector(caching=True)
    prompt = list(range(1, 51))
    hashes = extend_hashes([], blocks.hash_root, 16, 50, lambda a, b: prompt[a:b])
    blocks.allocate("old", 50)
    blocks.register("old", hashes)
    blocks.free("old")
    blocks.pools[0].drop_names()
    assert blocks.pools[0].num_cached == 0 and blocks.pools[1].num_cached == 1
    sinks = kv.prepare_receive("r", 50, 4, prompt_ids=prompt)
    assert [s.cached for s in sinks] == [0, 16] and ex.expected == ("r", [0, 16]) and kv.cached_tokens("r") == 16
    req = prefilled("r", 50)
    req.prompt_ids = list(prompt)
    kv.add_prefilled(req, 60.0)
    assert kv.abort("r")
    sinks = kv.prepare_receive("s", 50, 4, prompt_ids=[0] + prompt[1:])
    assert [s.cached for s in sinks] == [0, 0]
    assert kv.abort("s")
    blocks.check()


def test_a_cancel_a_dead_holder_interrupted_keeps_the_blocks_until_the_grid_is_repaired():
    """A holder died: the cancels of a failed intake and of an abort cannot be answered by every
    holder, so the blocks stay held (a holder that did not answer may still write), the engine is
    told (holder_lost), the id stays in use, and settle() after the repair cancels and frees."""
    from common.errors import WorkerFailedError
    kv, blocks, sched, ex, ended = connector()
    kv.prepare_receive("a", 40, 4)
    kv.add_prefilled(prefilled("a", 40), 60.0)
    kv.prepare_receive("b", 20, 4)
    ex.dead = WorkerFailedError("worker rank 2 closed the connection")
    ex.events.append(KVEvent(0, "recv", "a", "failed", "peer gone"))
    assert kv.admit_arrived() == ["peer gone"]                # the request ends all the same
    assert kv.abort("b")
    assert blocks.num_used == 5 and kv.unsettled == {"a", "b"} and kv.holder_lost is ex.dead
    with pytest.raises(InvalidRequestError, match="in use"):
        kv.prepare_receive("a", 40, 4)
    ex.dead = None
    kv.settle()
    assert blocks.num_used == 0 and not kv.unsettled and kv.holder_lost is None and ex.cancelled == ["a", "b"]
    blocks.check()


def _with_prompt(req: Request, prompt: list[int]) -> Request:
    req.prompt_ids = list(prompt)
    return req


def test_failed_late_or_aborted_receives_free_their_blocks():
    kv, blocks, sched, ex, ended = connector()
    kv.prepare_receive("a", 20, 4)
    kv.add_prefilled(prefilled("a", 20), 60.0)
    ex.events.append(KVEvent(1, "recv", "a", "failed", "peer gone"))
    assert kv.admit_arrived() == ["peer gone"] and blocks.num_used == 0 and "a" in ex.cancelled
    kv.prepare_receive("b", 20, 4)
    kv.add_prefilled(prefilled("b", 20), -1.0)                               # already past its deadline
    assert "stopped arriving" in kv.admit_arrived()[0] and blocks.num_used == 0
    kv.prepare_receive("c", 20, 4)
    assert kv.abort("c") and blocks.num_used == 0
    ex.error = "no receiver"
    with pytest.raises(KVTransferError, match="no receiver"):
        kv.prepare_receive("d", 20, 4)
    assert blocks.num_used == 0 and not kv.prepared
    blocks.check()


def test_blocks_a_late_write_may_land_in_are_withheld_for_good():
    """A holder answers the cancel of a failed (or aborted) receive with blocks a granted NIXL write
    may still land in: freed with the request, they never go back to the pool, so no later request
    is handed a block that write could overwrite; the rest of its blocks are free again."""
    kv, blocks, sched, ex, ended = connector(caching=True)
    kv.prepare_receive("a", 40, 4, prompt_ids=list(range(1, 41)))
    a = blocks.table("a")
    kv.add_prefilled(prefilled("a", 40), 60.0)
    ex.poisoned = {1: [a[1][0]]}                      # group 1's first block
    ex.events.append(KVEvent(2, "recv", "a", "failed", "checksum mismatch"))
    assert kv.admit_arrived() == ["checksum mismatch"]
    assert blocks.num_quarantined == 1 and blocks.num_used == 1 and blocks.pools[1].num_free == 7
    blocks.check()
    ex.poisoned = {0: [a[0][0]]}
    kv.prepare_receive("b", 40, 4)
    b = blocks.table("b")
    assert a[1][0] not in b[1]
    assert kv.abort("b") and blocks.num_quarantined == 2 and a[0][0] in blocks.pools[0].quarantined
    # what is left of both pools is handed out, never the withheld blocks
    for i in range(7):                                # one-token requests live in group 0
        kv.prepare_receive(f"c{i}", 1, 0)
    held = {blk for rid in blocks.pools[0].tables for blk in blocks.pools[0].tables[rid]}
    assert len(held) == 7 and a[0][0] not in held and blocks.pools[0].num_free == 0
    with pytest.raises(CapacityError):
        kv.prepare_receive("c7", 1, 0)
    blocks.check()


def test_stream_status_aggregates_every_holder():
    kv, blocks, sched, ex, ended = connector(kvp=1, spp=2, holders=2)
    sink = KVSink("tcp", 64, [GroupSink(0, 0, [0], ["x:1"])])
    kv.attach("p", sink)
    req = Request("p", [1, 2, 3], SamplingParams(max_tokens=1), 0.0)
    first, later = ScheduledItem(req, 0, 2, False), ScheduledItem(req, 2, 1, True)
    assert kv.sinks_for([first]) == {"p": sink} and kv.sinks_for([later]) == {}
    kv.sampled([later])
    assert kv.sinks_for([first]) == {}                                        # the prompt is all sent
    ex.events.append(KVEvent(0, "sent", "p", "done"))
    assert kv.kv_status("p") == ("pending", None)
    ex.events.append(KVEvent(1, "sent", "p", "done"))
    assert kv.kv_status("p") == ("done", None) == kv.kv_status("p")          # remembered
    assert kv.kv_status("q")[0] == "failed"
    with pytest.raises(ConfigError):                                          # receiving needs spp = 1
        kv.prepare_receive("r", 10, 1)
    kvp_kv = connector(kvp=2)[0]
    with pytest.raises(ConfigError):                                          # streaming needs kvp = 1
        kvp_kv.attach("p", sink)
