"""The CPU engine's hot paths in C++ (`cpu_kernels.cpp`): a decode step's work at memory speed, one call
where eager torch makes several, and a bfloat16 prefill chunk's attention at twice the flash kernel's rate.

A decode step of a small model on this CPU was ~3x its floor (the bytes it must read at the rate a
plain read reaches): torch's kernels stream a linear's weight at 10-17 GB/s for one row of
activations where a plain read reaches 35-55, its flash kernel reads a paged cache through a gather
or strided views, and each layer's elementwise steps are ~25 small torch ops. The kernels, compiled
for the machine's processor (bench/results/cpu_kernels.md measures each against what it replaces):
  linear            `linear(x, w, b)`: for up to max_rows rows of float32 or bfloat16 against a weight
                    stored [out, in] row-major, a matrix-vector product that streams each thread's block
                    of rows front to back (AVX-512, AVX2, or portable loops); the LM head's bfloat16
                    logits unrounded; more rows (prefill chunks) through the AVX2 builds' GEMM (`gemm`:
                    weight panels packed per call, float32 sums; bfloat16 operands widened exactly where
                    the CPU has no bfloat16 instructions, `bf16_widened`), through F.linear elsewhere
                    (other builds, dtypes and layouts, autograd, other devices);
  decode attention  `decode_attention`: each sequence's one query against its keys where they lie in
                    the paged cache (AVX-512 and AVX2 builds; elsewhere the flash planner of
                    common/attention/cpu.py);
  chunk attention   `chunk_attention`: a prefill chunk against every key it sees, by position: bfloat16
                    on vdpbf16ps (AVX512-BF16 builds), float32 and bfloat16 on float32 multiply-adds
                    (AVX2 builds without AVX-512); elsewhere (float32 on AVX-512) the flash kernel;
  elementwise       `rms_norm`, `rope`, `silu_mul`: one call each, with the eager code's roundings: for
                    any number of rows on the 16-lane builds (AVX-512, AVX2), split over the threads
                    (`elementwise`); elsewhere scalar loops for up to SMALL_ROWS rows (`small`).
Each returns what its torch counterpart returns, to rounding (the tests hold every build to a float64
reference and to the eager expressions).

The library is compiled here, on first use, by the machine's C++ compiler for the machine's own
processor (`-march=native`), into $MNEMOSYNE_CACHE/kernels (default ~/.cache/mnemosyne/kernels) under a
name that hashes the source, the compiler, the flags and the processor's feature flags: another CPU or
an edited source builds its own file. The build takes ~1 s; it writes a temporary file and renames it,
so processes that build at once never load a partial library. `make setup` installs the compiler and
builds it once (`python -m common.model.cpu_kernels`). Where no compiler works the engine runs on
torch's ops, as before, and says so once in its log; MNEMOSYNE_CPU_KERNELS=0 turns the kernels off.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off")
_CODES = {torch.float32: 0, torch.bfloat16: 1}    # the library's dtype argument
BUILD_TIMEOUT_S = 120.0

_lock = threading.Lock()
_state: dict[str, object] = {}          # "lib": the loaded library or None (not available), "why"


def enabled() -> bool:
    return os.environ.get("MNEMOSYNE_CPU_KERNELS", "1") != "0"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ("model name", "flags"), "" where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def library_path(cache: Path | None = None, flags: tuple[str, ...] = FLAGS) -> Path | None:
    """Where this machine's build of the kernel lives (None: no compiler)."""
    cxx = _compiler()
    if cxx is None:
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    raw = "\n".join([SOURCE.read_text(), cxx, version, " ".join(flags), cpuinfo("flags")])
    digest = hashlib.sha256(raw.encode()).hexdigest()[:16]
    if cache is None:
        from common.model.gguf_loader import default_cache_dir
        cache = default_cache_dir() / "kernels"
    return cache / f"cpu_kernels-{digest}.so"


