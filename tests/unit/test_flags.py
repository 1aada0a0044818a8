"""common/flags.py: flags and MNEMOSYNE_<FLAG> environment variables generated from config trees."""
from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from common.config import EngineConfig, SchedulerConfig, SLOConfig
from common.errors import ConfigError
from common.flags import RESERVED_ENV, Flags, env_name

ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Leaf:
    size: int = 4                      # items in a leaf
    rate_s: float | None = None        # seconds per item
                                       # (none: unlimited)
    # a block comment about the next field is not help
    mode: Literal["fast", "slow"] = "fast"
    on: bool = True                    # whether the leaf works

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ConfigError(f"leaf: size must be positive, got {self.size}")


@dataclass(frozen=True)
class Branch:
    leaf: Leaf = field(default_factory=Leaf)
    name: str = "b"                    # the branch's name
    port: int = field(default=0, metadata={"flag": "branch-port", "help": "where it listens"})


@dataclass(frozen=True)
class Root:
    address: str                       # required
    branch: Branch = field(default_factory=lambda: Branch(name="from-factory"))
    skip: dict = field(default_factory=dict, metadata={"flag": None})


def build(flags: Flags, argv: list[str], env: dict[str, str] | None = None):
    return flags.build(flags.parser(prog="t").parse_args(argv), env or {})


def test_nested_trees_flatten_to_leaf_names_with_types_metavars_and_help():
    flags = Flags(Root)
    assert [s.option for s in flags.settings] == ["--address", "--size", "--rate-s", "--mode", "--on",
                                                  "--name", "--branch-port"]
    assert [s.key for s in flags.settings][:3] == ["address", "branch.leaf.size", "branch.leaf.rate_s"]
    help_text = flags.parser(prog="t").format_help()
    for text in ("--size N", "--rate-s S", "--mode {fast,slow}", "--on, --no-on", "--branch-port PORT",
                 "items in a leaf (default: 4; env MNEMOSYNE_SIZE)", "where it listens", "(required; env ",
                 "seconds per item (none: unlimited) (default: none; env MNEMOSYNE_RATE_S)",
                 "--mode {fast,slow} (default: fast; env MNEMOSYNE_MODE)"):
        assert text in " ".join(help_text.split()), text
    cfg = build(flags, ["--address", "a:1", "--size", "7", "--mode", "slow", "--no-on", "--branch-port", "9"])
    assert cfg == Root("a:1", Branch(Leaf(7, None, "slow", False), "from-factory", 9))


def test_precedence_flag_over_env_over_role_default_over_dataclass_default():
    flags = Flags(Root, defaults={"branch.leaf.size": 5, "branch.name": "role"})
    assert build(flags, ["--address", "x"]).branch.leaf.size == 5                 # role default
    assert build(flags, ["--address", "x"]).branch.leaf.rate_s is None            # dataclass default
    assert build(flags, ["--address", "x"]).branch.name == "role"
    env = {"MNEMOSYNE_SIZE": "6", "MNEMOSYNE_ADDRESS": "from-env", "MNEMOSYNE_ON": "no"}
    cfg = build(flags, [], env)
    assert (cfg.address, cfg.branch.leaf.size, cfg.branch.leaf.on) == ("from-env", 6, False)
    cfg = build(flags, ["--size", "8", "--on", "--address", "flag"], env)
    assert (cfg.address, cfg.branch.leaf.size, cfg.branch.leaf.on) == ("flag", 8, True)
    assert flags.given(flags.parser().parse_args(["--size", "8"]), env) == \
        {"address": "from-env", "branch.leaf.size": 8, "branch.leaf.on": False}


