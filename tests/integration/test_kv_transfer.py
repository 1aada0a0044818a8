"""KV transfer, both backends, with the receiver (or the sender) in a separate spawned process.

Data is deterministic per request (a seeded generator over [layers, tokens, Hkv, D]), so the
receiver process checks its own cache against what the sender sent: bytes identical, every cell of
the request written, nothing else in its blocks touched.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import signal
import time
from dataclasses import replace

import pytest
import torch

from common.errors import CHECKSUM_MISMATCH, KVTransferError
from common.kv_transfer import (KVChunk, KVDest, KVLayout, TransferState, make_receiver, make_sender)
from common.kv_transfer import session
from common.kv_transfer.tracker import ChunkRejected, RequestTracker
from tests.fixtures.kv_proxy import CorruptingProxy

BACKENDS = ["tcp", "nixl"]
LAYOUT = KVLayout(dtype="float32", block_size=16, num_kv_heads=2, head_dim=64, num_layers=4, model="tiny-test")
NUM_BLOCKS = 256
SENTINEL = -7.0
MAX_TOKENS = 2048


def request_kv(layout: KVLayout, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole request's KV, [num_layers, MAX_TOKENS, Hkv, D] each, from `seed`."""
    g = torch.Generator().manual_seed(seed)
    shape = (layout.num_layers, MAX_TOKENS, layout.num_kv_heads, layout.head_dim)
    return (torch.randn(shape, generator=g).to(layout.torch_dtype),
            torch.randn(shape, generator=g).to(layout.torch_dtype))


def chunk_of(layout: KVLayout, rid: str, seed: int, layers: tuple[int, int], tokens: tuple[int, int],
             epoch: int = 0) -> KVChunk:
    k, v = request_kv(layout, seed)
    (l0, l1), (t0, t1) = layers, tokens
    return KVChunk(rid, layers, tokens, k[l0:l1, t0:t1].clone(), v[l0:l1, t0:t1].clone(), epoch)


