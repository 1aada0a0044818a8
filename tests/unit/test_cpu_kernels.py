"""The CPU decode kernels (common/model/cpu_kernels.py): every build against a float64 reference, the
cases that must stay on F.linear, and that the engine's decode steps take it."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.model import cpu_kernels, decode_layers
from tests.fixtures.paged import scattered_cache

ROOT = Path(__file__).resolve().parents[2]

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason=f"kernel {cpu_kernels.status()}")


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, object]:
    """The kernel as this machine loads it, and as machines without AVX-512 (x86-64-v3: AVX2) and with
    no vector extension beyond SSE2 (x86-64) build it: the portable paths, run on this processor."""
    if cpu_kernels.library() is None:
        pytest.skip(f"kernel {cpu_kernels.status()}")
    out = {"native": cpu_kernels.library()}
    cache = tmp_path_factory.mktemp("kernels")
    copy = cache / "copy.cpp"                 # the x86-64 build from a copy: build()'s `source` (bench/kernel_ab.py)
    copy.write_text(cpu_kernels.SOURCE.read_text())
    for arch in ("x86-64-v3", "x86-64"):
        flags = tuple("-march=" + arch if f == "-march=native" else f for f in cpu_kernels.FLAGS)
        path = cpu_kernels.library_path(cache, flags)
        cpu_kernels.build(path, flags, **({"source": copy} if arch == "x86-64" else {}))
        out[arch] = cpu_kernels.load(path)
    return out


@needs_kernel
def test_using_serves_another_build_and_restores_this_one(builds):
    """bench/kernel_ab.py's sides: within `using(lib)` the engine's calls go to lib (its row limits
    too), and after it to this machine's build again."""
    native, portable = builds["native"], builds["x86-64"]
    assert cpu_kernels.library() is native
    with cpu_kernels.using(portable):
        assert cpu_kernels.library() is portable
        assert cpu_kernels.max_rows(torch.float32) == portable.mn_gemv_max_rows(0)
        assert "using()" in cpu_kernels.status()
    assert cpu_kernels.library() is native and "using()" not in cpu_kernels.status()


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The exact product of the stored values, rounded once to the dtype."""
    return F.linear(x.double(), w.double()).to(x.dtype)


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = reference(x, w)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    scale = F.linear(x.double().abs(), w.double().abs())           # bound of the sum's rounding error
    if x.dtype == torch.float32:
        tol = 4e-7 * x.shape[1] ** 0.5 * scale + 1e-30
    else:                   # the float32 sum is far finer than bfloat16: the two round to neighbours
        tol = ref.double().abs() * 2.0 ** -7 + 1e-6 * scale
    err = (y.double() - ref.double()).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3e}"


def one_and_two_threads(fn):
    """fn() run with one torch (OpenMP) thread, then with two."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(2)
        return one, fn()
    finally:
        torch.set_num_threads(threads)


SHAPES = [(1, 576, 960), (2, 576, 1536), (3, 1536, 576), (4, 37, 5), (1, 100, 1), (4, 1, 3), (1, 64, 257),
          (6, 576, 960), (16, 1536, 576), (9, 37, 5), (13, 1000, 700)]       # batches: blocks of w by 4 rows of x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("build", ["native", "x86-64-v3", "x86-64"])
def test_every_build_matches_the_exact_product(builds, build, dtype):
    torch.manual_seed(0)
    lib = builds[build]
    for m, k, n in SHAPES:
        x = torch.randn(m, k).to(dtype)
        w = torch.randn(n, k).to(dtype)
        check(cpu_kernels.gemv(lib, x, w), x, w)


@pytest.mark.parametrize("build", ["native", "x86-64"])
def test_bf16_logits_are_the_unrounded_sums(builds, build):
    """The LM head's variant: bfloat16 operands, float32 sums returned as they are (bfloat16 logits
    tie: 8 bits), within float32 rounding of the exact product."""
    torch.manual_seed(3)
    x = torch.randn(3, 576).to(torch.bfloat16)
    w = torch.randn(1000, 576).to(torch.bfloat16)
    y = cpu_kernels.gemv(builds[build], x, w, float_out=True)
    exact = F.linear(x.double(), w.double())
    assert y.dtype == torch.float32
    assert bool(((y.double() - exact).abs() <= 4e-7 * 24 * F.linear(x.double().abs(), w.double().abs())).all())
    assert not torch.equal(y, y.to(torch.bfloat16).float())             # not rounded to bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_operands_and_thread_counts(builds, dtype):
    """x rows and w rows with a leading stride beyond K (views of wider tensors, as the fused q/k/v
    split is); one thread and two give the same bits (each row is one thread's)."""
    torch.manual_seed(1)
    lib = builds["native"]
    xs = torch.randn(3, 700).to(dtype)
    ws = torch.randn(1000, 640).to(dtype)
    x, w = xs[:, 50:626], ws[100:900, 64:]
    assert x.stride() == (700, 1) and w.stride() == (640, 1)
    one, two = one_and_two_threads(lambda: cpu_kernels.gemv(lib, x, w))
    check(one, x, w)
    assert torch.equal(one, two)


