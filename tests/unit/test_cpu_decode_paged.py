"""The CPU backend's batched paged decode, and the forward context that routes decodes to it, against
the float32/float64 reference (common/attention/reference.py)."""
from __future__ import annotations

import pytest
import torch

import common.attention.cpu as cpu
from common.attention.cpu import CpuFlashBackend, decode_buckets
from common.attention.reference import ReferenceBackend
from common.engine.forward_context import ForwardContext, SeqAttn
from common.kv_cache.paged import PagedKVCache
from common.model import cpu_kernels

_KERNEL_APPLIES = cpu_kernels.attention_applies


@pytest.fixture(autouse=True)
def flash_path(monkeypatch):
    """These tests hold the flash path (the planner) to the reference, as machines without the decode
    attention kernel of common/model/cpu_kernels.py run it; the kernel's own are marked below."""
    monkeypatch.setattr(cpu_kernels, "attention_applies", lambda *a: False)

REF = ReferenceBackend()
INF = float("inf")


def _tol(dtype):
    return dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)


def _cache(num_blocks, bs, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    v = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    return k, v


def _tables(lens, bs, num_blocks, layout, seed):
    """Block tables [B, max_blocks] int32 padded with -1: 'random' blocks, or 'runs' (each sequence a
    consecutive run, as after a prefill, then single blocks interleaved between sequences, as decode
    appends them)."""
    g = torch.Generator().manual_seed(seed)
    nbs = [-(-n // bs) for n in lens]
    width = max(nbs + [1])
    out = torch.full((len(lens), width), -1, dtype=torch.int32)
    if layout == "random":
        perm = torch.randperm(num_blocks, generator=g).tolist()
        for b, nb in enumerate(nbs):
            out[b, :nb] = torch.tensor(perm[:nb], dtype=torch.int32)
            perm = perm[nb:]
        return out
    nxt = 0
    prefix = [max(nb - 3, 0) for nb in nbs]              # the last (up to) 3 blocks come from decoding
    for b, nb in enumerate(nbs):
        out[b, :prefix[b]] = torch.arange(nxt, nxt + prefix[b], dtype=torch.int32)
        nxt += prefix[b]
    for i in range(3):
        for b, nb in enumerate(nbs):
            if prefix[b] + i < nb:
                out[b, prefix[b] + i] = nxt
                nxt += 1
    assert nxt <= num_blocks
    return out


def _reference(q, k_cache, v_cache, tables, lens, scale):
    """Each sequence's keys gathered token by token, then the reference."""
    bs = k_cache.shape[1]
    outs, lses = [], []
    for b, n in enumerate(lens):
        idx = [(int(tables[b, t // bs]), t % bs) for t in range(n)]
        k = torch.stack([k_cache[i, j] for i, j in idx]) if n else k_cache.new_zeros(0, *k_cache.shape[2:])
        v = torch.stack([v_cache[i, j] for i, j in idx]) if n else v_cache.new_zeros(0, *v_cache.shape[2:])
        o, l = REF.forward(q[b:b + 1], k, v, q_start=max(n - 1, 0), k_start=0, scale=scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def _check(backend, q, k_cache, v_cache, tables, lens, scale=0.3):
    o, l = backend.decode_paged(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), scale=scale)
    ro, rl = _reference(q, k_cache, v_cache, tables, lens, scale)
    assert o.shape == q.shape and o.dtype == q.dtype and l.shape == q.shape[:2]
    assert l.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert not o.isnan().any() and not l.isnan().any()
    assert torch.equal(l == -INF, rl == -INF)
    torch.testing.assert_close(o.double(), ro.double(), **_tol(q.dtype))
    fin = rl != -INF
    torch.testing.assert_close(l[fin].double(), rl[fin].double(), **_tol(q.dtype))


LENS = {
    "one": [37],
    "equal": [64, 64, 64],
    "mixed": [0, 1, 16, 17, 100, 333, 5],
    "empty": [0, 0],
    "long_short": [700, 3, 690, 40],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["random", "runs"])
@pytest.mark.parametrize("lens", list(LENS.values()), ids=list(LENS))
@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 4), (9, 3), (8, 1)])
def test_decode_paged_matches_reference(lens, layout, dtype, hq, hkv):
    bs, d, num_blocks = 16, 8, 160
    k_cache, v_cache = _cache(num_blocks, bs, hkv, d, dtype, seed=len(lens))
    tables = _tables(lens, bs, num_blocks, layout, seed=1)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    _check(CpuFlashBackend(), q, k_cache, v_cache, tables, lens)


def test_decode_paged_one_token_and_block_edges():
    bs, hq, hkv, d = 4, 6, 3, 16
    k_cache, v_cache = _cache(64, bs, hkv, d, torch.float32, seed=5)
    for lens in ([1], [4], [5], [1, 4, 5, 8, 9], [9, 1]):
        tables = _tables(lens, bs, 64, "random", seed=len(lens))
        q = torch.randn(len(lens), hq, d)
        _check(CpuFlashBackend(), q, k_cache, v_cache, tables, lens)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lens", [[64], [63], [65], [80, 3, 47, 0, 16, 33], [1, 2, 200]], ids=str)
def test_pieces_buckets_and_merges(monkeypatch, lens, threads):
    """Small pieces and buckets: sequences cut into several pieces (ending on a full or a partial block),
    pieces of several sequences in one call, partial results merged."""
    bs, hq, hkv, d = 4, 6, 3, 8
    token_bytes = 2 * hkv * d * 4
    monkeypatch.setattr(cpu, "PIECE_BYTES", 3 * bs * token_bytes)           # 3 blocks per piece
    monkeypatch.setattr(cpu, "BUCKET_BYTES", 4 * 3 * bs * token_bytes)      # up to 4 such pieces a call
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        k_cache, v_cache = _cache(200, bs, hkv, d, torch.float32, seed=11)
        tables = _tables(lens, bs, 200, "random", seed=12)
        q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(12))
        be = CpuFlashBackend()
        _check(be, q, k_cache, v_cache, tables, lens)
        plan = be._plan
        if max(lens) > 12:
            assert plan.slots > 1 and not plan.direct
        assert all(bk.size * bk.keys <= 4 * 3 * bs for bk in plan.buckets if bk.size > 1)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (8, 1), (9, 3)])
def test_runs_of_consecutive_blocks_are_attended_in_place(monkeypatch, dtype, threads, hq, hkv):
    """Runs of >= MIN_VIEW_BLOCKS consecutive blocks (and MIN_VIEW_BYTES) are attended as strided
    views of the cache (equal pieces, then the keys left over), the rest of the table gathered: the
    same as the reference for runs ending on a full or a partial block, in the middle or at the end of
    a table, several runs in one row, and rows with none."""
    monkeypatch.setattr(cpu, "MIN_VIEW_BLOCKS", 3)
    monkeypatch.setattr(cpu, "MIN_VIEW_BYTES", 0)
    monkeypatch.setattr(cpu, "MIN_PIECE_KEYS", 5)
    monkeypatch.setattr(cpu, "VIEW_PIECE_KEYS", 13)
    bs, d, num_blocks = 4, 8, 64
    k_cache, v_cache = _cache(num_blocks, bs, hkv, d, dtype, seed=hq)
    rows = [
        list(range(10, 17)),                        # one run, 7 blocks
        [40, 41, 42, 43, 5, 30, 31, 32, 33, 2],     # two runs, a single block between and after
        [3, 8, 21, 9],                              # no run: gathered
        [60, 61, 62, 63],                           # a run at the cache's end
    ]
    lens = [25, 38, 15, 14]                         # partial last blocks (25 = 6 blocks + 1 key)
    width = max(map(len, rows))
    tables = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32)
    q = torch.randn(len(rows), hq, d, generator=torch.Generator().manual_seed(9)).to(dtype)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        be = CpuFlashBackend()
        _check(be, q, k_cache, v_cache, tables, lens)
        views = be._plan.views
        assert sorted({v.row for v in views}) == [0, 1, 3]
        assert {v.start for v in views if v.row == 1 and v.pieces > 1} == {40 * bs, 30 * bs}
        assert any(v.pieces > 1 for v in views)
        # every key of a run in exactly one piece: 25 keys of row 0 (with 25 = 3 x 8 + 1 or 5 x 5 ...)
        for row, keys in ((0, 25), (3, 14)):
            mine = [v for v in views if v.row == row]
            assert sum(v.pieces * v.piece_len for v in mine) == keys
            assert mine[0].start == rows[row][0] * bs and all(
                a.start + a.pieces * a.piece_len == b.start for a, b in zip(mine, mine[1:]))
        assert any(v.row == 0 and v.pieces == 1 and v.piece_len < 5 for v in views) == (25 % views[0].pieces != 0)
    finally:
        torch.set_num_threads(prev)


