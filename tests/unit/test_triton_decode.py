"""CPU tests of the CUDA path: the Triton split-KV decode kernel under Triton's interpreter, the CUDA
backend's splitting / sharding / merging logic with CPU stand-in kernels, and the GPU scripts' CPU
behaviour (import without CUDA, clean exit).

Triton picks interpreter or compiler when it is imported (TRITON_INTERPRET=1 then), so the kernel runs in
one worker subprocess started with that variable: this test process never sees it, and neither do the
other tests. The worker is this file run as a script; it builds each case's inputs with the same
`make_case` the tests use and sends back (out, lse).
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
INF = float("inf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_case(spec: dict) -> tuple[torch.Tensor, ...]:
    """q [B, Hq, D], k_cache, v_cache [blocks, page, Hkv, D] (strided views of one buffer, like a layer of
    PagedKVCache), block_tables [B, max_blocks] int32 (disjoint random blocks, -1 past each length),
    seq_lens [B] int32."""
    g = torch.Generator().manual_seed(spec.get("seed", 0))
    lens = spec["lens"]
    B, hq, hkv, d, page = len(lens), spec["hq"], spec["hkv"], spec["d"], spec["page"]
    dtype = DTYPES[spec.get("dtype", "float32")]
    max_blocks = max([-(-n // page) for n in lens] + [1]) + 1
    num_blocks = B * max_blocks + 2
    kv = torch.randn(num_blocks, 2, page, hkv, d, generator=g).to(dtype)      # K and V interleaved
    k_cache, v_cache = kv[:, 0], kv[:, 1]
    q = torch.randn(B, hq + 1, d, generator=g).to(dtype)[:, 1:]                # a strided view
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    tables = perm[:B * max_blocks].view(B, max_blocks).clone()
    for b, n in enumerate(lens):
        tables[b, -(-n // page):] = -1                                         # never read
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


# --- the interpreter worker -------------------------------------------------------------------------

class Worker:
    def __init__(self) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def run(self, spec: dict, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
        path = tmp / "result.pt"
        self.proc.stdin.write(json.dumps({"spec": spec, "out": str(path)}) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"triton interpreter worker died (rc {self.proc.poll()})")
        reply = json.loads(reply)
        if "error" in reply:
            raise AssertionError(f"kernel failed in the interpreter: {reply['error']}")
        res = torch.load(path)
        return res["out"], res["lse"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _worker_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from common.attention.triton_decode import interpreting, paged_decode_attention
    assert interpreting()
    for line in sys.stdin:
        req = json.loads(line)
        spec = req["spec"]
        try:
            q, k, v, tables, lens = make_case(spec)
            out, lse = paged_decode_attention(q, k, v, tables, lens, spec.get("scale", 0.3),
                                              num_splits=spec.get("splits"), block_n=spec.get("block_n"))
            torch.save({"out": out, "lse": lse}, req["out"])
            print(json.dumps({"ok": True}), flush=True)
        except Exception as e:  # reported to the test, which fails with it
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)


@pytest.fixture(scope="module")
def worker():
    pytest.importorskip("triton")
    w = Worker()
    yield w
    w.close()


def _check(worker, tmp_path, spec, atol=2e-6, rtol=1e-5):
    from common.attention.reference import ReferenceBackend
    q, k, v, tables, lens = make_case(spec)
    out, lse = worker.run(spec, tmp_path)
    ro, rl = ReferenceBackend().decode_paged(q, k, v, tables, lens, scale=spec.get("scale", 0.3))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(lse == -INF, rl == -INF)
    fin = rl != -INF
    torch.testing.assert_close(lse[fin], rl[fin], atol=atol, rtol=rtol)
    if q.dtype == torch.bfloat16:   # both round the same float32 result to bf16: at most one ulp apart
        torch.testing.assert_close(out.float(), ro.float(), atol=2e-2, rtol=1e-2)
    else:
        torch.testing.assert_close(out, ro, atol=atol, rtol=rtol)
    empty = lens == 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.equal(lse[empty], torch.full_like(lse[empty], -INF))
    return out, lse


# --- kernel against the float32 reference -----------------------------------------------------------

@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_gqa_ratios_fp32(worker, tmp_path, ratio):
    # lens: empty, one token, page-exact (4, 8), odd, several tiles; 3 splits of 16-token tiles.
    _check(worker, tmp_path, dict(lens=[0, 1, 4, 8, 13, 37], hq=2 * ratio, hkv=2, d=16, page=4,
                                  splits=3, block_n=16, seed=ratio))


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_split_boundaries(worker, tmp_path, splits):
    # 16-token tiles over 8-token pages: lengths on and beside tile / page / split boundaries, and
    # more splits than tiles (empty splits must merge as (0, -inf)).
    _check(worker, tmp_path, dict(lens=[15, 16, 17, 31, 32, 33, 48, 49, 80], hq=4, hkv=1, d=16, page=8,
                                  splits=splits, block_n=16, seed=10 + splits))


@pytest.mark.parametrize("page,block_n", [(6, 16), (32, 16), (16, 32)])
def test_page_sizes_against_tiles(worker, tmp_path, page, block_n):
    # A page size that is no power of two, a tile inside a page, and two pages per tile.
    _check(worker, tmp_path, dict(lens=[1, page - 1, page, page + 1, 3 * page + 2], hq=8, hkv=2, d=16,
                                  page=page, splits=2, block_n=block_n, seed=page))


def test_head_dim_not_power_of_two_and_default_splits(worker, tmp_path):
    _check(worker, tmp_path, dict(lens=[3, 20, 0], hq=6, hkv=3, d=24, page=4, splits=None, block_n=None))


def test_all_sequences_empty(worker, tmp_path):
    _check(worker, tmp_path, dict(lens=[0, 0], hq=4, hkv=2, d=16, page=4, splits=2, block_n=16))


def test_empty_batch(worker, tmp_path):
    out, lse = worker.run(dict(lens=[], hq=4, hkv=2, d=16, page=4, splits=2, block_n=16), tmp_path)
    assert out.shape == (0, 4, 16) and lse.shape == (0, 4)


@pytest.mark.parametrize("ratio", [1, 4])
def test_bf16_inputs(worker, tmp_path, ratio):
    _check(worker, tmp_path, dict(lens=[0, 5, 33], hq=2 * ratio, hkv=2, d=32, page=8, splits=2, block_n=16,
                                  dtype="bfloat16", seed=20 + ratio))


def test_large_logits_do_not_overflow(worker, tmp_path):
    # scale 4 on unit normals: scores ~ +-60, exp would overflow without the running max.
    _check(worker, tmp_path, dict(lens=[40, 7], hq=4, hkv=2, d=16, page=4, splits=3, block_n=16, scale=4.0),
           atol=1e-5, rtol=1e-5)


# --- host-side checks (no kernel launch) ------------------------------------------------------------

def test_bad_arguments_raise_value_error():
    pytest.importorskip("triton")
    from common.attention.triton_decode import paged_decode_attention
    q, k, v, tables, lens = make_case(dict(lens=[3], hq=4, hkv=2, d=16, page=4))
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q, k, v, tables.long(), lens, 0.3)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        paged_decode_attention(q[:, :3], k, v, tables, lens, 0.3)
    from common.attention.triton_decode import interpreting
    if not interpreting():   # triton compiled (the usual case here): CPU tensors are refused, not miscomputed
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            paged_decode_attention(q, k, v, tables, lens, 0.3)


def _compile_for_hopper(dtype: str, precision: str, G: int, D: int, block_n: int):
    """Stage 1 compiled ahead of time for sm_90 (no GPU needed: the wheel bundles ptxas), with the
    16-divisibility the JIT infers for pointers and strides of a real cache."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from common.attention.triton_decode import _kernels
    stage1 = _kernels()[0]
    const = dict(G=G, HEAD_DIM=D, PAGE=16, NUM_SPLITS=16, BLOCK_G=max(16, triton.next_power_of_2(G)),
                 BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_n, PRECISION=precision)
    types = {"q_ptr": "*" + dtype, "k_ptr": "*" + dtype, "v_ptr": "*" + dtype, "bt_ptr": "*i32", "len_ptr": "*i32",
             "po_ptr": "*fp32", "plse_ptr": "*fp32", "scale": "fp32"}
    sig, attrs = {}, {}
    for i, name in enumerate(stage1.arg_names):
        sig[name] = "constexpr" if name in const else types.get(name, "i32")
        if sig[name].startswith("*") or name in ("stride_qb", "stride_qh", "stride_kn", "stride_ks", "stride_kh",
                                                 "stride_vn", "stride_vs", "stride_vh", "stride_ob", "stride_oh"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(stage1, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4, num_stages=2))


