"""Paged KV cache bookkeeping: a pool of fixed-size blocks with reference counts and a free list,
and per-request block tables. Pure Python (no torch): the scheduler uses it to decide capacity.

Ownership: the pool owns every block. A request holds references through its BlockTable; freeing the
table drops them. A block whose count reaches zero returns to the free list, or, when it holds a
named full block (prefix caching, see prefix.py), to the cache of reclaimable blocks.

Prefix caching (`prefix_caching=True`): `register` names a request's full, computed blocks by their
chained hashes; `acquire` starts a new request's table with the longest run of named blocks matching
its hashes (shared, one more reference each). A block nobody references keeps its name and K/V in
`cached` (least recently used first) until an allocation needs it: only then is it evicted (its name
dropped) and handed out. A referenced block is never in `cached`, so a block in use is never evicted.
Cached blocks count as free (`num_free`: what an allocation can get); `num_cached` says how many of
them are reclaimable cache.

Quarantine: a block a KV transfer may still write into (NIXL granted a one-sided write that neither
completed nor could be recalled when its request was cancelled) is never handed out again: once
nobody references it, it stays out of the free list and the cache (`num_quarantined`, counted as
used), so a late write lands in a block no request reads.

`check()` verifies used + free + cached (+ unreferenced quarantined) == total, that counts match the
live tables, and that the names and the cache agree; tests call it after every operation.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Sequence

from common.errors import CapacityError
from common.kv_cache.prefix import root_hash


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False, salt: str = "") -> None:
        """`salt`: what the K/V depend on besides the tokens (see prefix.py); gives `hash_root`."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.hash_root = root_hash(f"{salt}|block_size={block_size}")
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.tables: dict[str, list[int]] = {}
        self.cached: OrderedDict[int, None] = OrderedDict()   # unreferenced named blocks, LRU first
        self.block_hash: dict[int, bytes] = {}                 # named block -> its hash
        self.by_hash: dict[bytes, int] = {}                    # and back
        self.named: dict[str, int] = {}                        # request -> leading table entries registered
        self.quarantined: set[int] = set()                     # never handed out again (see the docstring)
        self.evictions = 0

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can get: free ones and reclaimable cached ones."""
        return len(self.free_ids) + len(self.cached)

    @property
    def num_cached(self) -> int:
        """Reclaimable blocks that still hold a named prefix (part of num_free)."""
        return len(self.cached)

    @property
    def num_quarantined(self) -> int:
        """Blocks withheld for good: a write may still land in them (part of num_used)."""
        return len(self.quarantined)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        """Whether the request's table can grow to hold `num_tokens` tokens."""
        need = self.blocks_for(num_tokens) - len(self.tables.get(request_id, ()))
        return need <= self.num_free

    def lookup(self, hashes: Sequence[bytes]) -> int:
        """How many leading `hashes` name blocks held here (in use or cached)."""
        n = 0
        for h in hashes:
            if h not in self.by_hash:
                break
            n += 1
        return n

    # ---- mutations -----------------------------------------------------------------------------
    def _take(self) -> int:
        """A block for new K/V: a free one, else the least recently used cached one (evicted)."""
        if self.free_ids:
            return self.free_ids.popleft()
        block, _ = self.cached.popitem(last=False)
        del self.by_hash[self.block_hash.pop(block)]
        self.evictions += 1
        return block

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grows the request's table to cover `num_tokens` tokens; returns the whole table.

        Raises CapacityError (and changes nothing) when there are not enough free blocks.
        """
        table = self.tables.setdefault(request_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free:
            if not table:
                del self.tables[request_id]
            raise CapacityError(f"KV cache full: request {request_id} needs {need} more blocks, "
                                f"{self.num_free} of {self.num_blocks} free")
        # One allocation's blocks in id order: runs of consecutive blocks (attended and transferred as
        # views) even where the free list hands them out descending (free() releases tails first).
        for block in sorted(self._take() for _ in range(max(need, 0))):
            self.ref_counts[block] = 1
            table.append(block)
        return table

    def acquire(self, request_id: str, hashes: Sequence[bytes]) -> int:
        """Appends to the request's (empty) table the blocks named by the longest run of leading
        `hashes` held here, one more reference each; returns how many. The caller must not write
        into them: they are full, and may be shared."""
        table = self.tables.setdefault(request_id, [])
        if table:
            raise ValueError(f"request {request_id} already has blocks")
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.cached[block]
            self.ref_counts[block] += 1
            table.append(block)
        if not table:
            del self.tables[request_id]
        else:
            self.named[request_id] = len(table)
        return len(table)

    def register(self, request_id: str, hashes: Sequence[bytes]) -> None:
        """Names the request's first len(hashes) table blocks (full, their K/V computed). A block
        whose name another block already has stays unnamed (its K/V equal; the first one serves)."""
        if not self.prefix_caching:
            return
        table = self.tables.get(request_id)
        if table is None:
            return
        start = self.named.get(request_id, 0)
        end = min(len(hashes), len(table))
        for i in range(start, end):
            block, h = table[i], hashes[i]
            if block not in self.block_hash and h not in self.by_hash:
                self.block_hash[block] = h
                self.by_hash[h] = block
        if end > start:
            self.named[request_id] = end

    def fork(self, src_id: str, dst_id: str) -> list[int]:
        """Shares src's blocks with a new request (copy-free prefix sharing)."""
        if dst_id in self.tables:
            raise ValueError(f"request {dst_id} already has blocks")
        table = list(self.tables.get(src_id, ()))
        for block in table:
            self.ref_counts[block] += 1
        self.tables[dst_id] = table
        return table

    def quarantine(self, blocks: Sequence[int]) -> int:
        """Withholds `blocks` for good: a late write may land in them. Their names are dropped (no
        prefix is ever served from them); a referenced one leaves circulation when its last holder
        frees it. Returns how many were not quarantined before."""
        new = 0
        for block in blocks:
            if block in self.quarantined:
                continue
            self.quarantined.add(block)
            new += 1
            h = self.block_hash.pop(block, None)
            if h is not None:
                del self.by_hash[h]
            if self.ref_counts[block] == 0:
                if block in self.cached:
                    del self.cached[block]
                else:
                    self.free_ids.remove(block)
        return new

    def drop_names(self) -> int:
        """Forgets every block's name: the K/V of this pool's blocks is gone (the worker that held
        them was replaced with an empty cache). Cached blocks become free. Returns how many names
        were dropped."""
        n = len(self.block_hash)
        self.free_ids.extend(self.cached)
        self.cached.clear()
        self.block_hash.clear()
        self.by_hash.clear()
        self.named.clear()
        return n

    def free(self, request_id: str) -> int:
        """Drops the request's references; returns how many blocks nobody references any more (back
        to the free list, or to the cache when named). The table's tail goes first, so that under
        eviction a prefix outlives its continuations. When no table is left, the free list is put
        in id order."""
        freed = 0
        self.named.pop(request_id, None)
        for block in reversed(self.tables.pop(request_id, ())):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self.quarantined:
                    continue                    # out of circulation for good (not counted as freed)
                if block in self.block_hash:
                    self.cached[block] = None
                else:
                    self.free_ids.append(block)
                freed += 1
        if not self.tables and freed:
            # Idle: nothing to keep apart, so the next requests get consecutive blocks. Without it a
            # pool's start-up calibration (blocks handed out one at a time, interleaved) leaves the
            # free list scattered, and a long prompt's table a run per block.
            self.free_ids = deque(sorted(self.free_ids))
        return freed

    def check(self) -> None:
        """Raises AssertionError if the pool's invariants do not hold."""
        counts = [0] * self.num_blocks
        for table in self.tables.values():
            for block in table:
                counts[block] += 1
        assert counts == self.ref_counts, "reference counts do not match the live block tables"
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), "a block is on the free list twice"
        assert all(self.ref_counts[b] == 0 for b in free), "a referenced block is on the free list"
        assert all(self.ref_counts[b] == 0 for b in self.cached), "a referenced block is in the cache"
        assert not free & self.cached.keys(), "a block is both free and cached"
        assert not self.quarantined & (free | self.cached.keys()), "a quarantined block is free or cached"
        assert not any(b in self.block_hash for b in self.quarantined), "a quarantined block has a name"
        assert all(b in self.block_hash for b in self.cached), "a cached block has no name"
        assert not any(b in self.block_hash for b in free), "a free block still has a name"
        assert len(self.by_hash) == len(self.block_hash) and all(
            self.by_hash.get(h) == b for b, h in self.block_hash.items()), "block names are not one-to-one"
        assert self.prefix_caching or not self.block_hash, "a block is named with prefix caching off"
        used = sum(1 for c in self.ref_counts if c > 0)
        idle = sum(1 for b in self.quarantined if self.ref_counts[b] == 0)
        assert used + idle + len(free) + len(self.cached) == self.num_blocks, (
            f"used {used} + quarantined unreferenced {idle} + free {len(free)} + cached {len(self.cached)} "
            f"!= total {self.num_blocks}")
        assert all(rid in self.tables and n <= len(self.tables[rid]) for rid, n in self.named.items()), (
            "a registration count outlives its table")
