"""The fused Triton RMSNorm and RoPE on the GPU against the eager code (the CPU interpreter tests are in
tests/unit/test_fused_ops.py), and a whole model's logits with the fused ops on and off."""
from __future__ import annotations

import pytest
import torch

from common.config import ModelConfig
from common.model import fused
from common.model.llama import LlamaModel, RMSNorm
from common.model.rope import Rope, RopeScaling, apply_rope


def _eager_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * xf.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows,n", [(1, 4096), (7, 576), (33, 8192), (2, 100)])
def test_rms_norm(device, dtype, rows, n):
    g = torch.Generator(device=device).manual_seed(rows)
    norm = RMSNorm(n, 1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, device=device, generator=g).to(dtype))
        x = (3 * torch.randn(rows, n, device=device, generator=g)).to(dtype)
        want = _eager_norm(norm, x)
        got = norm(x)                                       # the model's dispatch: fused on CUDA
    assert fused.enabled_for(x)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    else:
        rel = ((got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30)).max().item()
        assert rel <= 2 ** -7 and (got != want).float().mean().item() < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("t,hq,hkv,d", [(1, 32, 8, 128), (9, 9, 3, 64), (300, 12, 3, 64)])
def test_rope_bitwise(device, dtype, t, hq, hkv, d):
    g = torch.Generator(device=device).manual_seed(t)
    rope = Rope(d, 500000.0, RopeScaling())
    cos, sin = rope.cos_sin(torch.arange(1000, 1000 + t, device=device), dtype)
    q = torch.randn(t, hq, d, device=device, generator=g).to(dtype)
    k = torch.randn(t, hkv, d, device=device, generator=g).to(dtype)
    gq, gk = fused.rope_qk(q, k, cos, sin)
    assert torch.equal(gq, apply_rope(q, cos, sin)) and torch.equal(gk, apply_rope(k, cos, sin))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_model_logits_fused_vs_eager(device, dtype, monkeypatch):
    """A 2-layer Llama through a plain (non-paged) attention: fused on and off give the same argmax and
    logits within the dtype's rounding."""
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                      num_kv_heads=2, head_dim=32)
    torch.manual_seed(0)
    model = LlamaModel(cfg).to(device=device, dtype=dtype).eval()

    class Causal:
        def attend(self, layer, q, k, v):
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True)
            return o[0].transpose(0, 1)

    ids = torch.arange(40, device=device) * 7 % 512
    pos = torch.arange(40, device=device)

    def run():
        with torch.inference_mode():
            return model.logits(model(model.embed(ids), pos, Causal()))

    on = run()
    monkeypatch.setenv("MNEMOSYNE_FUSED_OPS", "0")
    off = run()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(on, off, **tol)
    assert (on.argmax(-1) == off.argmax(-1)).float().mean().item() >= (1.0 if dtype == torch.float32 else 0.95)
