"""CUDA-graph decode: replay is bitwise equal to the same padded step run eagerly, and close to the
ForwardContext path that ModelRunner uses. The helpers here are also used by the CPU test of the
runner's staging (tests/unit/test_triton_decode.py)."""
from __future__ import annotations

import pytest
import torch

from common.config import ModelConfig
from common.engine.cuda_graphs import DecodeGraphRunner
from common.engine.forward_context import ForwardContext, SeqAttn
from common.kv_cache.paged import PagedKVCache
from common.model.llama import LlamaModel

SCRATCH = 0          # the block the runner's padded rows write into; no sequence owns it


def decode_setup(dtype: torch.dtype, device, lens: list[int], block_size: int = 16, max_blocks: int = 8,
                 seed: int = 0):
    """A small random Llama (2 layers, 8 query / 2 KV heads, head dim 32), a cache filled with random
    past K/V, and disjoint random block tables (never block SCRATCH) for sequences of `lens` tokens."""
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                      num_kv_heads=2, head_dim=32)
    torch.manual_seed(seed)
    model = LlamaModel(cfg).to(device=device, dtype=dtype).eval()
    num_blocks = len(lens) * max_blocks + 1
    cache = PagedKVCache(range(cfg.num_layers), num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype,
                         device)
    g = torch.Generator().manual_seed(seed)
    cache.data.copy_(torch.randn(cache.data.shape, generator=g).to(dtype))
    perm = (1 + torch.randperm(num_blocks - 1, generator=g)).tolist()
    tables = [perm[i * max_blocks:(i + 1) * max_blocks] for i in range(len(lens))]
    return model, cache, tables


def forward_context_step(model, cache, backend, ids: list[int], positions: list[int], tables) -> torch.Tensor:
    """One decode step the way ModelRunner runs it (per-sequence backend.forward) -> logits [n, vocab]."""
    dev = cache.data.device
    seqs = [SeqAttn(rows=slice(i, i + 1), q_start=p, kv_start=0, kv_len=p + 1, block_table=t)
            for i, (p, t) in enumerate(zip(positions, tables))]
    slots = [cache.slots(t, p, p + 1)[0] for p, t in zip(positions, tables)]
    ctx = ForwardContext(cache, backend, seqs, model.cfg.head_dim ** -0.5,
                         write_rows=torch.arange(len(ids), device=dev),
                         write_slots=torch.tensor(slots, dtype=torch.long, device=dev))
    with torch.inference_mode():
        hidden = model(model.embed(torch.tensor(ids, device=dev)), torch.tensor(positions, device=dev), ctx)
        return model.logits(hidden)


def _runner(model, cache, backend, device, sizes=(1, 2, 4, 8)):
    return DecodeGraphRunner(model, cache, backend, max_blocks_per_seq=8, scratch_block=SCRATCH,
                             batch_sizes=sizes, device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_replay_is_bitwise_equal_to_eager_padded_step(device, dtype):
    from common.attention.cuda import CudaAttentionBackend
    lens = [5, 16, 17, 40, 100, 120, 1]
    model, cache, tables = decode_setup(dtype, device, lens)
    runner = _runner(model, cache, CudaAttentionBackend(), device)
    runner.capture()
    positions = list(lens)
    for step, n in enumerate([1, 3, 7, 4]):           # padded to 1, 4, 8, 4
        ids = [(7 * step + 3 * i) % 512 for i in range(n)]
        pos = [p + step for p in positions[:n]]
        saved = cache.data.clone()
        b = runner.load(ids, pos, tables[:n])
        eager = runner.eager(n, b)
        after_eager = cache.data.clone()
        cache.data.copy_(saved)                        # same storage: the graphs' addresses stay valid
        graph = runner.replay(n, b)
        torch.cuda.synchronize()
        assert torch.equal(graph, eager), f"step {step}: replay differs from eager"
        assert torch.equal(cache.data, after_eager), f"step {step}: replay wrote different K/V"


def test_replay_matches_forward_context_path(device):
    from common.attention.cuda import CudaAttentionBackend
    lens = [3, 31, 32, 33, 200]
    model, cache, tables = decode_setup(torch.float32, device, lens, max_blocks=16)
    backend = CudaAttentionBackend()
    runner = DecodeGraphRunner(model, cache, backend, max_blocks_per_seq=16, scratch_block=SCRATCH,
                               batch_sizes=(2, 8), device=device)
    runner.capture()
    ids = [11, 22, 33, 44, 55]
    saved = cache.data.clone()
    want = forward_context_step(model, cache, backend, ids, lens, tables)
    cache.data.copy_(saved)
    b = runner.load(ids, lens, tables)
    got = runner.replay(len(ids), b)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Padded rows wrote only the scratch block; live blocks changed only at the new tokens' slots.
    bs = cache.block_size
    changed = (cache.data != saved).any(dim=(0, 1, 4, 5)).nonzero().tolist()    # [(block, offset)]
    allowed = {(t[p // bs], p % bs) for t, p in zip(tables, lens)}
    assert {(blk, off) for blk, off in changed if blk != SCRATCH} <= allowed


def test_load_rejects_what_was_not_captured(device):
    from common.attention.cuda import CudaAttentionBackend
    model, cache, tables = decode_setup(torch.bfloat16, device, [4, 4])
    runner = _runner(model, cache, CudaAttentionBackend(), device, sizes=(1, 2))
    runner.capture()
    with pytest.raises(ValueError):
        runner.load([1, 2, 3], [4, 4, 4], tables + tables[:1])          # 3 > largest captured size
    with pytest.raises(ValueError):
        runner.load([1], [8 * 16], tables[:1])                           # needs a 9th block
