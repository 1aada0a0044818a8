"""Content-addressed KV blocks: a full block is named by a hash chained over every token before it.

    h_0 = H(root, tokens[0:B]),  h_j = H(h_{j-1}, tokens[jB:(j+1)B]),  root = H(salt)

A block's K/V depend only on the tokens up to its end (absolute positions, causal attention), so two
requests whose first (j+1)B tokens are equal can share block j. The salt names what else the numbers
depend on (model, dtype, block size, KVP layout), so blocks of different engines never share a name.
Pure Python (no torch); BLAKE2b-128, stable across processes, so an index outside the engine (the
kvstore) could name the same blocks later.
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Callable, Sequence


def root_hash(salt: str) -> bytes:
    return hashlib.blake2b(salt.encode(), digest_size=16, person=b"mnemo-kv-root").digest()


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The name of a full block whose tokens are `tokens`, after the blocks named up to `parent`."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def extend_hashes(hashes: list[bytes], root: bytes, block_size: int, num_tokens: int,
                  tokens: Callable[[int, int], Sequence[int]]) -> list[bytes]:
    """Extends `hashes` (in place) to name every full block of the first `num_tokens` tokens;
    `tokens(start, end)` gives the token ids. Returns `hashes`."""
    for j in range(len(hashes), num_tokens // block_size):
        hashes.append(block_hash(hashes[-1] if hashes else root, tokens(j * block_size, (j + 1) * block_size)))
    return hashes
