"""Command-line flags and environment variables generated from the frozen config dataclasses.

Every entry point (the services, `mnemosyne generate`, `make up`) builds its settings here, so a
setting has one name everywhere and flags never drift from the config tree.

    flags = Flags(PrefillConfig, defaults={"engine.scheduler.policy": "lars"})
    parser = flags.parser(prog="python -m services.prefill", description="...")
    config = flags.build(parser.parse_args(argv))        # validated once; errors name the flag

Naming (one rule for every service):
  - a field `max_kv_tokens` is the flag `--max-kv-tokens`; nested dataclass fields are flattened
    (EngineConfig.scheduler.policy is `--policy`); a field may rename its flag with
    `metadata={"flag": "slo-objective"}`, or hide it with `metadata={"flag": None}`. Names are
    unique within one tree (checked when the flags are generated).
  - the environment variable of a flag is MNEMOSYNE_ + the flag in upper case, dashes as
    underscores: `--max-kv-tokens` is MNEMOSYNE_MAX_KV_TOKENS, `--kvstore` MNEMOSYNE_KVSTORE.
    A few process-wide variables (RESERVED_ENV: MNEMOSYNE_CACHE, ...) are not settings, and no
    flag may take their names.
Precedence: flag > environment variable > the role's default (`defaults=`) > the dataclass default.
Values: bool flags are `--x` / `--no-x` (env: 1/0, true/false, yes/no, on/off); a field whose type
allows None takes `none` (or an empty env var) for None; a `Literal[...]` type gives the choices.
Help text: `helps=` (per entry point), else the field's `metadata["help"]`, else the comment at
the end of the field's line in the class source. Metavars: N (int), S (seconds, a float named
*_s), X (other float), DIR|FILE (model), HOST:PORT (kvstore), HOST, PORT, URL, TEXT, or
`metadata["metavar"]`; choices are shown as {a,b,c}. `HelpFormatter` gives a flag added by hand
(without a metavar) the same kind of metavar, never its dest in capitals (`MASTER_ADDR`).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from common.errors import ConfigError

ENV_PREFIX = "MNEMOSYNE_"
# Process-wide variables that are not settings of a config tree (read where they are used).
RESERVED_ENV = frozenset({"MNEMOSYNE_CACHE", "MNEMOSYNE_FUSED_OPS", "MNEMOSYNE_CPU_KERNELS", "MNEMOSYNE_HOST_MALLOC",
                          "MNEMOSYNE_LOG", "MNEMOSYNE_LAUNCHER_PID", "MNEMOSYNE_STANDBY_PROCESS"})
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
NONE = ("none", "")


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()          # argparse default: "not given on the command line"


def env_name(flag: str) -> str:
    """The environment variable of flag `flag` ("max-kv-tokens" or "--max-kv-tokens")."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


@dataclass(frozen=True)
class Setting:
    """One leaf field of a config tree: its path, flag, type and default."""
    path: tuple[str, ...]          # ("scheduler", "policy")
    flag: str                      # "policy" (no dashes)
    kind: type                     # int | float | str | bool
    optional: bool                 # None allowed
    choices: tuple[str, ...] | None
    default: Any                   # UNSET: required
    help: str
    metavar: str | None
    dest: str

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def option(self) -> str:
        return "--" + self.flag

    @property
    def env(self) -> str:
        return env_name(self.flag)

    def parse(self, text: str) -> Any:
        """The value of `text` (a flag's argument or an env var); ValueError names what it wanted."""
        t = text.strip()
        if self.optional and t.lower() in NONE:
            return None
        if self.kind is bool:
            if t.lower() in TRUE:
                return True
            if t.lower() in FALSE:
                return False
            raise ValueError(f"invalid bool value {text!r} (1/0, true/false, yes/no, on/off)")
        try:
            value = self.kind(t)
        except ValueError:
            raise ValueError(f"invalid {self.kind.__name__} value {text!r}") from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"invalid choice {text!r} (choose from {', '.join(self.choices)})")
        return value


# ---- reading the dataclasses ---------------------------------------------------------------