def build(path: Path, flags: tuple[str, ...] = FLAGS, source: Path = SOURCE) -> None:
    """Compiles the kernel (`source`: another revision's, bench/kernel_ab.py) into `path` (a temporary file
    renamed into place); raises on failure."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *flags, str(source), "-o", tmp], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# mn_decode_layers' per-layer callback: the layer's index -> 0, or nonzero to stop the step
COMBINE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64)


def load(path: Path) -> ctypes.CDLL:
    """The library at `path` with its functions' signatures set."""
    lib = ctypes.CDLL(str(path))
    args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    for fn in (lib.mn_gemv_f32, lib.mn_gemv_bf16, lib.mn_gemv_bf16_f32):
        fn.argtypes = args
        fn.restype = None
    lib.mn_gemv_isa.restype = ctypes.c_char_p
    lib.mn_gemm_isa.restype = ctypes.c_int
    lib.mn_gemm.restype = ctypes.c_int
    lib.mn_gemm.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.mn_gemv_max_rows.restype = ctypes.c_int64
    lib.mn_gemv_max_rows.argtypes = [ctypes.c_int]
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.mn_rms_norm.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, i64, i64, i64, ctypes.c_float]
    lib.mn_rope.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64]
    lib.mn_silu_mul.argtypes = [ctypes.c_int, ptr, i64, ptr, i64, i64]
    for fn in (lib.mn_rms_norm, lib.mn_rope, lib.mn_silu_mul):
        fn.restype = None
    lib.mn_elementwise_isa.restype = ctypes.c_int
    lib.mn_chunk_attention_isa.restype = ctypes.c_int
    lib.mn_chunk_attention_f32_isa.restype = ctypes.c_int
    lib.mn_chunk_attention_f32.restype = ctypes.c_int
    lib.mn_chunk_attention_f32.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, i64, i64, i64, i64, i64,
                                           i64, i64, ctypes.c_float, ptr, ptr]
    lib.mn_chunk_phases.restype = ctypes.c_int
    lib.mn_chunk_phases.argtypes = [ptr]
    lib.mn_chunk_attention_bf16.restype = ctypes.c_int
    lib.mn_chunk_attention_bf16.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, i64, i64, i64, i64, i64, i64,
                                            ctypes.c_float, ptr, ptr]
    pp = ctypes.POINTER(ctypes.c_void_p)
    lib.mn_decode_layers.restype = ctypes.c_int
    lib.mn_decode_layers.argtypes = [ctypes.c_int, i64, ptr, i64, i64, pp, pp, pp, pp, pp, pp, i64, ctypes.c_float,
                                     ptr, ptr, i64, i64, i64, pp, pp, ptr, ptr, i64, ptr, i64, ctypes.c_float, i64,
                                     ptr, ptr, COMBINE]
    lib.mn_decode_attention_isa.restype = ctypes.c_int
    lib.mn_decode_attention.restype = ctypes.c_int
    lib.mn_decode_attention.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def library() -> ctypes.CDLL | None:
    """This machine's kernels, built on first use; None when they cannot be (no compiler, a failed build)
    or are turned off. Logged once either way."""
    if "lib" in _state:
        return _state["lib"]            # type: ignore[return-value]
    with _lock:
        if "lib" in _state:
            return _state["lib"]        # type: ignore[return-value]
        lib = None
        if not enabled():
            _state["why"] = "off (MNEMOSYNE_CPU_KERNELS=0)"
        else:
            try:
                path = library_path()
                if path is None:
                    raise RuntimeError("no C++ compiler (g++) found")
                if not path.exists():
                    build(path)
                lib = load(path)
                _state["digest"] = path.stem.rsplit("-", 1)[-1][:8]
                _state["max_rows"] = {dt: lib.mn_gemv_max_rows(code) for dt, code in _CODES.items()}
                _state["gemm"] = bool(lib.mn_gemm_isa())
                _state["why"] = f"on ({lib.mn_gemv_isa().decode()})"
                log.info("CPU decode kernels %s: %s", _state["why"], path)
            except Exception as e:      # noqa: BLE001 - any failure leaves F.linear in place
                _state["why"] = f"unavailable: {e}"
                log.warning("CPU decode kernels %s; the decode step runs on torch's ops", _state["why"])
        _state["lib"] = lib
        return lib


@contextlib.contextmanager
def _swapped(**state: object) -> Iterator[None]:
    """Within it the loaded library's state is `state` over this machine's; restored after."""
    library()
    saved = dict(_state)
    _state.update(state)
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)


def disabled() -> contextlib.AbstractContextManager[None]:
    """Within it `library()` is None, as on a machine without the kernels: the benchmarks' other side
    (an engine built inside it also gets the layout F.linear prefers)."""
    return _swapped(lib=None, why="off (disabled())")


def using(lib: ctypes.CDLL) -> contextlib.AbstractContextManager[None]:
    """Within it `library()` is `lib` (a `load`ed build of another revision: bench/kernel_ab.py's sides),
    with its row limits."""
    return _swapped(lib=lib, why=f"on ({lib.mn_gemv_isa().decode()}, using())", gemm=bool(lib.mn_gemm_isa()),
                    max_rows={dt: lib.mn_gemv_max_rows(code) for dt, code in _CODES.items()})