def make_caches(layout: KVLayout, num_blocks: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    return {l: (torch.full(shape, SENTINEL, dtype=layout.torch_dtype),
                torch.full(shape, SENTINEL, dtype=layout.torch_dtype)) for l in range(layout.num_layers)}


def verify(layout: KVLayout, caches, seed: int, table: list[int], g0: int, layers: list[int], n: int) -> str | None:
    """None if the request's cells hold exactly its KV and the rest of its blocks is untouched."""
    k, v = request_kv(layout, seed)
    H, D, bs = layout.num_kv_heads, layout.head_dim, layout.block_size
    s = torch.arange(n)
    slots = torch.tensor(table)[s // bs] * bs + s % bs
    spare = [b * bs + o for b in table[:-(-n // bs)] for o in range(bs) if b * bs + o not in set(slots.tolist())]
    for l in layers:
        for name, cache, full in (("K", caches[l][0], k), ("V", caches[l][1], v)):
            flat = cache.view(-1, H, D)
            if not torch.equal(flat[slots], full[l, g0:g0 + n]):
                return f"layer {l} {name}: bytes differ"
            if spare and not bool((flat[torch.tensor(spare)] == SENTINEL).all()):
                return f"layer {l} {name}: a slot outside the request was written"
    return None


# ---- a receiver in its own process, driven over a pipe ---------------------------------------------
def _receiver_main(backend: str, layout: dict, num_blocks: int, pipe) -> None:
    logging.basicConfig(level=logging.WARNING)
    lay = KVLayout.from_dict(layout)
    caches = make_caches(lay, num_blocks)
    rx = make_receiver(backend, lay, caches)
    pipe.send(rx.address)
    while True:
        cmd, args = pipe.recv()
        try:
            if cmd == "exit":
                rx.close()
                pipe.send(("ok", None))
                return
            out = verify(lay, caches, *args) if cmd == "verify" else getattr(rx, cmd)(*args)
            pipe.send(("ok", out.value if isinstance(out, TransferState) else out))
        except KVTransferError as e:
            pipe.send(("error", str(e)))


class RemoteReceiver:
    def __init__(self, backend: str, layout: KVLayout = LAYOUT, num_blocks: int = NUM_BLOCKS) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_receiver_main, args=(backend, layout.to_dict(), num_blocks, child),
                                daemon=True)
        self.proc.start()
        if not self.pipe.poll(60):
            self.kill()
            raise TimeoutError("receiver process did not start")
        self.address = self.pipe.recv()

    def call(self, cmd: str, *args, timeout: float = 15.0):
        self.pipe.send((cmd, args))
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"receiver did not answer {cmd}")
        status, out = self.pipe.recv()
        if status == "error":
            raise KVTransferError(out)
        return out

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)


@pytest.fixture(scope="module", params=BACKENDS)
def remote(request):
    rx = RemoteReceiver(request.param)
    rx.backend = request.param
    yield rx
    try:
        rx.call("exit", timeout=10)
    finally:
        rx.kill()


@pytest.fixture
def sender(remote):
    s = make_sender(remote.backend, LAYOUT)
    s.connect(remote.address, timeout=10)
    yield s
    s.close()


def shuffled_table(n_tokens: int, pool: list[int]) -> list[int]:
    """Block ids for n_tokens, taken from the shuffled pool (so no two requests share a block)."""
    return [pool.pop() for _ in range(-(-n_tokens // LAYOUT.block_size))]


@pytest.fixture(scope="module")
def block_pool():
    ids = list(range(NUM_BLOCKS - 16))          # the last 16 blocks are kept for consecutive runs
    random.Random(0).shuffle(ids)
    return ids


def send_all(s, chunks, dest, timeout=10.0):
    handles = [s.send(c, dest, timeout=timeout) for c in chunks]
    assert all(h.wait(timeout) for h in handles)
    assert all(h.state is TransferState.DONE for h in handles)


# ---- correctness -----------------------------------------------------------------------------------
def test_bytes_identical_across_block_boundaries_and_odd_sizes(remote, sender, block_pool):
    n, g0, seed = 100, 0, 11
    table = shuffled_table(n, block_pool)
    table[2:4] = [NUM_BLOCKS - 2, NUM_BLOCKS - 1]                    # consecutive ids: one merged run
    remote.call("expect", "odd", table, g0, range(4), n)
    cuts = [0, 1, 17, 37, 61, 99, 100]                               # 1-token chunks, block crossings
    chunks = [chunk_of(LAYOUT, "odd", seed, (0, 4), (a, b)) for a, b in zip(cuts, cuts[1:])]
    send_all(sender, chunks, KVDest(table, g0))
    assert remote.call("wait_complete", "odd", 10.0) is True
    assert remote.call("verify", seed, table, g0, list(range(4)), n) is None


def test_layer_subset_of_a_later_kvp_group(remote, sender, block_pool):
    """A prefill stage holding layers [1, 3) sends to the group owning tokens [1000, 1045)."""
    n, g0, seed = 45, 1000, 12
    table = shuffled_table(n, block_pool)
    remote.call("expect", "stage", table, g0, [1, 2], n)
    chunks = [chunk_of(LAYOUT, "stage", seed, (1, 3), (a, b)) for a, b in ((1000, 1013), (1013, 1045))]
    send_all(sender, chunks, KVDest(table, g0))
    assert remote.call("wait_complete", "stage", 10.0) is True
    assert remote.call("verify", seed, table, g0, [1, 2], n) is None


def test_many_chunks_from_two_stages(remote, sender, block_pool):
    """Two SPP stages (two connections) stream many chunks of one request, interleaved."""
    n, g0, seed = 333, 512, 13
    table = shuffled_table(n, block_pool)
    remote.call("expect", "many", table, g0, range(4), n)
    stage2 = make_sender(remote.backend, LAYOUT)
    stage2.connect(remote.address, timeout=10)
    try:
        rng = random.Random(4)
        cuts = sorted({g0, g0 + n, *rng.sample(range(g0 + 1, g0 + n), 14)})
        dest = KVDest(table, g0)
        handles = []
        for a, b in zip(cuts, cuts[1:]):
            handles.append(sender.send(chunk_of(LAYOUT, "many", seed, (0, 2), (a, b)), dest))
            handles.append(stage2.send(chunk_of(LAYOUT, "many", seed, (2, 4), (a, b)), dest))
        assert all(h.wait(10) for h in handles)
    finally:
        stage2.close()
    assert remote.call("wait_complete", "many", 10.0) is True
    assert remote.call("verify", seed, table, g0, list(range(4)), n) is None


def test_complete_only_after_last_layer_of_last_token(remote, sender, block_pool):
    n, g0, seed = 40, 0, 14
    table = shuffled_table(n, block_pool)
    remote.call("expect", "last", table, g0, range(4), n)
    dest = KVDest(table, g0)
    assert remote.call("state", "last") == "pending"
    send_all(sender, [chunk_of(LAYOUT, "last", seed, (0, 4), (0, 39)),
                      chunk_of(LAYOUT, "last", seed, (0, 3), (39, 40))], dest)
    assert remote.call("wait_complete", "last", 0.2) is False
    assert remote.call("state", "last") == "transferring"
    send_all(sender, [chunk_of(LAYOUT, "last", seed, (3, 4), (39, 40))], dest)
    assert remote.call("wait_complete", "last", 10.0) is True
    assert remote.call("verify", seed, table, g0, list(range(4)), n) is None


def test_duplicate_and_misplaced_chunks_are_refused(remote, sender, block_pool):
    table = shuffled_table(32, block_pool)
    remote.call("expect", "dup", table, 0, range(4), 32)
    dest = KVDest(table, 0)
    send_all(sender, [chunk_of(LAYOUT, "dup", 15, (0, 4), (0, 16))], dest)
    h = sender.send(chunk_of(LAYOUT, "dup", 15, (1, 2), (8, 20)), dest)   # overlaps layer 1 tokens 8..16
    with pytest.raises(KVTransferError, match="duplicate"):
        h.wait(10)
    assert remote.call("state", "dup") == "failed"
    with pytest.raises(KVTransferError, match="duplicate"):
        remote.call("wait_complete", "dup", 1.0)
    # the sender disagrees on the block table: refused before any byte lands
    remote.call("expect", "moved", table[:1] + [NUM_BLOCKS - 3], 0, range(4), 32)
    h = sender.send(chunk_of(LAYOUT, "moved", 16, (0, 4), (0, 32)), dest)
    with pytest.raises(KVTransferError, match="block table"):
        h.wait(10)
    for rid in ("dup", "moved"):
        remote.call("cancel", rid)


def test_cancel_drops_state(remote, sender, block_pool):
    n, seed = 48, 17
    table = shuffled_table(n, block_pool)
    dest = KVDest(table, 0)
    remote.call("expect", "c", table, 0, range(4), n)
    send_all(sender, [chunk_of(LAYOUT, "c", seed, (0, 4), (0, 16))], dest)
    remote.call("cancel", "c")
    assert "c" not in remote.call("poll")
    with pytest.raises(KVTransferError, match="not registered"):
        remote.call("state", "c")
    h = sender.send(chunk_of(LAYOUT, "c", seed, (0, 4), (16, 32)), dest)
    with pytest.raises(KVTransferError, match="not expected"):
        h.wait(10)
    # the same id can be registered again and completes normally
    remote.call("expect", "c", table, 0, range(4), n)
    send_all(sender, [chunk_of(LAYOUT, "c", seed, (0, 4), (0, 48))], dest)
    assert remote.call("wait_complete", "c", 10.0) is True


def test_a_granted_nixl_write_that_never_finishes_poisons_its_blocks():
    """NIXL cannot recall a one-sided write it granted. A cancel that waited `cancel_timeout` for one
    in vain returns the blocks it may still land in (the scheduler side withholds them for good:
    test_engine_kv_connector.py), drops that sender's connection (its transfer fails), and tells
    nothing of a write that finished in time."""
    from common.kv_transfer.nixl import NixlReceiver, NixlSender
    granted: list[int] = []

    class Stalled(NixlSender):
        def _on_grant(self, seq: int) -> None:
            granted.append(seq)                       # granted, never posted (a write stuck in flight)

    caches = make_caches(LAYOUT, 32)
    with NixlReceiver(LAYOUT, caches, cancel_timeout=0.3) as rx:
        with make_sender("nixl", LAYOUT) as ok:
            ok.connect(rx.address, timeout=10)
            rx.expect("fine", [3, 8], 0, range(4), 32)
            send_all(ok, [chunk_of(LAYOUT, "fine", 2, (0, 4), (0, 16))], KVDest([3, 8], 0))
            assert rx.cancel("fine") == set()           # its write landed before the cancel
        with Stalled(LAYOUT) as s:
            s.connect(rx.address, timeout=10)
            table = [9, 4, 21]
            rx.expect("late", table, 0, range(4), 40)
            h = s.send(chunk_of(LAYOUT, "late", 3, (0, 4), (16, 40)), KVDest(table, 0))
            deadline = time.monotonic() + 10
            while not granted and time.monotonic() < deadline:
                time.sleep(0.01)
            assert granted, "the receiver never granted the chunk"
            t0 = time.monotonic()
            assert rx.cancel("late") == {4, 21}          # tokens 16-39: the table's 2nd and 3rd blocks
            assert 0.25 <= time.monotonic() - t0 < 5
            with pytest.raises(KVTransferError):
                h.wait(10)                              # its connection was dropped


def test_a_chunk_of_another_placement_epoch_is_refused_and_the_request_goes_on(remote, sender, block_pool):
    """The blocks were prepared for placement epoch 7: a chunk stamped 6 (a sender holding a stale
    placement) is refused before a byte lands, without failing the live request."""
    n, seed = 32, 19
    table = shuffled_table(n, block_pool)
    dest = KVDest(table, 0)
    remote.call("expect", "ep", table, 0, range(4), n, 7)
    h = sender.send(chunk_of(LAYOUT, "ep", seed, (0, 4), (0, 16), epoch=6), dest)
    with pytest.raises(KVTransferError, match="stale placement epoch: chunk of ep carries placement epoch 6, "
                                              "its blocks here were prepared for epoch 7"):
        h.wait(10)
    assert remote.call("state", "ep") == "pending"
    send_all(sender, [chunk_of(LAYOUT, "ep", seed, (0, 4), (0, 16), epoch=7),
                      chunk_of(LAYOUT, "ep", seed, (0, 4), (16, 32), epoch=7)], dest)
    assert remote.call("wait_complete", "ep", 10.0) is True
    assert remote.call("verify", seed, table, 0, list(range(4)), n) is None


def test_a_chunk_whose_bytes_fail_their_checksum_fails_the_request(remote, sender, block_pool, monkeypatch):
    """The receiver computes the checksum again over what arrived (TCP) or landed in its cache (NIXL):
    a chunk whose bytes do not match the checksum it came with (here the sender's is off by one bit)
    is never counted as arrived, and its request fails naming the mismatch."""
    n, seed = 32, 20
    table = shuffled_table(n, block_pool)
    dest = KVDest(table, 0)
    remote.call("expect", "crc", table, 0, range(4), n)
    send_all(sender, [chunk_of(LAYOUT, "crc", seed, (0, 4), (0, 16))], dest)
    real = session.kv_checksum
    monkeypatch.setattr(session, "kv_checksum", lambda k, v: real(k, v) ^ 1)
    h = sender.send(chunk_of(LAYOUT, "crc", seed, (0, 4), (16, 32)), dest)
    with pytest.raises(KVTransferError, match=CHECKSUM_MISMATCH):
        h.wait(10)
    assert remote.call("state", "crc") == "failed"
    with pytest.raises(KVTransferError, match=CHECKSUM_MISMATCH):
        remote.call("wait_complete", "crc", 1.0)
    remote.call("cancel", "crc")


def test_a_bit_flipped_in_flight_fails_the_request(block_pool):
    """TCP through a proxy that flips one payload bit: the receiver's checksum catches it."""
    caches = make_caches(LAYOUT, NUM_BLOCKS)
    with make_receiver("tcp", LAYOUT, caches) as rx, CorruptingProxy(rx.address) as proxy, \
            make_sender("tcp", LAYOUT) as s:
        s.connect(proxy.address, timeout=10)
        table = shuffled_table(40, block_pool)
        rx.expect("flip", table, 0, range(4), 40)
        h = s.send(chunk_of(LAYOUT, "flip", 21, (0, 4), (0, 40)), KVDest(table, 0))
        with pytest.raises(KVTransferError, match=CHECKSUM_MISMATCH):
            h.wait(10)
        assert proxy.flipped.is_set() and rx.state("flip") is TransferState.FAILED


def test_invalid_chunk_raises_and_the_connection_survives(remote, sender, block_pool):
    table = shuffled_table(16, block_pool)
    dest = KVDest(table, 0)
    good = chunk_of(LAYOUT, "inv", 18, (0, 4), (0, 16))
    with pytest.raises(KVTransferError, match="shape"):
        sender.send(replace(good, k=good.k[:, :8]), dest)
    with pytest.raises(KVTransferError, match="float32"):
        sender.send(replace(good, k=good.k.double()), dest)
    with pytest.raises(KVTransferError, match="not covered"):
        sender.send(chunk_of(LAYOUT, "inv", 18, (0, 4), (0, 17)), dest)
    remote.call("expect", "inv", table, 0, range(4), 16)
    send_all(sender, [good], dest)
    assert remote.call("wait_complete", "inv", 10.0) is True


@pytest.mark.parametrize("field,value", [("dtype", "bfloat16"), ("num_kv_heads", 4), ("block_size", 32),
                                         ("num_layers", 8), ("model", "other-model")])
def test_layout_mismatch_refused_naming_the_field(remote, field, value):
    s = make_sender(remote.backend, replace(LAYOUT, **{field: value}))
    with pytest.raises(KVTransferError, match=field):
        s.connect(remote.address, timeout=10)
    s.close()


def test_backend_mismatch_refused(remote):
    other = "tcp" if remote.backend == "nixl" else "nixl"
    s = make_sender(other, LAYOUT)
    with pytest.raises(KVTransferError, match="backend"):
        s.connect(remote.address, timeout=10)
    s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_in_process(backend):
    lay = replace(LAYOUT, dtype="bfloat16", model="bf16")
    caches = make_caches(lay, 32)
    with make_receiver(backend, lay, caches) as rx, make_sender(backend, lay) as s:
        s.connect(rx.address)
        table = [5, 6, 7, 30, 2]
        rx.expect("b", table, 64, range(4), 70)
        h = s.send(chunk_of(lay, "b", 21, (0, 4), (64, 134)), KVDest(table, 64))
        assert h.wait(10) and rx.wait_complete("b", 10)
        assert verify(lay, caches, 21, table, 64, list(range(4)), 70) is None


# ---- failures --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_hung_then_killed_fails_senders(backend):
    rx = RemoteReceiver(backend)
    try:
        table = list(range(8))
        rx.call("expect", "r", table, 0, range(4), 128)
        s1, s2 = make_sender(backend, LAYOUT), make_sender(backend, LAYOUT)
        s1.connect(rx.address, timeout=10)
        s2.connect(rx.address, timeout=10)
        send_all(s1, [chunk_of(LAYOUT, "r", 3, (0, 4), (0, 16))], KVDest(table, 0))
        os.kill(rx.proc.pid, signal.SIGSTOP)          # hung receiver: the deadline fails the transfer
        t = time.monotonic()
        h1 = s1.send(chunk_of(LAYOUT, "r", 3, (0, 4), (16, 32)), KVDest(table, 0), timeout=1.0)
        with pytest.raises(KVTransferError, match="deadline"):
            h1.wait(10)
        assert h1.state is TransferState.FAILED and time.monotonic() - t < 5
        with pytest.raises(KVTransferError):
            s1.send(chunk_of(LAYOUT, "r", 3, (0, 4), (32, 48)), KVDest(table, 0))
        # a receiver that dies is noticed at once, long before the transfer's own deadline
        h2 = s2.send(chunk_of(LAYOUT, "r", 3, (0, 4), (48, 64)), KVDest(table, 0), timeout=60.0)
        assert h2.state is not TransferState.DONE
        t = time.monotonic()
        rx.kill()
        with pytest.raises(KVTransferError):
            h2.wait(20)
        assert h2.state is TransferState.FAILED and time.monotonic() - t < 10
        s1.close()
        s2.close()
    finally:
        if rx.proc.is_alive():
            os.kill(rx.proc.pid, signal.SIGCONT)
        rx.kill()


def _sender_main(backend: str, address: str, pipe) -> None:
    s = make_sender(backend, LAYOUT)
    s.connect(address, timeout=10)
    table = list(range(4))
    assert s.send(chunk_of(LAYOUT, "k", 5, (0, 4), (0, 16)), KVDest(table, 0)).wait(10)
    pipe.send("first done")
    s.send(chunk_of(LAYOUT, "k", 5, (0, 4), (16, 48)), KVDest(table, 0))   # never the last tokens
    pipe.send("second started")
    time.sleep(60)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sender_killed_mid_request_fails_it(backend):
    caches = make_caches(LAYOUT, 8)
    with make_receiver(backend, LAYOUT, caches) as rx:
        rx.expect("k", list(range(4)), 0, range(4), 64)
        ctx = mp.get_context("spawn")
        pipe, child = ctx.Pipe()
        proc = ctx.Process(target=_sender_main, args=(backend, rx.address, child), daemon=True)
        proc.start()
        try:
            assert pipe.poll(60) and pipe.recv() == "first done"
            assert rx.state("k") is TransferState.TRANSFERRING
            assert pipe.poll(30) and pipe.recv() == "second started"
            proc.kill()
            t = time.monotonic()
            with pytest.raises(KVTransferError, match="sender"):
                rx.wait_complete("k", 10)
            assert rx.state("k") is TransferState.FAILED and time.monotonic() - t < 5
            rx.cancel("k")
            assert rx.poll() == {}
        finally:
            proc.kill()
            proc.join(10)


# ---- pure pieces -----------------------------------------------------------------------------------
def test_tracker_counts_a_cached_prefix_as_arrived_and_refuses_it_resent():
    """Tokens 8..17 expected, the first 4 (a cached prefix) in the blocks already: resending them is a
    duplicate, and the request completes when tokens 12..17 of every layer arrived."""
    from common.kv_transfer.base import blocks_crc
    tr = RequestTracker(block_size=4, num_blocks=16, layers=range(2))
    with pytest.raises(KVTransferError, match="have"):
        tr.expect("r", [3, 1, 2], 8, [0, 1], 10, have=10)
    tr.expect("r", [3, 1, 2], 8, [0, 1], 10, have=4)
    crc = lambda a, b: blocks_crc([3, 1, 2], 4, 8, (a, b))   # noqa: E731
    assert tr.arrived("r") == 8
    res = tr.begin(1, "r", (0, 2), (12, 18), 8, crc(12, 18))
    assert tr.commit(res) == (True, None) and tr.wait("r", 0)
    tr.cancel("r")
    tr.expect("r", [3, 1, 2], 8, [0, 1], 10, have=4)
    with pytest.raises(ChunkRejected, match="duplicate"):
        tr.begin(1, "r", (0, 1), (10, 14), 8, crc(10, 14))


def test_slot_runs_merge_consecutive_blocks():
    dest = KVDest([7, 8, 3, 4, 5], group_start=100)
    # tokens 110..150 -> slots 10..50: block 7 off 10 .. block 8 (merged), then 3,4 (merged)
    assert dest.slot_runs((110, 150), 16) == [(7 * 16 + 10, 0, 22), (3 * 16, 22, 18)]
    with pytest.raises(KVTransferError, match="not covered"):
        dest.slot_runs((90, 120), 16)


def test_tracker_exactly_once():
    tr = RequestTracker(block_size=4, num_blocks=16, layers=range(2))
    tr.expect("r", [3, 1, 2], 8, [0, 1], 10)
    from common.kv_transfer.base import blocks_crc
    crc = lambda a, b: blocks_crc([3, 1, 2], 4, 8, (a, b))   # noqa: E731
    a = tr.begin(1, "r", (0, 2), (8, 12), 8, crc(8, 12))
    with pytest.raises(ChunkRejected):                        # overlaps a reservation in flight
        tr.begin(2, "r", (1, 2), (11, 13), 8, crc(11, 13))
    assert tr.state("r")[0] is TransferState.FAILED
    tr.cancel("r")
    tr.expect("r", [3, 1, 2], 8, [0, 1], 10)
    assert tr.commit(a) == (False, "request r was cancelled")
    for t0, t1 in ((8, 12), (12, 18)):
        for l in (0, 1):
            res = tr.begin(1, "r", (l, l + 1), (t0, t1), 8, crc(t0, t1))
            assert tr.commit(res)[0]
            assert tr.wait("r", 0) is (t1 == 18 and l == 1)