def test_isa_names_the_paths(builds):
    assert builds["x86-64"].mn_gemv_isa().decode() == "float32=portable bfloat16=portable"
    assert builds["x86-64-v3"].mn_gemv_isa().decode() == "float32=avx2 bfloat16=avx2"
    assert [builds["x86-64"].mn_gemv_max_rows(code) for code in (0, 1)] == [4, 1]   # the portable bfloat16 loop: one row
    assert [builds["x86-64-v3"].mn_gemv_max_rows(code) for code in (0, 1)] == [16, 16]   # decode batches
    assert builds["x86-64"].mn_decode_attention_isa() == 0 and builds["x86-64-v3"].mn_decode_attention_isa() == 1
    assert builds["x86-64"].mn_elementwise_isa() == 0 and builds["x86-64-v3"].mn_elementwise_isa() == 1
    for arch in ("x86-64", "x86-64-v3"):
        assert builds[arch].mn_chunk_attention_isa() == 0
    assert builds["x86-64"].mn_chunk_attention_f32_isa() == 0 and builds["x86-64-v3"].mn_chunk_attention_f32_isa() == 1
    assert builds["x86-64"].mn_gemm_isa() == 0 and builds["x86-64-v3"].mn_gemm_isa() == 1
    native = builds["native"].mn_gemv_isa().decode()
    flags = cpu_kernels.cpuinfo("flags").split()
    avx2 = "avx2" in flags and "fma" in flags
    assert builds["native"].mn_decode_attention_isa() == ("avx512f" in flags or avx2)
    assert builds["native"].mn_chunk_attention_isa() == ("avx512_bf16" in flags)
    assert builds["native"].mn_chunk_attention_f32_isa() == ("avx512f" not in flags and avx2)
    assert builds["native"].mn_gemm_isa() == ("avx512f" not in flags and avx2)
    if "avx512f" in flags:
        assert native.startswith("float32=avx512")
        assert native.endswith("avx512_bf16" if "avx512_bf16" in flags else ("avx512" if "avx512bw" in flags
                                                                             else "portable"))
    elif avx2:
        assert native == "float32=avx2 bfloat16=avx2"
    assert cpu_kernels.status() == f"on ({native})"


