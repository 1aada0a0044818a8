"""`mnemosyne` CLI, run as a real subprocess (`python -m common.cli`) and, where the interpreter's start
is not what a test is about, as `main(argv)` in this process: --json output equals the in-process engine;
every bad argument gives exit status 2 and one line on stderr, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import grpc
import pytest

from common.cli import build_parser
from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.model.tokenizer import load_tokenizer
from common.rpc.protos import router_pb2
from common.sampling_params import SamplingParams
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.rpc_errors import FakeRpcError

ROOT = Path(__file__).resolve().parents[2]
JSON_KEYS = {"token_ids", "text", "logprobs", "ttft_s", "tbt_s"}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "common.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_in_process(args: list[str], capsys) -> subprocess.CompletedProcess:
    """`main(args)` in this process (no interpreter and torch import per case): its exit status and output."""
    from common.cli import main
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException as e:                      # what would have been a traceback
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, 1, out, err + f"Traceback: {e!r}")
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A random Llama HF directory with a tokenizer (max_position_embeddings 256)."""
    return str(write_random_hf_model(tmp_path_factory.mktemp("cli-llama"), "llama", seed=7))


def in_process(model: str | None, prompt_ids: list[int], params: SamplingParams, eos=()) -> tuple[list, list]:
    engine = LLMEngine(EngineConfig(model=model, cache=CacheConfig(max_kv_tokens=1024),
                                    scheduler=SchedulerConfig()), extra_eos_ids=eos)
    res = engine.generate([prompt_ids], params)[0]
    return res.token_ids, res.logprobs


def check_schema(out: dict, n: int | None = None) -> None:
    assert set(out) == JSON_KEYS
    assert all(isinstance(t, int) for t in out["token_ids"]) and isinstance(out["text"], str)
    assert len(out["logprobs"]) == len(out["token_ids"]) and all(lp <= 0 for lp in out["logprobs"])
    assert out["ttft_s"] > 0 and len(out["tbt_s"]) == len(out["token_ids"]) - 1
    assert all(t >= 0 for t in out["tbt_s"])
    if n is not None:
        assert len(out["token_ids"]) == n


