"""Fast CPU attention on PyTorch's flash kernel, exact for every layout of the contract.

The kernel, aten::_scaled_dot_product_flash_attention_for_cpu, takes [B, H, L, D] and returns
(out [B, H, L, D] in the input dtype, lse [B, H, L] float32 natural log). Its is_causal is TOP-LEFT
aligned, it crashes the process (SIGFPE) on zero queries or zero keys, with an additive mask a fully
masked row gives lse 0 (not -inf), and it silently computes garbage when the last (head) dim is not
unit-stride (any other strides, even 0, are fine, so K/V are passed as strided views, not copied).
So we never call it with an empty side or a mask, and the keys are split

    A = keys at positions <= q_start        (visible to every query: non-causal)
    B = keys at positions q_start+1 .. q_start+n-1   seen by queries 1..n-1 (top-left causal is right:
        query i sees B key j iff j <= i - 1, and rows past the last key see all of B)

and the two are merged with `merge_attention_states`. Keys after the last query are dropped; queries
before the first key (k_start > q_start) are empty rows (0, -inf) and the rest start at k_start. Decode
(n == 1, L == q_start + 1 - k_start) is a single non-causal call.

Batched decode over the paged cache (`decode_paged`) gathers the blocks of many sequences into one
reused workspace (index_select with out=: a fresh multi-megabyte buffer per call costs page faults that
took longer than the copy) and attends them in as few kernel calls as padding allows: sequences are
bucketed by length, each bucket is one call over [B, Hkv, L_max, D] with an additive 0/-inf mask on the
padding (the mask's dtype must be the query's: a float32 mask on float64 inputs gives wrong results).
A single sequence whose blocks are consecutive is attended in place, without a copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.attention.base import AttentionBackend
from common.attention.merge import merge_attention_states
from common.attention.reference import check_shapes

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

# Decode buckets: a bucket's padded key count may exceed its real key count by this factor, and one
# call gathers at most this many key slots (bounds the workspace: 2 * slots * Hkv * D elements).
PAD_SLACK = 1.25
MAX_BUCKET_SLOTS = 1 << 18


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernel assumes stride 1 along the head dim and reads wrong data otherwise."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty(n: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_zeros(n, q.shape[1], q.shape[2]),
            torch.full((n, q.shape[1]), float("-inf"), dtype=lse_dtype, device=q.device))


def _noncausal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query sees every key. q [n, Hq, D], k, v [L, Hkv, D], n, L > 0.

    GQA without expanding K/V: rows are independent, so the g query heads of a kv head are folded into
    the sequence dim, q -> [1, Hkv, n*g, D].
    """
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qf = q.reshape(n, hkv, g, d).permute(1, 0, 2, 3).reshape(1, hkv, n * g, d)   # copies
    kf = k.permute(1, 0, 2).unsqueeze(0)          # [1, Hkv, L, D]; a strided view: a copy costs more
    vf = v.permute(1, 0, 2).unsqueeze(0)
    out, lse = _flash(_unit_last(qf), _unit_last(kf), _unit_last(vf), 0.0, False, scale=scale)      # [1, Hkv, n*g, D], [1, Hkv, n*g]
    out = out.reshape(hkv, n, g, d).permute(1, 0, 2, 3).reshape(n, hq, d)
    lse = lse.reshape(hkv, n, g).permute(1, 0, 2).reshape(n, hq)
    return out, lse


