"""Block accounting for a request whose KV is sharded over KVP groups (torch-free).

Group g holds the request's tokens [g*M, (g+1)*M) in its own pool. The manager has the BlockPool
interface the scheduler uses (`can_allocate`, `allocate`, `free`, `blocks_for`, `num_blocks`,
`num_free`, `check`) with token counts meaning the request's total tokens; `table()` returns one local
block table per group.
"""
from __future__ import annotations

from common.errors import CapacityError
from common.kv_cache.block_pool import BlockPool


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
    def __init__(self, kvp: int, kvp_tokens: int, blocks_per_group: int, block_size: int) -> None:
        self.kvp = kvp
        self.kvp_tokens = kvp_tokens
        self.block_size = block_size
        self.pools = [BlockPool(blocks_per_group, block_size) for _ in range(kvp)]

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

    def table(self, request_id: str) -> list[list[int]]:
        return [list(p.table(request_id)) for p in self.pools]

    def free(self, request_id: str) -> int:
        return sum(p.free(request_id) for p in self.pools)

    def check(self) -> None:
        for p in self.pools:
            p.check()
