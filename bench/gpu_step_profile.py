"""Where the time of one CUDA-graph decode step goes: Llama-3-8B shapes (random bf16 weights), B = 1.

    python bench/gpu_step_profile.py --out step_profile.json [--context 4096]

Reports (JSON):
  graph_ms / floor_ms  the captured step against (weights + KV bytes) / measured copy bandwidth
  kernels              torch.profiler over eager steps: per kernel name, launches and GPU time per step,
                       grouped into matmul / attention / elementwise (norms, RoPE, residuals, casts)
  gemv                 each linear's shape alone (20 back-to-back launches in one graph): achieved
                       bytes/s and % of copy bandwidth, separate and fused (QKV, gate+up) shapes
Needs CUDA; exits 3 without it. Not part of `make bench` on CPU machines.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "gemv", "cutlass", "sm90", "cublas", "nvjet", "matmul", "splitk")):
        return "matmul"
    if "decode" in n or "attn" in n or "flash" in n:
        return "attention"
    if "memcpy" in n or "memset" in n:
        return "copy"
    return "elementwise"


def timed(fn, iters: int = 20) -> float:
    """Median seconds of fn, timed with CUDA events (fn may be a graph replay)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def timed_graph(fn, reps: int = 20, iters: int = 10) -> float:
    """Median seconds per call of fn, captured `reps` times back to back in one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return timed(g.replay, iters) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="step_profile.json")
    ap.add_argument("--context", type=int, default=4096)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 3
    from bench.gpu_probe import _llama8b_cfg, _random_llama
    from common.attention.cuda import CudaAttentionBackend
    from common.engine.cuda_graphs import DecodeGraphRunner
    from common.kv_cache.paged import PagedKVCache

    dev, dtype = torch.device("cuda"), torch.bfloat16
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "context": args.context}
    x = torch.empty(1 << 28, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    copy_s = timed_graph(lambda: y.copy_(x), reps=5)
    bw = 2 * x.numel() * 4 / copy_s
    out["copy_GBps"] = round(bw / 1e9, 1)
    del x, y

    cfg = _llama8b_cfg(False)
    model = _random_llama(cfg, dev, dtype)
    L, bs = args.context, 16
    nb = -(-(L + 1) // bs)
    cache = PagedKVCache(range(cfg.num_layers), nb + 1, bs, cfg.num_kv_heads, cfg.head_dim, dtype, dev)
    cache.data.normal_()
    runner = DecodeGraphRunner(model, cache, CudaAttentionBackend(), max_blocks_per_seq=nb, scratch_block=0,
                               batch_sizes=(1,), device=dev)
    runner.capture()
    b = runner.load([1], [L], [list(range(1, nb + 1))])
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = (params - cfg.vocab_size * cfg.hidden_size + cfg.hidden_size) * 2
    kv_bytes = 2 * (L + 1) * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    out["floor_ms"] = round((weight_bytes + kv_bytes) / bw * 1e3, 3)
    out["graph_ms"] = round(timed(runner.graphs[b].replay) * 1e3, 3)
    out["graph_over_floor"] = round(out["graph_ms"] / out["floor_ms"], 3)

    # kernels of the eager step (the same kernels the graph replays)
    steps = 3
    with torch.inference_mode():
        runner._forward(b)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                runner._forward(b)
            torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = per_kernel[ev.name]
            k[0] += 1
            k[1] += ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
    rows = sorted(({"kernel": n[:120], "category": category(n), "launches_per_step": c / steps,
                    "us_per_step": round(t / steps, 1)} for n, (c, t) in per_kernel.items()),
                  key=lambda r: -r["us_per_step"])
    cats: dict[str, dict] = defaultdict(lambda: {"launches_per_step": 0.0, "us_per_step": 0.0})
    for r in rows:
        cats[r["category"]]["launches_per_step"] += r["launches_per_step"]
        cats[r["category"]]["us_per_step"] = round(cats[r["category"]]["us_per_step"] + r["us_per_step"], 1)
    out["kernels_by_category"] = dict(cats)
    out["kernels_top"] = rows[:40]
    out["kernel_launches_per_step"] = sum(r["launches_per_step"] for r in rows)
    out["kernel_us_per_step"] = round(sum(r["us_per_step"] for r in rows), 1)

    # each linear alone, separate and fused
    h, q, kv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    shapes = {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, f), "up": (h, f), "down": (f, h),
              "qkv_fused": (h, q + 2 * kv), "gate_up_fused": (h, 2 * f), "lm_head": (h, cfg.vocab_size)}
    gemv = {}
    xin = {n: torch.randn(1, s[0], device=dev, dtype=dtype) for n, s in shapes.items()}
    for name, (i, o) in shapes.items():
        w = torch.randn(o, i, device=dev, dtype=dtype)
        t = timed_graph(lambda: torch.nn.functional.linear(xin[name], w))
        gemv[name] = {"shape": [i, o], "us": round(t * 1e6, 2), "GBps": round(w.numel() * 2 / t / 1e9, 1),
                      "pct_of_copy_bw": round(100 * w.numel() * 2 / t / bw, 1)}
        del w
    sep = sum(gemv[n]["us"] for n in ("q", "k", "v", "gate", "up"))
    fused = gemv["qkv_fused"]["us"] + gemv["gate_up_fused"]["us"]
    out["gemv"] = gemv
    out["gemv_per_layer_us"] = {"separate": round(sep + gemv["o"]["us"] + gemv["down"]["us"], 1),
                                "fused_qkv_gate_up": round(fused + gemv["o"]["us"] + gemv["down"]["us"], 1)}
    # elementwise chain alone: what one layer's norms + RoPE + residuals cost without matmuls
    from common.model.rope import apply_rope
    layer = next(iter(model.layers.values()))
    hs = torch.randn(1, h, device=dev, dtype=dtype)
    qq = torch.randn(1, cfg.num_heads, cfg.head_dim, device=dev, dtype=dtype)
    kk = torch.randn(1, cfg.num_kv_heads, cfg.head_dim, device=dev, dtype=dtype)
    cos, sin = model.rope.cos_sin(torch.tensor([L], device=dev), dtype)

    def chain():
        a = layer.input_layernorm(hs)
        apply_rope(qq, cos, sin)
        apply_rope(kk, cos, sin)
        c = layer.post_attention_layernorm(a + hs)
        return c + a

    with torch.inference_mode():
        out["elementwise_chain_us_per_layer"] = round(timed_graph(chain) * 1e6, 2)
        out["rmsnorm_us"] = round(timed_graph(lambda: layer.input_layernorm(hs)) * 1e6, 2)
        out["rope_q_us"] = round(timed_graph(lambda: apply_rope(qq, cos, sin)) * 1e6, 2)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("kernels_top", "gemv")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