def _scalar(hint: Any) -> tuple[type | None, bool, tuple[str, ...] | None]:
    """(scalar type, None allowed, choices) of a field annotation; type None for a non-scalar."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            return None, optional, None
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), optional, tuple(choices)
    if hint in (int, float, str, bool):
        return hint, optional, None
    return None, optional, None


@functools.cache
def _comments(cls: type) -> dict[str, str]:
    """field name -> the comment at the end of its line in the class body (or a base's), joined
    with the comment-only lines right below it that start in the same column."""
    out: dict[str, str] = {}
    field_line = re.compile(r"^\s+(\w+)\s*:[^#\n]*?(#\s*)(.+)$")
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        name, column = None, -1
        for line in lines:
            m = field_line.match(line)
            if m:
                name, column = m.group(1), m.start(2)
                if name not in out:
                    out[name] = m.group(3).strip()
                else:
                    name = None
            elif name and line.find("#") == column and not line[:column].strip():
                out[name] += " " + line[column + 1:].strip()
            else:
                name = None
    return out


def _metavar(name: str, kind: type, choices: Any) -> str | None:
    if choices is not None:
        return None                 # argparse shows {a,b,c}
    if kind is int:
        return "PORT" if name.endswith("port") else "N"
    if kind is float:
        return "S" if name.endswith("_s") else "X"
    if kind is str:
        if name == "model":
            return "DIR|FILE"
        if name == "kvstore":
            return "HOST:PORT"
        if name.endswith(("host", "addr")):
            return "HOST"
        if name.endswith("url"):
            return "URL"
        if name.endswith("dir"):
            return "DIR"
        return "TEXT"
    return None


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, but a flag added without a metavar shows one from its type and name
    (the rule of the generated flags: N, PORT, S, X, HOST, TEXT, ...), not its dest in capitals.
    Every entry point's parser uses it (Flags.parser, the CLI, `make up`)."""

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        kind = action.type if action.type in (int, float, str) else str
        return _metavar(action.dest, kind, action.choices) or "TEXT"


def _field_default(f: dataclasses.Field, parent: Any) -> Any:
    if parent is not UNSET:
        return getattr(parent, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return UNSET


# ---- the generator -------------------------------------------------------------------------

class Flags:
    """The flags of one config dataclass tree.

    cls         the root dataclass (its nested dataclass fields become flags too, recursively)
    defaults    {"engine.scheduler.policy": "lars", ...}: a role's defaults (below flag and env)
    exclude     keys ("engine.parallel.kvp") or node keys ("engine.parallel") left out; `build`
                then takes their values from `fixed=` or the defaults
    helps       {"policy": "..."} or {"scheduler.policy": "..."}: help text for this entry point
    dest_prefix argparse dest = dest_prefix + the key with dots as underscores, unless `dests`
                maps a node key ("" = the root, "scheduler") to a prefix of its own
    groups      node key -> argparse group title (default: the field's name; the root: the class's
                name without "Config", lower case)
    """

    def __init__(self, cls: type, *, defaults: Mapping[str, Any] | None = None,
                 exclude: Iterable[str] = (), helps: Mapping[str, str] | None = None,
                 dest_prefix: str = "", dests: Mapping[str, str] | None = None,
                 groups: Mapping[str, str] | None = None) -> None:
        self.cls = cls
        self.defaults = dict(defaults or {})
        self.exclude = set(exclude)
        self.helps = dict(helps or {})
        self.dest_prefix = dest_prefix
        self.dests = dict(dests or {})
        self.groups = dict(groups or {})
        self.settings: list[Setting] = []
        self._all: list[Setting] = []
        self._group_of: dict[str, str] = {}
        self._walk(cls, (), UNSET, self.groups.get("", cls.__name__.removesuffix("Config").lower() or "options"))
        unknown = set(self.defaults) - {s.key for s in self.all_settings}
        if unknown:
            raise ConfigError(f"flags: defaults for unknown settings {sorted(unknown)}")
        seen: dict[str, str] = {}
        for s in self.all_settings:
            if s.flag in seen:
                raise ConfigError(f"flags: --{s.flag} names both {seen[s.flag]} and {s.key}")
            if s.env in RESERVED_ENV:
                raise ConfigError(f"flags: --{s.flag} would use the reserved variable {s.env}")
            seen[s.flag] = s.key

    # -- the tree
    def _walk(self, cls: type, path: tuple[str, ...], parent_default: Any, group: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            p = path + (f.name,)
            key = ".".join(p)
            default = _field_default(f, parent_default)
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                if key in self.exclude:
                    continue
                sub_group = self.groups.get(key, f.name)
                self._walk(hint, p, default, sub_group)
                continue
            flag = f.metadata.get("flag", f.name.replace("_", "-"))
            kind, optional, choices = _scalar(hint)
            if flag is None or (kind is None and key in self.exclude):
                continue                  # not a setting: the dataclass default applies
            if kind is None:
                raise ConfigError(f"flags: {cls.__name__}.{f.name} ({hint}) has no flag form; "
                                  f"give it metadata={{'flag': None}}")
            choices = tuple(f.metadata["choices"]) if "choices" in f.metadata else choices
            default = self.defaults.get(key, default)
            help_text = (self.helps.get(key) or self.helps.get(f.name) or f.metadata.get("help")
                         or _comments(cls).get(f.name, ""))
            node = ".".join(path)
            dest = (self.dests[node] + f.name if node in self.dests
                    else self.dest_prefix + "_".join(p))
            s = Setting(p, flag, kind, optional, choices, default, help_text,
                        f.metadata.get("metavar", _metavar(f.name, kind, choices)), dest)
            self._all.append(s)
            if key not in self.exclude:
                self.settings.append(s)
                self._group_of[key] = group

    @property
    def all_settings(self) -> list[Setting]:
        """Every leaf of the tree, excluded ones too."""
        return self._all

    def setting(self, key: str) -> Setting:
        for s in self._all:
            if s.key == key:
                return s
        raise KeyError(key)

    def env_names(self) -> list[str]:
        """The environment variables this tree reads (one per flag)."""
        return [s.env for s in self.settings]

    # -- argparse
    def add_to(self, parser: argparse.ArgumentParser,
               groups: Mapping[str, argparse._ArgumentGroup] | None = None) -> None:
        """Adds one flag per setting to `parser`, in argument groups by node (`groups=` reuses
        existing groups by title)."""
        made: dict[str, Any] = dict(groups or {})
        for s in self.settings:
            title = self._group_of[s.key]
            if title not in made:
                made[title] = parser.add_argument_group(title)
            kw: dict[str, Any] = dict(dest=s.dest, default=UNSET, help=self._help(s))
            if s.kind is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw.update(type=_Parser(s), metavar=s.metavar)
                if s.choices is not None:
                    kw["choices"] = s.choices
            made[title].add_argument(s.option, **kw)

    def parser(self, **kw: Any) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(**{"formatter_class": HelpFormatter, **kw})
        self.add_to(p)
        return p

    def _help(self, s: Setting) -> str:
        default = "required" if s.default is UNSET else f"default: {_show(s.default)}"
        text = s.help.replace("%", "%%")
        return f"{text} ({default}; env {s.env})" if text else f"({default}; env {s.env})"

    # -- values
    def given(self, args: argparse.Namespace | None = None,
              env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """key -> value of the settings set by a flag or an environment variable (flag wins)."""
        env = os.environ if env is None else env
        out: dict[str, Any] = {}
        for s in self.settings:
            value = getattr(args, s.dest, UNSET) if args is not None else UNSET
            if value is UNSET and s.env in env:
                try:
                    value = s.parse(env[s.env])
                except ValueError as e:
                    raise ConfigError(f"{s.env}: {e} (the environment form of {s.option})") from None
            if value is not UNSET:
                out[s.key] = value
        return out

    def values(self, args: argparse.Namespace | None = None,
               env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """key -> value of every setting: flag > env > the role's default > the dataclass default."""
        out = {s.key: s.default for s in self.settings}
        out.update(self.given(args, env))
        return out

    def resolve(self, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> set[str]:
        """Fills every flag's dest in `args` with its value (flag > env > default), so code may
        read `args.<dest>` directly; returns the keys that a flag or an env var set."""
        given = self.given(args, env)
        for s in self.settings:
            setattr(args, s.dest, given.get(s.key, s.default))
        return set(given)

    def build(self, args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None,
              fixed: Mapping[str, Any] | None = None) -> Any:
        """The validated config from parsed flags and the environment. `fixed` gives values by
        key ("engine.cache.max_kv_tokens" or, for the root's own fields, "model") that no flag
        sets; a ConfigError names the flags of the values it rejects."""
        values = {s.key: s.default for s in self._all}
        values.update(self.values(args, env))
        values.update(fixed or {})
        return self._make(self.cls, (), values)

    def _make(self, cls: type, path: tuple[str, ...], values: Mapping[str, Any]) -> Any:
        hints = typing.get_type_hints(cls)
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            key = ".".join(path + (f.name,))
            if key in values:
                kw[f.name] = values[key]
            elif dataclasses.is_dataclass(hints[f.name]):
                if any(k.startswith(key + ".") for k in values):
                    kw[f.name] = self._make(hints[f.name], path + (f.name,), values)
        missing = [self.setting(".".join(path + (n,))) for n, v in kw.items() if v is UNSET]
        if missing:
            raise ConfigError(f"{missing[0].option} is required (or set {missing[0].env})")
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(self._name_flags(str(e), cls, path)) from None
        except TypeError as e:
            raise ConfigError(f"{cls.__name__}: {e}") from None

    def _name_flags(self, message: str, cls: type, path: tuple[str, ...]) -> str:
        """Appends the flags of the settings (of this node and below) a validation message names:
        "scheduler: chunk_size must be positive, got 0 (--chunk-size)"."""
        names = [s.option for s in self._all if s.path[:len(path)] == path
                 and re.search(rf"\b{re.escape(s.path[-1])}\b", message)]
        return f"{message} ({', '.join(names)})" if names else message

    # -- back to argv (what `make up` passes to a service)
    def argv(self, values: Mapping[str, Any]) -> list[str]:
        """Flags that set `values` (key -> value) in a process built from the same tree."""
        out = []
        for key, value in values.items():
            s = self.setting(key)
            if s.kind is bool:
                out.append(s.option if value else f"--no-{s.flag}")
            else:
                out += [s.option, "none" if value is None else str(value)]
        return out


class _Parser:
    """argparse `type=`: Setting.parse; argparse reports the flag and the message."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self.__name__ = setting.kind.__name__         # argparse's "invalid int value" wording

    def __call__(self, text: str) -> Any:
        try:
            return self.setting.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return f"{value:g}"
    return str(value)


def parse_config(flags: Flags, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                 **parser_kw: Any) -> Any:
    """A service's `from_args`: parses argv (a usage error exits with status 2) and builds the
    validated config from flags > env > defaults (a bad value raises ConfigError naming the flag)."""
    return flags.build(flags.parser(**parser_kw).parse_args(argv), env)