def test_stage1_compiles_for_hopper_with_async_copies(tmp_path, monkeypatch):
    # What the interpreter cannot show: the kernel lowers for an H100 (tl.dot shapes, tf32 for bf16,
    # shared memory), K/V tiles stream through 16-byte cp.async, and nothing spills.
    pytest.importorskip("triton")
    from common.attention.triton_decode import interpreting
    if interpreting():
        pytest.skip("TRITON_INTERPRET is set in this process")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")     # the default; set to silence its warning
    try:
        k = _compile_for_hopper("bf16", "tf32", 4, 128, 64)         # Llama-3-8B decode
    except Exception as e:   # a wheel without the NVIDIA backend tools: nothing to check here
        pytest.skip(f"cannot compile for sm_90 here: {type(e).__name__}: {e}")
    ptx = k.asm["ptx"]
    assert "cp.async.cg.shared.global" in ptx and "mma.sync" in ptx and ".tf32" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx                  # no register spills
    assert k.metadata.shared <= 100 * 1024
    k32 = _compile_for_hopper("fp32", "ieee", 8, 128, 64)                    # the exact float32 path
    assert ".tf32" not in k32.asm["ptx"]


def test_default_num_splits_depends_on_shapes_only():
    from common.attention.triton_decode import default_num_splits
    cpu = torch.device("cpu")
    assert default_num_splits(4, 8, 100, cpu) == 1
    assert default_num_splits(4, 8, 100_000, cpu) == 4