def test_json_from_prompt_tokens_equals_in_process_engine(tiny, tmp_path):
    ids = [5, 17, 99, 250, 31, 8, 64, 200, 12]
    f = tmp_path / "ids.json"
    f.write_text(json.dumps(ids))
    r = cli("generate", "--model", tiny, "--prompt-tokens", str(f), "--max-tokens", "12", "--ignore-eos",
            "--chunk-size", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    check_schema(out, 12)
    tokens, logprobs = in_process(tiny, ids, SamplingParams(max_tokens=12, ignore_eos=True))
    assert out["token_ids"] == tokens
    assert max(abs(a - b) for a, b in zip(out["logprobs"], logprobs)) < 1e-6
    assert out["text"] == load_tokenizer(tiny).decode(tokens, skip_special_tokens=True)


def test_text_prompt_file_and_plain_output(tiny, tmp_path, capsys):
    f = tmp_path / "prompt.txt"
    f.write_text("The quick brown fox", encoding="utf-8")
    r = cli_in_process(["generate", "--model", tiny, "--prompt-file", str(f), "--max-tokens", "5", "--ignore-eos"],
                       capsys)
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(tiny)
    tokens, _ = in_process(tiny, tok.encode("The quick brown fox"), SamplingParams(max_tokens=5, ignore_eos=True))
    assert r.stdout == tok.decode(tokens, skip_special_tokens=True) + "\n"
    assert "TTFT" in r.stderr and "5 generated" in r.stderr
    assert "prefill [" not in r.stderr                  # no progress bar unless stderr is a terminal


def test_forced_progress_lines_go_to_stderr_and_end_at_the_prompt_length(tiny, tmp_path, capsys):
    f = tmp_path / "ids.json"
    f.write_text(json.dumps([(7 * i + 3) % 200 + 10 for i in range(200)]))
    r = cli_in_process(["generate", "--model", tiny, "--prompt-tokens", str(f), "--max-tokens", "2", "--ignore-eos",
                        "--chunk-size", "16", "--progress"], capsys)
    assert r.returncode == 0, r.stderr
    bars = [line for line in r.stderr.splitlines() if line.startswith("prefill [")]
    assert bars and "200/200 tokens  100%" in bars[-1] and "tokens/s" in bars[-1], r.stderr
    assert "prefill [" not in r.stdout and r.stdout.endswith("\n")


def test_top_logprobs_json_and_table(tiny, tmp_path, capsys):
    """--top-logprobs K: the same tokens and logprobs as without, K sorted [token_id, logprob] per
    token in --json (the chosen token's entry equal to its logprob), and a table in plain output."""
    f = tmp_path / "ids.json"
    f.write_text(json.dumps([5, 17, 99, 250, 31]))
    args = ("generate", "--model", tiny, "--prompt-tokens", str(f), "--max-tokens", "4", "--ignore-eos")
    r = cli_in_process([*args, "--top-logprobs", "3", "--json"], capsys)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == JSON_KEYS | {"top_logprobs"}
    tokens, logprobs = in_process(tiny, [5, 17, 99, 250, 31], SamplingParams(max_tokens=4, ignore_eos=True))
    assert out["token_ids"] == tokens and max(abs(a - b) for a, b in zip(out["logprobs"], logprobs)) < 1e-6
    assert len(out["top_logprobs"]) == 4
    for token, lp, top in zip(out["token_ids"], out["logprobs"], out["top_logprobs"]):
        assert len(top) == 3 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert top[0] == [token, lp]                                    # greedy: the argmax, same float
    plain = cli_in_process([*args, "--top-logprobs", "2"], capsys)
    assert plain.returncode == 0, plain.stderr
    table = plain.stdout.splitlines()
    assert "[top 2 logprobs per generated token]" in table
    rows = table[table.index("[top 2 logprobs per generated token]") + 1:]
    assert len(rows) == 4 and all(row.split()[1] == str(t) for row, t in zip(rows, tokens))
    assert all(row.count(" | ") == 1 and row.split(" | ")[1].count(", ") == 1 for row in rows)


def test_sampling_flags_are_seeded(tiny, capsys):
    args = ("generate", "--model", tiny, "--prompt", "hello", "--max-tokens", "8", "--ignore-eos",
            "--temperature", "1.5", "--top-k", "50", "--top-p", "0.9", "--seed", "3", "--json")
    a, b = cli_in_process(list(args), capsys), cli_in_process(list(args), capsys)
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_builtin_chat_answer_and_bf16(tmp_path):
    r = cli("generate", "--prompt", "What is the capital of France?", "--chat", "--max-tokens", "24", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    check_schema(out)
    assert "Paris" in out["text"]
    assert len(out["token_ids"]) < 24                    # stopped at <|im_end|>, the tokenizer's eos
    tok = load_tokenizer(None)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    tokens, logprobs = in_process(None, prompt, SamplingParams(max_tokens=24), eos=tok.eos_token_ids)
    assert out["token_ids"] == tokens
    assert max(abs(a - b) for a, b in zip(out["logprobs"], logprobs)) < 1e-6
    r = cli("generate", "--prompt", "What is the capital of France?", "--chat", "--max-tokens", "24",
            "--dtype", "bfloat16", "--attention-backend", "reference", "--json")
    assert r.returncode == 0, r.stderr
    assert "Paris" in json.loads(r.stdout)["text"]


def bad_cases(tiny: str, tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "bad.json").write_text("[1, 2,")
    (tmp / "obj.json").write_text('{"ids": [1, 2]}')
    (tmp / "strs.json").write_text('["a", "b"]')
    (tmp / "empty.json").write_text("[]")
    (tmp / "range.json").write_text("[1, 2, 999999]")
    (tmp / "long.json").write_text(json.dumps([5] * 300))        # tiny allows 256 positions
    (tmp / "ok.json").write_text("[5, 6, 7]")
    (tmp / "notgguf.bin").write_text("x")
    gen = ["generate", "--model", tiny]
    return {
        "missing prompt file": (gen + ["--prompt-file", str(tmp / "nope.txt")], "nope.txt"),
        "missing token file": (gen + ["--prompt-tokens", str(tmp / "nope.json")], "nope.json"),
        "malformed token json": (gen + ["--prompt-tokens", str(tmp / "bad.json")], "not valid JSON"),
        "token json not a list": (gen + ["--prompt-tokens", str(tmp / "obj.json")], "JSON list"),
        "token json of strings": (gen + ["--prompt-tokens", str(tmp / "strs.json")], "JSON list"),
        "empty token list": (gen + ["--prompt-tokens", str(tmp / "empty.json")], "empty"),
        "token id out of range": (gen + ["--prompt-tokens", str(tmp / "range.json")], "out of range"),
        "prompt too long": (gen + ["--prompt-tokens", str(tmp / "long.json")], "at most 255"),
        "prompt longer than --max-model-len": (gen + ["--prompt", "hello world " * 10, "--max-model-len", "8"],
                                               "max_model_len 8"),
        "unknown dtype": (gen + ["--prompt", "hi", "--dtype", "float16"], "--dtype"),
        "negative max tokens": (gen + ["--prompt", "hi", "--max-tokens", "-3"], "max_tokens"),
        "zero max tokens": (gen + ["--prompt", "hi", "--max-tokens", "0"], "max_tokens"),
        "non-integer max tokens": (gen + ["--prompt", "hi", "--max-tokens", "many"], "--max-tokens"),
        "bad top-p": (gen + ["--prompt", "hi", "--top-p", "1.5"], "top_p"),
        "top-logprobs over 20": (gen + ["--prompt", "hi", "--top-logprobs", "21"], "top_logprobs"),
        "negative temperature": (gen + ["--prompt", "hi", "--temperature", "-1"], "temperature"),
        "zero chunk size": (gen + ["--prompt", "hi", "--chunk-size", "0"], "--chunk-size"),
        "unknown attention backend": (gen + ["--prompt", "hi", "--attention-backend", "magic"],
                                      "--attention-backend"),
        "missing model": (["generate", "--model", str(tmp / "no-such-model"), "--prompt", "hi"], "does not exist"),
        "model file not gguf": (["generate", "--model", str(tmp / "notgguf.bin"), "--prompt", "hi"], "gguf"),
        "no prompt": (gen, "one of the arguments"),
        "two prompts": (gen + ["--prompt", "a", "--prompt-tokens", str(tmp / "ok.json")], "not allowed"),
        "chat with token ids": (gen + ["--prompt-tokens", str(tmp / "ok.json"), "--chat"], "--chat"),
        "no subcommand": ([], "required"),
        "unknown subcommand": (["frobnicate"], "invalid choice"),
        "unknown flag": (gen + ["--prompt", "hi", "--frobnicate"], "unrecognized"),
        "ttft slo without --server": (gen + ["--prompt", "hi", "--ttft-slo-s", "5"], "--ttft-slo-s needs --server"),
        "zero ttft slo": (gen + ["--prompt", "hi", "--server", "127.0.0.1:9", "--ttft-slo-s", "0"],
                          "--ttft-slo-s must be a positive"),
        "negative ttft slo": (gen + ["--prompt", "hi", "--server", "127.0.0.1:9", "--ttft-slo-s", "-2"],
                              "--ttft-slo-s must be a positive"),
        "nan ttft slo": (gen + ["--prompt", "hi", "--server", "127.0.0.1:9", "--ttft-slo-s", "nan"],
                         "--ttft-slo-s must be a positive"),
        "non-numeric ttft slo": (gen + ["--prompt", "hi", "--ttft-slo-s", "soon"], "--ttft-slo-s"),
        "zero tbt slo": (gen + ["--prompt", "hi", "--server", "127.0.0.1:9", "--tbt-slo-s", "0"], "--tbt-slo-s"),
        "infinite tbt slo": (gen + ["--prompt", "hi", "--server", "127.0.0.1:9", "--tbt-slo-s", "inf"],
                             "--tbt-slo-s must be a positive"),
        "server port not a number": (gen + ["--prompt", "hi", "--server", "localhost:http"], "port must be 1..65535"),
        "server port out of range": (gen + ["--prompt", "hi", "--server", "localhost:70000"], "port must be"),
        "server ipv6 unclosed": (gen + ["--prompt", "hi", "--server", "[::1:5"], "[IPv6]:PORT"),
    }


# Run as a real `python -m common.cli` too: the interpreter's own exit path, an argparse error, a loaded model.
SUBPROCESS_CASES = ("no subcommand", "unknown flag", "prompt too long")


def test_bad_arguments_exit_2_with_one_line(tiny, tmp_path, capsys):
    failures = []
    for name, (args, needle) in bad_cases(tiny, tmp_path).items():
        runs = [cli_in_process(args, capsys)] + ([cli(*args)] if name in SUBPROCESS_CASES else [])
        for r in runs:
            lines = r.stderr.strip().splitlines()
            ok = (r.returncode == 2 and len(lines) == 1 and lines[0].startswith("mnemosyne: error: ")
                  and needle in lines[0] and "Traceback" not in r.stderr and r.stdout == "")
            if not ok:
                failures.append(f"{name}: rc={r.returncode} stderr={r.stderr!r}")
    assert not failures, "\n".join(failures)


def test_parser_has_room_for_parallel_and_serving_flags():
    parser = build_parser()
    gen = parser._subparsers._group_actions[0].choices["generate"]
    titles = {g.title for g in gen._action_groups}
    assert {"model", "prompt", "sampling", "scheduling", "parallel", "serving", "output"} <= titles
    args = parser.parse_args(["generate", "--prompt", "x"])
    assert args.sp_max_tokens == SamplingParams().max_tokens          # defaults come from the config
    assert args.sched_chunk_size == SchedulerConfig().chunk_size
    assert args.engine_dtype == EngineConfig().dtype and args.engine_max_model_len is None


def test_scheduling_policy_flags_reach_the_scheduler_config():
    from common.cli import config_from_args
    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", "x", "--policy", "lars", "--chunking", "adaptive",
                              "--no-slack-stealing"])
    cfg = config_from_args(SchedulerConfig, args, "sched_")
    assert (cfg.policy, cfg.chunking, cfg.slack_stealing) == ("lars", "adaptive", False)
    assert config_from_args(SchedulerConfig, parser.parse_args(["generate", "--prompt", "x"]), "sched_").slack_stealing


