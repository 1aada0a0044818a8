"""The engine flags of an instance service (prefill and decode), generated from the config tree.

    p = ArgumentParser(...)
    add_engine_flags(p, role="decode")           # --model, engine, cache, scheduler, parallel flags
    engine = engine_config(p.parse_args(argv))   # one validated EngineConfig

The roles differ only in their parallel layout: a prefill instance is a TP x SPP grid, a decode
instance a TP x KVP grid (prefill.proto / decode.proto).
"""
from __future__ import annotations

import argparse

from common.cli import add_config_flags, config_from_args
from common.config import DTYPES, CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig

_PARALLEL = {
    "prefill": {"tp": "tensor-parallel ranks", "spp": "sequence-pipeline stages"},
    "decode": {"tp": "tensor-parallel ranks", "kvp": "KV-parallel groups", "kvp_tokens": "tokens per KVP group"},
}
_KV_HOST = {"prefill": "address of this host for KV transfers",
            "decode": "address the KV receivers listen on"}
_CHUNK = {"prefill": "prefill chunk in tokens", "decode": "prefill chunk (short prompts)"}


def add_engine_flags(p: argparse.ArgumentParser, role: str) -> None:
    """Adds the engine's flags for a `role` ("prefill" | "decode") instance."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", metavar="DIR|FILE", default=None,
                   help="Hugging Face directory or .gguf file (default: the built-in model)")
    add_config_flags(g, EngineConfig, {"dtype": "weights and KV type", "max_model_len": "longest sequence",
                                       "attention_backend": "attention kernels", "device": "torch device",
                                       "kv_backend": "KV transfer backend (tcp | nixl)",
                                       "kv_host": _KV_HOST[role]},
                     dest_prefix="engine_", dtype=dict(choices=DTYPES), kv_backend=dict(choices=("tcp", "nixl")))
    add_config_flags(g, CacheConfig, {"block_size": "tokens per KV block",
                                      "num_blocks": "KV blocks per KVP group (default: from --max-kv-tokens)",
                                      "max_kv_tokens": "KV tokens per KVP group"}, dest_prefix="cache_")
    add_config_flags(g, SchedulerConfig, {"chunk_size": _CHUNK[role],
                                          "max_batch_tokens": "tokens per step", "max_num_seqs": "requests per step"},
                     dest_prefix="sched_")
    add_config_flags(g, ParallelConfig, _PARALLEL[role], dest_prefix="par_")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig from the flags add_engine_flags made."""
    return config_from_args(EngineConfig, args, "engine_", model=args.model,
                            cache=config_from_args(CacheConfig, args, "cache_"),
                            scheduler=config_from_args(SchedulerConfig, args, "sched_"),
                            parallel=config_from_args(ParallelConfig, args, "par_"))
