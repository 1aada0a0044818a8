"""The services' and `make up`'s configurations, built by common/flags.py: the pools' scheduler
defaults, one value per setting in the router, the kvstore's variables, and `make up`'s sizing and
the flags it passes on (parsed by the services' own parsers)."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from common.config import EngineConfig, SLOConfig
from common.errors import ConfigError
from scripts.up import Cluster, ClusterConfig, Service, build_parser, parse_args
from services.decode.config import DecodeConfig
from services.kvstore.config import KVStoreConfig
from services.prefill.config import PrefillConfig
from services.router.config import RouterConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]


def engine_keys() -> set[str]:
    out = set()
    for f in dataclasses.fields(EngineConfig):
        sub = getattr(EngineConfig(), f.name)
        if dataclasses.is_dataclass(sub):
            out |= {f"engine.{f.name}.{g.name}" for g in dataclasses.fields(sub)}
        else:
            out.add(f"engine.{f.name}")
    return out


@pytest.mark.parametrize("config, role", [(PrefillConfig, "prefill"), (DecodeConfig, "decode")])
def test_pools_run_lars_with_adaptive_chunks_and_calibrate_by_default(config, role):
    cfg = config.from_args(["--kvstore", "k:1"], env={})
    s = cfg.engine.scheduler
    assert (s.policy, s.chunking, s.role, s.slack_stealing) == ("lars", "adaptive", role, True)
    assert cfg.engine.perf_model == "calibrate"
    # flags and env override the role's defaults; the flags are the engine's every field
    cfg = config.from_args(["--kvstore", "k:1", "--chunking", "fixed", "--perf-model", "saved"],
                           env={"MNEMOSYNE_POLICY": "fcfs", "MNEMOSYNE_CHUNKING": "adaptive"})
    assert (cfg.engine.scheduler.policy, cfg.engine.scheduler.chunking, cfg.engine.perf_model) == \
           ("fcfs", "fixed", "saved")
    assert engine_keys() <= {s.key for s in config.flags().settings}
    help_text = config.flags().parser().format_help()
    assert "(default: lars; env MNEMOSYNE_POLICY)" in " ".join(help_text.split())


def test_pool_errors_name_the_flag():
    with pytest.raises(ConfigError, match=r"kvp = 1, got 2 \(--kvp\)"):
        PrefillConfig.from_args(["--kvstore", "k:1", "--kvp", "2", "--kvp-tokens", "64"], env={})
    with pytest.raises(ConfigError, match=r"--kvstore is required \(or set MNEMOSYNE_KVSTORE\)"):
        DecodeConfig.from_args([], env={})


def test_the_router_keeps_slos_in_one_place_and_no_model_of_its_own():
    names = {f.name for f in dataclasses.fields(RouterConfig)}
    assert not names & {"perf_step_s", "perf_token_s", "iteration_budget_s", "tbt_slo_s", "ttft_slo_s"}
    cfg = RouterConfig.from_args(["--kvstore", "k:1", "--ttft-short-s", "4", "--slo-factor", "2"],
                                 env={"MNEMOSYNE_TTFT_LONG_S": "99", "MNEMOSYNE_SLO_OBJECTIVE": "0.9"})
    assert cfg.slo == SLOConfig(ttft_short_s=4.0, ttft_long_s=99.0, objective=0.9, slo_factor=2.0)
    assert cfg.slo.ttft_for("short") == 4.0
    with pytest.raises(ConfigError, match=r"slo_factor must be >= 1.*\(--slo-factor\)"):
        RouterConfig.from_args(["--kvstore", "k:1", "--slo-factor", "0.5"], env={})


def test_the_kvstore_reads_mnemosyne_flag_variables():
    cfg = KVStoreConfig.from_args(["--lease-s", "3"], env={"MNEMOSYNE_LEASE_S": "7", "MNEMOSYNE_GRACE_S": "1",
                                                            "MNEMOSYNE_REDIS_URL": "redis://r:1/0"})
    assert (cfg.lease_s, cfg.grace_s, cfg.redis_url) == (3.0, 1.0, "redis://r:1/0")
    assert "MNEMOSYNE_INSTANCE_TTL_S" in KVStoreConfig.flags().env_names()


def test_make_up_sizes_the_decode_groups_for_max_model_len():
    cfg = parse_args(["--max-model-len", "262144", "--decode-kvp", "4"], env={}).sized()
    assert cfg.kvp_tokens == 65536                                  # ceil(N / K), a multiple of 16
    assert cfg.decode_kv_tokens > cfg.kvp_tokens and cfg.prefill_kv_tokens >= 262144
    # The KV timeout bounds a stall (it counts from the last progress): it need not grow with N. The
    # router's stream deadline grows with the attention work, N^2: 4 x 3600 s at 2 x 128K.
    assert cfg.kv_timeout_s == 60.0 and cfg.request_timeout_s == 4 * 3600.0
    cfg = parse_args(["--max-model-len", "1000", "--decode-kvp", "3", "--block-size", "32"], env={}).sized()
    assert cfg.kvp_tokens == 352 and 3 * cfg.kvp_tokens >= 1000     # ceil(1000 / 3) = 334 -> 352
    cfg = parse_args(["--max-model-len", "262144", "--decode-kvp", "4", "--kvp-tokens", "70000"], env={})
    assert cfg.sized().kvp_tokens == 70000
    with pytest.raises(ConfigError, match="4 x 1000 = 4000 tokens < max_model_len 262144"):
        ClusterConfig(max_model_len=262144, decode_kvp=4, kvp_tokens=1000)
    default = ClusterConfig(kv_backend="tcp").sized()                # `make up` as before
    assert (default.kvp_tokens, default.decode_kv_tokens, default.prefill_kv_tokens, default.kv_timeout_s,
            default.request_timeout_s) == (4096, 8192, 8192, 60.0, 3600.0)


def test_make_up_passes_the_given_engine_and_router_flags_on_and_the_services_accept_its_argv(tmp_path):
    cfg = parse_args(["--model", "/m", "--max-model-len", "4096", "--decode-kvp", "2", "--prefill-tp", "2",
                      "--policy", "fcfs", "--no-slack-stealing", "--tbt-slo-s", "0.1", "--ttft-short-s", "5",
                      "--kv-backend", "tcp", "--log-dir", str(tmp_path)], env={"MNEMOSYNE_CHUNKING": "fixed"})
    assert cfg.pool_flags == ("--policy", "fcfs", "--chunking", "fixed", "--tbt-slo-s", "0.1",
                              "--no-slack-stealing")
    assert cfg.router_flags == ("--ttft-short-s", "5.0")
    cluster = Cluster(cfg)
    cluster.services["kvstore"] = Service("kvstore", None, tmp_path / "k.log", address="127.0.0.1:1")
    pre = PrefillConfig.from_args(cluster._engine_args("prefill"), env={})
    dec = DecodeConfig.from_args(cluster._engine_args("decode"), env={})
    router = RouterConfig.from_args(cluster._router_args(), env={})
    assert router.request_timeout_s == cluster.config.request_timeout_s == 3600.0
    KVStoreConfig.from_args(cluster._kvstore_args(), env={})
    assert (pre.engine.parallel.tp, pre.engine.parallel.spp, pre.engine.scheduler.role) == (2, 2, "prefill")
    assert (dec.engine.parallel.kvp, dec.engine.parallel.kvp_tokens) == (2, 2048)
    for pool in (pre, dec):
        s = pool.engine.scheduler
        assert (s.policy, s.chunking, s.slack_stealing, s.tbt_slo_s) == ("fcfs", "fixed", False, 0.1)
        assert (pool.engine.model, pool.engine.max_model_len, pool.engine.perf_model) == ("/m", 4096, "calibrate")
    assert dec.engine.cache.max_kv_tokens >= 2048 and pre.engine.cache.max_kv_tokens >= 4096
    assert (router.model, router.max_model_len, router.slo.ttft_short_s) == ("/m", 4096, 5.0)


def test_make_up_logs_text_by_default_and_passes_log_format_and_otlp_endpoint_to_every_service(tmp_path):
    for argv, fmt, endpoint in (([], "text", ""),
                                (["--log-format", "json", "--otlp-endpoint", "http://c:4317"], "json", "http://c:4317")):
        cluster = Cluster(parse_args(argv + ["--log-dir", str(tmp_path)], env={}))
        cluster.services["kvstore"] = Service("kvstore", None, tmp_path / "k.log", address="127.0.0.1:1")
        args = cluster._observability_args()
        configs = [PrefillConfig.from_args(cluster._engine_args("prefill") + args, env={}),
                   DecodeConfig.from_args(cluster._engine_args("decode") + args, env={}),
                   RouterConfig.from_args(cluster._router_args() + args, env={}),
                   KVStoreConfig.from_args(cluster._kvstore_args() + args, env={})]
        assert {(c.observability.log_format, c.observability.otlp_endpoint) for c in configs} == {(fmt, endpoint)}


def test_make_up_gives_the_router_and_the_pools_one_model_name(tmp_path):
    cluster = Cluster(parse_args(["--model-name", "smol", "--log-dir", str(tmp_path)], env={}))
    cluster.services["kvstore"] = Service("kvstore", None, tmp_path / "k.log", address="127.0.0.1:1")
    assert {PrefillConfig.from_args(cluster._engine_args("prefill"), env={}).model_name,
            DecodeConfig.from_args(cluster._engine_args("decode"), env={}).model_name,
            RouterConfig.from_args(cluster._router_args(), env={}).model_name} == {"smol"}


def test_make_up_rejects_a_bad_pool_value_before_starting_anything(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--policy", "sjf"], env={})
    assert "--policy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--tbt-slo-s", "0"], env={})
    assert "--tbt-slo-s" in capsys.readouterr().err


def test_up_help_lists_the_engine_scheduler_and_router_flags(monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOSYNE_")}
    r = subprocess.run([sys.executable, "scripts/up.py", "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--model DIR|FILE", "--max-model-len N", "--decode-kvp N", "--kvp-tokens N", "--prefill-spp N",
                 "--policy {fcfs,edf,lars}", "--chunking {fixed,adaptive}", "--tbt-slo-s S", "--perf-model",
                 "--slack-stealing", "--preempt-interval-s S", "--ttft-short-s S", "--slo-factor X",
                 "env MNEMOSYNE_DECODE_KVP"):
        assert flag in r.stdout, flag
    mk = subprocess.run(["make", "-n", "up", "ARGS=--decode-kvp 4 --max-model-len 1024"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
    assert mk.returncode == 0 and "-m common.cli serve --decode-kvp 4 --max-model-len 1024" in mk.stdout, mk.stdout
    # `mnemosyne serve` is what `make up` runs: scripts/up.py's parser, every flag, the same help
    serve = subprocess.run([sys.executable, "-m", "common.cli", "serve", "--help"], cwd=ROOT,
                           env={**env, "COLUMNS": "100"}, capture_output=True, text=True, timeout=120)
    assert serve.returncode == 0, serve.stderr
    monkeypatch.setenv("COLUMNS", "100")
    assert serve.stdout == build_parser(prog="mnemosyne serve")[0].format_help()


def test_fixed_ports_are_the_router_port_and_an_http_port_when_there_is_one():
    from types import SimpleNamespace

    from scripts.up import fixed_ports
    assert fixed_ports(ClusterConfig()) == [("--port", 50051)]
    assert fixed_ports(ClusterConfig(router_port=0)) == []
    assert fixed_ports(SimpleNamespace(router_port=7000, http_port=8080)) == [("--port", 7000), ("--http-port", 8080)]
    assert fixed_ports(SimpleNamespace(router_port=7000, http_port=0)) == [("--port", 7000)]


def test_make_up_refuses_a_port_in_use_at_once_before_starting_anything(tmp_path):
    import socket
    import time

    from scripts.up import port_in_use
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOSYNE_")}
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "common.cli", "serve", "--port", str(port), "--log-dir",
                            str(tmp_path / "logs")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert r.stderr == (f"up: port {port} on 127.0.0.1 is in use (another `make up`?); choose another "
                            "with --port\n")
        assert r.stdout == "" and not (tmp_path / "logs").exists()      # nothing was started
        assert time.monotonic() - t0 < 60
    assert not port_in_use("127.0.0.1", port)