GEMM_SHAPES = [(1024, 576, 960), (13, 1536, 576), (7, 1000, 33), (100, 1201, 50), (5, 3, 7), (6, 8, 16), (1, 17, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("build", ["native", "x86-64-v3"])
def test_gemm_is_the_exact_product_to_float32_rounding(builds, build, dtype):
    """The prefill GEMM (AVX2 builds): float32 x against float32 or bfloat16 weights, shapes with every
    kind of edge (M not a multiple of the 6-row tile, N of the 16-column panel, K of the 8-wide packing
    or over the 576-wide k block), within float32 rounding of the float64 product; a row's result the
    same bits wherever it lies in x and whatever M is, one thread or two."""
    lib = builds[build]
    if not lib.mn_gemm_isa():
        pytest.skip("no GEMM kernel in this build (AVX-512 builds)")
    torch.manual_seed(4)
    for m, k, n in GEMM_SHAPES:
        x = torch.randn(m, k).to(dtype).float()
        w = torch.randn(n, k).to(dtype)
        y = cpu_kernels.gemm(lib, x, w)
        exact = F.linear(x.double(), w.double())
        bound = 4e-7 * (k ** 0.5 + 4) * F.linear(x.double().abs(), w.double().abs())
        assert y.dtype == torch.float32 and bool(((y.double() - exact).abs() <= bound).all()), (m, k, n)
        assert torch.equal(cpu_kernels.gemm(lib, x[m // 2:].contiguous(), w), y[m // 2:])
    xs = torch.randn(20, 700)
    x, w = xs[:, 50:626], torch.randn(96, 640).to(dtype)[:, :576]      # strided rows of both
    one, two = one_and_two_threads(lambda: cpu_kernels.gemm(lib, x, w))
    assert torch.equal(one, two)
    torch.testing.assert_close(one.double(), F.linear(x.double(), w.double()), rtol=1e-5, atol=1e-4)


def test_builds_without_the_gemm_say_so(builds):
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    y = torch.empty(8, 16)
    assert builds["x86-64"].mn_gemm(0, x.data_ptr(), 16, w.data_ptr(), 16, y.data_ptr(), 16, 8, 16, 16) == -1


@needs_kernel
def test_linear_takes_the_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = cpu_kernels.gemv
    monkeypatch.setattr(cpu_kernels, "gemv", lambda lib, x, w, *a: calls.append(x.shape) or real(lib, x, w, *a))
    torch.manual_seed(2)
    w = torch.randn(48, 32)
    b = torch.randn(48)
    most = cpu_kernels.max_rows(torch.float32)                     # 16 on AVX2 builds, else 4
    assert most == (16 if cpu_kernels.library().mn_gemm_isa() else 4)
    for m in (1, 4, most):                                         # decode rows: the kernel, bias added
        x = torch.randn(m, 32)
        torch.testing.assert_close(cpu_kernels.linear(x, w, b), F.linear(x, w, b), rtol=1e-6, atol=1e-5)
    assert calls == [(1, 32), (4, 32), (most, 32)]
    calls.clear()
    x5 = torch.randn(most + 1, 32)
    wt = w.t().contiguous().t()                                    # stored [in, out]
    if cpu_kernels._state.get("gemm"):                             # a prefill chunk: the GEMM kernel
        gemms = []
        real_gemm = cpu_kernels.gemm
        monkeypatch.setattr(cpu_kernels, "gemm", lambda lib, x, w: gemms.append(x.shape) or real_gemm(lib, x, w))
        torch.testing.assert_close(cpu_kernels.linear(x5, w, b), F.linear(x5, w, b), rtol=1e-6, atol=1e-5)
        assert gemms == [(most + 1, 32)]
        assert torch.equal(cpu_kernels.linear(x5, wt), F.linear(x5, wt))    # [in, out]: F.linear
        assert gemms == [(most + 1, 32)]
    else:
        assert torch.equal(cpu_kernels.linear(x5, w), F.linear(x5, w))     # F.linear itself
    x1 = torch.randn(1, 32)
    assert torch.equal(cpu_kernels.linear(x1, wt), F.linear(x1, wt))
    assert torch.equal(cpu_kernels.linear(x1.half(), w.half()), F.linear(x1.half(), w.half()))
    assert torch.equal(cpu_kernels.linear(x1[:, ::2], w[:, ::2]), F.linear(x1[:, ::2], w[:, ::2]))
    wg = w.clone().requires_grad_(True)
    out = cpu_kernels.linear(x1, wg)                                  # autograd: F.linear
    assert out.requires_grad
    with torch.no_grad():
        assert not cpu_kernels.linear(x1, wg).requires_grad
    assert calls == [(1, 32)]


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_rows_past_the_kernel_are_a_widened_float32_product(bias):
    """bfloat16 rows the kernel does not take: on a CPU without bfloat16 instructions one float32 GEMM
    of the exactly widened operands, rounded once (as torch's bfloat16 GEMM: exact products, a float32
    sum); else torch's bfloat16 F.linear. Both within one bfloat16 rounding of the exact product."""
    torch.manual_seed(7)
    x = torch.randn(64, 96).bfloat16()
    w = torch.randn(80, 96).bfloat16()
    b = torch.randn(80).bfloat16() if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    with cpu_kernels.bf16_widening(True):
        assert cpu_kernels.bf16_widened()
        y = cpu_kernels.linear(x, w, b)
        logits = cpu_kernels.linear(x, w, b, float_out=True)
        yt = cpu_kernels.linear(x, w.t().contiguous().t(), b)            # stored [in, out]
    assert y.dtype == torch.bfloat16 and logits.dtype == torch.float32
    wide = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert torch.equal(y, logits.bfloat16())                                     # rounded once
    if cpu_kernels._state.get("gemm"):       # the GEMM kernel's float32 sums ([in, out]: F.linear's)
        assert torch.equal(yt, wide.bfloat16())
    else:
        assert torch.equal(logits, wide) and torch.equal(yt, y)
    torch.testing.assert_close(logits.double(), exact, rtol=1e-6, atol=1e-4)     # float32 sums of exact products
    ulp = exact.abs().clamp_min(1e-3) * 2.0 ** -8
    assert ((y.double() - exact).abs() <= ulp).all() and ((yt.double() - exact).abs() <= ulp).all()
    with cpu_kernels.bf16_widening(False):
        assert torch.equal(cpu_kernels.linear(x, w, b), F.linear(x, w, b))    # torch's own kernel
    torch.testing.assert_close(F.linear(x, w, b).double(), exact, rtol=2.0 ** -7, atol=1e-2)


def test_bf16_widening_follows_the_cpu_flags(monkeypatch):
    """Widened exactly where the CPU lacks bfloat16 instructions (and the kernels are not turned off)."""
    for flags, want in (("fpu sse2 avx2 fma", True), ("avx2 avx512f avx512_bf16", False), ("avx2 amx_bf16", False)):
        monkeypatch.setattr(cpu_kernels, "cpuinfo", lambda field, f=flags: f)
        monkeypatch.setattr(cpu_kernels, "_widen", {})
        monkeypatch.setattr("platform.machine", lambda: "x86_64")
        assert cpu_kernels.bf16_widened() is want, flags
    monkeypatch.setattr(cpu_kernels, "_widen", {})
    monkeypatch.setenv("MNEMOSYNE_CPU_KERNELS", "0")
    assert cpu_kernels.bf16_widened() is False


@needs_kernel
def test_the_engine_decodes_on_the_kernel(monkeypatch):
    """make up's engines: every linear of a decode step (30 layers x 4 + the LM head) and every layer's
    attention take the kernels; float32 weights keep the [out, in] layout the linears stream."""
    from bench.engine import decode_step_times, make_engine
    from common.model.llama import weights_transposed
    from common.model.loader import load_checkpoint

    ckpt = load_checkpoint(None)
    engine = make_engine(ckpt, "float32", 256, 64, ())
    model = engine.executor.model
    assert not any(weights_transposed(m) for m in model.modules() if isinstance(m, torch.nn.Linear))
    calls, attends, whole = [], [], []
    real, real_attend, real_run = cpu_kernels.gemv, cpu_kernels.decode_attention, decode_layers.run
    monkeypatch.setattr(cpu_kernels, "gemv", lambda lib, x, w, *a: calls.append(x.shape[0]) or real(lib, x, w, *a))
    monkeypatch.setattr(cpu_kernels, "decode_attention", lambda *a: attends.append(a[1].shape[0]) or real_attend(*a))
    monkeypatch.setattr(decode_layers, "run", lambda *a: (lambda out: whole.append(out is not None) or out)(real_run(*a)))
    with decode_layers.disabled():                    # the layers one module at a time
        decode_step_times(engine, list(range(100, 140)), 2)
    layers = ckpt.config.num_layers
    assert calls == [1] * (4 * layers + 1) * 3        # the entering step (one new token) and 2 decode steps
    assert attends == [1] * layers * 3
    calls.clear(), attends.clear(), whole.clear()
    decode_step_times(engine, list(range(100, 140)), 2)
    assert whole == [True] * 3 and calls == [1] * 3 and attends == []     # one call; the LM head apart
    # the layers' check is kept per model and made again when its parameters change
    model.pack_weights(transposed=True)               # [in, out] storage: not what the kernel reads
    whole.clear()
    decode_step_times(engine, list(range(100, 140)), 2)
    assert whole == [False] * 3
    model.pack_weights(transposed=False)
    whole.clear()
    decode_step_times(engine, list(range(100, 140)), 2)
    assert whole == [True] * 3


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch, shape", [("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
                                         ("llama", dict(num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                                                        num_hidden_layers=3)),
                                         ("mistral", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=32)),
                                         ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16))])
