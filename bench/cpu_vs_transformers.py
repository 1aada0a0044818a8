"""Our CPU engine against Hugging Face transformers on the built-in model, in one run.

Both run SmolLM2-135M-Instruct from the same GGUF file (transformers dequantizes it itself) on the same
prompt tokens, at contexts of 1K, 4K and 8K tokens (prompt + output = the context, within the model's
8192), in float32 and bfloat16, with 2 torch threads. Per point:
  prefill   seconds from submitting the prompt to its first output token (ours: LLMEngine.step()
            until the request emits a token, chunked by --chunk; transformers: one forward of the
            prompt with use_cache, logits of the last row);
  decode    milliseconds per output token, median of the --decode-tokens - 1 steps after the first
            (ours: one engine step; transformers: one forward of one token over its DynamicCache).
The two are measured alternately (ours first in even rounds, transformers first in odd ones), --rounds
rounds; the table gives the medians over rounds and each round's 1-minute load average (the machine is
shared). Greedy tokens of the two are compared (float32 must agree; bfloat16 may diverge).

Floors, measured in the same run (the best of each round's measurement: a floor must not be loosened
by someone else's load):
  read    a plain streaming read of the weights' bytes (torch.sum over a float32 view of a buffer of
          exactly the bytes a decode step streams: the linear layers and the LM head in that dtype);
          decode floor = (weight bytes + KV bytes of the context) / that rate;
  matmul  dense matmul rate per dtype at the model's prefill shape, the fastest product measured: torch's
          GEMM and the engine's own (cpu_kernels.gemm, AVX2 builds); prefill floor = FLOPs / that rate
          (FLOPs as in bench/engine.py: linears + causal attention). bfloat16 on a CPU without
          bfloat16 instructions: the best of torch's bfloat16 GEMM, a float32 GEMM of the widened
          operands and the engine's GEMM on bfloat16 weights (what the engine runs there,
          cpu_kernels.bf16_widened).
Beside the ratios to those floors, ours against each round's own floors (the machine's speed moves
between rounds, and the best floor is one moment's), median over rounds (`ours_x_round_floor`), and
against the floors measured next to each of our runs: both floors measured just before and just after
it, the faster of the two kept (`ours_x_adjacent_floor`; a round's floors are measured at its start,
minutes before its last runs where transformers' bfloat16 prefills take minutes). Those measurements
count toward the run's best floors too. Beside them, a sustained matmul rate (the fastest product at
the floor's shape run back to back for SUSTAIN_S seconds, all its FLOPs over all its time), measured
at the same two moments: every floor above is a best single call of tens of milliseconds, and a
prefill of seconds runs at what the machine sustains (`prefill_sustained`).

Writes bench/results/cpu_vs_transformers.{json,md}.

--layout-ab compares our engine with itself instead: the float32/bfloat16 weights in the checkpoint's
[out, in] storage against the transposed [in, out] one (LlamaModel.pack_weights(transposed=...)), the
two engines alternating the same way; writes bench/results/cpu_layout_ab.{json,md} (--name: another stem).

Run: PYTHONPATH=. python -m bench.cpu_vs_transformers [--quick] [--rounds 3] [--contexts 1024,4096,8192]
     PYTHONPATH=. python -m bench.cpu_vs_transformers --layout-ab --contexts 1024,4096 [--dtypes float32]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench import roofline
from bench.engine import decode_bytes, prefill_flops
from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.model import cpu_kernels
from common.model.builtin import builtin_model_path
from common.model.loader import load_checkpoint
from common.sampling_params import SamplingParams

log = logging.getLogger("bench.cpu_vs_transformers")
RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def read_gbs(nbytes: int, reps: int = 5) -> float:
    """GB/s of a plain streaming read of `nbytes` (torch.sum over a float32 view), best of `reps`."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    buf.sum()
    for _ in range(reps):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def matmul_rates(dtype: torch.dtype, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of the model's own prefill shape (a 2048-token chunk through an MLP projection), best of
    `reps`, per product this machine has: torch's GEMM (best of both weight layouts) and the engine's
    own (cpu_kernels.gemm, AVX2 builds). bench/roofline.py's first shape (its 2048^3 one takes minutes in
    bfloat16 on AVX2)."""
    m, k, n = roofline.MATMUL_SHAPES[0]
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    bt = b.t().contiguous()          # the weight's [out, in] layout: bf16 on AVX2 is much faster with it
    best = min(roofline._best_time(lambda: torch.mm(a, b), reps), roofline._best_time(lambda: torch.mm(a, bt.t()), reps))
    if dtype == torch.bfloat16 and cpu_kernels.bf16_widened():
        # a CPU without bfloat16 instructions: the fastest bfloat16 product here is a float32 one of
        # the widened operands (cpu_kernels.bf16_widened), so that is the floor's rate (the widening
        # itself not counted)
        af, bf = a.float(), bt.float()
        best = min(best, roofline._best_time(lambda: torch.mm(af, bf.t()), reps))
    rates = {"torch": 2 * m * k * n / best / 1e9}
    if cpu_kernels.gemm_applies(a, bt):
        lib = cpu_kernels.library()
        af = a.float()
        rates["engine_gemm"] = 2 * m * k * n / roofline._best_time(lambda: cpu_kernels.gemm(lib, af, bt), reps) / 1e9
    return rates


SUSTAIN_S = 2.0        # seconds of back-to-back products in a sustained matmul measurement


def sustained_matmul_gflops(dtype: torch.dtype, seconds: float = SUSTAIN_S) -> float:
    """GFLOP/s of the fastest product (the engine's GEMM where it applies, else torch's) at the floor's
    shape, run back to back for `seconds`: all its FLOPs over all its time, what the machine keeps up
    for as long as that (the best-of-5 floor is the fastest single call, tens of milliseconds)."""
    m, k, n = roofline.MATMUL_SHAPES[0]
    a, bt = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    if cpu_kernels.gemm_applies(a, bt):
        lib, af = cpu_kernels.library(), a.float()
        call = lambda: cpu_kernels.gemm(lib, af, bt)          # noqa: E731
    elif dtype == torch.bfloat16 and cpu_kernels.bf16_widened():
        af, bf = a.float(), bt.float()
        call = lambda: torch.mm(af, bf.t())                   # noqa: E731
    else:
        call = lambda: torch.mm(a, bt.t())                    # noqa: E731
    call()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call()
        calls += 1
    return calls * 2 * m * k * n / (time.perf_counter() - t0) / 1e9


def adjacent_floors(mc, dtype: str, floors: dict) -> dict[str, float]:
    """The read and matmul floors measured now (next to one of our runs), and the sustained matmul
    rate; the run's best floors take the first two in too."""
    read = read_gbs(weight_bytes(mc, dtype))
    matmul = max(matmul_rates(DTYPES[dtype]).values())
    floors["read_gbs"][dtype] = max(floors["read_gbs"][dtype], read)
    floors["matmul_gflops"][dtype] = max(floors["matmul_gflops"][dtype], matmul)
    return {"read_gbs": read, "matmul_gflops": matmul,
            "matmul_sustained_gflops": sustained_matmul_gflops(DTYPES[dtype])}


