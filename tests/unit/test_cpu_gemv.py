"""The CPU decode kernel (common/model/cpu_gemv.py): every build of it against a float64 reference, the
cases that must stay on F.linear, and that the engine's decode steps take it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.model import cpu_gemv

ROOT = Path(__file__).resolve().parents[2]

needs_kernel = pytest.mark.skipif(cpu_gemv.library() is None, reason=f"kernel {cpu_gemv.status()}")


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, object]:
    """The kernel as this machine loads it, and as machines without AVX-512 (x86-64-v3: AVX2) and with
    no vector extension beyond SSE2 (x86-64) build it: the portable paths, run on this processor."""
    if cpu_gemv.library() is None:
        pytest.skip(f"kernel {cpu_gemv.status()}")
    out = {"native": cpu_gemv.library()}
    cache = tmp_path_factory.mktemp("kernels")
    for arch in ("x86-64-v3", "x86-64"):
        flags = tuple("-march=" + arch if f == "-march=native" else f for f in cpu_gemv.FLAGS)
        path = cpu_gemv.library_path(cache, flags)
        cpu_gemv.build(path, flags)
        out[arch] = cpu_gemv.load(path)
    return out


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


SHAPES = [(1, 576, 960), (2, 576, 1536), (3, 1536, 576), (4, 37, 5), (1, 100, 1), (4, 1, 3), (1, 64, 257)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("build", ["native", "x86-64-v3", "x86-64"])
def test_every_build_matches_the_exact_product(builds, build, dtype):
    torch.manual_seed(0)
    lib = builds[build]
    for m, k, n in SHAPES:
        x = torch.randn(m, k).to(dtype)
        w = torch.randn(n, k).to(dtype)
        check(cpu_gemv.gemv(lib, x, w), x, w)


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
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gemv.gemv(lib, x, w)
        torch.set_num_threads(2)
        two = cpu_gemv.gemv(lib, x, w)
    finally:
        torch.set_num_threads(threads)
    check(one, x, w)
    assert torch.equal(one, two)


def test_isa_names_the_paths(builds):
    assert builds["x86-64"].mn_gemv_isa().decode() == "float32=portable bfloat16=portable"
    assert builds["x86-64-v3"].mn_gemv_isa().decode() == "float32=portable bfloat16=portable"
    native = builds["native"].mn_gemv_isa().decode()
    flags = cpu_gemv._cpu_flags().split()
    if "avx512f" in flags:
        assert native.startswith("float32=avx512")
        assert native.endswith("avx512_bf16" if "avx512_bf16" in flags else ("avx512" if "avx512bw" in flags
                                                                             else "portable"))
    assert cpu_gemv.status() == f"on ({native})"


@needs_kernel
def test_linear_takes_the_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = cpu_gemv.gemv
    monkeypatch.setattr(cpu_gemv, "gemv", lambda lib, x, w: calls.append(x.shape) or real(lib, x, w))
    torch.manual_seed(2)
    w = torch.randn(48, 32)
    b = torch.randn(48)
    for m in (1, 4):                                               # decode rows: the kernel, bias added
        x = torch.randn(m, 32)
        torch.testing.assert_close(cpu_gemv.linear(x, w, b), F.linear(x, w, b), rtol=1e-6, atol=1e-5)
    assert calls == [(1, 32), (4, 32)]
    calls.clear()
    x5 = torch.randn(5, 32)
    assert torch.equal(cpu_gemv.linear(x5, w), F.linear(x5, w))    # a prefill chunk: F.linear itself
    wt = w.t().contiguous().t()                                    # stored [in, out]
    x1 = torch.randn(1, 32)
    assert torch.equal(cpu_gemv.linear(x1, wt), F.linear(x1, wt))
    assert torch.equal(cpu_gemv.linear(x1.half(), w.half()), F.linear(x1.half(), w.half()))
    assert torch.equal(cpu_gemv.linear(x1[:, ::2], w[:, ::2]), F.linear(x1[:, ::2], w[:, ::2]))
    wg = w.clone().requires_grad_(True)
    out = cpu_gemv.linear(x1, wg)                                  # autograd: F.linear
    assert out.requires_grad
    with torch.no_grad():
        assert not cpu_gemv.linear(x1, wg).requires_grad
    assert calls == [(1, 32)]


@needs_kernel
def test_the_engine_decodes_on_the_kernel(monkeypatch):
    """make up's engines: every linear of a decode step (30 layers x 4 + the LM head) takes the kernel,
    none of a prefill chunk's; float32 weights keep the [out, in] layout it streams."""
    from bench.engine import decode_step_times, make_engine
    from common.model.llama import weights_transposed
    from common.model.loader import load_checkpoint

    ckpt = load_checkpoint(None)
    engine = make_engine(ckpt, "float32", 256, 64, ())
    model = engine.executor.model
    assert not any(weights_transposed(m) for m in model.modules() if isinstance(m, torch.nn.Linear))
    calls = []
    real = cpu_gemv.gemv
    monkeypatch.setattr(cpu_gemv, "gemv", lambda lib, x, w: calls.append(x.shape[0]) or real(lib, x, w))
    decode_step_times(engine, list(range(100, 140)), 2)
    layers = ckpt.config.num_layers
    assert calls == [1] * (4 * layers + 1) * 3        # the entering step (one new token) and 2 decode steps


def test_no_compiler_leaves_f_linear_in_place(tmp_path):
    """A machine without a working compiler serves on F.linear and says why; the off switch too."""
    code = ("import torch; from common.model import cpu_gemv; x = torch.randn(1, 8); w = torch.randn(4, 8);"
            "assert torch.equal(cpu_gemv.linear(x, w), torch.nn.functional.linear(x, w));"
            "print(cpu_gemv.status())")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MNEMOSYNE_CACHE": str(tmp_path), "CXX": "/bin/false"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("unavailable: "), done.stdout
    assert "the decode linears run on F.linear" in done.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MNEMOSYNE_CPU_GEMV": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "off (MNEMOSYNE_CPU_GEMV=0)", done.stderr


def test_builds_are_named_by_what_they_depend_on(tmp_path):
    if cpu_gemv._compiler() is None:
        pytest.skip("no compiler")
    a = cpu_gemv.library_path(tmp_path)
    assert a == cpu_gemv.library_path(tmp_path)
    assert a != cpu_gemv.library_path(tmp_path, cpu_gemv.FLAGS + ("-DX",))
    assert a.parent == tmp_path and a.name.startswith("cpu_gemv-") and a.suffix == ".so"