# --- the CUDA backend's logic with CPU stand-in kernels ---------------------------------------------

def _cpu_flash_no_gqa(q, k, v, causal, scale):
    """PyTorch's CPU flash kernel behind the DenseOp interface; refuses what a no-GQA op would."""
    assert q.shape[2] == k.shape[2], "an op without GQA support got fewer K/V heads"
    assert not causal or q.shape[1] == k.shape[1], "causal asked for a non-square block"
    o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), 0.0, causal,
        scale=scale)[:2]
    return o.transpose(1, 2), l.transpose(1, 2)


def _einsum_square_only(q, k, v, causal, scale):
    from common.attention.cuda import _einsum
    assert not causal or q.shape[1] == k.shape[1], "causal asked for a non-square block"
    return _einsum(q, k, v, causal, scale)


def _backends():
    from common.attention.cuda import CudaAttentionBackend, DenseOp
    ops = [DenseOp("einsum_gqa", _einsum_square_only, gqa=True), DenseOp("cpu_no_gqa", _cpu_flash_no_gqa, gqa=False)]
    return [CudaAttentionBackend(op, num_sms=8, kv_shards=s, shard_min_tokens=4) for op in ops for s in (1, 3, "auto")]


@pytest.mark.parametrize("backend", _backends(), ids=lambda b: f"{b.op.name}-shards{b.kv_shards}")
def test_cuda_backend_layouts_match_reference(backend):
    # Every placement of a query block against a key block (cached context, keys past the last query,
    # keys starting after the first queries), GQA 3, tokens != heads; KV shards fixed and automatic.
    from common.attention.reference import ReferenceBackend
    ref = ReferenceBackend()
    for n, L, q_start, k_start in itertools.product([1, 3, 8], [1, 5, 12, 41], [0, 4, 10, 37], [0, 3, 12]):
        g = torch.Generator().manual_seed(n * 1000 + L)
        q, k, v = (torch.randn(s, generator=g) for s in ((n, 6, 8), (L, 2, 8), (L, 2, 8)))
        o, l = backend.forward(q, k, v, q_start=q_start, k_start=k_start, scale=0.3)
        ro, rl = ref.forward(q, k, v, q_start=q_start, k_start=k_start, scale=0.3)
        assert o.shape == q.shape and o.dtype == q.dtype and l.dtype == torch.float32
        assert torch.equal(l == -INF, rl == -INF), (n, L, q_start, k_start)
        torch.testing.assert_close(o, ro, atol=2e-6, rtol=1e-5)
        fin = rl != -INF
        torch.testing.assert_close(l[fin], rl[fin], atol=2e-6, rtol=1e-5)