def fingerprint() -> str | None:
    """A short hash of the loaded library (its source, compiler, flags and CPU), None without one:
    what a timing measured on these kernels depends on (common/engine/profile.py hardware_id)."""
    return None if library() is None else str(_state["digest"])


def status() -> str:
    """'on (float32=avx512 bfloat16=avx512_bf16)', 'off (...)' or 'unavailable: <why>'."""
    library()
    return str(_state["why"])


_FUNCS = {torch.float32: "mn_gemv_f32", torch.bfloat16: "mn_gemv_bf16"}


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear` takes the matrix-vector kernel for these operands: up to the loaded build's
    `max_rows` rows (mn_gemv_max_rows: 16 on AVX2 builds, 4 or 1 elsewhere; more go to the GEMM kernel
    or F.linear)."""
    return (x.device.type == "cpu" and x.dim() == 2 and x.dtype in _FUNCS and 0 < x.shape[0] <= max_rows(x.dtype)
            and w.dtype == x.dtype and w.device.type == "cpu" and w.dim() == 2 and w.stride(1) == 1
            and x.stride(1) == 1 and x.shape[1] == w.shape[1]
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def gemv(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, float_out: bool = False) -> torch.Tensor:
    """x [M, K] @ w[N, K].T with the kernel (the caller checked `applies`); `float_out`: bfloat16
    operands' float32 sums returned unrounded."""
    m, k = x.shape
    n = w.shape[0]
    wide = float_out and x.dtype == torch.bfloat16
    y = torch.empty(m, n, dtype=torch.float32 if wide else x.dtype)
    fn = lib.mn_gemv_bf16_f32 if wide else getattr(lib, _FUNCS[x.dtype])
    fn(x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), y.data_ptr(), n, m, n, k)
    return y


def gemm_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear` takes the GEMM kernel for these operands (more rows than the matrix-vector
    kernel takes; float32, or bfloat16 where it is widened)."""
    return (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] > 0 and w.dtype == x.dtype
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and bf16_widened()))
            and w.device.type == "cpu" and w.dim() == 2 and w.stride(1) == 1 and x.shape[1] == w.shape[1]
            and w.shape[0] > 0 and x.shape[1] > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and library() is not None and bool(_state.get("gemm")))


def gemm(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K].T in float32 (the caller checked `gemm_applies`; bfloat16 x widened here,
    bfloat16 w as the kernel packs it)."""
    xf = x.float() if x.dtype != torch.float32 else x
    if xf.stride(1) != 1:
        xf = xf.contiguous()
    m, k = xf.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if lib.mn_gemm(_CODES[w.dtype], xf.data_ptr(), xf.stride(0), w.data_ptr(), w.stride(0), y.data_ptr(), n, m, n, k):
        raise RuntimeError("mn_gemm: no GEMM kernel in this build")
    return y


def max_rows(dtype: torch.dtype) -> int:
    """The most rows of x for which `linear` takes the kernel in `dtype` (0 without the kernels)."""
    if library() is None:
        return 0
    return _state["max_rows"].get(dtype, 0)          # type: ignore[union-attr]


# ---- bfloat16 products on a CPU without bfloat16 instructions ------------------------------------
BF16_NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")   # /proc/cpuinfo flags of a CPU that multiplies bfloat16 itself
_widen: dict[str, bool] = {}                      # "on": whether `linear` widens bfloat16 products (cached)


def bf16_widened() -> bool:
    """Whether `linear` computes a bfloat16 product of more rows than the kernel takes in float32:
    operands widened (exactly), one float32 GEMM, the result rounded to bfloat16 once. Where the CPU
    has no bfloat16 instructions (no AVX512-BF16, no AMX), torch's bfloat16 GEMM is a slow generic
    loop: 16 GFLOP/s against float32's 162 on an AVX2 EPYC, so a bfloat16 prefill took 5x a float32
    one (bench/results/cpu_vs_transformers_avx2.md: transformers' bfloat16 prefill beside ours). The numerics are a bfloat16 GEMM's: every product of two
    bfloat16 values is exact in float32, the sum is float32, the output rounded once (to nearest
    even, as torch rounds); only the order of the sum may differ from torch's, as between its own
    kernels. x86 only (elsewhere torch's kernels are kept); MNEMOSYNE_CPU_KERNELS=0 keeps them too."""
    if "on" not in _widen:
        import platform
        flags = cpuinfo("flags").split()
        _widen["on"] = (enabled() and platform.machine() in ("x86_64", "AMD64") and bool(flags)
                        and not any(f in flags for f in BF16_NATIVE_FLAGS))
    return _widen["on"]


