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

Batched decode over the paged cache (`decode_paged`, every query sees all of its sequence's keys) is
planned once per batch (the plan is reused while the tables and lengths are equal, i.e. for every layer
of a step):
  - a run of >= MIN_INPLACE_BLOCKS consecutive blocks (a prefill's blocks) is attended where it lies,
    cut into `parts` equal parts that go to the kernel as a batch, so that parts x Hkv tasks share the
    threads evenly (the kernel parallelises over batch x heads, and one sequence has only Hkv heads);
  - the other blocks (those appended one by one in decode, interleaved between sequences) are gathered
    into one reused workspace (index_select with out=: a fresh multi-megabyte buffer per call cost page
    faults that took longer than the copy); sequences are bucketed by length and each bucket is one
    call over [n, Hkv, L_max, D] with an additive 0/-inf mask on the padding (the mask's dtype must be
    the query's: a float32 mask on float64 inputs gives wrong results);
  - a sequence's partial results (parts, runs, gathered rest) are merged with `merge_stacked`.
Measured on 2 cores (bench/results/engine.md): the gather costs about as much again as the kernel, and
the kernel is about twice as fast on head-major K/V as on the cache's [token, head, dim] rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.attention.base import AttentionBackend
from common.attention.merge import merge_attention_states, merge_stacked
from common.attention.reference import check_shapes

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

# Decode planning. Runs of at least MIN_INPLACE_BLOCKS consecutive full blocks are attended in place,
# cut into up to MAX_PARTS parts of at least MIN_PART_KEYS keys. The other blocks are gathered; a
# bucket's padded key count may exceed its real key count by PAD_SLACK, and one call gathers at most
# MAX_BUCKET_SLOTS key slots (bounds the workspace: 2 * slots * Hkv * D elements).
MIN_INPLACE_BLOCKS = 32
MAX_PARTS = 16
MIN_PART_KEYS = 256
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

    def __init__(self) -> None:
        self._workspace: torch.Tensor | None = None     # gathered K/V of decode buckets, reused
        self._plan: _DecodePlan | None = None            # the last decode batch's plan (every layer
                                                          # of a step decodes the same batch)

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

    def decode_paged(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched decode (contract in the base class), planned as described in the module docstring.

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
        threads = torch.get_num_threads()
        plan = self._plan
        if plan is None or not plan.matches(block_tables, seq_lens, bs, hkv, q.dtype, threads):
            plan = self._plan = _DecodePlan.build(block_tables, seq_lens, bs, hkv, q.dtype, threads)
        if plan.slots == 0:
            return _empty(b, q)
        if plan.direct:                                     # one gathered call, every row in order
            return self._attend_gathered(q, k_cache, v_cache, plan.gathered[0], scale)
        out_st, lse_st = _empty(plan.slots * b, q)
        out_st, lse_st = out_st.view(plan.slots, b, hq, d), lse_st.view(plan.slots, b, hq)
        ks, vs = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)           # [slots, Hkv, D]
        for ip in plan.inplace:
            n = ip.parts * ip.part_len
            kb = ks[ip.first_slot:ip.first_slot + n].view(ip.parts, ip.part_len, hkv, d).permute(0, 2, 1, 3)
            vb = vs[ip.first_slot:ip.first_slot + n].view(ip.parts, ip.part_len, hkv, d).permute(0, 2, 1, 3)
            qb = _unit_last(q[ip.row].view(1, hkv, g, d)).expand(ip.parts, hkv, g, d)
            o, l = _flash(qb, kb, vb, 0.0, False, scale=scale)     # [S, Hkv, g, D], [S, Hkv, g]
            out_st[ip.slot:ip.slot + ip.parts, ip.row] = o.reshape(ip.parts, hq, d)
            lse_st[ip.slot:ip.slot + ip.parts, ip.row] = l.reshape(ip.parts, hq)
        for bk in plan.gathered:
            o, l = self._attend_gathered(q, k_cache, v_cache, bk, scale)
            out_st.index_put_((bk.slots, bk.rows), o)
            lse_st.index_put_((bk.slots, bk.rows), l.to(lse_st.dtype))
        if plan.slots == 1:
            return out_st[0], lse_st[0]
        return merge_stacked(out_st, lse_st)

    def _attend_gathered(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bk: _Bucket,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One bucket: its blocks gathered, one flash call. Returns out [n, Hq, D], lse [n, Hq]."""
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


@dataclass(frozen=True)
class _InPlace:
    """A run of consecutive cache slots of one sequence, attended where it lies, cut into `parts`
    equal parts that the kernel runs in parallel (their results are merged like KV shards)."""
    row: int
    first_slot: int
    parts: int
    part_len: int
    slot: int                      # its parts are partial results slot .. slot + parts - 1 of the row


@dataclass(frozen=True)
class _Bucket:
    """The gathered keys of some sequences, attended in one kernel call."""
    rows: torch.Tensor | None      # [n] int64 batch rows; None: all rows of the batch, in order
    slots: torch.Tensor            # [n] int64 partial-result slot of each row
    size: int                      # n
    keys: int                      # L: keys of its longest member; the others are masked past their own
    index: torch.Tensor            # [n * nb] int64 blocks to gather, each member's padded to nb blocks
    mask: torch.Tensor | None      # [n, 1, 1, L] additive 0 / -inf in q's dtype; None: nothing to mask


@dataclass(frozen=True)
class _DecodePlan:
    key: tuple                     # block_size, Hkv, dtype, threads
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    inplace: list[_InPlace]
    gathered: list[_Bucket]
    slots: int                     # partial results per row (max over rows); 0: every row is empty
    direct: bool                   # a single gathered bucket of all rows in order, one slot each

    def matches(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, hkv: int,
                dtype: torch.dtype, threads: int) -> bool:
        """Compares values, not identities: a caller may refill the same tensors in place."""
        return (self.key == (block_size, hkv, dtype, threads)
                and block_tables.shape == self.block_tables.shape and seq_lens.shape == self.seq_lens.shape
                and torch.equal(seq_lens, self.seq_lens) and torch.equal(block_tables, self.block_tables))

    @staticmethod
    def build(block_tables: torch.Tensor, seq_lens: torch.Tensor, bs: int, hkv: int, dtype: torch.dtype,
              threads: int) -> _DecodePlan:
        dev = block_tables.device
        lens = [int(n) for n in seq_lens.tolist()]
        tables = block_tables.tolist()
        inplace: list[_InPlace] = []
        rest: list[list[int]] = []            # per row: the blocks left to gather, in table order
        rest_len: list[int] = []              # and how many keys they hold
        slots = [0] * len(lens)
        for row, n in enumerate(lens):
            own = tables[row][:-(-n // bs)] if n > 0 else []
            left: list[int] = []
            i = 0
            while i < len(own):
                j = i + 1
                while j < len(own) and own[j] == own[j - 1] + 1:
                    j += 1
                full = j - i if j < len(own) or n % bs == 0 else j - i - 1   # the last block may be partial
                if full >= MIN_INPLACE_BLOCKS:
                    parts = _parts(full * bs, hkv, threads)
                    if parts == 1:             # the whole run, partial last block included
                        keys = min(j * bs, n) - i * bs
                        inplace.append(_InPlace(row, own[i] * bs, 1, keys, slots[row]))
                        taken = j - i
                    else:
                        per = full // parts
                        inplace.append(_InPlace(row, own[i] * bs, parts, per * bs, slots[row]))
                        taken = parts * per
                    slots[row] += inplace[-1].parts
                    left += own[i + taken:j]
                else:
                    left += own[i:j]
                i = j
            rest.append(left)
            ends_partial = bool(left) and left[-1] == own[-1] and n % bs != 0
            rest_len.append(len(left) * bs - (bs - n % bs if ends_partial else 0))
        gathered = []
        groups = decode_buckets(rest_len, bs)
        for rows in groups:
            rows = sorted(rows)
            keys = max(rest_len[r] for r in rows)
            nb = -(-keys // bs)
            # A member with fewer blocks is padded with its own first block: finite values, masked.
            index = torch.tensor([blk for r in rows for blk in rest[r] + [rest[r][0]] * (nb - len(rest[r]))],
                                 dtype=torch.long, device=dev)
            mask = None
            if any(rest_len[r] != keys for r in rows):
                n_keys = torch.tensor([rest_len[r] for r in rows], device=dev)
                pad = torch.arange(keys, device=dev)[None, :] >= n_keys[:, None]           # [n, L]
                mask = torch.zeros(len(rows), 1, 1, keys, dtype=dtype, device=dev)
                mask.masked_fill_(pad.view(len(rows), 1, 1, keys), float("-inf"))
            row_slots = [slots[r] for r in rows]
            for r in rows:
                slots[r] += 1
            in_order = len(groups) == 1 and not inplace and rows == list(range(len(lens)))
            gathered.append(_Bucket(None if in_order else torch.tensor(rows, dtype=torch.long, device=dev),
                                    torch.tensor(row_slots, dtype=torch.long, device=dev), len(rows), keys,
                                    index, mask))
        direct = len(gathered) == 1 and gathered[0].rows is None
        return _DecodePlan((bs, hkv, dtype, threads), block_tables.clone(), seq_lens.clone(), inplace,
                           gathered, max(slots, default=0), direct)


def _parts(keys: int, hkv: int, threads: int) -> int:
    """How many parts to cut a run of `keys` keys into, so that parts x Hkv kernel tasks share the
    threads evenly (the kernel parallelises over batch x heads; one sequence has only Hkv heads)."""
    parts = 1
    while parts < MAX_PARTS and (parts * hkv < 2 * threads or (parts * hkv) % threads):
        parts += 1
    while parts > 1 and keys // parts < MIN_PART_KEYS:
        parts -= 1
    return parts


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