def test_cuda_backend_sanitises_inf_sentinel_and_chooses_ops():
    from common.attention.cuda import (ATEN_EFFICIENT, ATEN_FLASH, EINSUM, FLASH_ATTN, CudaAttentionBackend,
                                       DenseOp, choose_op)

    def sentinel(q, k, v, causal, scale):   # FlashAttention marks an empty row with lse +inf, out NaN
        return torch.full_like(q, float("nan")), torch.full(q.shape[:3], INF)
    be = CudaAttentionBackend(DenseOp("sentinel", sentinel, gqa=True), num_sms=1)
    o, l = be.forward(torch.randn(2, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8), q_start=5, k_start=0,
                      scale=1.0)
    assert torch.equal(o, torch.zeros(2, 4, 8)) and torch.equal(l, torch.full((2, 4), -INF))
    assert choose_op(torch.bfloat16, 128, flash_attn_ok=False) is ATEN_FLASH
    assert choose_op(torch.float16, 64, flash_attn_ok=True) is FLASH_ATTN
    assert choose_op(torch.float32, 128, flash_attn_ok=True) is ATEN_EFFICIENT
    assert choose_op(torch.bfloat16, 512, flash_attn_ok=False) is ATEN_EFFICIENT
    assert choose_op(torch.float64, 128, flash_attn_ok=False) is EINSUM
    with pytest.raises(ValueError):
        CudaAttentionBackend(kv_shards=0)


def test_cuda_backend_auto_shards_only_when_underfilled():
    from common.attention.cuda import EINSUM, CudaAttentionBackend
    be = CudaAttentionBackend(EINSUM, num_sms=132, shard_min_tokens=1024)
    assert be._shards(torch.zeros(32, 32, 8), 128 * 1024, EINSUM) == 9      # 32 tiles -> ~2 waves
    assert be._shards(torch.zeros(32, 32, 8), 3000, EINSUM) == 2            # shards >= 1024 keys
    assert be._shards(torch.zeros(4096, 32, 8), 128 * 1024, EINSUM) == 1    # 1024 tiles fill the GPU


def test_cuda_backend_registered_and_decode_falls_back_on_cpu():
    from common.attention.reference import ReferenceBackend
    from common.attention.registry import get_backend
    be = get_backend("cuda")
    assert be.name == "cuda"
    q, k, v, tables, lens = make_case(dict(lens=[0, 5, 9], hq=4, hkv=2, d=16, page=4))
    o, l = be.decode_paged(q, k, v, tables, lens, scale=0.3)                # CPU tensors: gather + forward
    ro, rl = ReferenceBackend().decode_paged(q, k, v, tables, lens, scale=0.3)
    torch.testing.assert_close(o, ro, atol=2e-6, rtol=1e-5)
    assert torch.equal(l == -INF, rl == -INF)


# --- the decode graph runner's staging, run eagerly on CPU (capture itself needs a GPU) ------------