def test_none_values_bools_and_choices_parse_from_flags_and_env():
    flags = Flags(Root)
    assert build(flags, ["--address", "x", "--rate-s", "0.5"]).branch.leaf.rate_s == 0.5
    assert build(flags, ["--address", "x", "--rate-s", "none"]).branch.leaf.rate_s is None
    assert build(flags, ["--address", "x"], {"MNEMOSYNE_RATE_S": ""}).branch.leaf.rate_s is None
    for text, value in (("1", True), ("true", True), ("off", False), ("NO", False)):
        assert build(flags, ["--address", "x"], {"MNEMOSYNE_ON": text}).branch.leaf.on is value
    with pytest.raises(ConfigError, match=r"MNEMOSYNE_ON: invalid bool value 'maybe'.*--on"):
        build(flags, ["--address", "x"], {"MNEMOSYNE_ON": "maybe"})
    with pytest.raises(ConfigError, match=r"MNEMOSYNE_MODE: invalid choice 'medium'.*--mode"):
        build(flags, ["--address", "x"], {"MNEMOSYNE_MODE": "medium"})
    with pytest.raises(ConfigError, match=r"MNEMOSYNE_SIZE: invalid int value 'big'.*--size"):
        build(flags, ["--address", "x"], {"MNEMOSYNE_SIZE": "big"})


def test_usage_errors_name_the_flag(capsys):
    flags = Flags(Root)
    for argv, needle in ((["--size", "big"], "argument --size: invalid int value 'big'"),
                         (["--mode", "medium"], "argument --mode: invalid choice 'medium'")):
        with pytest.raises(SystemExit):
            flags.parser(prog="t").parse_args(argv)
        assert needle in capsys.readouterr().err


def test_validation_errors_and_missing_required_settings_name_the_flag():
    flags = Flags(Root)
    with pytest.raises(ConfigError, match=r"leaf: size must be positive, got 0 \(--size\)"):
        build(flags, ["--address", "x", "--size", "0"])
    with pytest.raises(ConfigError, match=r"--address is required \(or set MNEMOSYNE_ADDRESS\)"):
        build(flags, [])
    with pytest.raises(ConfigError, match=r"tbt_slo_s must be positive, got 0.0 \(--tbt-slo-s\)"):
        build(Flags(EngineConfig), ["--tbt-slo-s", "0"])


def test_generation_refuses_clashing_names_unknown_defaults_and_reserved_variables():
    @dataclass(frozen=True)
    class Clash:
        a: Leaf = field(default_factory=Leaf)
        b: Leaf = field(default_factory=Leaf)
    with pytest.raises(ConfigError, match="--size names both a.size and b.size"):
        Flags(Clash)
    with pytest.raises(ConfigError, match="unknown settings"):
        Flags(Root, defaults={"branch.leaf.colour": 1})

    @dataclass(frozen=True)
    class Reserved:
        cache: str = ""
    with pytest.raises(ConfigError, match="MNEMOSYNE_CACHE"):
        Flags(Reserved)
    assert env_name("--max-kv-tokens") == "MNEMOSYNE_MAX_KV_TOKENS" and "MNEMOSYNE_CACHE" in RESERVED_ENV


def test_exclude_fixed_and_argv_round_trip():
    flags = Flags(Root, exclude=("branch.leaf.size",))
    assert "--size" not in [s.option for s in flags.settings]
    assert flags.build(None, {}, fixed={"address": "a", "branch.leaf.size": 3}).branch.leaf.size == 3
    values = {"branch.leaf.rate_s": None, "branch.leaf.on": False, "branch.leaf.mode": "slow"}
    argv = flags.argv(values)
    assert argv == ["--rate-s", "none", "--no-on", "--mode", "slow"]
    assert flags.given(flags.parser().parse_args(argv), {}) == values


def test_every_engine_field_is_a_flag_with_an_env_var():
    flags = Flags(EngineConfig)
    keys = {s.key for s in flags.settings}
    expected = {f.name for f in dataclasses.fields(EngineConfig)} - {"cache", "scheduler", "parallel"}
    for node in ("cache", "scheduler", "parallel"):
        cls = type(getattr(EngineConfig(), node))
        expected |= {f"{node}.{f.name}" for f in dataclasses.fields(cls)}
    assert keys == expected and len([k for k in keys if k.startswith("scheduler.")]) >= 15
    assert "MNEMOSYNE_PERF_MODEL" in flags.env_names()
    assert build(flags, ["--perf-model", "calibrate"]).perf_model == "calibrate"
    assert EngineConfig().perf_model == "saved"


