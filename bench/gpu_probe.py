"""The one GPU probe of issue 7: features, bandwidth, exactness and speed of the CUDA path.

    python bench/gpu_probe.py                          # everything; about 30 s on one H200
    python bench/gpu_probe.py --sections decode,summary --out /tmp/p.json

Sections (run in this order; the JSON file is rewritten after each, so a partial run still leaves data):
  features     versions, device, SMs, memory; which attention kernels work (flash GQA, efficient fp32,
               flash-attn package), the causal alignment of the aten flash op on a non-square block
  bandwidth    measured device copy bandwidth (read + write bytes / s), read-only bandwidth, bf16 GEMM rate
  correctness  every CUDA path against a float64 reference: the backend per dtype and layout (chunk over
               cache, earlier shard, fully-masked rows, KV shards), each dense op alone, the Triton decode
               kernel per dtype / GQA ratio / split count incl. empty sequences
  prefill      chunk attention TFLOP/s, chunks 512-8192 over 16K-128K contexts (Llama-3-8B heads); a
               128-token chunk with and without KV shards
  decode       Triton decode kernel: bytes of K/V read per second and % of the copy bandwidth, for
               B in {1, 8, 32} x L in {4K, 32K, 128K} (timed as graph replays of 10 launches)
  graphs       decode-step CUDA graphs on a 4-layer Llama-3-8B-wide model: replay bitwise equal to the
               eager padded step, and step time eager vs replay
  llama8b      synthetic Llama-3-8B (random bf16 weights) decode step, B = 1 at 4K and 128K context:
               ours (eager and graph) against the (weights + KV) / copy-bandwidth floor, then the same
               weights and KV through Hugging Face transformers (StaticCache and DynamicCache), logits
               compared
  summary      the issue's targets, met or not

Exit status: 0 all sections ran, 1 some section failed (its error is in the JSON), 2 bad arguments,
3 no CUDA device (nothing measured; the JSON says so). `--device cpu --tiny` runs the CPU-capable parts
on tiny shapes: a smoke test of this script's logic, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SECTIONS = ("features", "bandwidth", "correctness", "prefill", "decode", "graphs", "llama8b", "summary")
EXIT_FAILED, EXIT_NO_CUDA = 1, 3
GiB = 1 << 30
log = logging.getLogger("gpu_probe")


# --- arguments and the report -----------------------------------------------------------------------

def _sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {bad or [text]}; choose from {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in names]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GPU probe of Mnemosyne's CUDA path (issue 7).")
    p.add_argument("--out", default=None,
                   help="JSON results file, rewritten after every section (default: bench/results/gpu_probe.json "
                        "for a real GPU run; a CPU or --tiny smoke run writes to the temp directory, so that it "
                        "never replaces the committed GPU results)")
    p.add_argument("--sections", type=_sections, default=list(SECTIONS),
                   help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds; sections that would start after it are skipped (default: %(default)s)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run of the logic, not a measurement")
    return p.parse_args(argv)


class Report:
    def __init__(self, path: str, args: argparse.Namespace) -> None:
        self.path = Path(path)
        self.data = {"script": "bench/gpu_probe.py", "status": "running", "started": time.strftime("%F %T"),
                     "args": {"sections": args.sections, "time_budget": args.time_budget, "device": args.device,
                              "tiny": args.tiny},
                     "sections": {}}

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


class Probe:
    """State shared by the sections: device, shapes, measured bandwidth, the report."""

    def __init__(self, args: argparse.Namespace, report: Report) -> None:
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.tiny = args.tiny
        self.report = report
        self.deadline = time.monotonic() + args.time_budget
        self.copy_bw: float | None = None       # bytes/s, read + write

    # ---- timing ------------------------------------------------------------------------------------
    def time(self, fn, iters: int = 10, warmup: int = 2) -> float:
        """Median seconds per call."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    def time_graph(self, fn, reps: int = 10, iters: int = 5) -> float:
        """Median seconds per call of fn, captured `reps` times back to back in one CUDA graph (no launch
        gaps); eager timing off CUDA."""
        if not self.cuda:
            return self.time(fn, iters)
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        t = self.time(g.replay, iters, warmup=1) / reps
        del g
        return t

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        import gc
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def bandwidth(self) -> float:
        if self.copy_bw is None:
            bandwidth(self, {})
        return self.copy_bw


