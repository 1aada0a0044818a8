"""The KV cache tensors of one worker: one contiguous buffer for all the layers it holds.

Layout: data [layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim]. One buffer, so that a
transfer backend (NIXL) registers the whole cache once. Slot s = block * block_size + offset.
"""
from __future__ import annotations

import math
import mmap

import torch


class PagedKVCache:
    def __init__(self, layers: range, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        self.layers = layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (len(layers), 2, num_blocks, block_size, kv_heads, head_dim)
        self._mem: mmap.mmap | None = None
        if torch.device(device).type == "cpu":
            self.data, self._mem = _lazy_zeros(shape, dtype)
        else:
            self.data = torch.zeros(shape, dtype=dtype, device=device)

    def k(self, layer: int) -> torch.Tensor:
        """[num_blocks, block_size, kv_heads, head_dim] view of layer `layer` (global index)."""
        return self.data[layer - self.layers.start, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.data[layer - self.layers.start, 1]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v [N, kv_heads, D] into slots [N] (int64)."""
        self.k(layer).view(-1, *k.shape[1:]).index_copy_(0, slots, k.to(self.data.dtype))
        self.v(layer).view(-1, *v.shape[1:]).index_copy_(0, slots, v.to(self.data.dtype))

    def gather(self, layer: int, block_table: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `num_tokens` keys and values of a block table: [num_tokens, kv_heads, D] each.

        A table of consecutive blocks (the common case for a fresh pool) is returned as a view,
        without copying.
        """
        nb = -(-num_tokens // self.block_size)
        blocks = block_table[:nb]
        k, v = self.k(layer), self.v(layer)
        if nb and blocks[-1] - blocks[0] == nb - 1 and _consecutive(blocks):
            b0 = blocks[0]
            return (k[b0:b0 + nb].flatten(0, 1)[:num_tokens], v[b0:b0 + nb].flatten(0, 1)[:num_tokens])
        idx = torch.tensor(blocks, dtype=torch.long, device=k.device)
        return (k.index_select(0, idx).flatten(0, 1)[:num_tokens],
                v.index_select(0, idx).flatten(0, 1)[:num_tokens])

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Slot ids of table positions [start, end)."""
        bs = self.block_size
        return [block_table[t // bs] * bs + t % bs for t in range(start, end)]


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, mmap.mmap]:
    """A zero tensor in private anonymous memory: the kernel hands out zero pages as they are first
    touched, so a cache of gigabytes costs nothing until it holds KV (torch.zeros wrote every byte at
    start: half of a decode grid's rebuild time). Zeros matter: a padded decode read multiplies the
    unwritten slots of a block by 0, and garbage (NaN) there would poison the result."""
    nbytes = math.prod(shape) * dtype.itemsize
    mem = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    flat = torch.frombuffer(mem, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).view(shape), mem


def _consecutive(blocks: list[int]) -> bool:
    return all(b - a == 1 for a, b in zip(blocks, blocks[1:]))