def test_a_decode_step_in_one_call_equals_the_modules_bit_for_bit(tmp_path, monkeypatch, dtype, arch, shape):
    """common/model/decode_layers.py: six prompts decoding together (1-6 rows as they start and
    finish: past 4, the batch path of the AVX2 builds' linears), greedy, with the layers in one kernel
    call and module by module: the same tokens and the same logprobs bit for bit, the same KV left in
    the cache. qwen2 (q/k/v biases) keeps the modules."""
    from common.config import CacheConfig, EngineConfig, SchedulerConfig
    from common.engine.engine import LLMEngine
    from common.model.loader import load_checkpoint
    from common.model.random_hf import write_random_hf_model
    from common.sampling_params import SamplingParams

    ckpt = load_checkpoint(str(write_random_hf_model(tmp_path / arch, arch, seed=11, tokenizer=False, **shape)))
    prompts = [[(7 * i + 13 * j) % 300 + 10 for i in range(n)] for j, n in enumerate((5, 40, 17, 70, 23, 9))]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (9, 4, 12, 7, 10, 6)]

    def run() -> tuple[list, torch.Tensor, list[bool]]:
        engine = LLMEngine(EngineConfig(model="(preloaded)", dtype=dtype,
                                        cache=CacheConfig(block_size=16, num_blocks=64, prefix_caching=False),
                                        scheduler=SchedulerConfig(chunk_size=32)), ckpt)
        taken: list[bool] = []
        real = decode_layers.run
        monkeypatch.setattr(decode_layers, "run", lambda *a: (lambda out: taken.append(out is not None) or out)(real(*a)))
        rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        outs = {r: [] for r in rids}
        while engine.has_unfinished():
            for o in engine.step():
                if o.token_id is not None:
                    outs[o.request_id].append((o.token_id, o.logprob))
        monkeypatch.setattr(decode_layers, "run", real)
        return [outs[r] for r in rids], engine.executor.cache.data.clone(), taken

    fused, cache, taken = run()
    with decode_layers.disabled():
        ref, ref_cache, _ = run()
    assert fused == ref and all(lp is not None for out in fused for _, lp in out)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    if arch == "qwen2":
        assert not any(taken)
    else:
        assert sum(taken) >= 8 and not all(taken)     # the all-decode steps, not the prefill chunks


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_kv_parallel_decode_step_in_one_call_equals_the_modules(tmp_path, monkeypatch, dtype):
    """A KV-cache-parallel group's decode step (a grid worker's ForwardContext with `combine`): three
    rows, one whose keys lie here and whose K/V this group stores, one with no keys here, one whose
    earlier keys lie here and whose K/V another group stores. The one-call step merges each layer's
    partials through combine from inside the kernel: the same hidden states and the same cache bit for
    bit as module by module, combine called once per layer with the same partials; an exception in
    combine comes out of the step."""
    from common.attention.merge import merge_stacked
    from common.config import CacheConfig, EngineConfig, SchedulerConfig
    from common.engine.engine import LLMEngine
    from common.engine.forward_context import ForwardContext, SeqAttn
    from common.model.loader import load_checkpoint
    from common.model.random_hf import write_random_hf_model

    ckpt = load_checkpoint(str(write_random_hf_model(tmp_path / "llama", "llama", seed=5, tokenizer=False,
                                                     num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                                                     num_hidden_layers=3)))
    engine = LLMEngine(EngineConfig(model="(preloaded)", dtype=dtype,
                                    cache=CacheConfig(block_size=16, num_blocks=16, prefix_caching=False),
                                    scheduler=SchedulerConfig(chunk_size=32)), ckpt)
    ex = engine.executor
    model, cache, dt = ex.model, ex.cache, ex.dtype
    g = torch.Generator().manual_seed(2)
    cache.data.copy_(torch.randn(cache.data.shape, generator=g).to(dt))
    start = cache.data.clone()
    seqs = [SeqAttn(slice(0, 1), 40, 0, 41, [0, 1, 2]),        # keys 0..40 here, its own stored here
            SeqAttn(slice(2, 3), 70, 0, 32, [3, 4])]           # keys 0..31 here, stored by another group
    ids, positions = torch.tensor([11, 12, 13]), torch.tensor([40, 99, 70])

    def step(calls: list) -> torch.Tensor:
        def combine(out, lse):                  # another group's partials: the same each run, per call
            calls.append((out.clone(), lse.clone()))
            gen = torch.Generator().manual_seed(len(calls))
            other = torch.randn(out.shape, generator=gen).to(out.dtype)
            other_lse = torch.randn(lse.shape, generator=gen)
            return merge_stacked(torch.stack([out, other]), torch.stack([lse.float(), other_lse]))[0].to(out.dtype)
        cache.data.copy_(start)
        ctx = ForwardContext(cache, ex.backend, seqs, next(iter(model.layers.values())).self_attn.head_dim ** -0.5,
                             torch.tensor([0]), torch.tensor(cache.slots([0, 1, 2], 40, 41)), combine=combine)
        with torch.inference_mode():                    # as the engine and the grid workers run
            return model(model.embed(ids).to(dt), positions, ctx)

    taken: list[bool] = []
    real = decode_layers.run
    monkeypatch.setattr(decode_layers, "run", lambda *a: (lambda out: taken.append(out is not None) or out)(real(*a)))
    one_calls: list = []
    one = step(one_calls)
    one_cache = cache.data.clone()
    with decode_layers.disabled():
        mod_calls: list = []
        mods = step(mod_calls)
    assert taken == [True, False]
    assert torch.equal(one.view(torch.uint8), mods.view(torch.uint8))
    assert torch.equal(one_cache.view(torch.uint8), cache.data.view(torch.uint8))
    assert len(one_calls) == len(mod_calls) == 3
    for (a, la), (b, lb) in zip(one_calls, mod_calls):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and torch.equal(la, lb)
        assert torch.equal(la[1], torch.full_like(la[1], float("-inf"))) and not bool(a[1].any())   # no keys here
    # K/V written for row 0 only (slot 2 * 16 + 8 of every layer), none for the rows stored elsewhere
    written = (one_cache != start).reshape(cache.data.shape[0], 2, -1, cache.data.shape[-2] * cache.data.shape[-1])
    assert written.any(dim=-1).nonzero()[:, 2].unique().tolist() == [2 * 16 + 8]

    failed: list[int] = []

    def failing(out, lse):                      # the second layer's merge fails (a peer died, say)
        failed.append(1)
        if len(failed) == 2:
            raise ValueError("the other group is gone")
        return out
    ctx = ForwardContext(cache, ex.backend, seqs, 0.125, torch.tensor([0]), torch.tensor(cache.slots([0, 1, 2], 40, 41)),
                         combine=failing)
    with pytest.raises(ValueError, match="the other group is gone") as raised, torch.inference_mode():
        model(model.embed(ids).to(dt), positions, ctx)
    assert len(failed) == 2 and any(Path(str(e.path)).name == "decode_layers.py" for e in raised.traceback)