def randn(shape, dtype, dev, seed=0) -> torch.Tensor:
    g = torch.Generator(device=dev).manual_seed(seed)
    return torch.empty(shape, device=dev, dtype=dtype).normal_(generator=g)   # no float32 temporary


# --- sections ---------------------------------------------------------------------------------------

def features(p: Probe, out: dict) -> None:
    out["torch"] = torch.__version__
    out["python"] = platform.python_version()
    out["cuda_runtime"] = torch.version.cuda
    if p.cuda:
        prop = torch.cuda.get_device_properties(p.dev)
        out.update(device=prop.name, capability=f"{prop.major}.{prop.minor}", sms=prop.multi_processor_count,
                   memory_gib=round(prop.total_memory / GiB, 1))
        out["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    try:
        import triton
        out["triton"] = triton.__version__
        out["triton_interpret"] = bool(triton.knobs.runtime.interpret)
    except ImportError as e:
        out["triton"] = f"missing: {e}"
    from common.attention import cuda as ca
    out["flash_attn_pkg"] = ca._flash_attn_importable()
    if not p.cuda:
        return
    q, k, v = (randn((1, 5, h, 64), torch.bfloat16, p.dev, s) for s, h in ((0, 8), (1, 2), (2, 2)))
    ref_o, ref_l = ca.EINSUM.fn(q.float(), k.float(), v.float(), False, 0.125)
    for name, op, args in (("aten_flash_gqa", ca.ATEN_FLASH, (q, k, v)),
                           ("aten_efficient_fp32", ca.ATEN_EFFICIENT,
                            (q.float(), k.float().repeat_interleave(4, 2), v.float().repeat_interleave(4, 2)))):
        try:
            o, l = op.fn(*args, False, 0.125)
            out[name] = bool(torch.allclose(l.float(), ref_l, atol=2e-2)
                             and torch.allclose(o.float(), ref_o, atol=3e-2))
        except Exception as e:  # the probe records what does not work
            out[name] = f"error: {type(e).__name__}: {str(e)[:200]}"
    # Causal alignment of the aten flash op for 3 queries over 5 keys (the backend never relies on it).
    try:
        qn, kn, vn = (randn((1, n, 2, 64), torch.bfloat16, p.dev, s) for s, n in ((3, 3), (4, 5), (5, 5)))
        o, _ = ca.ATEN_FLASH.fn(qn, kn, vn, True, 0.125)
        br, _ = _masked(qn, kn, vn, lambda i, j: j <= i + 2)
        tl_, _ = _masked(qn, kn, vn, lambda i, j: j <= i)
        err_br, err_tl = (o.float() - br).abs().max().item(), (o.float() - tl_).abs().max().item()
        out["aten_flash_causal_alignment"] = "bottom-right" if err_br < err_tl else "top-left"
    except Exception as e:
        out["aten_flash_causal_alignment"] = f"error: {type(e).__name__}: {str(e)[:200]}"


def _masked(q, k, v, visible):
    """Float32 attention with an explicit visibility rule; q [1, n, H, D]."""
    n, L = q.shape[1], k.shape[1]
    mask = torch.tensor([[visible(i, j) for j in range(L)] for i in range(n)], device=q.device)
    s = torch.einsum("bnhd,blhd->bhnl", q.float(), k.float()) * 0.125
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhnl,blhd->bnhd", torch.softmax(s, -1), v.float()), torch.logsumexp(s, -1)


def bandwidth(p: Probe, out: dict) -> None:
    size = (16 << 20) if p.tiny else GiB
    x = torch.empty(size, dtype=torch.uint8, device=p.dev).fill_(1)
    y = torch.empty_like(x)
    t = p.time(lambda: y.copy_(x), iters=20)
    p.copy_bw = 2 * size / t
    out["copy_bytes"] = size
    out["copy_GBps"] = round(p.copy_bw / 1e9, 1)
    xb = x.view(torch.bfloat16)
    t = p.time(lambda: xb.sum(dtype=torch.float32), iters=20)
    out["read_GBps"] = round(size / t / 1e9, 1)
    del x, y, xb
    n = 256 if p.tiny else 8192
    a, b = randn((n, n), torch.bfloat16, p.dev, 1), randn((n, n), torch.bfloat16, p.dev, 2)
    t = p.time(lambda: a @ b, iters=20)
    out["gemm_bf16_n"] = n
    out["gemm_bf16_TFLOPs"] = round(2 * n ** 3 / t / 1e12, 1)


def _err(got, want) -> float:
    return float((got.double() - want.double()).abs().max()) if got.numel() else 0.0


def _compare(name, o, l, ro, rl, tol) -> dict:
    """o [n, H, D], l [n, H] against the float64 reference ro, rl: errors, and (0, -inf) on empty rows."""
    fin = rl != float("-inf")
    rec = {"case": name, "err_out": _err(o, ro), "err_lse": _err(l[fin], rl[fin]),
           "empty_rows": int((~fin).sum()),
           "empty_rows_exact": bool(torch.equal(l[~fin].double(), rl[~fin]) and not o[~fin].any()),
           "nan": bool(o.isnan().any() or l.isnan().any())}
    rec["ok"] = (rec["err_out"] <= tol and rec["err_lse"] <= tol and rec["empty_rows_exact"] and not rec["nan"]
                 and bool(torch.equal(l == float("-inf"), rl == float("-inf"))))
    return rec


TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-4, torch.float64: 1e-9}


