"""Model shards saved as they serve and mapped back (common/model/packed_cache.py).

A mapped shard must be the built one exactly: the same tensors in the same packed layout (the fused
q/k/v and gate/up matrices taken back from their views), hence bit-identical logits, in both dtypes
and for TP shards. A file is only reused for the same checkpoint files, config, layers, shard and
dtype; a corrupt file is replaced, a writer's lock respected (unless its process is gone), and the
directory kept under its size cap. Grids with the cache on are compared with the single-process
engine in tests/distributed/test_parallel.py.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from common.engine.executor import build_model
from common.model.loader import load_checkpoint
from common.model.packed_cache import PackedCache, shard_key
from common.parallel.tp import build_shard, tp_shard
from tests.fixtures.hf_models import write_random_hf_model
from tests.unit.test_weight_layout import F32_DEFAULT, assert_layout, fused, logits

VOCAB = 321
_rng = random.Random(7)
PROMPT = [_rng.randrange(4, VOCAB) for _ in range(29)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_random_hf_model(tmp_path_factory.mktemp("packed"), "qwen2", vocab_size=VOCAB, seed=41,
                                     tie_word_embeddings=True, tokenizer=False))    # q/k/v bias, tied head


def files(cache: PackedCache) -> list[str]:
    return sorted(p.name for p in cache.dir.glob("*.pt"))


def mapped_from(t: torch.Tensor, path) -> bool:
    """Whether `t`'s memory lies in a mapping of file `path` (/proc/self/maps)."""
    ptr, real = t.data_ptr(), os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False


def same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]) and sa[name].stride() == sb[name].stride(), name


@pytest.mark.parametrize("dtype,transposed", [(torch.float32, F32_DEFAULT), (torch.bfloat16, False)])
def test_mapped_model_is_the_built_one(checkpoint, tmp_path, dtype, transposed):
    ckpt = load_checkpoint(checkpoint)
    cache = PackedCache(tmp_path)
    plain = build_model(ckpt.config, ckpt, dtype, "cpu")
    first = build_model(ckpt.config, ckpt, dtype, "cpu", cache=cache)      # built, saved, mapped back
    assert len(files(cache)) == 1
    second = build_model(ckpt.config, ckpt, dtype, "cpu", cache=cache)     # mapped
    assert len(files(cache)) == 1
    path = cache.dir / files(cache)[0]
    for model in (first, second):
        assert_layout(model, transposed=transposed)
        same_tensors(plain, model)
        for name, w in fused(model).items():                  # the fused matrices are the file's pages
            assert mapped_from(w, path), name
        assert mapped_from(model.lm_head.weight, path) and mapped_from(model.embed_tokens.weight, path)
        assert torch.equal(logits(model, PROMPT), logits(plain, PROMPT))
    assert not any(mapped_from(w, path) for w in fused(plain).values())