def test_blocks_handed_out_descending_are_attended_in_place(monkeypatch):
    """A pool frees a table tail first, so reused blocks come descending: the full blocks are taken
    in id order (the query sees every key), the last (partial) block last. Views, and the reference's
    result."""
    monkeypatch.setattr(cpu, "MIN_VIEW_BLOCKS", 4)
    monkeypatch.setattr(cpu, "MIN_VIEW_BYTES", 0)
    monkeypatch.setattr(cpu, "MIN_PIECE_KEYS", 4)
    bs, hq, hkv, d = 4, 6, 2, 8
    k_cache, v_cache = _cache(64, bs, hkv, d, torch.float32, seed=21)
    rows = [list(range(30, 20, -1)),                 # 10 blocks descending, the last one partial
            list(range(50, 44, -1)) + [3, 7]]        # a descending run, then two stray blocks
    lens = [38, 31]
    tables = torch.tensor([r + [-1] * (10 - len(r)) for r in rows], dtype=torch.int32)
    q = torch.randn(2, hq, d, generator=torch.Generator().manual_seed(4))
    be = CpuFlashBackend()
    _check(be, q, k_cache, v_cache, tables, lens)
    views = be._plan.views
    assert {v.row for v in views} == {0, 1}
    for row, first, keys in ((0, 22, 9 * bs), (1, 45, 6 * bs)):   # blocks 22-30 (not 21, the partial last), 45-50
        mine = [v for v in views if v.row == row]
        assert mine[0].start == first * bs and sum(v.pieces * v.piece_len for v in mine) == keys
    assert torch.equal(tables[0, :10], torch.arange(30, 20, -1, dtype=torch.int32))   # not reordered