def weight_bytes(mc, dtype: str) -> int:
    return int(decode_bytes(mc, 0, dtype))


def prompt_tokens(n: int) -> list[int]:
    """A deterministic prompt of ordinary vocabulary ids (the cost does not depend on the text)."""
    return [100 + (i * 7919) % 30000 for i in range(n)]


# ---- the two sides ----------------------------------------------------------------------------------
class Ours:
    def __init__(self, checkpoint, dtype: str, max_len: int, chunk: int, transposed: bool | None = None) -> None:
        """`transposed`: the weight layout to force (LlamaModel.pack_weights); None keeps the default."""
        # No prefix caching: every round prefills the same prompt again (a warm round would reuse it).
        cfg = EngineConfig(dtype=dtype, max_model_len=max_len,
                           cache=CacheConfig(max_kv_tokens=max_len + 64, prefix_caching=False),
                           scheduler=SchedulerConfig(chunk_size=chunk, max_batch_tokens=max(chunk, 8192)))
        self.engine = LLMEngine(cfg, checkpoint)
        if transposed is not None:
            self.engine.executor.model.pack_weights(transposed)
        self.engine.generate([prompt_tokens(64)], SamplingParams(max_tokens=2, ignore_eos=True))   # warm-up

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, list[float], list[int]]:
        """(prefill s, decode step s, greedy tokens)."""
        eng = self.engine
        t0 = time.perf_counter()
        rid = eng.add_request(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
        prefill, steps, tokens = None, [], []
        while eng.has_unfinished():
            t = time.perf_counter()
            outs = eng.step()
            now = time.perf_counter()
            for o in outs:
                if o.request_id == rid and o.token_id is not None:
                    tokens.append(o.token_id)
                    if prefill is None:
                        prefill = now - t0
                    else:
                        steps.append(now - t)
        return prefill, steps, tokens


class Transformers:
    def __init__(self, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM
        path = Path(builtin_model_path())
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
        self.run(prompt_tokens(64), 2)                                                            # warm-up

    @torch.inference_mode()
    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, list[float], list[int]]:
        m = self.model
        t0 = time.perf_counter()
        out = m(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        tok = int(out.logits[0, -1].argmax())
        prefill = time.perf_counter() - t0
        cache, tokens, steps = out.cache, [tok], []        # transformers >= 5.2x: `cache`, not past_key_values
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            out = m(torch.tensor([[tok]]), cache=cache, use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            steps.append(time.perf_counter() - t)
            cache = out.cache
            tokens.append(tok)
        return prefill, steps, tokens


# ---- the run ----------------------------------------------------------------------------------------
LAYOUT_SIDES = ("ours [out,in]", "ours [in,out]")


def make_sides(checkpoint, dtype: str, max_len: int, chunk: int, layout_ab: bool) -> list[tuple[str, object]]:
    """The two sides of a run: ours and transformers, or (layout_ab) ours with each weight layout."""
    if layout_ab:
        return [(LAYOUT_SIDES[0], Ours(checkpoint, dtype, max_len, chunk, transposed=False)),
                (LAYOUT_SIDES[1], Ours(checkpoint, dtype, max_len, chunk, transposed=True))]
    return [("ours", Ours(checkpoint, dtype, max_len, chunk)), ("transformers", Transformers(DTYPES[dtype]))]


def run(contexts: list[int], dtypes: list[str], rounds: int, new_tokens: int, chunk: int,
        layout_ab: bool = False, on_round=None) -> dict:
    """Measures every point; `on_round(report)` is called after each round with the results so far
    (a shared machine may make a run too long to finish)."""
    load_before = list(os.getloadavg())
    checkpoint = load_checkpoint(None)
    mc = checkpoint.config
    samples: dict = {}
    floors = {"read_gbs": {d: 0.0 for d in dtypes}, "matmul_gflops": {d: 0.0 for d in dtypes},
              "read_gbs_rounds": {d: [] for d in dtypes}, "matmul_gflops_by_product": {}}
    rounds_load: list[list[float]] = []
    names = list(LAYOUT_SIDES) if layout_ab else ["ours", "transformers"]

    def report() -> dict:
        """The run so far: the points measured, medians over the rounds done."""
        rows = []
        for d in dtypes:
            for L in contexts:
                if (d, L, names[0]) not in samples or (d, L, names[1]) not in samples:
                    continue
                row = {"dtype": d, "context": L, "prompt_tokens": L - new_tokens}
                for name in names:
                    s = samples[(d, L, name)]
                    row[name] = {"prefill_s": statistics.median(x["prefill_s"] for x in s),
                                 "decode_ms": statistics.median(x["decode_ms"] for x in s),
                                 "prefill_s_rounds": [x["prefill_s"] for x in s],
                                 "decode_ms_rounds": [x["decode_ms"] for x in s],
                                 "loadavg_rounds": [x["loadavg"] for x in s],
                                 **({"adjacent_floor_rounds": [x["adjacent_floor"] for x in s]}
                                    if all("adjacent_floor" in x for x in s) else {})}
                row["same_greedy_tokens"] = all(a["tokens"] == b["tokens"] for a, b in
                                                zip(samples[(d, L, names[0])], samples[(d, L, names[1])]))
                if not layout_ab:
                    row["prefill_floor_s"] = prefill_flops(mc, L) / (floors["matmul_gflops"][d] * 1e9)
                    row["decode_floor_ms"] = 1e3 * decode_bytes(mc, L, d) / (floors["read_gbs"][d] * 1e9)
                    # against the floors measured in the same round (the machine's speed moves between
                    # rounds: the run's best floor is one moment's), median over rounds
                    o = row[names[0]]
                    matmul = [max(v[i] for v in floors["matmul_gflops_by_product"][d].values())
                              for i in range(len(o["prefill_s_rounds"]))]
                    row["ours_x_adjacent_floor"] = {
                        "prefill": statistics.median(x["prefill_s"] * x["adjacent_floor"]["matmul_gflops"] * 1e9
                                                     / prefill_flops(mc, L) for x in samples[(d, L, names[0])]),
                        "prefill_sustained": statistics.median(
                            x["prefill_s"] * x["adjacent_floor"]["matmul_sustained_gflops"] * 1e9
                            / prefill_flops(mc, L) for x in samples[(d, L, names[0])]),
                        "decode": statistics.median(x["decode_ms"] * x["adjacent_floor"]["read_gbs"] * 1e9
                                                    / (1e3 * decode_bytes(mc, L, d)) for x in samples[(d, L, names[0])])}
                    row["ours_x_round_floor"] = {
                        "prefill": statistics.median(p * m * 1e9 / prefill_flops(mc, L)
                                                     for p, m in zip(o["prefill_s_rounds"], matmul)),
                        "decode": statistics.median(ms * rd * 1e9 / (1e3 * decode_bytes(mc, L, d)) for ms, rd
                                                    in zip(o["decode_ms_rounds"], floors["read_gbs_rounds"][d]))}
                rows.append(row)
        return {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "cpu_kernels": cpu_kernels.status(), "bf16_widened": cpu_kernels.bf16_widened()},
                "config": {"contexts": contexts, "dtypes": dtypes, "rounds": rounds, "decode_tokens": new_tokens,
                           "chunk": chunk, "layout_ab": layout_ab, "sides": names,
                           "rounds_done": len(rounds_load)},
                "floors": floors, "loadavg_before": load_before, "loadavg_after": list(os.getloadavg()),
                "loadavg_after_rounds": rounds_load, "rows": rows}

    for d in dtypes:
        pair = make_sides(checkpoint, d, max(contexts) + 8, chunk, layout_ab)
        for r in range(rounds):
            if not layout_ab:                    # the A/B compares two sides of ours: no floors needed
                rate = read_gbs(weight_bytes(mc, d))
                floors["read_gbs_rounds"][d].append(rate)
                floors["read_gbs"][d] = max(floors["read_gbs"][d], rate)
                rates = matmul_rates(DTYPES[d])
                for src, rate in rates.items():
                    floors["matmul_gflops_by_product"].setdefault(d, {}).setdefault(src, []).append(rate)
                floors["matmul_gflops"][d] = max(floors["matmul_gflops"][d], *rates.values())
            for L in contexts:
                prompt = prompt_tokens(L - new_tokens)
                sides = list(pair)
                if r % 2:
                    sides.reverse()
                for name, side in sides:
                    adjacent = not layout_ab and name == names[0]
                    if adjacent:                 # ours: floors measured just before and just after it too
                        before = adjacent_floors(mc, d, floors)
                    load = os.getloadavg()[0]
                    pre, steps, toks = side.run(prompt, new_tokens)
                    log.info("%s %s L=%d round %d: prefill %.2f s, decode %.1f ms/token (load %.1f)", d, name,
                             L, r + 1, pre, 1e3 * statistics.median(steps), load)
                    sample = {"prefill_s": pre, "decode_ms": 1e3 * statistics.median(steps), "loadavg": load,
                              "tokens": toks}
                    if adjacent:                 # the faster of the two moments: the stricter floor
                        after = adjacent_floors(mc, d, floors)
                        sample["adjacent_floor"] = {k: max(before[k], after[k]) for k in before}
                    samples.setdefault((d, L, name), []).append(sample)
            rounds_load.append(list(os.getloadavg()))
            if on_round is not None:
                on_round(report())
        del pair
    return report()


def markdown(report: dict) -> str:
    c, f = report["config"], report["floors"]
    lines = [
        "# Mnemosyne's CPU engine vs Hugging Face transformers (built-in SmolLM2-135M, same GGUF)",
        "",
        f"{report['machine']['platform']}, torch {report['machine']['torch']} "
        f"({report['machine']['cpu_capability']}), {report['machine']['threads']} threads; our CPU kernels "
        f"(common/model/cpu_kernels.py): {report['machine'].get('cpu_kernels', 'not recorded')}"
        + ("; bfloat16 products widened to float32 (no bfloat16 instructions on this CPU). "
           if report['machine'].get('bf16_widened') else ". ") +
        f"{c['rounds']} rounds alternating the two; medians over rounds. Prompt = context - "
        f"{c['decode_tokens']} tokens; decode = median ms per token of the {c['decode_tokens'] - 1} steps after "
        f"the first token; our prefill in chunks of {c['chunk']}.",
        "",
        "Floors measured in this run (best over rounds): plain streaming read of the weights' bytes "
        + ", ".join(f"{d} {f['read_gbs'][d]:.1f} GB/s (rounds: "
                    + " / ".join(f"{x:.1f}" for x in f['read_gbs_rounds'][d]) + ")" for d in c["dtypes"])
        + "; matmul " + ", ".join(f"{d} {f['matmul_gflops'][d]:.0f} GFLOP/s" for d in c["dtypes"])
        + (" (best per product: " + "; ".join(
            f"{d} " + ", ".join(f"{src} {max(v):.0f}" for src, v in f["matmul_gflops_by_product"][d].items())
            for d in c["dtypes"] if d in f.get("matmul_gflops_by_product", {})) + ")"
           if f.get("matmul_gflops_by_product") else "")
        + ". Decode floor = (weights + KV bytes) / read rate; prefill floor = FLOPs / matmul rate. "
        "x round floors: each round's time against the floors measured at the start of that round; x adjacent "
        "floors: each of our runs against the floors measured just before and just after it (the faster of the "
        "two), median over rounds. The floor measurements are best-of-5 calls of a few tens of milliseconds; the "
        f"runs they are set against last seconds to minutes: (sustained) sets our prefill against the fastest "
        f"product run back to back for {SUSTAIN_S:.0f} s next to it instead (all its FLOPs over all its time).",
        "",
        "| context, dtype | ours prefill s (x floor) | transformers prefill s | ours decode ms/token (x floor) "
        "| transformers decode ms | ours x round floors (prefill; decode) "
        "| ours x adjacent floors (prefill (sustained); decode) "
        "| same greedy tokens | load avg per round (ours; transformers) |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|---|",
    ]
    loads = [x for r in report["rows"] for side in ("ours", "transformers") for x in r[side]["loadavg_rounds"]]
    threads = report["machine"]["threads"]
    if max(loads) > threads + 0.5:       # the run's own threads hold the load average at about `threads`
        lines[2:2] = [f"**Caution:** the load average reached {max(loads):.1f} during the run, more than its own "
                      f"{threads} threads (other jobs shared the machine): times include heavy interference, and "
                      "the floors measured under that load are too low, so the x-floor ratios are not meaningful.", ""]
    for r in report["rows"]:
        o, t = r["ours"], r["transformers"]
        loads = ("/".join(f"{x:.1f}" for x in o["loadavg_rounds"]) + "; "
                 + "/".join(f"{x:.1f}" for x in t["loadavg_rounds"]))
        rf = (f"{r['ours_x_round_floor']['prefill']:.2f}x; {r['ours_x_round_floor']['decode']:.2f}x"
              if "ours_x_round_floor" in r else "-")
        a = r.get("ours_x_adjacent_floor")
        af = (f"{a['prefill']:.2f}x ({a['prefill_sustained']:.2f}x); {a['decode']:.2f}x" if a else "-")
        lines.append(
            f"| {r['context'] // 1024}K, {r['dtype']} | {o['prefill_s']:.2f} ({o['prefill_s'] / r['prefill_floor_s']:.2f}x) "
            f"| {t['prefill_s']:.2f} | {o['decode_ms']:.1f} ({o['decode_ms'] / r['decode_floor_ms']:.2f}x) "
            f"| {t['decode_ms']:.1f} | {rf} | {af} | {'yes' if r['same_greedy_tokens'] else 'no'} | {loads} |")
    return "\n".join(lines) + "\n"


def markdown_ab(report: dict) -> str:
    """The --layout-ab table: per point, each layout's median prefill and decode, the ratio, every round."""
    c = report["config"]
    a, b = c["sides"]
    lb, la = report["loadavg_before"], report["loadavg_after"]
    lines = [
        "# CPU weight layout A/B: [out, in] (checkpoint) vs [in, out] (transposed) storage",
        "",
        f"Built-in SmolLM2-135M, our engine only, the two layouts side by side in one process "
        f"(LlamaModel.pack_weights(transposed=False/True)), alternating (the [out,in] engine first in even "
        f"rounds), {c['rounds']} rounds per dtype planned, {c['rounds_done']} done in all (dtypes one after the other), medians over the rounds done. {report['machine']['platform']}, torch "
        f"{report['machine']['torch']} ({report['machine']['cpu_capability']}), {report['machine']['threads']} "
        f"threads. Prompt = context - {c['decode_tokens']} tokens; decode = median ms per token of the "
        f"{c['decode_tokens'] - 1} steps after the first; prefill in chunks of {c['chunk']}.",
        "",
        f"Load average (1/5/15 min) before the run {lb[0]:.1f}/{lb[1]:.1f}/{lb[2]:.1f}, after "
        f"{la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f}, on a 2-core machine shared with other agents' jobs: every "
        "time includes their interference; compare the two layouts within a round (same minutes), not with "
        "other runs.",
        "",
        f"| context, dtype | prefill s {a} | prefill s {b} | {b} / {a} | decode ms {a} | decode ms {b} "
        f"| {b} / {a} | same greedy tokens | prefill s per round ({a}; {b}) | decode ms per round ({a}; {b}) "
        "| load per round ({a}; {b}) |".replace("{a}", a).replace("{b}", b),
        "|---|---:|---:|---:|---:|---:|---:|:---:|---|---|---|",
    ]

    def rounds(x: list[float], fmt: str) -> str:
        return "/".join(format(v, fmt) for v in x)

    for r in report["rows"]:
        x, y = r[a], r[b]
        lines.append(
            f"| {r['context'] // 1024}K, {r['dtype']} | {x['prefill_s']:.2f} | {y['prefill_s']:.2f} "
            f"| {y['prefill_s'] / x['prefill_s']:.2f} | {x['decode_ms']:.1f} | {y['decode_ms']:.1f} "
            f"| {y['decode_ms'] / x['decode_ms']:.2f} | {'yes' if r['same_greedy_tokens'] else 'no'} "
            f"| {rounds(x['prefill_s_rounds'], '.2f')}; {rounds(y['prefill_s_rounds'], '.2f')} "
            f"| {rounds(x['decode_ms_rounds'], '.1f')}; {rounds(y['decode_ms_rounds'], '.1f')} "
            f"| {rounds(x['loadavg_rounds'], '.1f')}; {rounds(y['loadavg_rounds'], '.1f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="1024,4096,8192")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1K only, 1 round, 6 tokens (development)")
    p.add_argument("--layout-ab", action="store_true",
                   help="our engine with [out, in] vs [in, out] weight storage instead of ours vs transformers")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None, help="file stem of the results (default: cpu_vs_transformers, "
                   "or cpu_layout_ab with --layout-ab)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    contexts = [int(x) for x in args.contexts.split(",")]
    rounds, new_tokens = args.rounds, args.decode_tokens
    if args.quick:
        contexts, rounds, new_tokens = [1024], 1, 6
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("cpu_layout_ab" if args.layout_ab else "cpu_vs_transformers")

    def write(report: dict) -> str:
        text = markdown_ab(report) if args.layout_ab else markdown(report)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"{stem}.md").write_text(text)
        return text

    print(write(run(contexts, args.dtypes.split(","), rounds, new_tokens, args.chunk, args.layout_ab, on_round=write)))


if __name__ == "__main__":
    main()
