"""Which instances are alive: the kvstore's view of the heartbeats (in Redis), cached briefly."""
from __future__ import annotations

import collections
import time

from common.client import KVStoreClient
from common.metadata.types import Instance


class Discovery:
    def __init__(self, kvstore: KVStoreClient, ttl_s: float) -> None:
        self.kvstore = kvstore
        self.ttl_s = ttl_s
        self._cache: list[Instance] = []
        self._at = -1e9
        self.inflight: collections.Counter[str] = collections.Counter()   # this router's requests per instance

    async def instances(self, role: str | None = None, *, fresh: bool = False) -> list[Instance]:
        """The live instances (of `role`); `fresh` asks the kvstore now instead of the cache."""
        if fresh or time.monotonic() - self._at > self.ttl_s:
            self._cache = await self.kvstore.list_instances()
            self._at = time.monotonic()
        return [i for i in self._cache if role is None or i.role == role]

    async def pick_prefill(self) -> Instance | None:
        """The live prefill instance with the fewest of our requests (then by id); None if none."""
        live = await self.instances("prefill")
        return min(live, key=lambda i: (self.inflight[i.instance_id], i.instance_id), default=None)