@contextlib.contextmanager
def bf16_widening(on: bool) -> Iterator[None]:
    """Within it `bf16_widened()` is `on` (the benchmark's two sides, the tests of both paths)."""
    saved = dict(_widen)
    _widen["on"] = on
    try:
        yield
    finally:
        _widen.clear()
        _widen.update(saved)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, float_out: bool = False) -> torch.Tensor:
    """F.linear(x, w, b), through the kernel where it applies. `float_out` (the LM head): where the
    kernel runs, bfloat16 operands give their float32 sums unrounded (logits rounded to bfloat16's 8
    bits tie often: two tokens 0.08 apart in float32 came out equal, and greedy took the lower id).
    More rows: the GEMM kernel where the build has it (float32; bfloat16 where `bf16_widened()`, its
    float32 sums rounded once, the same float_out rule), else bfloat16 rows widened to one float32
    F.linear where `bf16_widened()`, else F.linear."""
    if applies(x, w):
        y = gemv(_state["lib"], x, w, float_out)             # type: ignore[arg-type]
        return y if b is None else y.add_(b)
    if gemm_applies(x, w):
        y = gemm(_state["lib"], x, w)                    # type: ignore[arg-type]
        if b is not None:
            y.add_(b.float() if b.dtype != torch.float32 else b)
        return y if float_out or x.dtype == torch.float32 else y.to(torch.bfloat16)
    if (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and w.device.type == "cpu" and bf16_widened()):
        y = F.linear(x.float(), w.float(), None if b is None else b.float())
        return y if float_out else y.to(torch.bfloat16)
    return F.linear(x, w, b)


ATTN_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128, 256)      # the kernel's instantiations
MIN_SPAN_KEYS = 256          # keys per unit of the attention kernel's work: at least this many,
MAX_SPAN_KEYS = 8192         # at most this many, else about four units per thread