@pytest.mark.parametrize("rank", [0, 1])
def test_tp_shards_are_cached_apart(checkpoint, tmp_path, rank):
    ckpt = load_checkpoint(checkpoint)
    cache = PackedCache(tmp_path)
    shard = tp_shard(ckpt.config, rank, 2)
    n = ckpt.config.num_layers
    plain = build_shard(ckpt, shard, None, 0, n, torch.float32)
    build_shard(ckpt, tp_shard(ckpt.config, 1 - rank, 2), None, 0, n, torch.float32, cache)  # the other rank's
    mapped = build_shard(ckpt, shard, None, 0, n, torch.float32, cache)
    build_shard(ckpt, shard, None, 0, n // 2, torch.float32, cache)                          # another stage
    assert len(files(cache)) == 3
    assert_layout(mapped, transposed=F32_DEFAULT)
    same_tensors(plain, mapped)
    assert mapped_from(fused(mapped)["0.qkv"], cache.path(shard_key(ckpt.source, ckpt.config, torch.float32, 0, n, shard,
                                                                                   F32_DEFAULT)))


def test_key_follows_the_checkpoint_files(checkpoint, tmp_path):
    ckpt = load_checkpoint(checkpoint)
    key = shard_key(ckpt.source, ckpt.config, torch.float32, 0, 2)
    assert key == shard_key(ckpt.source, ckpt.config, torch.float32, 0, 2)
    assert key != shard_key(ckpt.source, ckpt.config, torch.bfloat16, 0, 2)
    assert key != shard_key(ckpt.source, ckpt.config, torch.float32, 0, 1)
    assert key != shard_key(ckpt.source, ckpt.config, torch.float32, 0, 2, transposed=True)    # the layout
    longer = load_checkpoint(checkpoint, max_model_len=4096)       # no weight depends on max_position
    assert key == shard_key(longer.source, longer.config, torch.float32, 0, 2)
    weights = next(p for p in os.scandir(checkpoint) if p.name.endswith(".safetensors"))
    st = os.stat(weights.path)
    try:
        os.utime(weights.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))   # the weights replaced
        assert key != shard_key(ckpt.source, ckpt.config, torch.float32, 0, 2)
    finally:
        os.utime(weights.path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_corrupt_file_is_replaced(checkpoint, tmp_path, caplog):
    ckpt = load_checkpoint(checkpoint)
    cache = PackedCache(tmp_path)
    plain = build_model(ckpt.config, ckpt, torch.float32, "cpu")
    build_model(ckpt.config, ckpt, torch.float32, "cpu", cache=cache)
    path = cache.dir / files(cache)[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])        # truncated
    model = build_model(ckpt.config, ckpt, torch.float32, "cpu", cache=cache)
    assert "unusable" in caplog.text
    same_tensors(plain, model)
    assert torch.load(path, mmap=True, weights_only=True).keys() == plain.state_dict().keys()   # written again


def test_live_writer_lock_is_respected_and_a_dead_ones_taken_over(checkpoint, tmp_path):
    ckpt = load_checkpoint(checkpoint)
    cache = PackedCache(tmp_path)
    key = shard_key(ckpt.source, ckpt.config, torch.float32, 0, ckpt.config.num_layers)
    cache.dir.mkdir(parents=True, exist_ok=True)
    lock = cache.dir / f".{key}.lock"
    lock.write_text(str(os.getpid()))                       # another writer, alive
    model = build_model(ckpt.config, ckpt, torch.float32, "cpu", cache=cache)
    assert files(cache) == [] and lock.exists()             # built, not saved, the lock left alone
    assert model.layers["0"].self_attn.qkv is not None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    lock.write_text(dead)                                    # a writer that died mid-write
    build_model(ckpt.config, ckpt, torch.float32, "cpu", cache=cache)
    assert files(cache) == [f"{key}.pt"] and not lock.exists()
    assert not list(cache.dir.glob(".*.tmp"))


def test_directory_is_kept_under_its_cap(checkpoint, tmp_path):
    ckpt = load_checkpoint(checkpoint)
    n = ckpt.config.num_layers
    probe = PackedCache(tmp_path / "probe")
    size = {}
    for last in (n, n - 1, n - 2):                           # three stages' files
        build_model(ckpt.config, ckpt, torch.float32, "cpu", 0, last, cache=probe)
        size[last] = probe.path(shard_key(ckpt.source, ckpt.config, torch.float32, 0, last)).stat().st_size
    order = sorted(size, key=size.get)                       # the smallest first
    cache = PackedCache(tmp_path / "capped", max_bytes=size[order[1]] + size[order[2]])
    for last in order:
        build_model(ckpt.config, ckpt, torch.float32, "cpu", 0, last, cache=cache)
    keys = [shard_key(ckpt.source, ckpt.config, torch.float32, 0, last) + ".pt" for last in order]
    assert files(cache) == sorted(keys[1:])                   # the least recently used one went
    assert sum(p.stat().st_size for p in cache.dir.glob("*.pt")) <= cache.max_bytes
    small = PackedCache(tmp_path / "small", max_bytes=size[order[0]] // 2)
    build_model(ckpt.config, ckpt, torch.float32, "cpu", 0, order[0], cache=small)   # over the cap: not cached
    assert not small.dir.exists() or files(small) == []