def test_graph_runner_padded_eager_step_matches_forward_context_on_cpu():
    from common.attention.reference import ReferenceBackend
    from common.engine.cuda_graphs import DecodeGraphRunner
    from tests.gpu.test_cuda_graphs import SCRATCH, decode_setup, forward_context_step
    lens = [3, 16, 17, 40]
    model, cache, tables = decode_setup(torch.float32, "cpu", lens, block_size=4, max_blocks=12)
    backend = ReferenceBackend()
    runner = DecodeGraphRunner(model, cache, backend, max_blocks_per_seq=12, scratch_block=SCRATCH,
                               batch_sizes=(2, 8), device="cpu")
    ids = [5, 6, 7]
    saved = cache.data.clone()
    want = forward_context_step(model, cache, backend, ids, lens[:3], tables[:3])
    after_want = cache.data.clone()
    cache.data.copy_(saved)
    b = runner.load(ids, lens[:3], tables[:3])
    assert b == 8 and runner.dev["seq_lens"].tolist() == [4, 17, 18, 0, 0, 0, 0, 0]
    got = runner.eager(3, b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    live = torch.ones(cache.num_blocks, dtype=torch.bool)
    live[SCRATCH] = False
    # Padded rows wrote only the scratch block. (Not bitwise: a batch of 8 rows goes through the
    # linears instead of 3, which moves the last bits of the new K/V.)
    torch.testing.assert_close(cache.data[:, :, live], after_want[:, :, live], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        runner.load([1], [12 * 4], tables[:1])                              # a 13th block


def test_graph_runner_buffers_made_in_inference_mode_can_be_restaged():
    """capture() runs in inference mode and allocates the staging buffers on first use; `load` then
    rewrites them from ordinary code. Found on the first H200 run: inference tensors refuse that."""
    from common.attention.reference import ReferenceBackend
    from common.engine.cuda_graphs import DecodeGraphRunner
    from tests.gpu.test_cuda_graphs import SCRATCH, decode_setup
    model, cache, tables = decode_setup(torch.float32, "cpu", [3, 5], block_size=4, max_blocks=4)
    runner = DecodeGraphRunner(model, cache, ReferenceBackend(), max_blocks_per_seq=4, scratch_block=SCRATCH,
                               batch_sizes=(1, 4), device="cpu")
    with torch.inference_mode():
        runner._alloc()                                   # what capture() does before it captures
    assert not any(t.is_inference() for t in list(runner.dev.values()) + list(runner.host.values()))
    assert runner.load([5, 6], [3, 5], tables) == 4
    assert runner.dev["seq_lens"].tolist() == [4, 6, 0, 0]


# --- the GPU scripts on a machine without CUDA ------------------------------------------------------

def test_gpu_modules_import_and_probe_exits_cleanly_without_cuda(tmp_path):
    # One fresh process without CUDA: the modules import without touching CUDA, and the probe script
    # exits with status 3, one clear line and no traceback, leaving a JSON that says so.
    out = tmp_path / "probe.json"
    code = ("import sys, runpy, torch, common.attention.cuda, common.engine.cuda_graphs, "
            "common.attention.triton_decode; assert not torch.cuda.is_initialized(); "
            f"sys.argv = ['bench/gpu_probe.py', '--out', {str(out)!r}]; "
            "runpy.run_path('bench/gpu_probe.py', run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "no CUDA device" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(out.read_text())["status"] == "no_cuda"


def test_gpu_probe_without_cuda_never_replaces_the_committed_gpu_results():
    """`make bench` on a CPU machine runs the probe with its default output: it must leave the H200
    results in bench/results/gpu_probe.json as they are."""
    if torch.cuda.is_available():
        pytest.skip("with CUDA the default run is the real probe")
    from bench import gpu_probe
    results = ROOT / "bench" / "results" / "gpu_probe.json"
    before = results.read_bytes() if results.exists() else None
    assert gpu_probe.main([]) == gpu_probe.EXIT_NO_CUDA
    assert (results.read_bytes() if results.exists() else None) == before


def test_gpu_probe_arguments(tmp_path, monkeypatch, capsys):
    from bench import gpu_probe
    with pytest.raises(SystemExit) as e:
        gpu_probe.main(["--help"])
    assert e.value.code == 0 and "--sections" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        gpu_probe.main(["--sections", "decode,nonsense"])
    assert e.value.code == 2 and "nonsense" in capsys.readouterr().err
    assert gpu_probe.parse_args(["--sections", "summary,decode"]).sections == ["decode", "summary"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)        # also on a GPU machine
    assert gpu_probe.main(["--out", str(tmp_path / "p.json")]) == gpu_probe.EXIT_NO_CUDA


def test_gpu_probe_logic_runs_on_cpu_tiny(tmp_path):
    # The CPU-capable parts on tiny shapes (backend correctness, prefill timing, the Llama step against
    # transformers): a GPU session must not lose its minutes to a Python error in the shared logic.
    from bench import gpu_probe
    out = tmp_path / "probe.json"
    rc = gpu_probe.main(["--device", "cpu", "--tiny", "--out", str(out),
                         "--sections", "correctness,prefill,llama8b,summary"])
    data = json.loads(out.read_text())
    s = data["sections"]
    assert rc == 0 and data["status"] == "done", {k: v.get("error") for k, v in s.items()}
    assert s["correctness"]["all_ok"] and s["summary"]["targets"]["correctness_all_ok"]
    row = s["llama8b"]["rows"][0]
    assert "hf_error" not in row, row
    for kind in ("static", "dynamic"):   # same weights and K/V through transformers: same logits
        assert row[f"hf_{kind}_same_argmax"] and row[f"hf_{kind}_repeatable"]
        assert row[f"hf_{kind}_max_logit_diff"] < 1e-4


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(ROOT))
    _worker_main()
