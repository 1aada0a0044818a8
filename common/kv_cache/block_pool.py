"""Paged KV cache bookkeeping: a pool of fixed-size blocks with reference counts and a free list,
and per-request block tables. Pure Python (no torch): the scheduler uses it to decide capacity.

Ownership: the pool owns every block. A request holds references through its BlockTable; freeing the
table drops them. A block returns to the free list when its count reaches zero. `check()` verifies
used + free == total and that counts match the live tables; tests call it after every operation.
"""
from __future__ import annotations

from collections import deque

from common.errors import CapacityError


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.tables: dict[str, list[int]] = {}

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        """Whether the request's table can grow to hold `num_tokens` tokens."""
        need = self.blocks_for(num_tokens) - len(self.tables.get(request_id, ()))
        return need <= self.num_free

    # ---- mutations -----------------------------------------------------------------------------
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
        for _ in range(max(need, 0)):
            block = self.free_ids.popleft()
            self.ref_counts[block] = 1
            table.append(block)
        return table

    def fork(self, src_id: str, dst_id: str) -> list[int]:
        """Shares src's blocks with a new request (copy-free prefix sharing)."""
        if dst_id in self.tables:
            raise ValueError(f"request {dst_id} already has blocks")
        table = list(self.tables.get(src_id, ()))
        for block in table:
            self.ref_counts[block] += 1
        self.tables[dst_id] = table
        return table

    def free(self, request_id: str) -> int:
        """Drops the request's references; returns how many blocks went back to the free list."""
        freed = 0
        for block in self.tables.pop(request_id, ()):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_ids.append(block)
                freed += 1
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
        used = sum(1 for c in self.ref_counts if c > 0)
        assert used + len(free) == self.num_blocks, (
            f"used {used} + free {len(free)} != total {self.num_blocks}")