def correctness(p: Probe, out: dict) -> None:
    from common.attention import cuda as ca
    from common.attention.reference import ReferenceBackend
    ref = ReferenceBackend()
    cases = out.setdefault("cases", [])
    d = 64 if p.tiny else 128
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64] if p.cuda else [torch.float32, torch.float64]
    layouts = [  # name, n, L, q_start, k_start, hq, hkv
        ("chunk_over_cache", 64, 1064, 1000, 0, 32, 8),
        ("odd_chunk_gqa8", 37, 337, 300, 0, 32, 4),
        ("earlier_kvp_shard", 16, 500, 2000, 0, 32, 8),
        ("fully_masked_first_rows", 8, 20, 0, 3, 8, 2),
        ("keys_after_last_query", 5, 40, 10, 0, 8, 8),
        ("decode", 1, 4097, 4096, 0, 32, 8),
    ]
    if p.tiny:
        layouts = [(name, min(n, 9), min(L, 60), min(qs, 50), ks, min(hq, 8), min(hkv, 2))
                   for name, n, L, qs, ks, hq, hkv in layouts]
    for dtype in dtypes:
        for name, n, L, qs, ks, hq, hkv in layouts:
            for shards in (1, 4):
                if shards == 4 and name not in ("chunk_over_cache", "decode"):
                    continue
                q, k, v = (randn(s, dtype, p.dev, i) for i, s in enumerate(((n, hq, d), (L, hkv, d), (L, hkv, d))))
                be = ca.CudaAttentionBackend(kv_shards=shards)
                try:
                    o, l = be.forward(q, k, v, q_start=qs, k_start=ks, scale=d ** -0.5)
                    ro, rl = ref.forward(q.double(), k.double(), v.double(), q_start=qs, k_start=ks, scale=d ** -0.5)
                    rec = _compare(f"backend/{str(dtype)[6:]}/{name}/shards{shards}", o, l, ro, rl, TOL[dtype])
                    rec["op"] = be.op_for(q).name
                except Exception as e:
                    rec = {"case": f"backend/{str(dtype)[6:]}/{name}/shards{shards}", "ok": False,
                           "error": f"{type(e).__name__}: {str(e)[:300]}"}
                cases.append(rec)
    # Each dense op alone, non-causal and square causal, 7 tokens x 3 heads.
    ops = [ca.EINSUM] + ([ca.ATEN_FLASH, ca.ATEN_EFFICIENT] if p.cuda else [])
    if p.cuda and ca._flash_attn_importable():
        ops.append(ca.FLASH_ATTN)
    for op in ops:
        for dtype in ((torch.bfloat16,) if op in (ca.ATEN_FLASH, ca.FLASH_ATTN) else (torch.float32,)):
            for causal in (False, True):
                n = 7
                q, k, v = (randn((1, n, 3, d), dtype, p.dev, i) for i in range(3))
                try:
                    o, l = op.fn(q, k, v, causal, 0.1)
                    ro, rl = ca.EINSUM.fn(q.double(), k.double(), v.double(), causal, 0.1)
                    rec = _compare(f"op/{op.name}/{str(dtype)[6:]}/causal{int(causal)}", o[0], l[0], ro[0], rl[0],
                                   TOL[dtype])
                except Exception as e:
                    rec = {"case": f"op/{op.name}", "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                cases.append(rec)
    p.report.save()
    if p.cuda:
        _correct_decode(p, cases, ref, d)
    out["all_ok"] = all(c.get("ok") for c in cases)
    out["failed"] = [c["case"] for c in cases if not c.get("ok")]


def _paged_case(p, lens, hq, hkv, d, page, dtype, seed=0, consecutive=False):
    max_blocks = max([-(-n // page) for n in lens] + [1])
    num_blocks = len(lens) * max_blocks + 1
    k = randn((num_blocks, page, hkv, d), dtype, p.dev, seed)
    v = randn((num_blocks, page, hkv, d), dtype, p.dev, seed + 1)
    q = randn((len(lens), hq, d), dtype, p.dev, seed + 2)
    ids = torch.arange(len(lens) * max_blocks) if consecutive else torch.randperm(num_blocks)[:len(lens) * max_blocks]
    tables = ids.view(len(lens), max_blocks).to(device=p.dev, dtype=torch.int32)
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32, device=p.dev)


def _correct_decode(p, cases, ref, d):
    from common.attention.triton_decode import paged_decode_attention
    lens = [0, 1, 16, 17, 1000, 5000]
    for dtype, ratio, splits in ((torch.bfloat16, 4, None), (torch.bfloat16, 1, 7), (torch.bfloat16, 8, 1),
                                 (torch.float16, 4, None), (torch.float32, 4, None), (torch.float32, 8, 3)):
        q, k, v, tables, seq = _paged_case(p, lens, 8 * ratio, 8, d, 16, dtype)
        name = f"triton_decode/{str(dtype)[6:]}/gqa{ratio}/splits{splits}"
        try:
            o, l = paged_decode_attention(q, k, v, tables, seq, d ** -0.5, num_splits=splits)
            ro, rl = ref.decode_paged(q.double(), k.double(), v.double(), tables, seq, scale=d ** -0.5)
            rec = _compare(name, o, l, ro, rl, TOL[dtype])
        except Exception as e:
            rec = {"case": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        cases.append(rec)


def prefill(p: Probe, out: dict) -> None:
    from common.attention.cuda import CudaAttentionBackend
    hq, hkv, d = (8, 2, 64) if p.tiny else (32, 8, 128)
    contexts = [128] if p.tiny else [16384, 32768, 65536, 131072]
    chunks = [16, 32] if p.tiny else [512, 2048, 8192]
    rows = out.setdefault("rows", [])
    dtype = torch.bfloat16 if p.cuda else torch.float32
    be = CudaAttentionBackend()
    for ctx in contexts:
        L = ctx + max(chunks)
        k, v = randn((L, hkv, d), dtype, p.dev, 1), randn((L, hkv, d), dtype, p.dev, 2)
        for n in chunks:
            q = randn((n, hq, d), dtype, p.dev, 3)
            t = p.time(lambda: be.forward(q, k[:ctx + n], v[:ctx + n], q_start=ctx, k_start=0, scale=d ** -0.5),
                       iters=5)
            flops = 4 * d * hq * (n * ctx + n * (n + 1) / 2)
            rows.append({"context": ctx, "chunk": n, "ms": round(t * 1e3, 3), "TFLOPs": round(flops / t / 1e12, 1),
                         "op": be.op_for(q).name})
            p.report.save()
        if ctx == contexts[-1]:                      # a short chunk: KV shards on and off
            n = 16 if p.tiny else 128
            q = randn((n, hq, d), dtype, p.dev, 4)
            for shards in (1, "auto"):
                b2 = CudaAttentionBackend(kv_shards=shards)
                t = p.time(lambda: b2.forward(q, k[:ctx + n], v[:ctx + n], q_start=ctx, k_start=0, scale=d ** -0.5),
                           iters=5)
                flops = 4 * d * hq * (n * ctx + n * (n + 1) / 2)
                out.setdefault("short_chunk", []).append(
                    {"context": ctx, "chunk": n, "kv_shards": shards,
                     "shards_used": b2._shards(q, ctx + 1, b2.op_for(q)),
                     "ms": round(t * 1e3, 3), "TFLOPs": round(flops / t / 1e12, 1)})
        del k, v
        p.free()
    big = [r["TFLOPs"] for r in rows if r["chunk"] >= 2048 and r["context"] >= 16384]
    out["min_TFLOPs_chunk_ge_2048_ctx_ge_16K"] = min(big) if big else None


def decode(p: Probe, out: dict) -> None:
    if not p.cuda:
        out["skipped"] = "the Triton kernel is compiled for CUDA only"
        return
    from common.attention.triton_decode import default_num_splits, paged_decode_attention
    bw = p.bandwidth()
    hq, hkv, d, page = 32, 8, 128, 16
    rows = out.setdefault("rows", [])
    for B in (1, 8, 32):
        for L in (4096, 32768, 131072):
            q, k, v, tables, seq = _paged_case(p, [L] * B, hq, hkv, d, page, torch.bfloat16)
            o = torch.empty_like(q)
            fn = lambda: paged_decode_attention(q, k, v, tables, seq, d ** -0.5, out=o)  # noqa: E731
            t = p.time_graph(fn)
            t_eager = p.time(fn, iters=10)
            nbytes = 2 * B * L * hkv * d * 2
            rows.append({"B": B, "L": L, "splits": default_num_splits(B, hkv, tables.shape[1] * page, p.dev),
                         "us": round(t * 1e6, 1), "us_eager": round(t_eager * 1e6, 1),
                         "GBps": round(nbytes / t / 1e9, 1), "pct_of_copy_bw": round(100 * nbytes / t / bw, 1)})
            if (B, L) in ((1, 131072), (32, 4096)):
                for block_n in (32, 128):
                    tb = p.time_graph(lambda: paged_decode_attention(q, k, v, tables, seq, d ** -0.5, out=o,
                                                                     block_n=block_n))
                    rows[-1][f"pct_block_n{block_n}"] = round(100 * nbytes / tb / bw, 1)
            p.report.save()
            del fn, q, k, v, tables, seq, o          # fn holds them too: up to 17 GB
            p.free()
    big = [r["pct_of_copy_bw"] for r in rows if r["B"] * r["L"] >= 131072]
    out["min_pct_of_copy_bw_BL_ge_128K"] = min(big) if big else None


def _random_llama(cfg, dev, dtype, seed=0):
    """A LlamaModel with random weights made on the device (N(0, 0.02), norms 1)."""
    from common.model.llama import LlamaModel
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to(dtype).to_empty(device=dev).eval().requires_grad_(False)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "norm" in name:
                prm.fill_(1.0)
            else:
                prm.copy_(torch.randn(prm.shape, generator=g, device=dev, dtype=torch.float32).mul_(0.02))
    return model


def graphs(p: Probe, out: dict) -> None:
    if not p.cuda:
        out["skipped"] = "CUDA graphs need CUDA"
        return
    from common.attention.cuda import CudaAttentionBackend
    from common.config import ModelConfig
    from common.engine.cuda_graphs import DecodeGraphRunner
    from common.kv_cache.paged import PagedKVCache
    cfg = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=4, num_heads=32,
                      num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position=131072)
    model = _random_llama(cfg, p.dev, torch.bfloat16)
    ctx, sizes, bs = 4096, (1, 8, 32), 16
    per_seq = ctx // bs + 1
    cache = PagedKVCache(range(cfg.num_layers), 1 + max(sizes) * per_seq, bs, cfg.num_kv_heads, cfg.head_dim,
                         torch.bfloat16, p.dev)
    cache.data.normal_()
    runner = DecodeGraphRunner(model, cache, CudaAttentionBackend(), max_blocks_per_seq=per_seq, scratch_block=0,
                               batch_sizes=sizes, device=p.dev)
    t0 = time.monotonic()
    runner.capture()
    out["capture_s"] = round(time.monotonic() - t0, 2)
    rows = out.setdefault("rows", [])
    for n in (1, 5, 8, 32):                      # 5 is padded to 8
        tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(n)]
        b = runner.load([(13 * i) % 32000 for i in range(n)], [ctx - 1 - i for i in range(n)], tables)
        saved = cache.data.clone()
        eager = runner.eager(n, b)
        cache.data.copy_(saved)                  # replay writes the same K/V into the same cache
        del saved
        graph = runner.replay(n, b)
        p.sync()
        rows.append({"n": n, "padded": b, "bitwise_equal": bool(torch.equal(eager, graph)),
                     "eager_ms": round(p.time(lambda: runner._forward(b), iters=5) * 1e3, 3),
                     "graph_ms": round(p.time(runner.graphs[b].replay, iters=10) * 1e3, 3)})
        p.report.save()
    out["all_bitwise_equal"] = all(r["bitwise_equal"] for r in rows)
    del runner, cache, model
    p.free()


def _llama8b_cfg(tiny: bool):
    from common.config import ModelConfig
    if tiny:
        return ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16, rope_theta=500000.0, max_position=4096)
    return ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position=131072 + 64)