def test_no_compiler_leaves_f_linear_in_place(tmp_path):
    """A machine without a working compiler serves on F.linear and says why; the off switch too."""
    code = ("import torch; from common.model import cpu_kernels; x = torch.randn(1, 8); w = torch.randn(4, 8);"
            "assert torch.equal(cpu_kernels.linear(x, w), torch.nn.functional.linear(x, w));"
            "print(cpu_kernels.status())")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MNEMOSYNE_CACHE": str(tmp_path), "CXX": "/bin/false"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("unavailable: "), done.stdout
    assert "the decode step runs on torch's ops" in done.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MNEMOSYNE_CPU_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "off (MNEMOSYNE_CPU_KERNELS=0)", done.stderr


def test_builds_are_named_by_what_they_depend_on(tmp_path):
    if cpu_kernels._compiler() is None:
        pytest.skip("no compiler")
    a = cpu_kernels.library_path(tmp_path)
    assert a == cpu_kernels.library_path(tmp_path)
    assert a != cpu_kernels.library_path(tmp_path, cpu_kernels.FLAGS + ("-DX",))
    assert a.parent == tmp_path and a.name.startswith("cpu_kernels-") and a.suffix == ".so"


def paged(lens: list[int], bs: int, hkv: int, d: int, dtype: torch.dtype, seed: int):
    """A cache holding sequences of `lens` keys in scattered blocks (3 spare), and their tables."""
    return scattered_cache(lens, bs, hkv, d, dtype, torch.Generator().manual_seed(seed), spare_blocks=3)


