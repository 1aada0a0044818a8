"""The fused Triton RMSNorm and RoPE (common/model/fused.py) against the eager model code, on CPU under
Triton's interpreter (one subprocess with TRITON_INTERPRET=1 set before triton is imported; see
tests/unit/test_triton_decode.py for why), and the model's dispatch: eager on CPU tensors.

RoPE must be bitwise equal to apply_rope (same roundings); RMSNorm agrees to rounding (float32 row sums
reduced in another order), at most one bf16 ulp. The GPU side: tests/gpu/test_fused_ops_gpu.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

WORKER = r'''
import torch
from common.model import fused
from common.model.llama import RMSNorm
from common.model.rope import Rope, RopeScaling, apply_rope

def ulps_bf16(a, b):
    return ((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-30)).max().item()

g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for rows, n in ((5, 576), (3, 64), (1, 4096), (0, 128), (2, 100)):
        norm = RMSNorm(n, 1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(n, generator=g).to(dtype))
        x = (3 * torch.randn(rows, n, generator=g)).to(dtype)
        with torch.no_grad():
            want = norm(x)                          # CPU tensor: the eager path
        got = fused.rms_norm(x, norm.weight.detach(), 1e-5)
        assert got.shape == want.shape and got.dtype == dtype, (got.shape, got.dtype)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
        elif rows:
            assert ulps_bf16(got, want) <= 2 ** -7, ulps_bf16(got, want)      # one bf16 ulp at most
            assert (got != want).float().mean().item() < 0.02
    # a row-strided input (a view of a wider buffer)
    wide = torch.randn(4, 160, generator=g).to(dtype)
    norm = RMSNorm(128, 1e-6).to(dtype)
    with torch.no_grad():
        want = norm(wide[:, :128])
    torch.testing.assert_close(fused.rms_norm(wide[:, :128], norm.weight.detach(), 1e-6).float(), want.float(),
                               rtol=1e-2, atol=1e-2)

    for t, hq, hkv, d, start in ((7, 9, 3, 64, 1000), (1, 32, 8, 128, 131071), (5, 4, 4, 16, 0), (0, 4, 2, 32, 0)):
        rope = Rope(d, 500000.0, RopeScaling())
        pos = torch.arange(start, start + t)
        cos, sin = rope.cos_sin(pos, dtype)
        q = torch.randn(t, hq, d, generator=g).to(dtype)
        k = torch.randn(t, hkv, d, generator=g).to(dtype)
        assert fused.rope_supported(q, k, cos)
        gq, gk = fused.rope_qk(q, k, cos, sin)
        assert torch.equal(gq, apply_rope(q, cos, sin)), (dtype, t, hq, d)
        assert torch.equal(gk, apply_rope(k, cos, sin)), (dtype, t, hkv, d)
    # views of a fused projection output (q and k strided along tokens)
    t, hq, hkv, d = 3, 6, 2, 32
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
    cos, sin = Rope(d, 10000.0, RopeScaling()).cos_sin(torch.arange(t) + 7, dtype)
    gq, gk = fused.rope_qk(q, k, cos, sin)
    assert torch.equal(gq, apply_rope(q, cos, sin)) and torch.equal(gk, apply_rope(k, cos, sin))
print("OK")
'''


def test_fused_kernels_match_the_eager_code_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", WORKER], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]


def test_model_uses_eager_code_on_cpu_and_fused_is_opt_out(monkeypatch):
    from common.model import fused
    x = torch.randn(2, 8)
    assert not fused.enabled_for(x)                            # CPU tensor: eager
    assert not fused.rope_supported(torch.randn(1, 2, 6), torch.randn(1, 1, 6), torch.randn(1, 1, 6))  # D=6
    monkeypatch.setenv("MNEMOSYNE_FUSED_OPS", "0")
    if torch.cuda.is_available():
        assert not fused.enabled_for(x.cuda())
