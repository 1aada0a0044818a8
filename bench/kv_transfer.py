"""KV transfer throughput per backend (TCP, NIXL) versus a raw torch memory copy of the same bytes.

One prefill stage (8 of 32 layers, Llama-3-8B-like shard: 8 KV heads x 128, bf16) streams 64 MiB of KV
(K and V) for one request, in chunks of 1, 2 or 4 MiB, to a receiver in another process whose paged
cache has a shuffled block table. Every chunk is posted at once and the clock stops when the last
handle is DONE (= written at the receiver and acknowledged). Baselines on the same bytes: one
contiguous `copy_` (memory bandwidth), the TCP receiver's paged scatter (one `copy_` per block
run into shuffled blocks) and the checksum (XXH3-64) every chunk carries (`kv_checksum`, computed once by the
sender and once by the receiver; the backends' rows include both). Medians of --runs runs, wall time and CPU time (sender + receiver processes, all threads: the
number to trust on a shared machine). Writes bench/results/kv_transfer.json.

Run: PYTHONPATH=. python -m bench.kv_transfer [--total-mib 64] [--chunks-mib 1 2 4] [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch

from common.kv_transfer import KVChunk, KVDest, KVLayout, make_receiver, make_sender
from common.kv_transfer.base import kv_checksum

RESULTS = Path(__file__).resolve().parent / "results" / "kv_transfer.json"
STAGE_LAYERS = (0, 8)


def _receiver_main(backend: str, layout: dict, num_blocks: int, pipe) -> None:
    logging.basicConfig(level=logging.WARNING)
    lay = KVLayout.from_dict(layout)
    shape = (num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim)
    caches = {l: (torch.zeros(shape, dtype=lay.torch_dtype), torch.zeros(shape, dtype=lay.torch_dtype))
              for l in range(*STAGE_LAYERS)}
    rx = make_receiver(backend, lay, caches)
    pipe.send(rx.address)
    while True:
        cmd, args = pipe.recv()
        if cmd == "exit":
            rx.close()
            pipe.send(None)
            return
        if cmd == "cpu":        # CPU seconds this process used (all threads)
            pipe.send(time.process_time())
            continue
        if cmd == "checksum":   # sum over the request's slots, to check the bytes really landed
            table, n = args
            s = torch.arange(n)
            slots = torch.tensor(table)[s // lay.block_size] * lay.block_size + s % lay.block_size
            pipe.send(sum(float(c.view(-1, lay.num_kv_heads, lay.head_dim)[slots].double().sum())
                          for kv in caches.values() for c in kv))
            continue
        pipe.send(getattr(rx, cmd)(*args))


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_backend(backend: str, lay: KVLayout, total_tokens: int, chunk_tokens: list[int], runs: int,
                  ) -> dict[int, tuple[list[float], list[float]]]:
    """{chunk tokens: (wall seconds per run, CPU seconds per run of sender + receiver processes)}"""
    num_blocks = total_tokens // lay.block_size
    table = list(range(num_blocks))
    random.Random(0).shuffle(table)
    ctx = mp.get_context("spawn")
    pipe, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_main, args=(backend, lay.to_dict(), num_blocks, child), daemon=True)
    proc.start()
    out: dict[int, tuple[list[float], list[float]]] = {}
    try:
        if not pipe.poll(120):
            raise TimeoutError("receiver process did not start")
        address = pipe.recv()
        L = STAGE_LAYERS[1] - STAGE_LAYERS[0]
        g = torch.Generator().manual_seed(0)
        shape = (L, total_tokens, lay.num_kv_heads, lay.head_dim)
        full_k = torch.randn(shape, generator=g).to(lay.torch_dtype)
        full_v = torch.randn(shape, generator=g).to(lay.torch_dtype)
        want = float(full_k.double().sum() + full_v.double().sum())
        with make_sender(backend, lay) as s:
            s.connect(address, timeout=30)
            for ct in chunk_tokens:
                chunks = [(t, min(t + ct, total_tokens)) for t in range(0, total_tokens, ct)]
                src = [(full_k[:, a:b].contiguous(), full_v[:, a:b].contiguous()) for a, b in chunks]
                times, cpus = [], []
                for r in range(runs + 1):                       # run 0 warms up
                    rid = f"bench-{ct}-{r}"
                    pipe.send(("expect", (rid, table, 0, list(range(*STAGE_LAYERS)), total_tokens)))
                    pipe.recv()
                    pipe.send(("cpu", ()))
                    rx_cpu = pipe.recv()
                    cpu = time.process_time()
                    t = time.perf_counter()
                    handles = [s.send(KVChunk(rid, STAGE_LAYERS, (a, b), k, v), KVDest(table, 0), timeout=60)
                               for (a, b), (k, v) in zip(chunks, src)]
                    for h in handles:
                        h.wait(60)
                    dt = time.perf_counter() - t
                    cpu = time.process_time() - cpu
                    pipe.send(("cpu", ()))
                    cpu += pipe.recv() - rx_cpu
                    pipe.send(("wait_complete", (rid, 10.0)))
                    assert pipe.recv() is True
                    if r == 0:
                        pipe.send(("checksum", (table, total_tokens)))
                        got = pipe.recv()
                        assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (got, want)
                    else:
                        times.append(dt)
                        cpus.append(cpu)
                    pipe.send(("cancel", (rid,)))
                    pipe.recv()
                out[ct] = (times, cpus)
        pipe.send(("exit", ()))
        pipe.poll(10)
    finally:
        proc.kill()
        proc.join(10)
    return out


def bench_copy(lay: KVLayout, total_tokens: int, runs: int) -> dict[str, list[float]]:
    """The same bytes moved by one contiguous copy_, and by the paged scatter a receiver does; and
    their checksum (one side's share of what a transfer spends on integrity)."""
    L = STAGE_LAYERS[1] - STAGE_LAYERS[0]
    shape = (L, total_tokens, lay.num_kv_heads, lay.head_dim)
    src = torch.randn((2, *shape)).to(lay.torch_dtype)
    dst = torch.empty_like(src)
    cache = torch.empty_like(src).view(2, L, -1, lay.num_kv_heads, lay.head_dim)
    perm = list(range(total_tokens // lay.block_size))
    random.Random(0).shuffle(perm)
    block_runs = KVDest(perm, 0).slot_runs((0, total_tokens), lay.block_size)
    out: dict[str, list[float]] = {"copy": [], "paged_scatter": [], "checksum": []}
    for r in range(runs + 1):
        t = time.perf_counter()
        dst.copy_(src)
        dt_copy = time.perf_counter() - t
        t = time.perf_counter()
        for kv in range(2):             # what the TCP receiver does: one copy_ per block run
            for l in range(L):
                for slot, off, n in block_runs:
                    cache[kv, l, slot:slot + n].copy_(src[kv, l, off:off + n])
        dt_scatter = time.perf_counter() - t
        t = time.perf_counter()
        kv_checksum(src[0], src[1])
        dt_crc = time.perf_counter() - t
        if r:
            out["copy"].append(dt_copy)
            out["paged_scatter"].append(dt_scatter)
            out["checksum"].append(dt_crc)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--total-mib", type=int, default=64)
    p.add_argument("--chunks-mib", type=float, nargs="+", default=[1, 2, 4])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--backends", nargs="+", default=["tcp", "nixl"])
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    lay = KVLayout(dtype="bfloat16", block_size=16, num_kv_heads=8, head_dim=128, num_layers=32,
                   model="bench-llama3-8b-shard")
    L = STAGE_LAYERS[1] - STAGE_LAYERS[0]
    token_bytes = 2 * L * lay.slot_bytes                     # K and V of one token over the stage
    total_tokens = (a.total_mib << 20) // token_bytes
    total_bytes = total_tokens * token_bytes
    chunk_tokens = [max(1, int(c * (1 << 20)) // token_bytes) for c in a.chunks_mib]

    rows = []
    base = bench_copy(lay, total_tokens, a.runs)
    for name, times in base.items():
        rows.append({"method": name, "chunk_mib": None, "runs_s": times, "median_s": _median(times),
                     "cpu_s": _median(times)})
    for backend in a.backends:
        for ct, (times, cpus) in bench_backend(backend, lay, total_tokens, chunk_tokens, a.runs).items():
            rows.append({"method": backend, "chunk_mib": ct * token_bytes / (1 << 20), "runs_s": times,
                         "median_s": _median(times), "cpu_s": _median(cpus)})
    for r in rows:
        r["gib_per_s"] = total_bytes / r["median_s"] / (1 << 30)
        r["cpu_s_per_gib"] = r["cpu_s"] / (total_bytes / (1 << 30))

    print(f"KV transfer, {total_bytes / (1 << 20):.0f} MiB ({L} layers x {total_tokens} tokens, "
          f"{lay.dtype}, {lay.num_kv_heads}x{lay.head_dim}), median of {a.runs}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'method':<15}{'chunk MiB':>10}{'median ms':>12}{'GiB/s':>9}{'CPU s/GiB':>11}")
    for r in rows:
        chunk = f"{r['chunk_mib']:.0f}" if r["chunk_mib"] else "-"
        print(f"{r['method']:<15}{chunk:>10}{r['median_s'] * 1e3:>12.1f}{r['gib_per_s']:>9.2f}"
              f"{r['cpu_s_per_gib']:>11.2f}")

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "benchmark": "kv_transfer",
        "setup": {"total_bytes": total_bytes, "layers": L, "tokens": total_tokens, "layout": lay.to_dict(),
                  "runs": a.runs, "cpus": os.cpu_count(), "machine": platform.machine(),
                  "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                  "torch": torch.__version__, "nixl": version("nixl-cu12") or version("nixl"),
                  "note": "sender and receiver in separate processes on loopback; all chunks posted, "
                          "clock stops when every handle is DONE (receiver wrote and acked)"},
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