@needs_kernel
@pytest.mark.parametrize("build", ["native", "x86-64-v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 3, 9, 64), (32, 2, 2, 128), (5, 1, 4, 16), (16, 2, 14, 64), (16, 4, 16, 128),
                                   (16, 1, 5, 48), (16, 1, 2, 256), (16, 2, 6, 32)])
def test_decode_attention_matches_the_exact_reference(builds, build, dtype, shape):
    """Batches with empty, one-key, partial-block and many-span sequences (5,000 keys: about 20 units
    of work merged, each span several blocks of V rows and a padded tail), against the float64
    reference over the same paged cache; query heads per kv head from 1 to 7 (the V sums' head blocks
    of 1 to 4; groups of 3 take AVX2's three-key scores), head dims 16 to 256. This machine's build and
    the AVX2 one (x86-64-v3)."""
    from common.attention.reference import ReferenceBackend
    lib = builds[build]
    if not lib.mn_decode_attention_isa():
        pytest.skip("no decode attention kernel in this build")
    bs, hkv, hq, d = shape
    lens = [1, 17, 0, 300, 5000, bs]
    k, v, tables, seq_lens = paged(lens, bs, hkv, d, dtype, seed=bs + d)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(9)).to(dtype)
    assert cpu_kernels.attention_applies(lib, q, k)
    out, lse = cpu_kernels.decode_attention(lib, q, k, v, tables, seq_lens, d ** -0.5)
    ref_out, ref_lse = ReferenceBackend().decode_paged(q.double(), k.double(), v.double(), tables, seq_lens,
                                                       scale=d ** -0.5)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(out[2], torch.zeros_like(out[2])) and bool((lse[2] == float("-inf")).all())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2e-3)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse.to(torch.float64), rtol=1e-6, atol=1e-5)


@needs_kernel
def test_the_cpu_backend_decodes_on_the_kernel_where_it_applies(monkeypatch):
    from common.attention.cpu import CpuFlashBackend
    from common.attention.reference import ReferenceBackend
    calls = []
    real = cpu_kernels.decode_attention
    monkeypatch.setattr(cpu_kernels, "decode_attention", lambda *a: calls.append(a[1].dtype) or real(*a))
    backend = CpuFlashBackend()
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        k, v, tables, lens = paged([40, 7], 16, 2, 32, dtype, seed=3)
        q = torch.randn(2, 4, 32).to(dtype)
        out, lse = backend.decode_paged(q, k, v, tables, lens, scale=0.2)
        ref_out, _ = ReferenceBackend().decode_paged(q.double(), k.double(), v.double(), tables, lens, scale=0.2)
        torch.testing.assert_close(out.double(), ref_out, rtol=2 ** -7, atol=2e-3)
    assert calls == [torch.float32, torch.bfloat16]                 # float64: the flash path
    k, v, tables, lens = paged([40], 16, 2, 24, torch.float32, seed=4)   # head dim 24: not a multiple of 16
    assert not cpu_kernels.attention_applies(cpu_kernels.library(), torch.randn(1, 4, 24), k)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of the dtype lie between a and b (same sign assumed)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    return (a.view(bits).to(torch.int64) - b.view(bits).to(torch.int64)).abs()