def test_request_slo_flags_parse_and_reach_the_request(monkeypatch):
    """--ttft-slo-s is a serving flag; --tbt-slo-s is the scheduler's TBT SLO, sent with a --server
    request only when given (flag or MNEMOSYNE_TBT_SLO_S), else the deployment's applies."""
    from common.cli import check_args, request_tbt_slo_s
    from common.client import RouterClient
    parser = build_parser()
    gen = parser._subparsers._group_actions[0].choices["generate"]
    serving = next(g for g in gen._action_groups if g.title == "serving")
    ttft = next(a for a in serving._group_actions if a.dest == "ttft_slo_s")
    assert ttft.option_strings == ["--ttft-slo-s"] and ttft.metavar == "S" and "deployment" in ttft.help

    monkeypatch.delenv("MNEMOSYNE_TBT_SLO_S", raising=False)
    plain = parser.parse_args(["generate", "--prompt", "x", "--server", "h:1"])
    check_args(plain)
    assert plain.ttft_slo_s is None and request_tbt_slo_s(plain) is None
    assert not RouterClient.request(text="x").HasField("slo")

    args = parser.parse_args(["generate", "--prompt", "x", "--server", "h:1", "--ttft-slo-s", "1.5",
                              "--tbt-slo-s", "0.05"])
    check_args(args)
    assert (args.ttft_slo_s, request_tbt_slo_s(args)) == (1.5, 0.05)
    assert args.sched_tbt_slo_s == 0.05                    # offline: the engine's TBT SLO, one flag
    req = RouterClient.request(text="x", ttft_slo_s=args.ttft_slo_s, tbt_slo_s=request_tbt_slo_s(args))
    assert (req.slo.ttft_s, req.slo.tbt_s) == (1.5, 0.05)

    monkeypatch.setenv("MNEMOSYNE_TBT_SLO_S", "0.1")
    assert request_tbt_slo_s(parser.parse_args(["generate", "--prompt", "x", "--server", "h:1"])) == 0.1


