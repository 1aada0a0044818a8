"""`mnemosyne` command line: `generate` (one request through the in-process engine, or a running
router with --server), `serve` (the local cluster: scripts/up.py, what `make up` runs), `bench serve`
(load against a running endpoint: common/bench_serve.py), `keys new` (an API key for a router's keys
file), `make-test-model` (the long-context test checkpoint), `demo` and `worker`.

Flags are generated from the config dataclasses by common/flags.py (SamplingParams and every field
of EngineConfig: its own, CacheConfig, SchedulerConfig, ParallelConfig), so their names, types and
defaults never drift from the config; each flag also reads its MNEMOSYNE_<FLAG> environment
variable (flag > env > default). Arguments are grouped (model, prompt, sampling, scheduling,
parallel, serving, output); after parsing, `args.<dest>` holds every setting's value (dests:
engine_*, sched_*, cache_*, par_*, sp_*) and `engine_config(args)` builds the validated EngineConfig.
With --server the request goes to a router; --ttft-slo-s (serving, --server only) and --tbt-slo-s
(the scheduler's TBT SLO; sent only when given) become the request's own SLOs.

Errors: a bad argument or a failure the user can fix (missing file, malformed token list, prompt too
long, bad sampling value) prints ONE line `mnemosyne: error: ...` on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

from common import bench_serve
from common.config import EngineConfig
from common.errors import ConfigError, InvalidRequestError, MnemosyneError, UnreachableError
from common.flags import Flags, HelpFormatter
from common.sampling_params import SamplingParams

PROG = "mnemosyne"
EXIT_USAGE = 2
EXIT_UNREACHABLE = 1           # --server: no router answers at that address

log = logging.getLogger(PROG)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump), exit status 2; after
    parsing, every generated flag's dest holds its value (flag > env > default) and
    `args.given` the keys a flag or env var set. Help shows metavars by type (common.flags.HelpFormatter)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        fail(message)

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        if hasattr(ns, "config_flags") and not hasattr(ns, "given"):   # a subcommand's parser resolves
            try:
                ns.given = set().union(*(flags.resolve(ns) for flags in ns.config_flags))
            except MnemosyneError as e:
                self.error(str(e))
        return ns, rest


def fail(message: str, status: int = EXIT_USAGE) -> typing.NoReturn:
    first = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    sys.stderr.write(f"{PROG}: error: {first}\n")
    sys.exit(status)


# ---- flags generated from the config dataclasses ------------------------------------------------
ENGINE_DESTS = {"": "engine_", "cache": "cache_", "scheduler": "sched_", "parallel": "par_"}
ENGINE_HELPS = {
    "max_model_len": "longest sequence (prompt + output) allowed; may exceed the trained context",
    "max_kv_tokens": "KV capacity per KVP group, tokens (default here: what the request needs)",
    "iteration_budget_s": "seconds one iteration may take (adaptive chunking; unset: by --role)",
    "tbt_slo_s": "TBT SLO (mean gap between tokens): the engine's (decode role: budget = tbt_headroom x it); "
                 "generate --server: the request's own (unset: the deployment's)",
}


def engine_flags(parallel: bool = True) -> Flags:
    """The flags of EngineConfig: the model group (its own fields), scheduling (scheduler and
    cache), parallel (unless `parallel` is False: one process)."""
    return Flags(EngineConfig, exclude=() if parallel else ("parallel",), helps=ENGINE_HELPS,
                 dests=ENGINE_DESTS, groups={"": "model", "cache": "scheduling", "scheduler": "scheduling",
                                             "parallel": "parallel"})


def sampling_flags(max_tokens: int | None = None, top_logprobs: bool = True) -> Flags:
    """`top_logprobs`: offer --top-logprobs (generate prints them; the demo does not)."""
    return Flags(SamplingParams, exclude=("stop_token_ids",) + (() if top_logprobs else ("top_logprobs",)),
                 dest_prefix="sp_", groups={"": "sampling"},
                 defaults={"max_tokens": max_tokens} if max_tokens else None,
                 helps={"max_tokens": "tokens to generate at most", "top_p": "nucleus sampling mass",
                        "top_k": "keep the k most likely tokens (0 = off)", "seed": "sampling seed",
                        "temperature": "0 = greedy",
                        "ignore_eos": "keep generating past end-of-sequence tokens",
                        "top_logprobs": "also print the K most likely tokens and their logprobs at each "
                                        "generated position (0-20; 0 = off)"})


def add_flags(p: argparse.ArgumentParser, *flag_sets: Flags) -> None:
    """Adds the flags of each set to `p` (groups by title, made once) and has parse_args resolve them."""
    groups = {g.title: g for g in p._action_groups}
    for flags in flag_sets:
        flags.add_to(p, groups)
        groups = {g.title: g for g in p._action_groups}
    p.set_defaults(config_flags=tuple(p.get_default("config_flags") or ()) + flag_sets)


def engine_config(args: argparse.Namespace, fixed: Mapping[str, Any] | None = None) -> EngineConfig:
    """The validated EngineConfig of parsed arguments (`fixed`: values by key no flag set)."""
    return args.config_flags[0].build(args, fixed=fixed)


def config_from_args(cls: type, args: argparse.Namespace, dest_prefix: str,
                     fixed: Mapping[str, Any] | None = None) -> Any:
    """Dataclass `cls` (a flat one) from the resolved dests `dest_prefix + field` in `args`."""
    values = {f.name: getattr(args, dest_prefix + f.name) for f in dataclasses.fields(cls)
              if hasattr(args, dest_prefix + f.name)}
    values.update(fixed or {})
    return cls(**values)


def add_parallel_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The grid's rendezvous flags (the layout flags --tp --spp --kvp --kvp-tokens come with the
    engine's flags)."""
    g = next(g for g in p._action_groups if g.title == "parallel")
    g.description = ("worker layout (tensor, sequence-pipeline, KV-cache parallelism); "
                     "tp*spp*kvp > 1 starts a grid of worker processes")
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,serve,demo,worker,bench,keys,make-test-model}")

    gen = sub.add_parser("generate", help="run one prompt through the in-process engine",
                         description="Run one prompt through the in-process engine.")
    gen.add_argument_group("model")
    prompt = gen.add_argument_group("prompt")
    src = prompt.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="file holding the prompt text (UTF-8)")
    src.add_argument("--prompt-tokens", metavar="FILE", help="file holding a JSON list of token ids")
    prompt.add_argument("--chat", action="store_true",
                        help="wrap the text prompt as a user message in the model's chat template")
    gen.add_argument_group("sampling")
    gen.add_argument_group("scheduling")
    gen.add_argument_group("parallel")
    add_flags(gen, engine_flags(), sampling_flags())
    add_parallel_args(gen)
    serving = gen.add_argument_group(
        "serving", "send the request to a running Mnemosyne router instead; --tbt-slo-s (scheduling) "
                   "is then the request's own TBT SLO, sent with it when given")
    serving.add_argument("--server", metavar="HOST:PORT", default=None,
                         help="a Mnemosyne router (e.g. 127.0.0.1:50051, started by `make up`); the model, "
                              "scheduling and parallel flags are then the server's business")
    serving.add_argument("--api-key", metavar="KEY", default=None,
                         help="with --server: the API key to present (default: $MNEMOSYNE_API_KEY, else the key "
                              "`make up` generated)")
    serving.add_argument("--retries", metavar="N", type=int, default=2, choices=range(5),
                         help="with --server: send a request the router rejected for load again, up to N times, "
                              "after the wait the router asks for (its retry hint); never one it says cannot fit")
    serving.add_argument("--ttft-slo-s", metavar="S", type=float, default=None,
                         help="the request's own TTFT SLO in seconds; needs --server (default: the "
                              "deployment's, which scales the TTFT deadline with the prompt)")
    out = gen.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help='print one JSON object {"token_ids", "text", "logprobs", "ttft_s", "tbt_s"}, '
                          'with --top-logprobs also "top_logprobs": per token a list of [token_id, logprob]')
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="a long prompt's prefill progress (tokens, tokens/s, ETA) on stderr (default: when "
                          "stderr is a terminal; forced on a pipe: one line a second)")
    gen.set_defaults(func=run_generate)

    # `serve` takes scripts/up.py's flags; main() hands its arguments to up.py before parsing.
    serve = sub.add_parser("serve", add_help=False,
                           help="start the local cluster on loopback, what `make up` runs (`mnemosyne serve "
                                "--help` lists its flags)")
    serve.set_defaults(func=lambda args: run_serve([]))

    keys = sub.add_parser("keys", help="make an API key for a router's --api-keys-file",
                          description="Adds a new API key to a keys file (created 0600; only its SHA-256 is "
                                      "stored) and prints the key once, e.g. for a Kubernetes Secret.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="{new}")
    new = keys_sub.add_parser("new", help="add a new key to a keys file and print it")
    new.add_argument("--id", required=True, metavar="NAME", help="the key's name (logs, ownership, limits)")
    new.add_argument("--file", required=True, metavar="PATH", help="the keys file (JSON) to add it to")
    new.add_argument("--max-concurrent", metavar="N", type=int, default=0,
                     help="requests this key may run at once (0 = no limit)")
    new.add_argument("--tokens-per-minute", metavar="N", type=int, default=0,
                     help="prompt + max_tokens this key may send per minute (0 = no limit)")
    new.set_defaults(func=run_keys_new)

    demo = sub.add_parser("demo", help="long-prompt demo with the built-in model, offline (what `make demo` runs)",
                          description="Answer a question about a long generated document; print the "
                                      "answer, TTFT, TBT and throughput.")
    demo.add_argument_group("model")
    demo.add_argument("--doc-tokens", type=int, default=3000, metavar="N",
                      help="approximate document length in tokens (default: 3000)")
    add_flags(demo, engine_flags(parallel=False), sampling_flags(max_tokens=48, top_logprobs=False))
    demo.set_defaults(func=run_demo)

    worker = sub.add_parser("worker", help="one rank of a grid whose driver runs on another machine",
                            description="Join a grid: fetch the configuration from the driver, load this "
                                        "rank's slice of the model and serve steps until the driver stops.")
    worker.add_argument("--driver", required=True, metavar="HOST:PORT", help="the driver's control address")
    worker.add_argument("--rank", required=True, type=int, help="this worker's rank, 1 .. tp*spp*kvp")
    worker.add_argument("--threads", type=int, default=None, help="torch threads (default: half the cores)")
    worker.set_defaults(func=run_worker)
    test_model = sub.add_parser(
        "make-test-model", help="write the long-context TEST model (random weights) into a directory",
        description="Write mnemosyne-longctx-test, a small random-weight Llama checkpoint in Hugging Face "
                    "format (2 layers, 1 KV head of dim 16, rope_theta 1e7, 2M positions) whose weights "
                    "depend only on --seed: for running million-token prompts through the services on a "
                    "CPU. Then: make up ARGS=\"--model DIR --max-model-len N\".")
    test_model.add_argument("dir", metavar="DIR", help="directory to write (created)")
    test_model.add_argument("--seed", type=int, default=0, help="weights seed (default: 0)")
    test_model.set_defaults(func=run_make_test_model)
    bench_serve.add_subcommand(sub)
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


def check_args(args: argparse.Namespace) -> EngineConfig:
    """Rejects bad values before anything slow (loading the model) happens; the EngineConfig."""
    if getattr(args, "chat", False) and getattr(args, "prompt_tokens", None) is not None:
        raise InvalidRequestError("--chat applies to a text prompt, not to --prompt-tokens")
    if getattr(args, "server", None):
        from common.client import router_target
        router_target(args.server)                          # a malformed address fails here, at once
    ttft = getattr(args, "ttft_slo_s", None)
    if ttft is not None:
        if not (math.isfinite(ttft) and ttft > 0):
            raise InvalidRequestError(f"--ttft-slo-s must be a positive number of seconds, got {ttft}")
        if not getattr(args, "server", None):
            # The offline engine uses a TTFT deadline only to order requests (LARS); it never rejects
            # or aborts a late one, so for the one request here the flag would silently do nothing.
            raise InvalidRequestError("--ttft-slo-s needs --server: offline nothing enforces a TTFT SLO "
                                      "(the engine runs the one request as fast as it can)")
    tbt = request_tbt_slo_s(args)
    if tbt is not None and not (math.isfinite(tbt) and tbt > 0):
        raise InvalidRequestError(f"--tbt-slo-s must be a positive number of seconds, got {tbt}")
    return engine_config(args)


def request_tbt_slo_s(args: argparse.Namespace) -> float | None:
    """The TBT SLO to send with the request: --tbt-slo-s (or MNEMOSYNE_TBT_SLO_S) when given, else
    None (the deployment's). One flag: offline it is the engine's TBT SLO, served the request's."""
    if "scheduler.tbt_slo_s" not in getattr(args, "given", ()):
        return None
    return args.sched_tbt_slo_s


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return config_from_args(SamplingParams, args, "sp_")


def open_session(args: argparse.Namespace, load_tokenizer_required: bool = True) -> tuple[Any, Any, int]:
    """Loads the checkpoint config and tokenizer, not yet the weights: (checkpoint, tokenizer, max_len).

    Without a tokenizer (allowed only when the prompt is given as token ids) tokenizer is None.
    """
    from common.model.loader import load_checkpoint
    from common.model.tokenizer import load_tokenizer
    checkpoint = load_checkpoint(args.engine_model, max_model_len=args.engine_max_model_len)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(args.engine_model, checkpoint.config)
    except MnemosyneError:
        if load_tokenizer_required:
            raise
        log.warning("no tokenizer for %s: printing token ids only", checkpoint.source)
    return checkpoint, tokenizer, checkpoint.config.max_position


def build_engine(args: argparse.Namespace, checkpoint: Any, tokenizer: Any, kv_tokens: int) -> Any:
    """The engine, its KV cache sized for `kv_tokens` tokens (the request at hand): in-process for a
    1x1x1 layout, else a grid of worker processes (local, or remote with --remote-workers)."""
    from common.engine.engine import LLMEngine
    sized = {} if "cache.max_kv_tokens" in getattr(args, "given", ()) else \
        {"cache.max_kv_tokens": kv_tokens + args.cache_block_size}
    cfg = engine_config(args, fixed=sized)
    par = cfg.parallel
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
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)   # when asked


