"""Block accounting for a request whose KV is sharded over KVP groups (torch-free).

Group g holds the request's tokens [g*M, (g+1)*M) in its own pool. The manager has the BlockPool
interface the scheduler uses (`can_allocate`, `allocate`, `free`, `blocks_for`, `num_blocks`,
`num_free`, `check`) with token counts meaning the request's total tokens; `table()` returns one local
block table per group.

Prefix caching: the request's full blocks are named by one hash chain over its tokens (prefix.py);
global block j (tokens [jB, (j+1)B)) lives in group j // (M / B), so a cached prefix spans the groups
exactly as a live one does and `acquire` hands a new request, group by group, the blocks that hold its
prefix. It needs M to be a multiple of the block size B (else a group's last block would be partial);
the manager turns it off otherwise.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from common.errors import CapacityError
from common.kv_cache.block_pool import BlockPool
from common.kv_cache.prefix import root_hash


def kvp_split(num_tokens: int, max_new_tokens: int, kvp_tokens: int,
              block_size: int) -> tuple[tuple[int, int, int], ...]:
    """Where a request's KV lives over KVP groups of M = kvp_tokens tokens (0: one group holds all):
    per group (token_start, prompt_end, blocks). The prompt fills groups in order; generated tokens go
    after it in its last group until that group holds M tokens, then to the next group, as
    KVPBlockManager allocates them, so no group holds more than M. A group past the prompt has
    prompt_end == token_start. The one rule the kvstore's placement and the router's admission share."""
    total = num_tokens + max_new_tokens
    m = kvp_tokens if kvp_tokens > 0 else total
    out = []
    for k in range(-(-total // m)):
        start = k * m
        end = min(total, start + m)
        out.append((start, max(start, min(num_tokens, end)), -(-(end - start) // block_size)))
    return tuple(out)


class KVPBlockManager:
    def __init__(self, kvp: int, kvp_tokens: int, blocks_per_group: int, block_size: int,
                 prefix_caching: bool = False, salt: str = "") -> None:
        """`salt`: what the K/V depend on besides the tokens (model, dtype, layout): see prefix.py."""
        self.kvp = kvp
        self.kvp_tokens = kvp_tokens
        self.block_size = block_size
        self.prefix_caching = prefix_caching and (kvp == 1 or kvp_tokens % block_size == 0)
        self.hash_root = root_hash(f"{salt}|block_size={block_size}|kvp_tokens={kvp_tokens if kvp > 1 else 0}")
        self.group_blocks = kvp_tokens // block_size if kvp > 1 else None   # blocks of one group's M tokens
        self.pools = [BlockPool(blocks_per_group, block_size, self.prefix_caching) for _ in range(kvp)]

    @property
    def max_tokens(self) -> int:
        return self.kvp * self.kvp_tokens

    @property
    def num_blocks(self) -> int:
        return sum(p.num_blocks for p in self.pools)

    @property
    def num_free(self) -> int:
        return sum(p.num_free for p in self.pools)

    @property
    def num_used(self) -> int:
        return sum(p.num_used for p in self.pools)

    @property
    def num_cached(self) -> int:
        return sum(p.num_cached for p in self.pools)

    @property
    def evictions(self) -> int:
        return sum(p.evictions for p in self.pools)

    def split(self, num_tokens: int) -> list[int]:
        """Tokens of a request of `num_tokens` tokens that each group holds."""
        m = self.kvp_tokens
        return [max(0, min(num_tokens - g * m, m)) for g in range(self.kvp)]

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed across groups; more than the whole cache when the request cannot fit at all."""
        if num_tokens > self.max_tokens:
            return self.num_blocks + 1
        return sum(p.blocks_for(n) for p, n in zip(self.pools, self.split(num_tokens)))

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        if num_tokens > self.max_tokens:
            return False
        return all(n == 0 or p.can_allocate(request_id, n) for p, n in zip(self.pools, self.split(num_tokens)))

    def allocate(self, request_id: str, num_tokens: int) -> None:
        """Grows the request's tables (no copy returned: the scheduler calls this every step)."""
        if not self.can_allocate(request_id, num_tokens):
            raise CapacityError(f"KV cache full: request {request_id} cannot grow to {num_tokens} tokens "
                                f"over {self.kvp} KVP groups of {self.kvp_tokens} tokens")
        for p, n in zip(self.pools, self.split(num_tokens)):
            if n:
                p.allocate(request_id, n)

    def by_group(self, hashes: Sequence[bytes]) -> list[Sequence[bytes]]:
        """The request's block hashes cut into each group's run (global block j -> group j // (M/B))."""
        if self.group_blocks is None:
            return [hashes]
        g = self.group_blocks
        return [hashes[k * g:(k + 1) * g] for k in range(self.kvp)]

    def lookup(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks named by `hashes` the groups hold."""
        n = 0
        for pool, run in zip(self.pools, self.by_group(hashes)):
            k = pool.lookup(run)
            n += k
            if k < len(run) or not run:
                break
        return n

    def acquire(self, request_id: str, hashes: Sequence[bytes]) -> int:
        """Starts the request's tables with its longest cached prefix (BlockPool.acquire, group by
        group); returns the blocks reused. The request must hold no blocks."""
        if any(request_id in p.tables for p in self.pools):
            raise ValueError(f"request {request_id} already has blocks")
        n = 0
        for pool, run in zip(self.pools, self.by_group(hashes)):
            k = pool.acquire(request_id, run)
            n += k
            if k < len(run) or not run:
                break
        return n

    def acquire_groups(self, request_id: str, hashes: Sequence[bytes]) -> list[int]:
        """Starts each group's table with the longest cached run of that group's own blocks, group by
        group whether or not the groups before it had theirs (a block's name covers every token
        before it, so a cached later group is valid alone: after a worker holding an earlier group
        was replaced, the KV of the groups that survived is reused). Returns the blocks reused per
        group. The request must hold no blocks."""
        if any(request_id in p.tables for p in self.pools):
            raise ValueError(f"request {request_id} already has blocks")
        runs = self.by_group(hashes)
        return [pool.acquire(request_id, runs[k]) if k < len(runs) and runs[k] else 0
                for k, pool in enumerate(self.pools)]

    def register(self, request_id: str, hashes: Sequence[bytes]) -> None:
        """Names the request's full computed blocks, `hashes` covering them in token order."""
        for pool, run in zip(self.pools, self.by_group(hashes)):
            if not run:
                break
            pool.register(request_id, run)

    def table(self, request_id: str) -> list[list[int]]:
        return [list(p.table(request_id)) for p in self.pools]

    def free(self, request_id: str) -> int:
        return sum(p.free(request_id) for p in self.pools)

    def quarantine(self, by_group: Mapping[int, Iterable[int]]) -> int:
        """Withholds for good the blocks a late KV write may land in ({group: local block ids}:
        BlockPool.quarantine); returns how many were newly withheld."""
        return sum(self.pools[g].quarantine(list(ids)) for g, ids in by_group.items())

    @property
    def num_quarantined(self) -> int:
        return sum(p.num_quarantined for p in self.pools)

    def check(self) -> None:
        for p in self.pools:
            p.check()