@needs_kernel
@pytest.mark.parametrize("build", ["native", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 100])
def test_elementwise_steps_are_the_eager_ones(builds, build, dtype, rows):
    """RMSNorm, RoPE and SiLU-and-multiply of a decode step's few rows and of a prefill chunk's (100:
    split over the threads), against the model's eager expressions: RoPE bit for bit; the others within
    a few units in the last place (a reduction's order, exp's last bit). Every build: the 16-lane ones
    (this machine's, AVX2) and the portable scalar loops (x86-64); values past exp's range, infinities
    and NaN come out as the eager code's."""
    from common.model.llama import RMSNorm
    from common.model.rope import Rope, apply_rope
    from common.config import RopeScaling
    lib = builds[build]
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(rows, 576, generator=g) * 3).to(dtype)
    norm = RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=g))
        eager = norm.weight * (lambda f: f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-5))(x.float()).to(dtype)
        got = cpu_kernels.rms_norm(lib, x, norm.weight.detach(), 1e-5)
    # float32: the sum of squares in another order moves a row's scale by an ulp, its values by a few;
    # bfloat16: rounding hides that but for the few values at a rounding boundary
    assert got is not None and int(ulps_apart(got, eager).max()) <= (4 if dtype == torch.float32 else 1)
    assert dtype == torch.float32 or float((got != eager).float().mean()) < 0.05

    qkv = (torch.randn(rows, 9 * 64 + 2 * 3 * 64, generator=g) * 50).to(dtype)
    qkv[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 3e38])      # bfloat16 rounding's edges
    q = qkv[:, :576].view(rows, 9, 64)                                # strided, as Attention.forward's
    cos, sin = Rope(64, 10000.0, RopeScaling()).cos_sin(torch.arange(rows) * 37, dtype)
    got = cpu_kernels.rope(lib, q, cos, sin)
    want = apply_rope(q, cos, sin)
    assert got is not None and torch.equal(got.isnan(), want.isnan()) and bool(want.isnan().any())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])

    gate_up = (torch.randn(rows, 2 * 1536, generator=g) * 4).to(dtype)
    gate_up[0, :6] = torch.tensor([-100.0, 100.0, -87.5, 89.0, float("-inf"), float("inf")])
    gate_up[1, 1536:1540] = torch.tensor([float("nan"), float("inf"), 0.0, -0.0])
    gate, up = gate_up.chunk(2, dim=-1)
    got = cpu_kernels.silu_mul(lib, gate_up)
    eager = F.silu(gate) * up
    assert got is not None and torch.equal(got.isnan(), eager.isnan())
    fin = torch.isfinite(eager)
    assert torch.equal(got[~fin & ~eager.isnan()], eager[~fin & ~eager.isnan()])
    assert int(ulps_apart(got[fin], eager[fin]).max()) <= (4 if dtype == torch.float32 else 1)


def test_elementwise_takes_prefill_rows_where_the_build_is_vectorised():
    """`small` takes a decode step's rows only; `elementwise` takes any rows where the loaded build runs
    the steps on 16 lanes (AVX-512, AVX2), else the decode rows only; never float64."""
    lib = cpu_kernels.library()
    for dtype in (torch.float32, torch.bfloat16):
        assert cpu_kernels.small(torch.zeros(cpu_kernels.SMALL_ROWS + 1, 8, dtype=dtype)) is None   # a prefill chunk
        big = cpu_kernels.elementwise(torch.zeros(1024, 8, dtype=dtype))
        assert (big is not None) == bool(lib is not None and lib.mn_elementwise_isa())
        assert cpu_kernels.elementwise(torch.zeros(3, 8, dtype=dtype)) is lib
    assert cpu_kernels.small(torch.zeros(2, 8, dtype=torch.float64)) is None
    assert cpu_kernels.elementwise(torch.zeros(1024, 8, dtype=torch.float64)) is None