def llama8b(p: Probe, out: dict) -> None:
    from common.attention.cuda import CudaAttentionBackend
    from common.attention.reference import ReferenceBackend
    from common.engine.cuda_graphs import DecodeGraphRunner
    from common.kv_cache.paged import PagedKVCache
    cfg = _llama8b_cfg(p.tiny)
    dtype = torch.bfloat16 if p.cuda else torch.float32
    bw = p.bandwidth()
    t0 = time.monotonic()
    model = _random_llama(cfg, p.dev, dtype)
    out["init_s"] = round(time.monotonic() - t0, 1)
    esize = torch.empty(0, dtype=dtype).element_size()
    params = sum(x.numel() for x in model.parameters())
    weight_bytes = (params - cfg.vocab_size * cfg.hidden_size + cfg.hidden_size) * esize   # one embedding row
    out.update(params=params, weight_bytes_read=weight_bytes)
    backend = CudaAttentionBackend() if p.cuda else ReferenceBackend()
    rows = out.setdefault("rows", [])
    contexts = (40,) if p.tiny else (4096, 131072)
    bs = 16
    for L in contexts:
        nb = -(-(L + 1) // bs)
        cache = PagedKVCache(range(cfg.num_layers), nb + 1, bs, cfg.num_kv_heads, cfg.head_dim, dtype, p.dev)
        cache.data.normal_()
        table = list(range(1, nb + 1))
        kv_bytes = 2 * (L + 1) * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * esize
        floor = (weight_bytes + kv_bytes) / bw
        row = {"context": L, "batch": 1, "kv_bytes": kv_bytes, "floor_ms": round(floor * 1e3, 3)}
        rows.append(row)
        runner = DecodeGraphRunner(model, cache, backend, max_blocks_per_seq=nb, scratch_block=0, batch_sizes=(1,),
                                   device=p.dev)
        if p.cuda:
            runner.capture()
        b = runner.load([1], [L], [table])
        row["ours_eager_ms"] = round(p.time(lambda: runner._forward(b), iters=5) * 1e3, 3)
        if p.cuda:
            row["ours_graph_ms"] = round(p.time(runner.graphs[b].replay, iters=10) * 1e3, 3)
            row["graph_over_floor"] = round(row["ours_graph_ms"] / row["floor_ms"], 3)
            ours = runner.replay(1, b)
        else:
            ours = runner.eager(1, b)
        p.report.save()
        # Our K/V of positions 0..L-1 as transformers lays them out, [1, Hkv, L, D] per layer; then our
        # cache goes, so that at 128K the weights, one copy of the KV and transformers' own fit together.
        blocks = torch.tensor(table[:-(-L // bs)], device=p.dev)
        kv = [tuple(c.index_select(0, blocks).flatten(0, 1)[:L].transpose(0, 1).unsqueeze(0).contiguous()
                    for c in (cache.k(layer), cache.v(layer))) for layer in range(cfg.num_layers)]
        del runner, cache
        p.free()
        try:
            _hf_step(p, model, cfg, kv, L, ours, row)
        except Exception as e:
            row["hf_error"] = f"{type(e).__name__}: {str(e)[:400]}"
            log.warning("transformers step failed at L=%d: %s", L, e)
        p.report.save()
        del kv, ours
        p.free()
    del model
    p.free()


def _hf_model(model, cfg, dev):
    """transformers' LlamaForCausalLM sharing our parameter tensors (no second copy of the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    hcfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       max_position_embeddings=cfg.max_position, rope_theta=cfg.rope_theta,
                       rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device("meta"):
        hf = LlamaForCausalLM(hcfg)
    hf.load_state_dict(dict(model._param_names()), assign=True, strict=True)
    hf.model.rotary_emb = LlamaRotaryEmbedding(hcfg).to(dev)
    meta = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"transformers model still has meta tensors: {meta[:3]}")
    return hf.eval()


def _hf_step(p, model, cfg, kv, L, ours, row):
    """The same decode step (token 1 at position L over our K/V of positions < L) through transformers.

    Written against the transformers 5.x cache API, which moves between minor versions: the forward takes
    `cache` (5.24) or `past_key_values` + `cache_position` (earlier); a StaticCache layer advances its own
    `cumulative_length` (5.24) or writes where cache_position says. Between timed steps the cache is put
    back to L tokens by restoring each layer's tensors and length, which works for both.
    """
    import inspect

    from transformers import DynamicCache, StaticCache
    hf = _hf_model(model, cfg, p.dev)
    row["transformers"] = __import__("transformers").__version__
    params = inspect.signature(hf.forward).parameters
    ids = torch.tensor([[1]], device=p.dev)
    kw = {"input_ids": ids, "position_ids": torch.tensor([[L]], device=p.dev), "use_cache": True}
    if "cache_position" in params:
        kw["cache_position"] = torch.tensor([L], device=p.dev)
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    cache_kw = "cache" if "cache" in params else "past_key_values"
    for kind in ("static", "dynamic"):
        hc = StaticCache(config=hf.config, max_cache_len=L + 1) if kind == "static" else DynamicCache(config=hf.config)
        with torch.inference_mode():
            for layer, (k, v) in enumerate(kv):                    # static copies them, dynamic keeps them
                hc.update(k, v, layer, {"cache_position": torch.arange(L, device=p.dev)})
            saved = [(lay.keys, lay.values, _length(lay)) for lay in hc.layers]

            def step():
                logits = hf(**kw, **{cache_kw: hc}).logits
                for lay, (k, v, n) in zip(hc.layers, saved):        # back to L tokens
                    lay.keys, lay.values = k, v
                    if n is not None:
                        lay.cumulative_length.fill_(n) if torch.is_tensor(lay.cumulative_length) \
                            else setattr(lay, "cumulative_length", n)
                return logits

            logits = step()[:, -1].float()
            row[f"hf_{kind}_ms"] = round(p.time(step, iters=3, warmup=1) * 1e3, 3)
            row[f"hf_{kind}_repeatable"] = bool(torch.equal(step()[:, -1].float(), logits))   # the reset works
        row[f"hf_{kind}_max_logit_diff"] = float(f"{(logits - ours.float()).abs().max().item():.3g}")
        row[f"hf_{kind}_logit_scale"] = float(f"{ours.float().abs().max().item():.3g}")
        row[f"hf_{kind}_same_argmax"] = bool(logits.argmax(-1).item() == ours.argmax(-1).item())
        if "ours_graph_ms" in row:
            row[f"speedup_vs_hf_{kind}"] = round(row[f"hf_{kind}_ms"] / row["ours_graph_ms"], 2)
        p.report.save()
        del hc, saved
        p.free()
    del hf


def _length(layer) -> int | None:
    n = getattr(layer, "cumulative_length", None)
    return None if n is None else int(n)


def summary(p: Probe, out: dict) -> None:
    s = p.report.data["sections"]
    dec = s.get("decode", {}).get("min_pct_of_copy_bw_BL_ge_128K")
    pre = s.get("prefill", {}).get("min_TFLOPs_chunk_ge_2048_ctx_ge_16K")
    rows = {r["context"]: r for r in s.get("llama8b", {}).get("rows", [])}
    r128 = rows.get(131072, {})
    hf_best = [r128[k] for k in ("hf_static_ms", "hf_dynamic_ms") if k in r128]
    out["targets"] = {
        "decode_ge_70pct_copy_bw_at_BL_ge_128K": None if dec is None else dec >= 70,
        "prefill_ge_250_TFLOPs_chunk_ge_2048_ctx_ge_16K": None if pre is None else pre >= 250,
        "llama8b_step_le_1.3x_floor_at_128K": (None if "graph_over_floor" not in r128
                                               else r128["graph_over_floor"] <= 1.3),
        "llama8b_faster_than_transformers_at_128K": (None if not hf_best or "ours_graph_ms" not in r128
                                                     else r128["ours_graph_ms"] < min(hf_best)),
        "correctness_all_ok": s.get("correctness", {}).get("all_ok"),
        "graphs_bitwise": s.get("graphs", {}).get("all_bitwise_equal"),
    }


RUN = {"features": features, "bandwidth": bandwidth, "correctness": correctness, "prefill": prefill,
       "decode": decode, "graphs": graphs, "llama8b": llama8b, "summary": summary}
EST_S = {"features": 10, "bandwidth": 10, "correctness": 60, "prefill": 40, "decode": 60, "graphs": 40,
         "llama8b": 120, "summary": 0}   # rough H100 estimates: a section is skipped if it cannot fit


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="gpu_probe: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    explicit_out = args.out is not None
    if not explicit_out:
        real = args.device == "cuda" and not args.tiny
        args.out = str(ROOT / "bench" / "results" / "gpu_probe.json" if real
                       else Path(tempfile.gettempdir()) / "gpu_probe_smoke.json")
    report = Report(args.out, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        report.data["status"] = "no_cuda"
        if explicit_out:                     # never replace the committed GPU results with "no_cuda"
            report.save()
        log.error("no CUDA device (torch %s, torch.cuda.is_available() is False); nothing measured. "
                  "Run on a GPU machine, or use --device cpu --tiny for a smoke run.%s", torch.__version__,
                  f" Wrote {args.out}" if explicit_out else "")
        return EXIT_NO_CUDA
    probe = Probe(args, report)
    failed = []
    for name in args.sections:
        out = report.section(name)
        left = probe.deadline - time.monotonic()
        if not args.tiny and left < EST_S[name]:
            out["skipped"] = f"time budget: {left:.0f} s left, section needs ~{EST_S[name]} s"
            report.save()
            continue
        log.info("section %s ...", name)
        t0 = time.monotonic()
        try:
            RUN[name](probe, out)
        except Exception as e:  # one failing section must not lose the others' data
            out["error"] = f"{type(e).__name__}: {e}"
            out["traceback"] = traceback.format_exc()[-4000:]
            failed.append(name)
            log.error("section %s failed: %s", name, e)
        out["wall_s"] = round(time.monotonic() - t0, 1)
        probe.free()
        report.save()
    report.data["status"] = "failed: " + ",".join(failed) if failed else "done"
    report.data["finished"] = time.strftime("%F %T")
    report.save()
    log.info("%s; results in %s", report.data["status"], args.out)
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