def attention_applies(lib: ctypes.CDLL | None, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `decode_attention` takes these operands (else the caller's flash path)."""
    return (lib is not None and q.device.type == "cpu" and q.dtype in _CODES and k_cache.dtype == q.dtype
            and q.shape[-1] in ATTN_HEAD_DIMS and q.shape[1] * q.shape[2] <= 4096
            and q.shape[1] % k_cache.shape[2] == 0 and bool(lib.mn_decode_attention_isa()))


def span_keys(seq_lens: torch.Tensor) -> int:
    """Keys per unit of the attention kernel's work for these sequences: about four units per thread."""
    total = int(seq_lens.sum()) if seq_lens.numel() else 0
    span = -(-total // (4 * torch.get_num_threads())) if total else MIN_SPAN_KEYS
    return min(max(span, MIN_SPAN_KEYS), MAX_SPAN_KEYS)


def decode_attention(lib: ctypes.CDLL, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention kernel of `cpu_kernels.cpp` (the caller checked `attention_applies`): q [B, Hq, D],
    caches [num_blocks, block_size, Hkv, D] contiguous, block_tables [B, >= blocks], seq_lens [B] ->
    out [B, Hq, D] in q's dtype, lse [B, Hq] float32."""
    b, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    q = q.contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, dtype=torch.float32)
    rc = lib.mn_decode_attention(_CODES[q.dtype], q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                 tables.data_ptr(), tables.stride(0) if b else 0, lens.data_ptr(), b, hq, hkv, d,
                                 bs, scale, span_keys(lens), out.data_ptr(), lse.data_ptr())
    if rc != 0:
        raise ValueError(f"decode attention kernel: unsupported shape q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    return out, lse


CHUNK_HEAD_DIMS = (32, 64, 128)       # the bfloat16 chunk attention kernel's instantiations


def chunk_attention(lib: ctypes.CDLL | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                    k_start: int, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A prefill chunk's attention (the AttentionBackend.forward contract): q [n, Hq, D] at positions
    q_start.., k, v [L, Hkv, D] at k_start..; query i sees key j iff k_start + j <= q_start + i.
    Returns out [n, Hq, D] in q's dtype and lse [n, Hq] float32, or None where no kernel applies: the
    caller's flash path. The kernels: bfloat16 on vdpbf16ps (AVX512-BF16 builds, head dims
    CHUNK_HEAD_DIMS); float32 and bfloat16 on float32 multiply-adds (AVX2 builds without AVX-512, head
    dims a multiple of 16 up to 256, any number of keys: in float32 1.7x the flash path over 1K keys,
    1.18-1.33x over 4K-64K, bench/results/cpu_kernels_chunk_s27.md; a cap at 4,096 keys, from when
    the kernel was only even with the flash path there, went). Elsewhere (float32 on AVX-512: a
    multiply-add variant ran at the flash kernel's speed there) the flash kernel."""
    n, hq, d = q.shape
    L, hkv = k.shape[0], k.shape[1]
    if (lib is None or q.device.type != "cpu" or q.dtype not in _CODES or k.dtype != q.dtype
            or v.dtype != q.dtype or n == 0 or L == 0 or hq % hkv
            or q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or k.stride(1) != d or v.stride(1) != d
            or (torch.is_grad_enabled() and q.requires_grad)):
        return None
    native = q.dtype == torch.bfloat16 and d in CHUNK_HEAD_DIMS and bool(lib.mn_chunk_attention_isa())
    if not native and not (d % 16 == 0 and d <= 256 and lib.mn_chunk_attention_f32_isa()):
        return None
    out = torch.empty(n, hq, d, dtype=q.dtype)
    lse = torch.empty(n, hq, dtype=torch.float32)
    args = (q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), n, L, hq,
            hkv, d, q_start - k_start, scale, out.data_ptr(), lse.data_ptr())
    rc = lib.mn_chunk_attention_bf16(*args) if native else lib.mn_chunk_attention_f32(_CODES[q.dtype], *args)
    return None if rc != 0 else (out, lse)


# ---- the elementwise steps of a layer (RMSNorm, RoPE, SiLU-and-multiply) --------------------------
SMALL_ROWS = 16              # rows up to which one single-threaded call beats torch's several ops


def small(x: torch.Tensor) -> ctypes.CDLL | None:
    """The library when x (rows first) is a decode-sized float32/bfloat16 CPU activation, else None."""
    if (x.device.type == "cpu" and x.dtype in _CODES and 0 < x.shape[0] <= SMALL_ROWS
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return library()
    return None


def elementwise(x: torch.Tensor) -> ctypes.CDLL | None:
    """The library for the elementwise steps of x (rows first, a float32/bfloat16 CPU activation): any
    number of rows where the build runs them on 16 lanes over the threads (mn_elementwise_isa; a 1K
    chunk's steps over 30 layers: bench/results/elementwise_prefill.md), else up to SMALL_ROWS."""
    lib = small(x)
    if lib is not None or x.device.type != "cpu" or x.dtype not in _CODES or x.shape[0] == 0 \
            or (torch.is_grad_enabled() and x.requires_grad):
        return lib
    lib = library()
    return lib if lib is not None and lib.mn_elementwise_isa() else None


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Hugging Face's LlamaRMSNorm of x [rows, n] (the caller checked `elementwise`); None where it does not
    apply (the caller's eager code)."""
    if x.dim() != 2 or x.stride(1) != 1 or w.dtype != x.dtype or not w.is_contiguous() or w.shape != x.shape[1:]:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    lib.mn_rms_norm(_CODES[x.dtype], x.data_ptr(), x.stride(0), w.data_ptr(), out.data_ptr(), out.stride(0),
                    x.shape[0], x.shape[1], eps)
    return out


def rope(lib: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """apply_rope (common/model/rope.py) of x [rows, heads, D] with cos/sin [rows, 1, D]; None where it
    does not apply."""
    if (x.dim() != 3 or x.stride(2) != 1 or cos.dtype != x.dtype or sin.dtype != x.dtype
            or cos.shape != (x.shape[0], 1, x.shape[2]) or sin.shape != cos.shape
            or not (cos.is_contiguous() and sin.is_contiguous())):
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    lib.mn_rope(_CODES[x.dtype], x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(),
                out.data_ptr(), x.shape[0], x.shape[1], x.shape[2])
    return out


def silu_mul(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor | None:
    """F.silu(gate) * up for gate_up [rows, 2 I] = [gate | up]; None where it does not apply."""
    if gate_up.dim() != 2 or gate_up.stride(1) != 1 or gate_up.shape[1] % 2:
        return None
    n = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], n, dtype=gate_up.dtype)
    lib.mn_silu_mul(_CODES[gate_up.dtype], gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(),
                    gate_up.shape[0], n)
    return out


def main() -> int:
    """`python -m common.model.cpu_kernels`: builds this machine's kernel now (make setup), prints its status."""
    logging.basicConfig(level=logging.INFO)
    print(f"CPU decode kernels: {status()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
