"""One typed configuration object for the daemon and the CLI.

Layers, lowest first: embedded defaults < TOML file < ``QISD_*`` environment < flags
actually passed on the command line. Each section is a frozen dataclass whose field
defaults *are* the embedded defaults; ``config/qisd.toml`` documents every key (this
module only says what each accepts) and a test keeps it equal to them.

Unlike permissive loaders, anything we do not recognise is an error: an unknown
section, key or ``QISD_*`` variable most likely means a typo, and a daemon silently
running on a default its operator thought they had changed is worse than one that
refuses to start. Every problem names the key, where the value came from (file path,
environment variable or flag) and what was expected; all problems found are reported
together so one ``qisd config check`` shows them all.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from qisd import paths

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
    "load_config",
    "parse_hostport",
    "to_dict",
    "to_toml",
]

#: Longest control socket path Linux accepts (``sun_path`` is 108 bytes with NUL).
MAX_SOCKET_PATH_BYTES = 107


class ConfigError(ValueError):
    """The configuration cannot be used. ``problems`` lists every issue found, each
    naming the key, its source and what was expected."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Source:
    """Where a value came from: ``kind`` is file, env or flag; ``name`` the file
    path, variable name or flag."""

    kind: str
    name: str

    def __str__(self) -> str:
        return self.name


# --- values: parsing and rules -------------------------------------------------

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


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


def _check_host(host: str) -> None:
    if not host:
        raise ValueError("the host is empty")
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{host!r} is not a host name or IPv4 address")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv4 address") from None


