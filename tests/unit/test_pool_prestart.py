"""How fast a pool instance starts: its main starts its grid's forkserver before it imports torch
(common/pool_config.py start_worker_server), so the forkserver's own imports run beside the main's,
and building the model skips an import of torch._dynamo. Each checked in a fresh interpreter, as
`python -m services.decode` starts."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import os, sys
    from common.pool_config import start_worker_server
    from services.decode.config import DecodeConfig
    from services.prefill.config import PrefillConfig

    def forkservers():
        me, out = str(os.getpid()), []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                cmd = open(f"/proc/{pid}/cmdline").read()
            except OSError:
                continue
            if stat[1] == me and "forkserver" in cmd:
                out.append(pid)
        return out

    base = ["--kvstore", "127.0.0.1:1"]
    assert not start_worker_server(DecodeConfig, base)                    # one process: no grid
    assert not start_worker_server(DecodeConfig, base + ["--no-such-flag"])  # left to the real parse
    assert not start_worker_server(PrefillConfig, base + ["--spp", "0"])
    assert not forkservers()
    assert start_worker_server(DecodeConfig, base + ["--kvp", "2", "--kvp-tokens", "1024"])
    assert "torch" not in sys.modules, "started after torch was imported"
    assert len(forkservers()) == 1
    assert start_worker_server(PrefillConfig, base + ["--spp", "2"])        # idempotent: the same one
    assert len(forkservers()) == 1
    print("ok")
""")


def test_a_grid_pool_starts_its_forkserver_before_importing_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


MODEL_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from common.config import ModelConfig
    from common.model.llama import LlamaModel
    from common.parallel.tp import apply_tp, tp_shard

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaModel(cfg)
        apply_tp(model, tp_shard(cfg, 1, 2), groups=None)
    assert model.embed_tokens.weight.is_meta and model.embed_tokens.num_embeddings == 32
    assert "torch._dynamo" not in sys.modules, "building on the meta device imported torch._dynamo"
    from common.model.llama import to_empty
    model = to_empty(model, "cpu")
    assert "torch.fx.experimental.symbolic_shapes" not in sys.modules, "to_empty imported torch.fx"
    assert all(not t.is_meta for t in [*model.parameters(), *model.buffers()])
    with torch.device("meta"):
        a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    b.weight = a.weight
    pair = to_empty(torch.nn.Sequential(a, b), "cpu")
    assert pair[0].weight is pair[1].weight and not pair[0].weight.is_meta   # shared: still one tensor
    torch.manual_seed(0)
    plain = LlamaModel(cfg)                     # off the meta device: initialised as nn.Embedding is
    assert 0.8 < plain.embed_tokens.weight.std().item() < 1.2
    print("ok")
""")


def test_building_a_model_on_the_meta_device_imports_no_compiler_module():
    """nn.Embedding's own init of a meta tensor imports torch._dynamo (~2 s of every engine's and
    grid worker's start here, for values the checkpoint replaces): the model's embeddings skip it
    on the meta device, and only there. Making the meta model real (to_empty) imports nothing either
    (torch's own Module.to_empty imports torch.fx's symbolic shapes, ~0.5 s) and keeps ties."""
    out = subprocess.run([sys.executable, "-c", MODEL_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