def test_plan_is_rebuilt_when_tables_are_refilled_in_place():
    # A caller may reuse the same tensors for the next step (CUDA-graph style staging buffers).
    be = CpuFlashBackend()
    bs, hq, hkv, d = 16, 6, 2, 8
    k_cache, v_cache = _cache(96, bs, hkv, d, torch.float32, seed=7)
    tables = _tables([64, 64], bs, 96, "random", seed=3)
    lens = torch.tensor([50, 20], dtype=torch.int32)
    q = torch.randn(2, hq, d)
    for new_lens, seed in (([50, 20], 3), ([21, 48], 4), ([33, 0], 5), ([33, 0], 6)):
        tables.copy_(_tables([64, 64], bs, 96, "runs" if seed % 2 else "random", seed=seed))
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        for _layer in range(2):
            o, l = be.decode_paged(q, k_cache, v_cache, tables, lens, scale=0.3)
            ro, rl = _reference(q, k_cache, v_cache, tables, new_lens, 0.3)
            torch.testing.assert_close(o, ro, atol=1e-5, rtol=1e-5)


def test_decode_buckets_bound_padding():
    assert decode_buckets([], 16) == []
    assert decode_buckets([0, 0], 16) == []
    assert decode_buckets([100, 100, 100], 16) == [[0, 1, 2]]
    # 1000 and 10 tokens never share a call; equal-ish lengths do
    buckets = decode_buckets([1000, 10, 990, 12, 0], 16)
    assert sorted(map(sorted, buckets)) == [[0, 2], [1, 3]]
    for b in decode_buckets([5000, 4000, 3000, 2000, 1000, 17, 1], 16):
        nbs = [-(-n // 16) for n in [5000, 4000, 3000, 2000, 1000, 17, 1]]
        width = max(nbs[i] for i in b)
        assert len(b) == 1 or len(b) * width <= 1.25 * sum(nbs[i] for i in b)
    # the slot cap: equal pieces, at most 3 x 64 slots a call
    assert [len(b) for b in decode_buckets([64] * 7, 16, max_slots=192)] == [3, 3, 1]


# --- the forward context -----------------------------------------------------------------------------

def _ctx_case(seqs_spec, bs=4, hq=6, hkv=2, d=8, seed=0):
    """seqs_spec: (n query rows, q_start, kv_start, kv_len) per sequence. Fills a cache with random
    K/V for every key, returns (cache, seqs, q, k, v) with no new K/V to write."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-kv // bs) for _, _, _, kv in seqs_spec) + 4
    cache = PagedKVCache(range(2), num_blocks, bs, hkv, d, torch.float32)
    cache.data.copy_(torch.randn(cache.data.shape, generator=g))
    perm = torch.randperm(num_blocks, generator=g).tolist()
    seqs, row = [], 0
    for n, q_start, kv_start, kv_len in seqs_spec:
        nb = -(-kv_len // bs)
        seqs.append(SeqAttn(slice(row, row + n), q_start, kv_start, kv_len, perm[:nb]))
        perm = perm[nb:]
        row += n
    q = torch.randn(row, hq, d, generator=g)
    return cache, seqs, q


def _loop_reference(cache, seqs, q, layer, scale):
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], -INF)
    for s in seqs:
        if s.kv_len == 0:
            continue
        k, v = cache.gather(layer, s.block_table, s.kv_len)
        o, l = REF.forward(q[s.rows], k, v, q_start=s.q_start, k_start=s.kv_start, scale=scale)
        out[s.rows], lse[s.rows] = o, l
    return out, lse


CTX_CASES = {
    "all_decode": [(1, 40, 0, 41), (1, 7, 0, 8), (1, 0, 0, 1)],
    "mixed": [(1, 40, 0, 41), (5, 10, 0, 15), (1, 19, 0, 20), (3, 0, 0, 3)],
    "kvp_shards": [(1, 50, 16, 20), (1, 50, 36, 15), (2, 60, 16, 20), (1, 30, 32, 0)],
    "decode_not_last": [(3, 0, 0, 3), (1, 12, 0, 13)],
}


@pytest.mark.parametrize("case", list(CTX_CASES), ids=list(CTX_CASES))
@pytest.mark.parametrize("backend", [CpuFlashBackend(), REF], ids=lambda b: b.name)
def test_forward_context_matches_per_sequence_loop(case, backend):
    cache, seqs, q = _ctx_case(CTX_CASES[case])
    merged = {}

    def combine(out, lse):
        merged["lse"] = lse
        return out

    ctx = ForwardContext(cache, backend, seqs, 0.3, None, None, combine=combine)
    for layer in range(2):
        out = ctx.attend(layer, q, q[:, :2], q[:, :2])          # k, v unused: nothing is written
        ro, rl = _loop_reference(cache, seqs, q, layer, 0.3)
        torch.testing.assert_close(out, ro, atol=1e-5, rtol=1e-5)
        assert torch.equal(merged["lse"] == -INF, rl == -INF)
        fin = rl != -INF
        torch.testing.assert_close(merged["lse"][fin], rl[fin], atol=1e-5, rtol=1e-5)


def test_forward_context_writes_before_attending():
    # A decode step: the new token's K/V is written into the cache, then attended.
    bs, hq, hkv, d = 4, 4, 2, 8
    cache = PagedKVCache(range(1), 8, bs, hkv, d, torch.float32)
    g = torch.Generator().manual_seed(1)
    cache.data.copy_(torch.randn(cache.data.shape, generator=g))
    seqs = [SeqAttn(slice(0, 1), 6, 0, 7, [3, 5]), SeqAttn(slice(1, 2), 2, 0, 3, [0])]
    q, k, v = (torch.randn(2, h, d, generator=g) for h in (hq, hkv, hkv))
    ctx = ForwardContext(cache, CpuFlashBackend(), seqs, 0.3, torch.tensor([0, 1]),
                         torch.tensor([5 * bs + 2, 0 * bs + 2]))
    out = ctx.attend(0, q, k, v)
    assert torch.equal(cache.k(0)[5, 2], k[0]) and torch.equal(cache.v(0)[0, 2], v[1])
    ro, _ = _loop_reference(cache, seqs, q, 0, 0.3)
    torch.testing.assert_close(out, ro, atol=1e-5, rtol=1e-5)


# --- the engine, with every decode path taken -----------------------------------------------------------

ENGINE_PROMPTS = [[(37 * i + 11) % 40000 + 100 for i in range(90)], [(53 * i + 7) % 30000 + 200 for i in range(41)]]


def _engine_outputs(backend: str):
    from common.config import CacheConfig, EngineConfig, SchedulerConfig
    from common.engine.engine import LLMEngine
    from common.model.loader import load_checkpoint
    from common.sampling_params import SamplingParams
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = EngineConfig(attention_backend=backend, cache=CacheConfig(block_size=4, max_kv_tokens=512),
                           scheduler=SchedulerConfig(chunk_size=24))
        engine = LLMEngine(cfg, load_checkpoint(None))
        return engine, engine.generate(ENGINE_PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    finally:
        torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def reference_engine_outputs():
    return _engine_outputs("reference")[1]


@pytest.mark.parametrize("views", [False, True], ids=["gathered", "views"])
def test_engine_with_pieces_matches_reference_engine(monkeypatch, views, reference_engine_outputs):
    """The built-in model, two prompts batched, 4-token blocks: with small pieces the decodes cut each
    sequence into pieces, bucket pieces of both sequences together and merge (and with short view runs,
    attend the runs of consecutive blocks the chunks allocated in place). Greedy tokens equal the
    reference backend's (which test_engine_builtin.py holds to Hugging Face), logprobs within 1e-4.
    The flash path, as where the decode attention kernel does not run (common/model/cpu_kernels.py)."""
    monkeypatch.setattr(cpu, "PIECE_BYTES", 5 * 4 * 2 * 3 * 64 * 4)     # 5 blocks of 4 tokens (3 KV heads x 64)
    monkeypatch.setattr(cpu, "BUCKET_BYTES", 3 * 5 * 4 * 2 * 3 * 64 * 4)
    monkeypatch.setattr(cpu, "MIN_VIEW_BLOCKS", 4 if views else 1 << 40)
    monkeypatch.setattr(cpu, "MIN_VIEW_BYTES", 0)
    monkeypatch.setattr(cpu, "MIN_PIECE_KEYS", 8)
    engine, outputs = _engine_outputs("cpu_flash")
    plan = engine.executor.backend._plan
    assert plan is not None and plan.slots > 1 and len(plan.buckets) > (0 if views else 1)
    assert bool(plan.views) == views
    for ref, got in zip(reference_engine_outputs, outputs):
        assert got.token_ids == ref.token_ids
        assert max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs)) <= 1e-4


@pytest.mark.skipif(not _KERNEL_APPLIES(cpu_kernels.library(), torch.zeros(1, 9, 64), torch.zeros(1, 4, 3, 64)),
                    reason="no decode attention kernel")
def test_engine_on_the_decode_attention_kernel_matches_reference_engine(monkeypatch, reference_engine_outputs):
    """The same batch with the decode attention kernel, as this machine serves: the same greedy tokens."""
    monkeypatch.setattr(cpu_kernels, "attention_applies", _KERNEL_APPLIES)
    calls = []
    real = cpu_kernels.decode_attention
    monkeypatch.setattr(cpu_kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    _, outputs = _engine_outputs("cpu_flash")
    assert calls
    for ref, got in zip(reference_engine_outputs, outputs):
        assert got.token_ids == ref.token_ids
        assert max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs)) <= 1e-4


# --- prefill chunks over runs of consecutive blocks ---------------------------------------------------

def test_block_runs():
    from common.engine.forward_context import block_runs
    assert block_runs([7, 8, 9, 2, 3, 11], 22, 4) == [(0, 7, 12), (12, 2, 8), (20, 11, 2)]
    assert block_runs([5, 6], 5, 4) == [(0, 5, 5)]                 # only the blocks the tokens need
    assert block_runs([5, 9, 13], 12, 4, max_runs=2) is None
    assert block_runs([], 0, 4) == []


def test_block_runs_of_long_tables_in_numpy_equal_the_loop(monkeypatch):
    """Tables over VECTOR_BLOCKS blocks are scanned in numpy: the same runs (or None past
    max_runs) as the loop, on 2,000 random tables of runs, block sizes, lengths and limits."""
    import random

    from common.engine import forward_context as fc
    rng = random.Random(0)
    cases = []
    for _ in range(2000):
        table = []
        for _ in range(rng.randrange(1, 12)):
            start = rng.randrange(0, 5000)
            table += range(start, start + rng.randrange(1, 120))
        bs = rng.choice([1, 4, 16])
        cases.append((table, rng.randrange(0, len(table) * bs + 1), bs, rng.choice([1, 2, 5, 16, 1000])))
    vector = [fc.block_runs(*c) for c in cases]
    assert sum(-(-c[1] // c[2]) > fc.VECTOR_BLOCKS for c in cases) > 1000       # most took the numpy path
    monkeypatch.setattr(fc, "VECTOR_BLOCKS", 1 << 40)
    assert vector == [fc.block_runs(*c) for c in cases]


@pytest.mark.parametrize("max_runs", [16, 0], ids=["runs", "gathered"])
@pytest.mark.parametrize("kv_map", [None, ((0, 2, 0), (2, 6, 1))], ids=["gqa", "kv_map"])
def test_prefill_chunk_over_block_runs_matches_one_gathered_call(monkeypatch, max_runs, kv_map):
    """A chunk of 10 queries at positions 30..39 over a 40-key table of three runs of consecutive
    blocks, the last run starting inside the chunk (its causal part is split): attended run by run and
    merged (or gathered when more runs than MAX_RUNS) equals one call over the gathered keys."""
    import common.engine.forward_context as fc
    monkeypatch.setattr(fc, "MAX_RUNS", max_runs)
    bs, hq, hkv, d = 4, 6, 2, 8
    g = torch.Generator().manual_seed(3)
    cache = PagedKVCache(range(1), 24, bs, hkv, d, torch.float32)
    cache.data.copy_(torch.randn(cache.data.shape, generator=g))
    table = [4, 5, 6, 7, 8, 12, 13, 20, 21, 22]                  # runs: tokens 0-19, 20-27, 28-39
    seqs = [SeqAttn(slice(0, 10), 30, 0, 40, table)]
    q = torch.randn(10, hq, d, generator=g)
    ctx = ForwardContext(cache, CpuFlashBackend(), seqs, 0.3, None, None, kv_map=kv_map)
    # three runs as three views; past MAX_RUNS, the 7 full blocks before position 30 in id order (runs
    # 4-8 and 12-13, shorter than MIN_VIEW_BLOCKS: gathered) and the 3 blocks the chunk spans, a view
    assert [(p.t0, p.n, p.b0, p.gather is None) for p in ctx.parts[0]] == (
        [(0, 20, 4, True), (20, 8, 12, True), (28, 12, 20, True)] if max_runs else
        [(0, 28, -1, False), (28, 12, 20, True)])
    out = ctx.attend(0, q, q[:, :2], q[:, :2])
    k, v = cache.gather(0, table, 40)
    if kv_map is None:
        ro, _ = REF.forward(q, k, v, q_start=30, k_start=0, scale=0.3)
    else:
        ro = torch.cat([REF.forward(q[:, lo:hi], k[:, kv:kv + 1], v[:, kv:kv + 1], q_start=30, k_start=0,
                                    scale=0.3)[0] for lo, hi, kv in kv_map], dim=1)
    torch.testing.assert_close(out, ro, atol=1e-5, rtol=1e-5)


def _shuffled_table(kind, nb, rng):
    if kind == "descending":                  # what a churned pool hands a long prompt (BlockPool.free)
        return list(range(3 * nb, 2 * nb, -1))
    runs, b = [], 0                           # runs of 1..12 consecutive blocks, shuffled, gaps between
    while sum(map(len, runs)) < nb:
        n = rng.choice([1, 1, 2, 3, 9, 12])
        runs.append(list(range(b, b + n)))
        b += n + rng.randrange(0, 3)
    rng.shuffle(runs)
    return [x for r in runs for x in r][:nb]


PLAN_CASES = {                                # kv_start, kv_len, q_start, queries
    "chunk_at_end": (0, 203, 160, 43),
    "query_inside_a_block": (0, 203, 161, 42),
    "earlier_kvp_shard": (100, 128, 300, 8),  # every key before every query
    "shard_starting_inside_the_chunk": (180, 23, 160, 43),
    "one_block_prefix": (0, 40, 5, 35),
}


@pytest.mark.parametrize("kind", ["descending", "shuffled_runs"])
@pytest.mark.parametrize("case", list(PLAN_CASES), ids=list(PLAN_CASES))
@pytest.mark.parametrize("kv_map", [None, ((0, 2, 0), (2, 6, 1))], ids=["gqa", "kv_map"])
def test_prefill_chunk_over_a_shuffled_table_matches_one_gathered_call(monkeypatch, kind, case, kv_map):
    """Past MAX_RUNS runs, the keys every query sees are attended in block id order (views of the long
    runs, the short ones gathered), the chunk's own blocks in position order: equal to one call over
    the keys gathered in position order (the reference backend), for a chunk at the end of the keys,
    a first query inside a block, a KVP shard wholly before the chunk and one that starts inside it."""
    import random

    import common.engine.forward_context as fc
    monkeypatch.setattr(fc, "MAX_RUNS", 2)
    monkeypatch.setattr(fc, "MIN_VIEW_BLOCKS", 3)
    kv_start, kv_len, q_start, nq = PLAN_CASES[case]
    bs, hq, hkv, d = 4, 6, 2, 8
    nb = -(-kv_len // bs)
    table = _shuffled_table(kind, nb, random.Random(f"{kind}/{case}"))
    g = torch.Generator().manual_seed(5)
    cache = PagedKVCache(range(1), max(table) + 1, bs, hkv, d, torch.float32)
    cache.data.copy_(torch.randn(cache.data.shape, generator=g))
    q = torch.randn(nq, hq, d, generator=g)
    ctx = ForwardContext(cache, CpuFlashBackend(), [SeqAttn(slice(0, nq), q_start, kv_start, kv_len, table)],
                         0.3, None, None, kv_map=kv_map)
    parts = ctx.parts[0]
    n_pre = max(0, min((q_start - kv_start + 1) // bs, kv_len // bs))
    assert sum(p.n for p in parts) == kv_len
    assert all(p.t0 == 0 for p in parts if p.t0 < n_pre * bs)            # the keys all queries see
    if kind == "descending" and n_pre >= fc.MIN_VIEW_BLOCKS:
        assert parts[0] == fc.Part(0, n_pre * bs, min(table[:n_pre]))   # one view of them all
    assert len(parts) <= fc.MAX_RUNS + 1 + fc.MAX_TAIL_RUNS
    out = ctx.attend(0, q, q[:, :hkv], q[:, :hkv])
    k, v = cache.gather(0, table, kv_len)
    if kv_map is None:
        ro, _ = REF.forward(q, k, v, q_start=q_start, k_start=kv_start, scale=0.3)
    else:
        ro = torch.cat([REF.forward(q[:, lo:hi], k[:, kv:kv + 1], v[:, kv:kv + 1], q_start=q_start,
                                    k_start=kv_start, scale=0.3)[0] for lo, hi, kv in kv_map], dim=1)
    torch.testing.assert_close(out, ro, atol=1e-5, rtol=1e-5)


def test_plan_parts_cover_each_key_once():
    """On 2,000 random tables, positions and limits: a plan's parts hold each of the first kv_len keys
    (block, offset) exactly once, the keys after the first query's position keep their positions,
    and there are at most MAX_RUNS + 1 + MAX_TAIL_RUNS of them."""
    import random

    import common.engine.forward_context as fc
    rng = random.Random(1)
    bs = 4
    for _ in range(2000):
        nb = rng.randrange(1, 80)
        table = _shuffled_table(rng.choice(["descending", "shuffled_runs"]), nb, rng)
        kv_len = rng.randrange(1, nb * bs + 1)
        kv_start = rng.randrange(0, 50)
        q_start = rng.randrange(0, kv_start + kv_len + 20)
        parts = fc.plan_parts(table, kv_start, kv_len, q_start, bs)
        keys = []
        for p in parts:
            blocks = p.gather.tolist() if p.gather is not None else range(p.b0, p.b0 + -(-p.n // bs))
            got = [(b, o) for b in blocks for o in range(bs)][:p.n]
            keys += got
            late = [t for t in range(p.t0, p.t0 + p.n) if kv_start + t > q_start]
            for t in late:                                        # position kept where it matters
                assert got[t - p.t0] == (table[t // bs], t % bs)
        want = [(table[t // bs], t % bs) for t in range(kv_len)]
        assert sorted(keys) == sorted(want)
        assert len(parts) <= fc.MAX_RUNS + 1 + fc.MAX_TAIL_RUNS


def test_engine_on_a_churned_pool_matches_reference_engine(monkeypatch, reference_engine_outputs):
    """The same two prompts after a 500-token request has come and gone: the pool (prefix caching on)
    evicts its cached blocks tail first, so the prompts' later chunks get them in descending runs (one
    run per allocation); with MAX_RUNS = 2 their chunks attend the blocks every query sees in id order
    (plan_parts). Greedy tokens equal the
    reference backend's on a fresh pool, logprobs within 1e-4."""
    import common.engine.forward_context as fc
    from common.config import CacheConfig, EngineConfig, SchedulerConfig
    from common.engine.engine import LLMEngine
    from common.model.loader import load_checkpoint
    from common.sampling_params import SamplingParams
    monkeypatch.setattr(fc, "MAX_RUNS", 2)
    monkeypatch.setattr(fc, "MIN_VIEW_BLOCKS", 2)
    plans = []
    plan_parts = fc.plan_parts
    monkeypatch.setattr(fc, "plan_parts", lambda *a: plans.append((a, plan_parts(*a))) or plans[-1][1])
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = EngineConfig(attention_backend="cpu_flash", cache=CacheConfig(block_size=4, max_kv_tokens=512),
                           scheduler=SchedulerConfig(chunk_size=24))
        engine = LLMEngine(cfg, load_checkpoint(None))
        engine.generate([[(11 * i + 5) % 30000 + 300 for i in range(500)]], SamplingParams(max_tokens=1))
        plans.clear()
        outputs = engine.generate(ENGINE_PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    finally:
        torch.set_num_threads(prev)
    # chunks whose tables were past MAX_RUNS runs, and attended their keys in id order, as views
    churned = [plan for (table, kv_start, kv_len, q_start, bs, _), plan in plans
               if fc.block_runs(table, kv_len, bs, fc.MAX_RUNS) is None and table[:q_start // bs] != sorted(table[:q_start // bs])]
    assert len(churned) >= 2 and any(p.t0 == 0 and p.gather is None and p.n > 8 for plan in churned for p in plan)
    for ref, got in zip(reference_engine_outputs, outputs):
        assert got.token_ids == ref.token_ids
        assert max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs)) <= 1e-4