def _causal_topleft(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Query i sees keys j <= i (top-left). q [n, Hq, D], k, v [m, Hkv, D], 0 < m <= n: no row is empty."""
    g = q.shape[1] // k.shape[1]
    qf = q.permute(1, 0, 2).unsqueeze(0)                                  # [1, Hq, n, D]
    kf = k.repeat_interleave(g, dim=1).permute(1, 0, 2).unsqueeze(0)      # [1, Hq, m, D]
    vf = v.repeat_interleave(g, dim=1).permute(1, 0, 2).unsqueeze(0)
    out, lse = _flash(_unit_last(qf), _unit_last(kf), _unit_last(vf), 0.0, True, scale=scale)       # [1, Hq, n, D], [1, Hq, n]
    return out[0].permute(1, 0, 2), lse[0].transpose(0, 1)


class CpuFlashBackend(AttentionBackend):
    name = "cpu_flash"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int, k_start: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        check_shapes(q, k, v)
        n = q.shape[0]
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        skip = min(max(k_start - q_start, 0), n)     # queries before the first key: empty rows
        if skip:
            head_out, head_lse = _empty(skip, q)
            out, lse = self.forward(q[skip:], k, v, q_start=q_start + skip, k_start=k_start, scale=scale)
            return torch.cat([head_out, out]), torch.cat([head_lse, lse])
        # Now k_start <= q_start (or n == 0). Local key index of position p is p - k_start.
        n_a = min(k.shape[0], q_start + 1 - k_start)                 # keys at positions <= q_start
        n_b = min(k.shape[0], q_start + n - k_start) - n_a           # keys in (q_start, q_start + n)
        if n == 0 or n_a <= 0:
            return _empty(n, q)
        out, lse = _noncausal(q, k[:n_a], v[:n_a], scale)
        if n_b > 0:
            out_b, lse_b = _causal_topleft(q[1:], k[n_a:n_a + n_b], v[n_a:n_a + n_b], scale)
            out_m, lse_m = merge_attention_states([out[1:], out_b], [lse[1:], lse_b])
            out, lse = torch.cat([out[:1], out_m]), torch.cat([lse[:1], lse_m])
        return out.to(q.dtype), lse.to(lse_dtype)

    def __init__(self) -> None:
        self._workspace: torch.Tensor | None = None     # gathered K/V of decode buckets, reused
        self._plan: _DecodePlan | None = None            # the last decode batch's plan (every layer
                                                          # of a step decodes the same batch)

    def decode_paged(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched decode (contract in the base class): one kernel call per length bucket.

        q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] contiguous (a layer of
        PagedKVCache); block_tables [B, >= max blocks] int (entries past a sequence's blocks are never
        read); seq_lens [B]. Returns out [B, Hq, D] in q.dtype, lse [B, Hq] float32 (float64 for
        float64 q). Not thread-safe: calls share one workspace."""
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            return super().decode_paged(q, k_cache, v_cache, block_tables, seq_lens, scale=scale)
        check_shapes(q, k_cache[0], v_cache[0])
        b, hq, d = q.shape
        num_blocks, bs, hkv, _ = k_cache.shape
        g = hq // hkv
        plan = self._plan
        if plan is None or not plan.matches(block_tables, seq_lens, bs, q.dtype):
            plan = self._plan = _DecodePlan.build(block_tables, seq_lens, bs, q.dtype)
        if len(plan.buckets) == 1 and plan.buckets[0].rows is None:      # one bucket, rows in order
            out, lse = None, None
        else:
            out, lse = _empty(b, q)
        for bk in plan.buckets:
            n, L = bk.size, bk.keys
            qb = q if bk.rows is None else q.index_select(0, bk.rows)   # [n, Hq, D]
            qb = _unit_last(qb.reshape(n, hkv, g, d))                    # [n, Hkv, g, D]
            if bk.index is None:                                         # one sequence, consecutive blocks
                nb = -(-L // bs)
                kb = k_cache[bk.first_block:bk.first_block + nb].flatten(0, 1)[:L].unsqueeze(0)
                vb = v_cache[bk.first_block:bk.first_block + nb].flatten(0, 1)[:L].unsqueeze(0)
            else:
                kb, vb = self._gather(k_cache, v_cache, bk.index, n)      # [n, nb * bs, Hkv, D]
                kb, vb = kb[:, :L], vb[:, :L]
            o, l = _flash(qb, kb.permute(0, 2, 1, 3), vb.permute(0, 2, 1, 3), 0.0, False,
                          attn_mask=bk.mask, scale=scale)                # [n, Hkv, g, D], [n, Hkv, g]
            o, l = o.reshape(n, hq, d), l.reshape(n, hq)
            if out is None:
                return o, l
            out.index_copy_(0, bk.rows, o)
            lse.index_copy_(0, bk.rows, l.to(lse.dtype))
        return out, lse

    def _gather(self, k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor, n: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks `index` [n * nb] of both caches -> K, V [n, nb * block_size, Hkv, D], views of the
        workspace (valid until the next call)."""
        num_blocks, bs, hkv, d = k_cache.shape
        size = 2 * index.numel() * bs * hkv * d
        ws = self._workspace
        if ws is None or ws.numel() < size or ws.dtype != k_cache.dtype or ws.device != k_cache.device:
            # Grow by half again: decode lengths creep up a block at a time.
            ws = self._workspace = torch.empty(size + size // 2, dtype=k_cache.dtype, device=k_cache.device)
        kv = ws[:size].view(2, index.numel(), bs * hkv * d)
        torch.index_select(k_cache.view(num_blocks, -1), 0, index, out=kv[0])
        torch.index_select(v_cache.view(num_blocks, -1), 0, index, out=kv[1])
        kv = kv.view(2, n, -1, hkv, d)
        return kv[0], kv[1]


@dataclass(frozen=True)
class _Bucket:
    """Sequences attended in one kernel call."""
    rows: torch.Tensor | None      # [n] int64 batch rows (ascending); None: all rows of the batch, in order
    size: int                      # n
    keys: int                      # L: keys of its longest sequence; the others are masked past their own
    index: torch.Tensor | None     # [n * nb] int64 blocks to gather; None: one sequence read in place
    first_block: int               # (read in place) its first block
    mask: torch.Tensor | None      # [n, 1, 1, L] additive 0 / -inf in q's dtype; None: nothing to mask


@dataclass(frozen=True)
class _DecodePlan:
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    block_size: int
    dtype: torch.dtype
    buckets: list[_Bucket]

    def matches(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                dtype: torch.dtype) -> bool:
        """Compares values, not identities: a caller may refill the same tensors in place."""
        return (block_size == self.block_size and dtype == self.dtype
                and block_tables.shape == self.block_tables.shape and seq_lens.shape == self.seq_lens.shape
                and torch.equal(seq_lens, self.seq_lens) and torch.equal(block_tables, self.block_tables))

    @staticmethod
    def build(block_tables: torch.Tensor, seq_lens: torch.Tensor, bs: int, dtype: torch.dtype) -> _DecodePlan:
        dev = block_tables.device
        lens = [int(n) for n in seq_lens.tolist()]
        tables = block_tables.tolist()
        buckets = []
        groups = decode_buckets(lens, bs)
        for rows in groups:
            rows = sorted(rows)
            L = max(lens[r] for r in rows)
            nb = -(-L // bs)
            own = [tables[r][:-(-lens[r] // bs)] for r in rows]
            all_rows = len(groups) == 1 and rows == list(range(len(lens)))
            row_t = None if all_rows else torch.tensor(rows, dtype=torch.long, device=dev)
            if len(rows) == 1 and _consecutive(own[0]):
                buckets.append(_Bucket(row_t, 1, L, None, own[0][0], None))
                continue
            # A table shorter than nb is padded with its own first block: finite values, masked.
            index = torch.tensor([blk for t in own for blk in t + [t[0]] * (nb - len(t))],
                                 dtype=torch.long, device=dev)
            mask = None
            if any(lens[r] != L for r in rows):
                n_keys = torch.tensor([lens[r] for r in rows], device=dev)
                pad = torch.arange(L, device=dev)[None, :] >= n_keys[:, None]              # [n, L]
                mask = torch.zeros(len(rows), 1, 1, L, dtype=dtype, device=dev)
                mask.masked_fill_(pad.view(len(rows), 1, 1, L), float("-inf"))
            buckets.append(_Bucket(row_t, len(rows), L, index, 0, mask))
        return _DecodePlan(block_tables.clone(), seq_lens.clone(), bs, dtype, buckets)

def decode_buckets(lens: list[int], block_size: int, pad_slack: float = PAD_SLACK,
                   max_slots: int = MAX_BUCKET_SLOTS) -> list[list[int]]:
    """Groups the non-empty sequences of a decode batch (by index) for padded batched calls.

    Longest first; a sequence joins the current bucket while the bucket's padded block count
    (members x the longest's blocks) stays within `pad_slack` x its real block count and within
    `max_slots` key slots (a single sequence longer than that is a bucket of its own). Sequences of
    length 0 are in no bucket."""
    nbs = {i: -(-n // block_size) for i, n in enumerate(lens) if n > 0}
    order = sorted(nbs, key=lambda i: -nbs[i])
    buckets: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        if cur:
            width = nbs[cur[0]]
            padded = (len(cur) + 1) * width
            if padded <= pad_slack * (real + nbs[i]) and padded * block_size <= max_slots:
                cur.append(i)
                real += nbs[i]
                continue
            buckets.append(cur)
        cur, real = [i], nbs[i]
    if cur:
        buckets.append(cur)
    return buckets


def _consecutive(blocks: list[int]) -> bool:
    return all(b - a == 1 for a, b in zip(blocks, blocks[1:]))