@pytest.mark.parametrize("address, target", [
    ("localhost", "localhost:50051"), ("localhost:6000", "localhost:6000"), (" 10.0.0.7 ", "10.0.0.7:50051"),
    ("[::1]:6000", "[::1]:6000"), ("[::1]", "[::1]:50051"), ("::1", "[::1]:50051"),
    ("router.example.com:443", "router.example.com:443")])
def test_router_address_defaults_to_the_router_port(address, target):
    from common.client import RouterClient, router_target
    from services.router.config import RouterConfig
    assert router_target(address) == target
    assert router_target("h") == f"h:{RouterConfig(kvstore='k:1').port}"      # one default port
    with RouterClient(address) as c:
        assert c.address == target


def test_server_not_running_is_one_line_with_a_hint_exit_1():
    from common.metadata.redis_server import free_port
    port = free_port()
    r = cli("generate", "--server", f"127.0.0.1:{port}", "--prompt", "hi", timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr == (f"mnemosyne: error: cannot reach the router at 127.0.0.1:{port} "
                        "(connection refused; is `make up` running?)\n")
    assert r.stdout == ""


def test_router_errors_are_one_line_with_the_status_name_and_the_retry_hint():
    from common.client import RouterClient
    from common.errors import CapacityError, UnreachableError, WorkerFailedError
    from common.rpc.status import ERROR_KEY, RETRY_PUSHBACK_KEY

    def failing(err, after=0):
        def generate(request, timeout, metadata=()):
            yield from [router_pb2.GenerateResponse()] * after
            raise err
        return generate

    cases = [
        (FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full",
                      ((ERROR_KEY, "CapacityError"), (RETRY_PUSHBACK_KEY, "1500"))), 0,
         CapacityError, "RESOURCE_EXHAUSTED: queue full; retry after 1.5s"),
        (FakeRpcError(grpc.StatusCode.UNAVAILABLE, "decode instance d1 failed", ((ERROR_KEY, "WorkerFailedError"),)),
         0, WorkerFailedError, "UNAVAILABLE: decode instance d1 failed"),
        (FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed"), 1, WorkerFailedError,
         "UNAVAILABLE: Socket closed"),                  # the router went away mid-stream: not "cannot reach"
        (FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; Connection refused"), 0,
         UnreachableError, "cannot reach the router at h:1 (connection refused; is `make up` running?)"),
    ]
    for err, after, cls, message in cases:
        with RouterClient("h:1") as c:
            c._stub = types.SimpleNamespace(Generate=failing(err, after))
            with pytest.raises(cls) as info:
                c.complete(text="x")
        assert str(info.value) == message
    assert not isinstance(WorkerFailedError("x"), UnreachableError)
