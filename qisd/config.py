"""One typed configuration object for the daemon and the CLI.

Layers, lowest first: embedded defaults < TOML file < ``QISD_*`` environment < flags
actually passed on the command line. Each section is a frozen dataclass whose field
defaults *are* the embedded defaults (:mod:`qisd.config_sections`); what each key
accepts is in :mod:`qisd.config_rules`; ``config/qisd.toml`` documents every key and
a test keeps it equal to the defaults. This module layers the sources into a
:class:`Config`, loads and renders it, and re-exports the public names of both.

Unlike permissive loaders, anything we do not recognise is an error: an unknown
section, key or ``QISD_*`` variable most likely means a typo, and a daemon silently
running on a default its operator thought they had changed is worse than one that
refuses to start. Every problem names the key, where the value came from (file path,
environment variable or flag) and what was expected; all problems found are reported
together so one ``qisd config check`` shows them all.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qisd import paths
from qisd.config_rules import (
    RULES,
    ConfigError,
    Invalid,
    accept,
    cross_problems,
    format_hostport,
    parse_hostport,
    show,
    toml_value,
)
from qisd.config_sections import (
    KEYS,
    KINDS,
    SECTION_NAMES,
    SECTIONS,
    ControlConfig,
    DaemonConfig,
    DhtConfig,
    LogConfig,
    MetricsConfig,
    NodeConfig,
    StoreConfig,
    SynthesisConfig,
)

__all__ = [
    "DEFAULT_CONFIG_TOML",
    "ENV_ALIASES",
    "KEYS",
    "MAX_SOCKET_PATH_BYTES",
    "NON_CONFIG_ENV",
    "Config",
    "ConfigError",
    "ControlConfig",
    "DaemonConfig",
    "DhtConfig",
    "LogConfig",
    "MetricsConfig",
    "NodeConfig",
    "Source",
    "StoreConfig",
    "SynthesisConfig",
    "env_var_name",
    "find_config_file",
    "flag_name",
    "format_hostport",
    "load_config",
    "parse_hostport",
    "to_dict",
    "to_toml",
]

#: Longest control socket path Linux accepts (``sun_path`` is 108 bytes with NUL).
MAX_SOCKET_PATH_BYTES = 107


@dataclass(frozen=True)
class Source:
    """Where a value came from: ``kind`` is file, env or flag; ``name`` the file
    path, variable name or flag."""

    kind: str
    name: str

    def __str__(self) -> str:
        return self.name


# --- sources: environment variables and flags ---------------------------------

#: ``QISD_*`` variables that are not config keys (read elsewhere).
NON_CONFIG_ENV = frozenset({"QISD_CONFIG", "QISD_LONG_FUZZ"})
#: Short variables for the options operators set most, beside ``QISD_<SECTION>_<KEY>``.
ENV_ALIASES: dict[str, str] = {
    "QISD_STATE_DIR": "node.state_dir",
    "QISD_SOCKET": "node.socket",
    "QISD_LISTEN": "node.listen",
    "QISD_BOOTSTRAP": "node.bootstrap",
    "QISD_METRICS": "metrics.listen",
    "QISD_MANIFEST": "node.manifest",
}
_FLAGS = {
    "node.state_dir": "--state-dir",
    "node.socket": "--socket",
    "node.listen": "--listen",
    "node.bootstrap": "--bootstrap",
    "node.manifest": "--manifest",
    "metrics.listen": "--metrics",
    "log.level": "--log-level",
    "log.format": "--log-format",
}


def flag_name(key: str) -> str:
    """The command-line flag that overrides a dotted key (used to name the source
    of an override in errors): ``--listen`` for ``node.listen``; keys without an
    operator flag get ``--<section>-<key>``."""
    return _FLAGS.get(key) or "--" + key.replace(".", "-").replace("_", "-")


# --- loading -------------------------------------------------------------------

#: Keys holding filesystem paths: relative ones are made absolute when loaded.
_PATH_KEYS = frozenset({"node.state_dir", "node.socket", "node.manifest"})


def env_var_name(key: str) -> str:
    """The ``QISD_<SECTION>_<KEY>`` variable for a dotted key."""
    return "QISD_" + key.replace(".", "_").upper()


_ENV_KEYS: dict[str, str] = {env_var_name(key): key for key in KEYS} | ENV_ALIASES


@dataclass(frozen=True)
class Config:
    """The effective configuration. ``source_file``, ``sources`` (dotted key ->
    where a non-default value came from) and ``path_env`` (the environment the
    automatic paths resolve against) describe it and take no part in equality."""

    node: NodeConfig = field(default_factory=NodeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dht: DhtConfig = field(default_factory=DhtConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    log: LogConfig = field(default_factory=LogConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    source_file: Path | None = field(default=None, compare=False)
    sources: Mapping[str, Source] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )
    path_env: Mapping[str, str] | None = field(default=None, compare=False, repr=False)

    def source_of(self, key: str) -> str:
        """Where the value of dotted ``key`` came from: a file path, an environment
        variable, a flag, or ``"default"``."""
        source = self.sources.get(key)
        return "default" if source is None else str(source)

    def _env(self) -> Mapping[str, str]:
        return os.environ if self.path_env is None else self.path_env

    def resolved_state_dir(self) -> Path:
        """``node.state_dir``, or the automatic one (:mod:`qisd.paths`) when empty."""
        if self.node.state_dir:
            return Path(self.node.state_dir)
        return paths.default_state_dir(self._env())

    def resolved_socket(self) -> Path:
        """``node.socket``, or the automatic one when empty. Raises ConfigError when
        the path is too long for a Unix socket, which bind() would only report as
        an obscure OSError."""
        if self.node.socket:
            sock = Path(self.node.socket)
        else:
            sock = paths.default_socket_path(self._env(), state_dir=self.resolved_state_dir())
        size = len(os.fsencode(sock))
        if size > MAX_SOCKET_PATH_BYTES:
            where = self.sources.get("node.socket") or self.sources.get("node.state_dir")
            prefix = f"{where}: " if where else ""
            raise ConfigError(
                f"{prefix}node.socket: the control socket path {str(sock)!r} is {size} bytes;"
                f" Unix sockets allow at most {MAX_SOCKET_PATH_BYTES}: set a shorter"
                " node.socket"
            )
        return sock


def find_config_file(
    path: Path | str | None = None, env: Mapping[str, str] | None = None
) -> Path | None:
    """The file to load: ``path`` if given, else ``$QISD_CONFIG``, else the systemd
    default (:func:`qisd.paths.default_config_path`), else None (embedded defaults)."""
    env = os.environ if env is None else env
    if path is not None and str(path):
        return Path(path)
    named = env.get("QISD_CONFIG", "")
    if named:
        return Path(named)
    return paths.default_config_path(env)


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        # utf-8-sig: a leading BOM (as some editors write) is not part of the TOML.
        return tomllib.loads(file.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: invalid TOML: the file is not UTF-8") from None


def _did_you_mean(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _absolute(value: str, base: Path, env: Mapping[str, str]) -> str:
    """Expand ``~`` and make a relative path absolute against ``base`` (the config
    file's directory for file values, so a config moves with its files)."""
    if not value:
        return value
    if value == "~" or value.startswith("~/"):
        path = paths.home_dir(env) / value[2:]
    else:
        path = Path(value)
    return str(path if path.is_absolute() else base / path)


def load_config(
    path: Path | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective config: defaults < TOML file < ``QISD_*`` env < overrides.

    ``path`` defaults as in :func:`find_config_file`; ``env`` to ``os.environ``;
    ``overrides`` maps dotted keys (``"node.listen"``) to the values of the flags
    the user actually gave (None values are skipped, so a CLI can pass every flag).
    Raises ConfigError listing every problem.
    """
    env = os.environ if env is None else env
    file = find_config_file(path, env)
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    problems: list[str] = []

    def put(key: str, raw: Any, source: Source, base: Path, *, textual: bool) -> None:
        try:
            value = accept(key, KINDS[key], raw, textual=textual)
        except Invalid as exc:
            problems.append(exc.render(str(source)))
            return
        if key in _PATH_KEYS:
            value = _absolute(value, base, env)
        values[key] = value
        sources[key] = source

    if file is not None:
        file = file.absolute()
        data = _read_toml(file)
        origin = Source("file", str(file))
        for name, table in data.items():
            if name not in SECTION_NAMES:
                what = "section" if isinstance(table, dict) else "key"
                hint = _did_you_mean(name, SECTION_NAMES) if what == "section" else ""
                if what == "key":
                    hint = " (keys belong in a section such as [node])"
                problems.append(f"{file}: unknown {what} {name}{hint}")
                continue
            if not isinstance(table, dict):
                problems.append(f"{file}: {name}: expected a table [{name}], got {show(table)}")
                continue
            for sub, raw in table.items():
                key = f"{name}.{sub}"
                if key not in RULES:
                    problems.append(f"{file}: unknown key {key}{_did_you_mean(key, KEYS)}")
                    continue
                put(key, raw, origin, file.parent, textual=False)

    cwd = Path.cwd()
    by_key: dict[str, list[str]] = {}
    for name in sorted(env):
        if not name.startswith("QISD_") or name in NON_CONFIG_ENV:
            continue
        target = _ENV_KEYS.get(name)
        if target is None:
            hint = _did_you_mean(name, sorted(_ENV_KEYS))
            problems.append(f"{name}: unknown QISD_ environment variable{hint}")
            continue
        by_key.setdefault(target, []).append(name)
    for key, names in by_key.items():
        for name in names:
            put(key, env[name], Source("env", name), cwd, textual=True)
        if len(names) > 1 and len({env[name].strip() for name in names}) > 1:
            problems.append(f"{' and '.join(names)} both set {key}, to different values")

    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in RULES:
            problems.append(f"{flag_name(key)}: unknown config key {key}")
            continue
        put(key, raw, Source("flag", flag_name(key)), cwd, textual=True)

    if not problems:
        merged = {key: values.get(key, _default(key)) for key in KEYS}
        problems += cross_problems(merged, lambda k: str(sources[k]) if k in sources else None)
    if problems:
        error = ConfigError(problems)
        # What was valid, the rest at defaults: `qisd config check` finds the
        # problems only a running daemon would meet in it too.
        try:
            error.partial = _assemble(values, sources, file, env)
        except (ValueError, TypeError):
            pass
        raise error
    return _assemble(values, sources, file, env)


def _assemble(values: Mapping[str, Any], sources: dict[str, Source], file: Path | None,
              env: Mapping[str, str]) -> Config:
    sections = {
        cls.section: cls(
            **{
                f.name: values[f"{cls.section}.{f.name}"]
                for f in fields(cls)
                if f"{cls.section}.{f.name}" in values
            }
        )
        for cls in SECTIONS
    }
    return Config(
        **sections,  # type: ignore[arg-type]
        source_file=file,
        sources=MappingProxyType(sources),
        path_env={name: env[name] for name in paths.PATH_ENV_VARS if name in env},
    )


def _default(key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(_DEFAULTS, section), name)


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The config as plain data (lists, not tuples), e.g. for ``--json``."""
    out: dict[str, dict[str, Any]] = {}
    for cls in SECTIONS:
        section = getattr(config, cls.section)
        out[cls.section] = {
            f.name: list(v) if isinstance(v := getattr(section, f.name), tuple) else v
            for f in fields(section)
        }
    return out


def to_toml(config: Config, *, annotate: bool = False) -> str:
    """The config as TOML that :func:`load_config` reads back to an equal Config.
    With ``annotate``, values not at their default say where they came from."""
    lines: list[str] = []
    for section, table in to_dict(config).items():
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        for name, value in table.items():
            line = f"{name} = {toml_value(value)}"
            source = config.sources.get(f"{section}.{name}")
            if annotate and source is not None:
                line += f"  # from {source}"
            lines.append(line)
    return "\n".join(lines) + "\n"


_DEFAULTS = Config()
#: The embedded defaults as TOML (what ``config/qisd.toml`` must agree with).
DEFAULT_CONFIG_TOML = to_toml(_DEFAULTS)
