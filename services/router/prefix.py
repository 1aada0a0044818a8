"""Cache-aware routing's input: where a prompt's prefix is cached, per live instance, in tokens.

Every instance with prefix caching publishes the root and block size of the hash chain it names its
cached blocks by (SchedulingInfo.prefix_hash_root / prefix_block_size). The router hashes the prompt
under each distinct chain with the engines' own function (common/kv_cache/prefix.py, so the names are
byte-identical) and asks the kvstore's index (MatchPrefix) which instances hold how many leading
blocks. Only the full blocks of prompt[:-1] are hashed: an engine always computes the last prompt
token, so it never reuses more (common/scheduler/scheduler.py looks up num_tokens - 1).

The answer is the index's view at routing time (the instances' last heartbeats): the engine looks its
cache up again when the request starts, so a block evicted since costs its prefill, never wrong KV.
"""
from __future__ import annotations

import asyncio
import logging
from array import array
from typing import Sequence

from common.client import KVStoreClient
from common.errors import MnemosyneError
from common.kv_cache.prefix import extend_hashes
from common.metadata.types import Instance

log = logging.getLogger(__name__)

#: Prompts longer than this are hashed in a worker thread (about 1 s of hashing per 10M tokens).
HASH_IN_THREAD_TOKENS = 16_384


def prompt_hashes(prompt_ids: Sequence[int], root: bytes, block_size: int) -> list[bytes]:
    """The names of the full blocks of prompt_ids[:-1] under the chain (root, block_size), as an
    engine with that chain names them."""
    tokens = array("q", prompt_ids)
    return extend_hashes([], root, block_size, len(tokens) - 1, lambda s, e: tokens[s:e])


def chains(instances: Sequence[Instance]) -> dict[tuple[str, int], list[str]]:
    """(hash root in hex, block size) -> the ids of the instances naming their blocks under it."""
    out: dict[tuple[str, int], list[str]] = {}
    for inst in instances:
        s = inst.scheduling
        if s is not None and s.prefix_hash_root and s.prefix_block_size > 0:
            out.setdefault((s.prefix_hash_root, s.prefix_block_size), []).append(inst.instance_id)
    return out


async def match_prefix(kvstore: KVStoreClient, instances: Sequence[Instance],
                       prompt_ids: Sequence[int]) -> dict[str, int]:
    """Instance id -> prompt tokens found in its prefix cache (only instances holding at least one
    block). {} when no instance caches, the prompt is shorter than a block, or the kvstore failed
    (logged: routing then goes on without the cache)."""
    by_chain = chains(instances)
    if not by_chain:
        return {}

    async def one(root_hex: str, block_size: int, ids: list[str]) -> dict[str, int]:
        if len(prompt_ids) - 1 < block_size:
            return {}
        root = bytes.fromhex(root_hex)
        if len(prompt_ids) > HASH_IN_THREAD_TOKENS:
            hashes = await asyncio.to_thread(prompt_hashes, prompt_ids, root, block_size)
        else:
            hashes = prompt_hashes(prompt_ids, root, block_size)
        held = await kvstore.match_prefix(hashes)
        return {i: held[i] * block_size for i in ids if held.get(i, 0) > 0}

    try:
        found = await asyncio.gather(*(one(root, bs, ids) for (root, bs), ids in by_chain.items()))
    except MnemosyneError as e:
        log.warning("prefix match at the kvstore failed (%s): routing without the cache", e)
        return {}
    return {i: n for part in found for i, n in part.items()}