@needs_kernel
@pytest.mark.parametrize("build, dtype", [("native", torch.bfloat16), ("native", torch.float32),
                                          ("x86-64-v3", torch.bfloat16), ("x86-64-v3", torch.float32)])
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (5, 1, 48)])
def test_chunk_attention_matches_the_reference(builds, build, dtype, heads):
    """A prefill chunk against keys before and inside it, by position: a prompt's first chunk, a later
    chunk over its prefix, a shard whose keys start after the chunk's first queries (empty rows), fewer
    keys than queries, keys ending before the chunk, odd key counts; strided q (as the fused q/k/v
    split gives). Against the float64 reference, and no further from it than torch's flash kernel.
    Whichever kernel the build has for the dtype: bfloat16 on vdpbf16ps (AVX512-BF16), float32 and
    bfloat16 on multiply-adds (AVX2: x86-64-v3 here on any x86-64 machine with AVX2)."""
    from common.attention.cpu import CpuFlashBackend
    from common.attention.reference import ReferenceBackend
    lib = builds[build]
    hq, hkv, d = heads
    probe = torch.zeros(1, hq, d, dtype=dtype), torch.zeros(1, hkv, d, dtype=dtype)
    if cpu_kernels.chunk_attention(lib, probe[0], probe[1], probe[1], 0, 0, 1.0) is None:
        assert not (lib.mn_chunk_attention_f32_isa() and d % 16 == 0)      # the AVX2 kernel takes both dtypes
        pytest.skip(f"no chunk attention kernel for {dtype}, head dim {d} in this build")
    g = torch.Generator().manual_seed(hq + d)
    ref, flash = ReferenceBackend(), CpuFlashBackend()
    tol = dict(rtol=2 ** -7, atol=4e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    slack = 1e-3 if dtype == torch.bfloat16 else 1e-6
    cases = [(100, 100, 0, 0), (37, 301, 264, 0), (70, 200, 130, 150), (50, 21, 40, 30), (33, 129, 500, 0),
             (1, 65, 64, 0), (130, 130, 0, 0)]
    if heads == (9, 3, 64):            # more keys than the AVX2 kernel lays out at a time (KW = 16,384)
        cases += [(40, 20000, 19960, 0), (70, 17000, 16390, 20)]
    for n, L, q_start, k_start in cases:
        qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(dtype)
        q = qkv[:, :hq * d].view(n, hq, d)
        k = torch.randn(L, hkv, d, generator=g).to(dtype)
        v = torch.randn(L, hkv, d, generator=g).to(dtype)
        got = cpu_kernels.chunk_attention(lib, q, k, v, q_start, k_start, d ** -0.5)
        assert got is not None
        out, lse = got
        assert out.dtype == dtype and lse.dtype == torch.float32
        want_out, want_lse = ref.forward(q.double(), k.double(), v.double(), q_start=q_start, k_start=k_start,
                                         scale=d ** -0.5)
        torch.testing.assert_close(out.double(), want_out, **tol)
        with cpu_kernels.disabled():
            f_out, _ = flash.forward(q, k, v, q_start=q_start, k_start=k_start, scale=d ** -0.5)
        assert (out.double() - want_out).abs().max() <= 1.5 * (f_out.double() - want_out).abs().max() + slack
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
        fin = torch.isfinite(want_lse)
        torch.testing.assert_close(lse.double()[fin], want_lse[fin], rtol=1e-5, atol=1e-3)
    assert cpu_kernels.chunk_attention(lib, q.double(), k.double(), v.double(), 0, 0, 0.2) is None   # float64


@needs_kernel
def test_the_phases_build_counts_the_chunk_kernel_and_changes_nothing(builds, tmp_path):
    """bench/chunk_phases.py's profiling build (-DMN_CHUNK_PHASES; x86-64-v3, the AVX2 kernel): the
    same bits as the build without it, ticks in each of its three phases (and none counted twice: no
    more than the threads' wall time), reset by each read; builds without it answer -1."""
    flags = tuple("-march=x86-64-v3" if f == "-march=native" else f for f in cpu_kernels.FLAGS)
    path = cpu_kernels.library_path(tmp_path, flags + ("-DMN_CHUNK_PHASES",))
    cpu_kernels.build(path, flags + ("-DMN_CHUNK_PHASES",))
    lib = cpu_kernels.load(path)
    out = (ctypes.c_uint64 * 4)()
    for arch in ("x86-64", "x86-64-v3"):
        assert builds[arch].mn_chunk_phases(out) == -1
    assert lib.mn_chunk_phases(out) == 0
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(300, 9, 64, generator=g).to(dtype)
        k, v = (torch.randn(1000, 3, 64, generator=g).to(dtype) for _ in range(2))
        plain = cpu_kernels.chunk_attention(builds["x86-64-v3"], q, k, v, 700, 0, 0.125)
        lib.mn_chunk_phases(out)
        t0 = out[3]
        got = cpu_kernels.chunk_attention(lib, q, k, v, 700, 0, 0.125)
        assert lib.mn_chunk_phases(out) == 0
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
        assert all(out[i] > 0 for i in range(3))
        assert sum(out[i] for i in range(3)) <= (out[3] - t0) * torch.get_num_threads()
        lib.mn_chunk_phases(out)
        assert [out[i] for i in range(3)] == [0, 0, 0]