def test_slo_config_is_flat_and_gives_the_class_table():
    slo = SLOConfig()
    assert slo.ttft_s == (("short", 2.0), ("medium", 20.0), ("long", 120.0), ("xlong", 600.0))
    assert slo.ttft_for("long") == 120.0 and (slo.objective, slo.slo_factor) == (0.99, 3.0)
    with pytest.raises(ConfigError, match="ttft_medium_s"):
        SLOConfig(ttft_medium_s=0)
    with pytest.raises(ConfigError, match="objective"):
        SLOConfig(objective=1.0)
    assert SchedulerConfig().tbt_slo_s == 0.2


def test_no_module_under_services_imports_the_cli():
    """Services build their configs with common/flags.py, never through common/cli.py."""
    offenders = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "common.cli" or n.startswith("common.cli.") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"services import the CLI: {offenders}"
    # ... and the services' configs import without it (no side door through another module)
    code = ("import sys; import services.prefill.config, services.decode.config, services.router.config, "
            "services.kvstore.config, common.pool_config; assert 'common.cli' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def help_texts(capsys) -> dict[str, str]:
    """The --help of every entry point: `mnemosyne` and its subcommands, `make up` (scripts/up.py,
    also `mnemosyne serve`), each `python -m services.X`, the grid worker."""
    import argparse

    from common.cli import build_parser
    from common.parallel.worker import main as worker_main
    from scripts.up import build_parser as up_parser
    from services.decode.config import DecodeConfig
    from services.kvstore.config import KVStoreConfig
    from services.prefill.config import PrefillConfig
    from services.router.config import RouterConfig

    cli = build_parser()
    sub = next(a for a in cli._actions if isinstance(a, argparse._SubParsersAction))
    out = {"mnemosyne": cli.format_help(), "make up": up_parser()[0].format_help()}
    out.update({f"mnemosyne {name}": p.format_help() for name, p in sub.choices.items()})
    out["mnemosyne serve"] = up_parser(prog="mnemosyne serve")[0].format_help()     # up.py parses its flags
    for name, entry in (("router", RouterConfig.from_args), ("prefill", PrefillConfig.from_args),
                        ("decode", DecodeConfig.from_args), ("kvstore", KVStoreConfig.from_args),
                        ("worker", worker_main)):
        with pytest.raises(SystemExit):
            entry(["--help"])
        out[f"python -m services.{name}" if name != "worker" else "worker main"] = capsys.readouterr().out
    return out


KINDS = {"N", "S", "X", "TEXT", "HOST", "PORT", "URL", "DIR", "FILE"}      # metavars that say a value's kind


def test_no_help_shows_a_dest_as_metavar(capsys):
    """Flags added by hand get a metavar from their type and name (common.flags.HelpFormatter), like
    the generated ones: --master-port PORT, --threads N, never --master-port MASTER_PORT."""
    texts = help_texts(capsys)
    assert len(texts) >= 10 and all("--help" in t for t in texts.values())
    leaks = []
    for name, text in texts.items():
        for flag, metavar in re.findall(r"(--[a-z0-9][a-z0-9-]*)[ =]([A-Z][A-Z0-9_]*)\b", text):
            dest = flag[2:].upper().replace("-", "_")
            if re.fullmatch(r"[A-Z0-9]+_[A-Z0-9_]+", metavar) or (metavar == dest and metavar not in KINDS):
                leaks.append(f"{name}: {flag} {metavar}")
    assert not leaks, leaks
    assert "--master-addr HOST" in texts["mnemosyne generate"]
    assert "--threads N" in texts["mnemosyne worker"]


def test_help_formatter_derives_metavars_from_type_and_name():
    import argparse

    from common.flags import HelpFormatter
    p = argparse.ArgumentParser(prog="t", formatter_class=HelpFormatter)
    for flag, kw in (("--count", {"type": int}), ("--listen-port", {"type": int}), ("--delay-s", {"type": float}),
                     ("--ratio", {"type": float}), ("--bind-host", {}), ("--name", {}),
                     ("--mode", {"choices": ["a", "b"]}), ("--path", {"metavar": "FILE"})):
        p.add_argument(flag, **kw)
    usage = " ".join(p.format_usage().split())
    for text in ("--count N", "--listen-port PORT", "--delay-s S", "--ratio X", "--bind-host HOST", "--name TEXT",
                 "--mode {a,b}", "--path FILE"):
        assert text in usage, (text, usage)
