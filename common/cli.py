"""`mnemosyne` command line: `generate` (one request through the in-process engine) and `demo`.

Flags are generated from the config dataclasses (SamplingParams, SchedulerConfig, CacheConfig,
EngineConfig), so their names, types and defaults never drift from the config. Arguments are grouped
(model, prompt, sampling, scheduling, parallel, serving, output); `build_parser()` returns the groups'
parser so later subsystems add their flags to the group they belong to, and `run_generate(args)`
turns parsed arguments into configs.

Errors: a bad argument or a failure the user can fix (missing file, malformed token list, prompt too
long, bad sampling value) prints ONE line `mnemosyne: error: ...` on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
import typing
from pathlib import Path
from typing import Any, Sequence

from common.config import (DTYPES, SCHED_CHUNKINGS, SCHED_POLICIES, CacheConfig, EngineConfig, ParallelConfig,
                           SchedulerConfig)
from common.errors import InvalidRequestError, MnemosyneError
from common.sampling_params import SamplingParams

PROG = "mnemosyne"
EXIT_USAGE = 2
ATTENTION_BACKENDS = ("auto", "reference", "cpu_flash", "cuda")   # common.attention.registry.BACKENDS

log = logging.getLogger(PROG)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        fail(message)


def fail(message: str) -> typing.NoReturn:
    first = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    sys.stderr.write(f"{PROG}: error: {first}\n")
    sys.exit(EXIT_USAGE)


# ---- flags generated from config dataclasses --------------------------------------------------------
def _flag_type(cls: type, name: str) -> type:
    """The scalar type of a dataclass field: `int | None` -> int."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_flags(group: argparse._ArgumentGroup, cls: type, helps: dict[str, str], dest_prefix: str,
                     **extra: dict[str, Any]) -> None:
    """Adds `--field-name` for each field of dataclass `cls` named in `helps` (in that order).

    dest = dest_prefix + field name, default = the dataclass default, type from its annotation.
    `extra[field]` overrides argparse keywords (choices, metavar, ...).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, text in helps.items():
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = _flag_type(cls, name)
        kw: dict[str, Any] = dict(dest=dest_prefix + name, default=default,
                                  help=f"{text} (default: {default})")
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
        kw.update(extra.get(name, {}))
        group.add_argument("--" + name.replace("_", "-"), **kw)


def config_from_args(cls: type, args: argparse.Namespace, dest_prefix: str, **fixed: Any) -> Any:
    """Builds dataclass `cls` from the flags add_config_flags made (plus `fixed` values)."""
    values = dict(fixed)
    for f in dataclasses.fields(cls):
        dest = dest_prefix + f.name
        if hasattr(args, dest) and f.name not in values:
            values[f.name] = getattr(args, dest)
    return cls(**values)


def add_model_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR|FILE", default=None,
                   help="Hugging Face checkpoint directory or .gguf file (default: the built-in "
                        "SmolLM2-135M-Instruct)")
    add_config_flags(g, EngineConfig, {
        "dtype": "weights, activations and KV cache type",
        "max_model_len": "longest sequence (prompt + output) allowed; may exceed the trained context",
        "attention_backend": "attention kernels",
        "device": "torch device",
    }, dest_prefix="engine_", dtype=dict(choices=DTYPES), attention_backend=dict(choices=ATTENTION_BACKENDS),
        max_model_len=dict(metavar="N"))
    return g


def add_scheduling_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("scheduling")
    add_config_flags(g, SchedulerConfig, {
        "chunk_size": "prefill chunk size in tokens (fixed chunking)",
        "policy": "order in which prefills get an iteration (lars: least slack per unit of work first)",
        "chunking": "fixed: --chunk-size tokens; adaptive: the largest chunk whose predicted iteration "
                    "time fits the budget (needs a performance model: the saved profile, else the "
                    "analytic roofline)",
        "iteration_budget_s": "seconds one iteration may take (adaptive chunking; unset: 0.8 x the TBT SLO)",
        "slack_stealing": "lars: a request that would miss its deadline moves ahead of requests that keep "
                          "theirs (--no-slack-stealing: the paper's rho order alone)",
    }, dest_prefix="sched_", chunk_size=dict(metavar="N"), policy=dict(choices=SCHED_POLICIES),
        chunking=dict(choices=SCHED_CHUNKINGS), iteration_budget_s=dict(metavar="S"))
    add_config_flags(g, CacheConfig, {"block_size": "KV cache block size in tokens"},
                     dest_prefix="cache_", block_size=dict(metavar="N"))
    return g


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int | None = None) -> argparse._ArgumentGroup:
    g = p.add_argument_group("sampling")
    add_config_flags(g, SamplingParams, {
        "max_tokens": "tokens to generate at most",
        "temperature": "0 = greedy",
        "top_p": "nucleus sampling mass",
        "top_k": "keep the k most likely tokens (0 = off)",
        "seed": "sampling seed",
        "ignore_eos": "keep generating past end-of-sequence tokens",
    }, dest_prefix="sp_", max_tokens=dict(metavar="N", **({"default": max_tokens} if max_tokens else {})))
    return g


def add_parallel_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("parallel", "worker layout (tensor, sequence-pipeline, KV-cache parallelism); "
                                         "tp*spp*kvp > 1 starts a grid of worker processes")
    add_config_flags(g, ParallelConfig, {
        "tp": "tensor-parallel ranks (split heads and MLP columns)",
        "spp": "sequence-pipeline stages (split layers; chunks of one prompt overlap)",
        "kvp": "KV-cache-parallel groups (split the context by token ranges)",
        "kvp_tokens": "tokens each KVP group holds (needed when --kvp > 1)",
    }, dest_prefix="par_", tp=dict(metavar="T"), spp=dict(metavar="S"), kvp=dict(metavar="K"),
        kvp_tokens=dict(metavar="M"))
    g.add_argument("--master-addr", default="127.0.0.1", help="rendezvous address (default: 127.0.0.1)")
    g.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    g.add_argument("--control-port", type=int, default=None,
                   help="driver control port for remote workers (default: a free one)")
    g.add_argument("--remote-workers", action="store_true",
                   help="do not start workers here: wait for `mnemosyne worker --driver HOST:PORT --rank R`")
    return g


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Mnemosyne: exact long-context LLM serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,demo,worker}")

    gen = sub.add_parser("generate", help="run one prompt through the in-process engine",
                         description="Run one prompt through the in-process engine.")
    add_model_args(gen)
    prompt = gen.add_argument_group("prompt")
    src = prompt.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text")
    src.add_argument("--prompt-file", metavar="F", help="file holding the prompt text (UTF-8)")
    src.add_argument("--prompt-tokens", metavar="F", help="file holding a JSON list of token ids")
    prompt.add_argument("--chat", action="store_true",
                        help="wrap the text prompt as a user message in the model's chat template")
    add_sampling_args(gen)
    add_scheduling_args(gen)
    # Multi-worker layouts (--tp --spp --kvp --kvp-tokens) and remote serving (--server ADDR) add
    # their flags to these groups; run_generate reads them through getattr(args, ..., default).
    add_parallel_args(gen)
    serving = gen.add_argument_group("serving", "send the request to a running Mnemosyne router instead")
    serving.add_argument("--server", metavar="HOST:PORT", default=None,
                         help="a Mnemosyne router (e.g. 127.0.0.1:50051, started by `make up`); the model, "
                              "scheduling and parallel flags are then the server's business")
    out = gen.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help='print one JSON object {"token_ids", "text", "logprobs", "ttft_s", "tbt_s"}')
    gen.set_defaults(func=run_generate)

    demo = sub.add_parser("demo", help="long-prompt demo with the built-in model (what `make up` runs)",
                          description="Answer a question about a long generated document; print the "
                                      "answer, TTFT, TBT and throughput.")
    add_model_args(demo)
    demo.add_argument("--doc-tokens", type=int, default=3000, metavar="N",
                      help="approximate document length in tokens (default: 3000)")
    add_sampling_args(demo, max_tokens=48)
    add_scheduling_args(demo)
    demo.set_defaults(func=run_demo)

    worker = sub.add_parser("worker", help="one rank of a grid whose driver runs on another machine",
                            description="Join a grid: fetch the configuration from the driver, load this "
                                        "rank's slice of the model and serve steps until the driver stops.")
    worker.add_argument("--driver", required=True, metavar="HOST:PORT", help="the driver's control address")
    worker.add_argument("--rank", required=True, type=int, help="this worker's rank, 1 .. tp*spp*kvp")
    worker.add_argument("--threads", type=int, default=None, help="torch threads (default: half the cores)")
    worker.set_defaults(func=run_worker)
    return parser


# ---- generate ---------------------------------------------------------------------------------------
def read_prompt_tokens(path: str) -> list[int]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidRequestError(f"cannot read --prompt-tokens file {path!r}: {e.strerror or e}") from e
    except ValueError as e:
        raise InvalidRequestError(f"--prompt-tokens file {path!r} is not valid JSON: {e}") from e
    if not isinstance(data, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in data):
        raise InvalidRequestError(f"--prompt-tokens file {path!r} must hold a JSON list of integer token ids")
    return data


def read_prompt_text(args: argparse.Namespace) -> str | None:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or e
            raise InvalidRequestError(f"cannot read --prompt-file {args.prompt_file!r}: {reason}") from e
    return None


def check_args(args: argparse.Namespace) -> None:
    """Rejects bad values before anything slow (loading the model) happens."""
    if getattr(args, "chat", False) and getattr(args, "prompt_tokens", None) is not None:
        raise InvalidRequestError("--chat applies to a text prompt, not to --prompt-tokens")
    for flag in ("sched_chunk_size", "cache_block_size"):
        if getattr(args, flag) <= 0:
            raise InvalidRequestError(f"--{flag.split('_', 1)[1].replace('_', '-')} must be positive, "
                                      f"got {getattr(args, flag)}")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return config_from_args(SamplingParams, args, "sp_")


def open_session(args: argparse.Namespace, load_tokenizer_required: bool = True) -> tuple[Any, Any, int]:
    """Loads the checkpoint config and tokenizer, not yet the weights: (checkpoint, tokenizer, max_len).

    Without a tokenizer (allowed only when the prompt is given as token ids) tokenizer is None.
    """
    from common.model.loader import load_checkpoint
    from common.model.tokenizer import load_tokenizer
    checkpoint = load_checkpoint(args.model, max_model_len=args.engine_max_model_len)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(args.model, checkpoint.config)
    except MnemosyneError:
        if load_tokenizer_required:
            raise
        log.warning("no tokenizer for %s: printing token ids only", checkpoint.source)
    return checkpoint, tokenizer, checkpoint.config.max_position


def build_engine(args: argparse.Namespace, checkpoint: Any, tokenizer: Any, kv_tokens: int) -> Any:
    """The engine, its KV cache sized for `kv_tokens` tokens (the request at hand): in-process for a
    1x1x1 layout, else a grid of worker processes (local, or remote with --remote-workers)."""
    from common.engine.engine import LLMEngine
    cache = config_from_args(CacheConfig, args, "cache_", max_kv_tokens=kv_tokens + args.cache_block_size)
    sched = config_from_args(SchedulerConfig, args, "sched_")
    par = config_from_args(ParallelConfig, args, "par_") if hasattr(args, "par_tp") else ParallelConfig()
    cfg = config_from_args(EngineConfig, args, "engine_", model=args.model, cache=cache, scheduler=sched,
                           parallel=par)
    eos = tokenizer.eos_token_ids if tokenizer is not None else ()
    if par.world_size == 1:
        return LLMEngine(cfg, checkpoint, extra_eos_ids=eos)
    from common.parallel.driver import ParallelEngine
    return ParallelEngine(cfg, master_addr=args.master_addr, master_port=args.master_port,
                          control_port=args.control_port, spawn_workers=not args.remote_workers,
                          extra_eos_ids=eos, threads_per_worker=max(1, (os.cpu_count() or 1) // par.world_size))


@dataclasses.dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    ttft_s: float
    tbt_s: list[float]
    finish_reason: str


def stream_one(engine: Any, prompt_ids: list[int], params: SamplingParams, on_token=None) -> Generation:
    """Runs one request step by step; `on_token(token_id)` is called as each token is sampled.

    TTFT is measured from the request's arrival (add_request) to its first sampled token.
    """
    t0 = time.monotonic()
    rid = engine.add_request(prompt_ids, params)
    gen = Generation([], [], 0.0, [], "")
    last = t0
    while engine.has_unfinished():
        outs = engine.step()
        if not outs:
            engine.abort(rid)
            raise MnemosyneError("the request cannot make progress (KV cache too small)")
        for o in outs:
            if o.token_id is None:
                continue
            now = time.monotonic()
            if gen.token_ids:
                gen.tbt_s.append(now - last)
            else:
                gen.ttft_s = now - t0
            last = now
            gen.token_ids.append(o.token_id)
            gen.logprobs.append(o.logprob)
            if on_token is not None:
                on_token(o.token_id)
            if o.finish_reason is not None:
                gen.finish_reason = o.finish_reason.value
    return gen


def timing_line(prompt_len: int, g: Generation) -> str:
    n = len(g.token_ids)
    parts = [f"{prompt_len} prompt tokens, {n} generated ({g.finish_reason})", f"TTFT {g.ttft_s:.3f} s"]
    if g.tbt_s:
        tbt = sorted(g.tbt_s)
        p90 = tbt[min(len(tbt) - 1, int(0.9 * len(tbt)))]
        parts.append(f"TBT median {1e3 * statistics.median(tbt):.1f} ms, p90 {1e3 * p90:.1f} ms")
        parts.append(f"decode {len(tbt) / sum(tbt):.1f} tokens/s")
    parts.append(f"prefill {prompt_len / g.ttft_s:.0f} tokens/s" if g.ttft_s > 0 else "")
    return "[" + "; ".join(p for p in parts if p) + "]"


def run_generate(args: argparse.Namespace) -> int:
    check_args(args)
    params = sampling_from_args(args)
    if getattr(args, "server", None):
        return run_remote(args, params)
    text = read_prompt_text(args)
    token_file = args.prompt_tokens
    prompt_ids = read_prompt_tokens(token_file) if token_file is not None else None
    checkpoint, tokenizer, max_len = open_session(args, load_tokenizer_required=prompt_ids is None)
    if prompt_ids is None:
        if args.chat:
            prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        else:
            prompt_ids = tokenizer.encode(text)
    from common.engine.engine import validate_prompt
    validate_prompt(prompt_ids, checkpoint.config.vocab_size, max_len, params.max_tokens)
    engine = build_engine(args, checkpoint, tokenizer, min(len(prompt_ids) + params.max_tokens, max_len))

    stream = tokenizer is not None and not args.json
    decoder = None
    if stream:
        from common.model.tokenizer import IncrementalDecoder
        decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)

    def show(token_id: int) -> None:
        sys.stdout.write(decoder.push(token_id))
        sys.stdout.flush()

    try:
        g = stream_one(engine, prompt_ids, params, on_token=show if stream else None)
    finally:
        if hasattr(engine, "shutdown"):
            engine.shutdown()
    text_out = tokenizer.decode(g.token_ids, skip_special_tokens=True) if tokenizer is not None else ""
    if args.json:
        print(json.dumps({"token_ids": g.token_ids, "text": text_out, "logprobs": g.logprobs,
                          "ttft_s": g.ttft_s, "tbt_s": g.tbt_s}))
    else:
        if stream:
            sys.stdout.write(decoder.flush() + "\n")
        else:
            print(" ".join(map(str, g.token_ids)))
        sys.stdout.flush()
        print(timing_line(len(prompt_ids), g), file=sys.stderr)
    return 0


def run_remote(args: argparse.Namespace, params: SamplingParams) -> int:
    """`generate --server ADDR`: the same request and output, served by a router (common/client.py)."""
    from common.client import RouterClient
    if params.ignore_eos:
        raise InvalidRequestError("--ignore-eos is not supported with --server (the API has no such option)")
    text = read_prompt_text(args)
    token_ids = read_prompt_tokens(args.prompt_tokens) if args.prompt_tokens is not None else None

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    with RouterClient(args.server) as client:
        c = client.complete(on_text=None if args.json else show, text=text, token_ids=token_ids, chat=args.chat,
                            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                            top_k=params.top_k, seed=params.seed, logprobs=True)
    if args.json:
        print(json.dumps({"token_ids": c.token_ids, "text": c.text, "logprobs": c.logprobs,
                          "ttft_s": c.ttft_s, "tbt_s": c.tbt_s}))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        g = Generation(c.token_ids, c.logprobs, c.ttft_s, c.tbt_s, c.finish_reason)
        print(timing_line(c.prompt_tokens, g) + f" [{c.route} via {args.server}]", file=sys.stderr)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from common.parallel.worker import main as worker_main
    argv = ["--driver", args.driver, "--rank", str(args.rank)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return worker_main(argv)


def run_demo(args: argparse.Namespace) -> int:
    from common.engine.demo import run
    return run(args)


# ---- entry point --------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except (MnemosyneError, ValueError, OSError) as e:
        fail(str(e) or type(e).__name__)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