def parse_hostport(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` (IPv6 as ``"[::1]:4470"``) into ``(host, port)``,
    the host without brackets. Port 0 is allowed (bind any free port). Raises
    ValueError saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"expected a 'host:port' string, got {type(text).__name__}")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError("missing ']' after the IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError("missing ':port' after ']'")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError("missing ':port'")
        if ":" in host:
            raise ValueError("an IPv6 address needs brackets, e.g. [::1]:4470")
        _check_host(host)
    if not port_text:
        raise ValueError("missing port")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is above 65535")
    return host, port


class _Invalid(Exception):
    """One bad value; rendered into a problem line once its source is known."""

    def __init__(self, key: str, raw: Any, expected: str, detail: str = "") -> None:
        super().__init__(key)
        self.key, self.raw, self.expected, self.detail = key, raw, expected, detail

    def render(self, source: str | None) -> str:
        return _problem(source, self.key, self.raw, self.expected, self.detail)


def _problem(source: str | None, key: str, raw: Any, expected: str, detail: str = "") -> str:
    where = f"{source}: " if source else ""
    tail = f" ({detail})" if detail else ""
    return f"{where}{key}: expected {expected}, got {_show(raw)}{tail}"


def _show(raw: Any) -> str:
    """A bad value as the user wrote it (TOML syntax), cut short if long."""
    if isinstance(raw, dict):
        return "a table"
    try:
        text = _toml_value(raw)
    except TypeError:
        text = "a list" if isinstance(raw, list | tuple) else repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class _Rule:
    """What a key accepts: ``expected`` reads after "expected" in an error;
    ``check`` gets a value of the right type and returns it (normalised) or raises
    ValueError with an optional detail."""

    expected: str
    check: Callable[[Any], Any]


def _where(expected: str, ok: Callable[[Any], bool]) -> _Rule:
    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError("")
        return value

    return _Rule(expected, check)


def _ints(lo: int, hi: int | None = None) -> _Rule:
    if hi is None:
        return _where(f"an integer >= {lo}", lambda v: v >= lo)
    return _where(f"an integer from {lo} to {hi}", lambda v: lo <= v <= hi)


_SECONDS = _where("a number of seconds > 0", lambda v: v > 0)
_RATE = _where("a rate > 0 (per second)", lambda v: v > 0)


def _address(*, allow_off: bool = False, allow_zero: bool = True) -> _Rule:
    def check(value: str) -> str:
        if allow_off and value == "off":
            return value
        _host, port = parse_hostport(value)
        if port == 0 and not allow_zero:
            raise ValueError("a peer's port cannot be 0")
        return value

    expected = "'host:port' (IPv6 as '[::1]:port')"
    return _Rule(expected + (" or 'off'" if allow_off else ""), check)


def _peers(value: tuple[str, ...]) -> tuple[str, ...]:
    for peer in value:
        try:
            _address(allow_zero=False).check(peer)
        except ValueError as exc:
            raise ValueError(f"{peer!r}: {exc}") from None
    return value


def _choice(*options: str) -> _Rule:
    def check(value: str) -> str:
        if value.lower() not in options:
            raise ValueError("")
        return value.lower()

    return _Rule("one of " + ", ".join(options), check)


def _mode(value: str) -> str:
    if not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError("")
    return value


_RULES: dict[str, _Rule] = {
    "node.state_dir": _Rule("a directory path, or '' for automatic", lambda v: v),
    "node.listen": _address(),
    "node.bootstrap": _Rule("a list of peer addresses 'host:port'", _peers),
    "node.socket": _Rule("a socket path, or '' for automatic", lambda v: v),
    "node.manifest": _Rule("a manifest file path, or '' for the default swarm", lambda v: v),
    "metrics.listen": _address(allow_off=True),
    "dht.ksize": _ints(1, 256),
    "dht.alpha": _ints(1, 64),
    "dht.rpc_timeout": _SECONDS,
    "dht.rpc_retries": _ints(0, 10),
    "dht.max_outstanding": _ints(1),
    "dht.rate_per_peer": _RATE,
    "dht.rate_burst": _ints(1),
    "dht.rate_total": _RATE,
    "dht.refresh_interval": _SECONDS,
    "dht.republish_interval": _SECONDS,
    "dht.handoff_concurrency": _ints(1, 1024),
    "dht.max_peers_per_subnet": _ints(1),
    "dht.listen_ttl": _SECONDS,
    "dht.max_listens_per_peer": _ints(1),
    "store.max_packets": _ints(1),
    "store.max_bytes": _ints(1),
    "store.origin_quota": _where("a fraction > 0 and <= 1", lambda v: 0 < v <= 1),
    "store.key_quota": _ints(1),
    "store.expire_interval": _SECONDS,
    "synthesis.enabled": _Rule("true or false", lambda v: v),
    "synthesis.synthesizer": _where(
        "an entry point name in group qisd.synthesizers",
        lambda v: re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", v) is not None,
    ),
    "synthesis.min_cohort": _ints(1),
    "synthesis.similarity": _where("a number from 0 to 1", lambda v: 0 <= v <= 1),
    "synthesis.interval": _SECONDS,
    "synthesis.min_new": _ints(1),
    "synthesis.epsilon": _where("a number >= 0 (0 = no noise)", lambda v: v >= 0),
    "synthesis.channel_size": _ints(1),
    "control.socket_mode": _Rule("an octal mode string such as '0660'", _mode),
    "control.max_request_bytes": _ints(1),
    "log.level": _choice("debug", "info", "warning", "error", "critical"),
    "log.format": _choice("auto", "json", "console"),
    "daemon.grace_period": _where("a number of seconds >= 0", lambda v: v >= 0),
}

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def _coerce(kind: type, raw: Any, *, textual: bool) -> Any:
    """``raw`` as a value of ``kind`` (the type of the key's default). Textual
    sources (environment, flags) give strings, parsed here; TOML values must
    already have the right type, except that an integer serves as a float."""
    if textual and isinstance(raw, str):
        text = raw.strip()
        if kind is bool and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        try:
            if kind is int:
                return int(text, 10)
            if kind is float:
                raw = float(text)
        except ValueError:
            raise ValueError("") from None
        if kind is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        elif kind is str:
            raw = text
    if kind is float and isinstance(raw, int | float) and not isinstance(raw, bool):
        if not math.isfinite(raw):
            raise ValueError("not a finite number")
        return float(raw)
    if kind is int and isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if kind is tuple and isinstance(raw, list | tuple):
        if all(isinstance(item, str) for item in raw):
            return tuple(_text(item) for item in raw)
        raise ValueError("every entry must be a string")
    if kind is str and isinstance(raw, str):
        return _text(raw)
    if kind is bool and isinstance(raw, bool):
        return raw
    raise ValueError("")


def _text(value: str) -> str:
    if "\0" in value:
        raise ValueError("contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid UTF-8") from None
    return value


def _accept(key: str, raw: Any, *, textual: bool) -> Any:
    """Coerce and check one value for ``key``; raise _Invalid saying why not."""
    rule = _RULES[key]
    try:
        return rule.check(_coerce(_KINDS[key], raw, textual=textual))
    except ValueError as exc:
        raise _Invalid(key, raw, rule.expected, str(exc)) from None


def _cross_problems(values: Mapping[str, Any], source: Callable[[str], str | None]) -> list[str]:
    """Checks between keys (only those whose keys are all in ``values``)."""
    problems = []
    alpha, ksize = values.get("dht.alpha"), values.get("dht.ksize")
    if alpha is not None and ksize is not None and alpha > ksize:
        # Kademlia 2.3: alpha parallel queries go to the alpha closest of the k known.
        problems.append(
            _problem(source("dht.alpha"), "dht.alpha", alpha, f"at most dht.ksize ({ksize})")
        )
    return problems


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        chars = (
            _ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
            for c in value
        )
        return '"' + "".join(chars) + '"'
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


@dataclass(frozen=True)
class _Section:
    """Base of the section dataclasses: validates (and normalises, e.g. lists to
    tuples, ints to floats) on construction, so a config built in code is held to
    the same rules as one loaded from a file."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        problems: list[str] = []
        values: dict[str, Any] = {}
        for f in fields(self):
            key = f"{self.section}.{f.name}"
            raw = getattr(self, f.name)
            try:
                value = _accept(key, raw, textual=False)
            except _Invalid as exc:
                problems.append(exc.render(None))
                continue
            object.__setattr__(self, f.name, value)
            values[key] = value
        problems += _cross_problems(values, lambda _key: None)
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class NodeConfig(_Section):
    """[node]: where this node keeps its state, listens and finds its swarm."""

    section: ClassVar[str] = "node"
    state_dir: str = ""
    listen: str = "0.0.0.0:4470"
    bootstrap: tuple[str, ...] = ()
    socket: str = ""
    manifest: str = ""

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen)

    @property
    def bootstrap_addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(parse_hostport(peer) for peer in self.bootstrap)


@dataclass(frozen=True)
class MetricsConfig(_Section):
    """[metrics]: the Prometheus HTTP endpoint."""

    section: ClassVar[str] = "metrics"
    listen: str = "127.0.0.1:9470"

    @property
    def address(self) -> tuple[str, int] | None:
        """The HTTP listen address, or None when metrics are ``off``."""
        return None if self.listen == "off" else parse_hostport(self.listen)


@dataclass(frozen=True)
class DhtConfig(_Section):
    """[dht]: Kademlia parameters (k, alpha; paper 2.3) and the transport's limits."""

    section: ClassVar[str] = "dht"
    ksize: int = 20
    alpha: int = 3
    rpc_timeout: float = 2.0
    rpc_retries: int = 1
    max_outstanding: int = 4096
    rate_per_peer: float = 500.0
    rate_burst: int = 1000
    rate_total: float = 20000.0
    refresh_interval: float = 3600.0
    republish_interval: float = 3600.0
    handoff_concurrency: int = 8
    max_peers_per_subnet: int = 2
    listen_ttl: float = 600.0
    max_listens_per_peer: int = 64


@dataclass(frozen=True)
class StoreConfig(_Section):
    """[store]: capacity and fairness limits of the packet store."""

    section: ClassVar[str] = "store"
    max_packets: int = 1_000_000
    max_bytes: int = 1_073_741_824
    origin_quota: float = 0.25
    key_quota: int = 10_000
    expire_interval: float = 60.0


@dataclass(frozen=True)
class SynthesisConfig(_Section):
    """[synthesis]: the worker that turns delivered packets into syntheses."""

    section: ClassVar[str] = "synthesis"
    enabled: bool = True
    synthesizer: str = "cohort"
    min_cohort: int = 5
    similarity: float = 0.9
    interval: float = 2.0
    min_new: int = 1
    epsilon: float = 0.0
    channel_size: int = 4096


@dataclass(frozen=True)
class ControlConfig(_Section):
    """[control]: the local API on the Unix socket."""

    section: ClassVar[str] = "control"
    socket_mode: str = "0660"
    max_request_bytes: int = 1_048_576

    @property
    def mode(self) -> int:
        """``socket_mode`` as permission bits for ``os.chmod``."""
        return int(self.socket_mode, 8)


@dataclass(frozen=True)
class LogConfig(_Section):
    """[log]: level and rendering (see :mod:`qisd.logs`)."""

    section: ClassVar[str] = "log"
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class DaemonConfig(_Section):
    """[daemon]: process lifecycle."""

    section: ClassVar[str] = "daemon"
    grace_period: float = 5.0


_SECTIONS: tuple[type[_Section], ...] = (
    NodeConfig,
    MetricsConfig,
    DhtConfig,
    StoreConfig,
    SynthesisConfig,
    ControlConfig,
    LogConfig,
    DaemonConfig,
)
_SECTION_NAMES = tuple(cls.section for cls in _SECTIONS)
#: Every dotted key, in file order.
KEYS: tuple[str, ...] = tuple(f"{cls.section}.{f.name}" for cls in _SECTIONS for f in fields(cls))
#: The type of each key, from its default (tuple means a list of strings).
_KINDS: dict[str, type] = {
    f"{cls.section}.{f.name}": type(f.default) for cls in _SECTIONS for f in fields(cls)
}
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
        with file.open("rb") as fh:
            return tomllib.load(fh)
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
            value = _accept(key, raw, textual=textual)
        except _Invalid as exc:
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
            if name not in _SECTION_NAMES:
                what = "section" if isinstance(table, dict) else "key"
                hint = _did_you_mean(name, _SECTION_NAMES) if what == "section" else ""
                if what == "key":
                    hint = " (keys belong in a section such as [node])"
                problems.append(f"{file}: unknown {what} {name}{hint}")
                continue
            if not isinstance(table, dict):
                problems.append(f"{file}: {name}: expected a table [{name}], got {_show(table)}")
                continue
            for sub, raw in table.items():
                key = f"{name}.{sub}"
                if key not in _RULES:
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
        if key not in _RULES:
            problems.append(f"{flag_name(key)}: unknown config key {key}")
            continue
        put(key, raw, Source("flag", flag_name(key)), cwd, textual=True)

    if not problems:
        merged = {key: values.get(key, _default(key)) for key in KEYS}
        problems += _cross_problems(merged, lambda k: str(sources[k]) if k in sources else None)
    if problems:
        raise ConfigError(problems)

    sections = {
        cls.section: cls(
            **{
                f.name: values[f"{cls.section}.{f.name}"]
                for f in fields(cls)
                if f"{cls.section}.{f.name}" in values
            }
        )
        for cls in _SECTIONS
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
    for cls in _SECTIONS:
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
            line = f"{name} = {_toml_value(value)}"
            source = config.sources.get(f"{section}.{name}")
            if annotate and source is not None:
                line += f"  # from {source}"
            lines.append(line)
    return "\n".join(lines) + "\n"


_DEFAULTS = Config()
#: The embedded defaults as TOML (what ``config/qisd.toml`` must agree with).
DEFAULT_CONFIG_TOML = to_toml(_DEFAULTS)
