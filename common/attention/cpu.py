"""Fast CPU attention on PyTorch's flash kernel, exact for every layout of the contract.

The kernel, aten::_scaled_dot_product_flash_attention_for_cpu, takes [B, H, L, D] and returns
(out [B, H, L, D] in the input dtype, lse [B, H, L] float32 natural log). Its is_causal is TOP-LEFT
aligned, it crashes the process (SIGFPE) on zero queries or zero keys, with an additive mask a fully
masked row gives lse 0 (not -inf), and it silently computes garbage when the last (head) dim is not
unit-stride (any other strides, even 0, are fine, so K/V are passed as strided views, not copied).
So `forward` never calls it with an empty side or a mask, and the keys are split

    A = keys at positions <= q_start        (visible to every query: non-causal)
    B = keys at positions q_start+1 .. q_start+n-1   seen by queries 1..n-1 (top-left causal is right:
        query i sees B key j iff j <= i - 1, and rows past the last key see all of B)

and the two are merged with `merge_attention_states` (when A is the first query's own key alone, A + B
is one top-left causal call, no merge). Keys after the last query are dropped; queries
before the first key (k_start > q_start) are empty rows (0, -inf) and the rest start at k_start. Decode
(n == 1, L == q_start + 1 - k_start) is a single non-causal call.

Batched decode over the paged cache (`decode_paged`, each query sees all of its sequence's keys) is
planned once per batch (the plan is reused while tables and lengths are equal: every layer of a step):
each sequence's blocks are cut into pieces of at most PIECE_BYTES of K and V, pieces of similar length
are bucketed (at most BUCKET_BYTES per bucket, padding at most PAD_SLACK of the real keys), and each
bucket is gathered into one reused workspace and attended in one kernel call over
[pieces, Hkv, L_max, D] with an additive 0/-inf mask on the padding; a sequence's pieces are merged
with `merge_stacked`. Why (measured in the engine, 2 cores, bench/results/engine.md):
  - a gathered piece is still in the cache when the kernel reads it; the kernel reading the cache's
    [token, head, dim] rows where they lie (a strided view, cold) was slower than copying first (in
    that engine measurement, with a plan of scattered blocks; for whole runs of consecutive blocks
    in place is faster, below), and one gather of a whole batch (100 MB at 8 x 8K tokens) no longer
    fits in any cache;
  - a fresh multi-megabyte gather buffer per call cost page faults that took longer than the copy
    (hence the reused workspace, index_select with out=);
  - the kernel parallelises over batch x heads: one sequence in one piece gives only Hkv tasks, badly
    shared by 2 threads when Hkv = 3; several pieces per call share them evenly.
Every piece has at least one real key, so no row is fully masked (where the kernel's lse would be 0).
The mask's dtype must be the query's (a float32 mask on float64 inputs gives wrong results).

A run of consecutive blocks in a sequence's table (its blocks but the last taken in id order: a
decode query sees every key, so their order is free, and a pool that freed blocks tail first hands
them out descending) holding at least MIN_VIEW_BLOCKS blocks and MIN_VIEW_BYTES of K and V is not
gathered: its keys lie in the cache as one [tokens, Hkv, D] range, so it is cut into equal pieces
that are one strided view ([pieces, Hkv, piece_len, D]) attended in one call, and the few keys left
over (fewer than the pieces) in a second (`_View`). No mask, and nothing outside the run is read. The gather was up to
half of a long decode (bench/results/decode_paged.md); a shorter run costs less gathered, bucketed
with other rows' pieces, than in a kernel call of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.attention.base import AttentionBackend
from common.attention.merge import merge_attention_states, merge_stacked
from common.attention.reference import check_shapes
from common.model import cpu_kernels

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

# Decode planning (see the module docstring): bytes of K and V per piece and per kernel call, and
# how much padding a bucket may add (as a fraction of its real keys).
PIECE_BYTES = 3 << 20
BUCKET_BYTES = 6 << 20
PAD_SLACK = 1.25
# Runs of consecutive blocks attended where they lie (`_View`): the shortest such run (in blocks and
# in K+V bytes: a shorter one is cheaper bucketed with other rows' pieces in one gathered call than in
# a kernel call of its own), the most keys per piece, the fewest keys a piece is cut to (pieces share
# the kernel's tasks among threads).
MIN_VIEW_BLOCKS = 16
MIN_VIEW_BYTES = 2 << 20
VIEW_PIECE_KEYS = 1 << 15
MIN_PIECE_KEYS = 512


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
    # decode_paged runs cpu_kernels.decode_attention wherever it applies: a whole decode step may then
    # run in one kernel call (common/model/decode_layers.py, ForwardContext.in_place_decode)
    cpu_decode_kernel = True

    def __init__(self) -> None:
        self._workspace: torch.Tensor | None = None     # gathered K/V of decode buckets, reused
        self._plan: _DecodePlan | None = None            # the last decode batch's plan (every layer
                                                          # of a step decodes the same batch)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int, k_start: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        check_shapes(q, k, v)
        # the chunk attention kernels of common/model/cpu_kernels.cpp where one applies (bfloat16 on
        # AVX512-BF16 builds, ~2x the flash kernel's rate; float32 and bfloat16 on AVX2 builds): one
        # call by position, no split and merge below
        done = cpu_kernels.chunk_attention(cpu_kernels.library(), q, k, v, q_start, k_start, scale)
        if done is not None:
            return done
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
        if n_a == 1:
            # no key before the chunk's first query (a prompt's first chunk): A is that query's own
            # key, and A + B is one top-left causal call, with no merge (the merge's elementwise
            # passes were 6-9% of a 1K-token prefill on 2 cores, float32 and bfloat16)
            out, lse = _causal_topleft(q, k[:1 + n_b], v[:1 + n_b], scale)
            return out.to(q.dtype), lse.to(lse_dtype)
        out, lse = _noncausal(q, k[:n_a], v[:n_a], scale)
        if n_b > 0:
            out_b, lse_b = _causal_topleft(q[1:], k[n_a:n_a + n_b], v[n_a:n_a + n_b], scale)
            out_m, lse_m = merge_attention_states([out[1:], out_b], [lse[1:], lse_b])
            out, lse = torch.cat([out[:1], out_m]), torch.cat([lse[:1], lse_m])
        return out.to(q.dtype), lse.to(lse_dtype)

    def decode_paged(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched decode (contract in the base class): on the decode attention kernel of
        common/model/cpu_kernels.cpp where it runs (AVX-512, AVX2; it reads each key where it lies, as one
        stream per thread), else planned over the flash kernel as in the module docstring.

        q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] contiguous (a layer of
        PagedKVCache); block_tables [B, >= max blocks] int (entries past a sequence's blocks are never
        read); seq_lens [B]. Returns out [B, Hq, D] in q.dtype, lse [B, Hq] float32 (float64 for
        float64 q). Not thread-safe: calls share one workspace."""
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            return super().decode_paged(q, k_cache, v_cache, block_tables, seq_lens, scale=scale)
        check_shapes(q, k_cache[0], v_cache[0])
        lib = cpu_kernels.library()
        if cpu_kernels.attention_applies(lib, q, k_cache):
            return cpu_kernels.decode_attention(lib, q, k_cache, v_cache, block_tables, seq_lens, scale)
        b, hq, d = q.shape
        shape = tuple(k_cache.shape[1:])                                    # block_size, Hkv, D
        plan = self._plan
        key = (shape, k_cache.dtype, q.dtype, torch.get_num_threads())
        if plan is None or not plan.matches(block_tables, seq_lens, key):
            plan = self._plan = _DecodePlan.build(block_tables, seq_lens, key)
        if plan.slots == 0:
            return _empty(b, q)
        if plan.direct:                                     # one call, one piece per row, rows in order
            return self._attend(q, k_cache, v_cache, plan.buckets[0], scale)
        out_st, lse_st = _empty(plan.slots * b, q)
        out_st, lse_st = out_st.view(plan.slots, b, hq, d), lse_st.view(plan.slots, b, hq)
        for vw in plan.views:
            o, l = self._attend_view(q, k_cache, v_cache, vw, scale)          # [p, Hq, D], [p, Hq]
            out_st[vw.slot:vw.slot + vw.pieces, vw.row] = o
            lse_st[vw.slot:vw.slot + vw.pieces, vw.row] = l.to(lse_st.dtype)
        for bk in plan.buckets:
            o, l = self._attend(q, k_cache, v_cache, bk, scale)                # [n, Hq, D], [n, Hq]
            out_st.index_put_((bk.slots, bk.rows), o)
            lse_st.index_put_((bk.slots, bk.rows), l.to(lse_st.dtype))
        if plan.slots == 1:
            return out_st[0], lse_st[0]
        return merge_stacked(out_st, lse_st)

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bk: _Bucket,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One bucket: its pieces gathered, one kernel call. Returns out [n, Hq, D], lse [n, Hq]."""
        num_blocks, bs, hkv, d = k_cache.shape
        n, hq = bk.size, q.shape[1]
        qb = q if bk.rows is None else q.index_select(0, bk.rows)                     # [n, Hq, D]
        qb = _unit_last(qb.reshape(n, hkv, hq // hkv, d))                               # [n, Hkv, g, D]
        size = 2 * bk.index.numel() * bs * hkv * d
        ws = self._workspace
        if ws is None or ws.numel() < size or ws.dtype != k_cache.dtype or ws.device != k_cache.device:
            # Grow by half again: decode lengths creep up a block at a time.
            ws = self._workspace = torch.empty(size + size // 2, dtype=k_cache.dtype, device=k_cache.device)
        kv = ws[:size].view(2, bk.index.numel(), bs * hkv * d)
        torch.index_select(k_cache.view(num_blocks, -1), 0, bk.index, out=kv[0])
        torch.index_select(v_cache.view(num_blocks, -1), 0, bk.index, out=kv[1])
        kv = kv.view(2, n, -1, hkv, d)[:, :, :bk.keys].permute(0, 1, 3, 2, 4)          # [2, n, Hkv, L, D]
        o, l = _flash(qb, kv[0], kv[1], 0.0, False, attn_mask=bk.mask, scale=scale)   # [n, Hkv, g, D]
        return o.reshape(n, hq, d), l.reshape(n, hq)

    @staticmethod
    def _attend_view(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, vw: _View, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One run of consecutive blocks, attended where it lies: [pieces, Hkv, piece_len, D] strided
        views of the cache, one kernel call. Returns out [pieces, Hq, D], lse [pieces, Hq]."""
        _, _, hkv, d = k_cache.shape
        hq = q.shape[1]
        span = slice(vw.start, vw.start + vw.pieces * vw.piece_len)
        kf = k_cache.view(-1, hkv, d)[span].view(vw.pieces, vw.piece_len, hkv, d).permute(0, 2, 1, 3)
        vf = v_cache.view(-1, hkv, d)[span].view(vw.pieces, vw.piece_len, hkv, d).permute(0, 2, 1, 3)
        qb = _unit_last(q[vw.row].reshape(1, hkv, hq // hkv, d)).expand(vw.pieces, -1, -1, -1)
        o, l = _flash(qb, kf, vf, 0.0, False, scale=scale)                          # [p, Hkv, g, D]
        return o.reshape(vw.pieces, hq, d), l.reshape(vw.pieces, hq)


@dataclass(frozen=True)
class _View:
    """Keys of one sequence lying in consecutive cache slots, in equal pieces attended in place."""
    row: int                       # its batch row
    slot: int                      # its first piece's partial-result index in the row
    start: int                     # its first key's cache slot (block * block_size + offset)
    pieces: int
    piece_len: int                 # keys per piece


@dataclass(frozen=True)
class _Bucket:
    """Pieces of some sequences, gathered and attended in one kernel call."""
    rows: torch.Tensor | None      # [n] int64 batch row of each piece; None: one piece per row, in order
    slots: torch.Tensor            # [n] int64 which partial result of its row each piece is
    size: int                      # n
    keys: int                      # L: keys of its longest piece; the others are masked past their own
    index: torch.Tensor            # [n * nb] int64 blocks to gather, each piece's padded to nb blocks
    mask: torch.Tensor | None      # [n, 1, 1, L] additive 0 / -inf in q's dtype; None: nothing to mask


@dataclass(frozen=True)
class _DecodePlan:
    key: tuple                     # (block_size, Hkv, D), cache dtype, query dtype, torch threads
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    views: list[_View]
    buckets: list[_Bucket]
    slots: int                     # partial results (pieces) per row, max over rows; 0: all rows empty
    direct: bool                   # a single bucket holding one piece of every row, rows in order

    def matches(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, key: tuple) -> bool:
        """Compares values, not identities: a caller may refill the same tensors in place."""
        return (self.key == key
                and block_tables.shape == self.block_tables.shape and seq_lens.shape == self.seq_lens.shape
                and torch.equal(seq_lens, self.seq_lens) and torch.equal(block_tables, self.block_tables))

    @staticmethod
    def build(block_tables: torch.Tensor, seq_lens: torch.Tensor, key: tuple) -> _DecodePlan:
        dev = block_tables.device
        (bs, hkv, d), cache_dtype, dtype, threads = key
        token_bytes = 2 * hkv * d * torch.empty((), dtype=cache_dtype).element_size()      # K and V
        piece_blocks = max(1, PIECE_BYTES // (bs * token_bytes))
        max_slots = max(bs, BUCKET_BYTES // token_bytes)
        min_run = max(MIN_VIEW_BLOCKS, -(-MIN_VIEW_BYTES // (bs * token_bytes)))
        lens = [int(n) for n in seq_lens.tolist()]
        tables = block_tables.cpu().numpy()
        slots = [0] * len(lens)
        views: list[_View] = []
        pieces: list[tuple[int, list[int], int]] = []          # (row, its blocks, keys they hold)
        for row, n in enumerate(lens):
            if n <= 0:
                continue
            nb = -(-n // bs)
            own = tables[row, :nb].astype(np.int64)
            keep = None                                         # blocks left to gather (all: None)
            if nb >= min_run:
                # The one query sees every key, so their order is free: the full blocks in id order
                # (a pool hands freed blocks out tail first, descending) lie in runs of consecutive
                # memory; the last block, partial or not, stays last (the key counts assume it).
                own[:-1].sort()
                cut = np.flatnonzero(np.diff(own) != 1) + 1
                starts, ends = np.concatenate(([0], cut)), np.concatenate((cut, [nb]))
                for a, b in zip(starts.tolist(), ends.tolist()):
                    if b - a < min_run:
                        continue
                    for vw in _views(row, slots[row], int(own[a]) * bs, min(b * bs, n) - a * bs, hkv, threads):
                        views.append(vw)
                        slots[row] += vw.pieces
                    if keep is None:
                        keep = np.ones(nb, dtype=bool)
                    keep[a:b] = False
            gathered = own if keep is None else own[keep]
            # Keys the gathered blocks hold: all of each block, but the last block's only up to n (it
            # is gathered last: it stays last in `own`).
            keys = len(gathered) * bs - (nb * bs - n if keep is None or keep[-1] else 0)
            gathered = gathered.tolist()
            for p0 in range(0, len(gathered), piece_blocks):
                blocks = gathered[p0:p0 + piece_blocks]
                pieces.append((row, blocks, min(len(blocks) * bs, keys - p0 * bs)))
        buckets = []
        groups = decode_buckets([keys for _, _, keys in pieces], bs, PAD_SLACK, max_slots)
        for members in groups:
            members = sorted(members)
            keys = max(pieces[m][2] for m in members)
            nb = -(-keys // bs)
            # A piece with fewer blocks is padded with its own first block: finite values, masked.
            blocks = [b for m in members for b in pieces[m][1] + [pieces[m][1][0]] * (nb - len(pieces[m][1]))]
            index = torch.tensor(blocks, dtype=torch.long, device=dev)
            mask = None
            if any(pieces[m][2] != keys for m in members):
                n_keys = torch.tensor([pieces[m][2] for m in members], device=dev)
                pad = torch.arange(keys, device=dev)[None, :] >= n_keys[:, None]             # [n, L]
                mask = torch.zeros(len(members), 1, 1, keys, dtype=dtype, device=dev)
                mask.masked_fill_(pad.view(len(members), 1, 1, keys), float("-inf"))
            rows = [pieces[m][0] for m in members]
            row_slots = []
            for r in rows:
                row_slots.append(slots[r])
                slots[r] += 1
            in_order = not views and len(groups) == 1 and rows == list(range(len(lens)))
            buckets.append(_Bucket(None if in_order else torch.tensor(rows, dtype=torch.long, device=dev),
                                   torch.tensor(row_slots, dtype=torch.long, device=dev), len(rows), keys,
                                   index, mask))
        return _DecodePlan(key, block_tables.clone(), seq_lens.clone(), views, buckets,
                           max(slots, default=0), not views and len(buckets) == 1 and buckets[0].rows is None)


def _views(row: int, slot: int, start: int, keys: int, hkv: int, threads: int) -> list[_View]:
    """`keys` keys from cache slot `start` on: equal pieces, enough for every thread to have kernel
    tasks (the kernel splits over pieces x KV heads) and at most VIEW_PIECE_KEYS each, none under
    MIN_PIECE_KEYS; then the keys left over (fewer than the pieces), if any, as one piece."""
    p = max(-(-2 * threads // hkv), -(-keys // VIEW_PIECE_KEYS))
    p = max(1, min(p, keys // MIN_PIECE_KEYS))
    piece_len = keys // p
    out = [_View(row, slot, start, p, piece_len)]
    if keys > p * piece_len:
        out.append(_View(row, slot + p, start + p * piece_len, 1, keys - p * piece_len))
    return out


def decode_buckets(lens: list[int], block_size: int, pad_slack: float = PAD_SLACK,
                   max_slots: int = 1 << 62) -> list[list[int]]:
    """Groups the non-empty pieces of a decode batch (by index) for padded batched calls.

    Longest first; a piece joins the current bucket while the bucket's padded block count (members x
    the longest's blocks) stays within `pad_slack` x its real block count and within `max_slots` key
    slots (a single piece longer than that is a bucket of its own). Pieces of length 0 are in none."""
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