def stream_one(engine: Any, prompt_ids: list[int], params: SamplingParams, on_token=None,
               on_progress=None) -> Generation:
    """Runs one request step by step; `on_token(token_id)` is called as each token is sampled,
    `on_progress(tokens_done, prompt_len)` after each step of its prefill (the last one with
    tokens_done = prompt_len, before the first token's on_token).

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
            if on_progress is not None and not gen.token_ids:
                on_progress(o.num_computed, o.prompt_len)
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
            if o.top_logprobs:
                gen.top_logprobs.append(list(o.top_logprobs))
            if on_token is not None:
                on_token(o.token_id)
            if o.finish_reason is not None:
                gen.finish_reason = o.finish_reason.value
    return gen


def prefill_bar(args: argparse.Namespace) -> Any:
    """The prefill progress bar on stderr: --progress / --no-progress, else when stderr is a terminal."""
    from common.progress import PrefillBar, wanted
    return PrefillBar(sys.stderr, enabled=wanted(args.progress, sys.stderr))


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


def json_output(g: Generation, text: str) -> str:
    """The --json line; "top_logprobs" only when they were asked for (a list of [token_id, logprob]
    per generated token, most likely first)."""
    out = {"token_ids": g.token_ids, "text": text, "logprobs": g.logprobs, "ttft_s": g.ttft_s, "tbt_s": g.tbt_s}
    if g.top_logprobs:
        out["top_logprobs"] = [[list(e) for e in top] for top in g.top_logprobs]
    return json.dumps(out)


def top_logprobs_table(g: Generation, tokenizer: Any = None) -> str:
    """One line per generated token: its index, id, text (when a tokenizer is at hand) and logprob,
    then the alternatives, most likely first: `  3  9378 " Paris" -0.1234 | 9378 " Paris" -0.1234, ...`."""
    def show(token_id: int) -> str:
        if tokenizer is None:
            return str(token_id)
        return f"{token_id} {json.dumps(tokenizer.decode([token_id]), ensure_ascii=False)}"

    lines = [f"[top {len(g.top_logprobs[0]) if g.top_logprobs else 0} logprobs per generated token]"]
    for i, (t, lp, top) in enumerate(zip(g.token_ids, g.logprobs, g.top_logprobs)):
        alts = ", ".join(f"{show(a)} {v:.4f}" for a, v in top)
        lines.append(f"{i:>4}  {show(t)} {lp:.4f} | {alts}")
    return "\n".join(lines)


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

    bar = prefill_bar(args)
    try:
        g = stream_one(engine, prompt_ids, params, on_token=show if stream else None, on_progress=bar.update)
    finally:
        bar.close()
        if hasattr(engine, "shutdown"):
            engine.shutdown()
    text_out = tokenizer.decode(g.token_ids, skip_special_tokens=True) if tokenizer is not None else ""
    if args.json:
        print(json_output(g, text_out))
    else:
        if stream:
            sys.stdout.write(decoder.flush() + "\n")
        else:
            print(" ".join(map(str, g.token_ids)))
        if g.top_logprobs:
            print(top_logprobs_table(g, tokenizer))
        sys.stdout.flush()
        print(timing_line(len(prompt_ids), g), file=sys.stderr)
    return 0


def run_remote(args: argparse.Namespace, params: SamplingParams) -> int:
    """`generate --server ADDR`: the same request and output, served by a router (common/client.py),
    with the request's own SLOs when --ttft-slo-s / --tbt-slo-s are given (else the deployment's).
    A rejection by the router's admission (RESOURCE_EXHAUSTED) is one error line, exit status 2."""
    from common.client import RouterClient
    text = read_prompt_text(args)
    token_ids = read_prompt_tokens(args.prompt_tokens) if args.prompt_tokens is not None else None

    bar = prefill_bar(args)

    def show(delta: str) -> None:
        bar.close()
        sys.stdout.write(delta)
        sys.stdout.flush()

    with RouterClient(args.server, retries=args.retries, api_key=args.api_key) as client, contextlib.closing(bar):
        c = client.complete(on_text=None if args.json else show, on_progress=bar.update, text=text,
                            token_ids=token_ids, chat=args.chat, max_tokens=params.max_tokens,
                            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                            seed=params.seed, logprobs=True, ignore_eos=params.ignore_eos,
                            top_logprobs=params.top_logprobs,
                            ttft_slo_s=args.ttft_slo_s, tbt_slo_s=request_tbt_slo_s(args))
    g = Generation(c.token_ids, c.logprobs, c.ttft_s, c.tbt_s, c.finish_reason, c.top_logprobs)
    if args.json:
        print(json_output(g, c.text))
    else:
        sys.stdout.write("\n")
        if g.top_logprobs:
            print(top_logprobs_table(g))           # token ids only: the tokenizer is the server's
        sys.stdout.flush()
        print(timing_line(c.prompt_tokens, g) + f" [{c.route} via {args.server}]", file=sys.stderr)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from common.parallel.worker import main as worker_main
    argv = ["--driver", args.driver, "--rank", str(args.rank)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return worker_main(argv)


def run_keys_new(args: argparse.Namespace) -> int:
    from common.auth import add_key, load_keys_file, new_key
    if args.max_concurrent < 0 or args.tokens_per_minute < 0:
        raise ConfigError("--max-concurrent and --tokens-per-minute must be >= 0")
    key = new_key()
    add_key(args.file, args.id, key, max_concurrent=args.max_concurrent, tokens_per_minute=args.tokens_per_minute)
    load_keys_file(args.file)                      # what the router will read
    print(key)
    return 0


def run_make_test_model(args: argparse.Namespace) -> int:
    from common.model.random_hf import write_longctx_test_model
    print(write_longctx_test_model(args.dir, seed=args.seed))
    return 0


def run_serve(argv: list[str]) -> int:
    """`mnemosyne serve [FLAGS]` = `make up ARGS="FLAGS"`: scripts/up.py's main, which needs the
    source checkout this package was installed from (the services run from it)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "scripts" / "up.py").is_file():
        fail(f"serve starts the services of a source checkout (scripts/up.py); there is none at {root}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from scripts.up import main as up_main
    return up_main(argv, prog=f"{PROG} serve")


def run_demo(args: argparse.Namespace) -> int:
    from common.engine.demo import run
    return run(args)


# ---- entry point --------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "serve":                      # every later argument is up.py's
        return run_serve(argv[argv.index("serve") + 1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except UnreachableError as e:
        fail(str(e), EXIT_UNREACHABLE)
    except (MnemosyneError, ValueError, OSError) as e:
        fail(str(e) or type(e).__name__)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
