"""Value rules for the configuration: what each key accepts, and how problems read.

Pure functions and data, no I/O: :mod:`qisd.config` layers defaults, file,
environment and flags, and calls :func:`accept` here on every value; the section
dataclasses (:mod:`qisd.config_sections`) call it too, so a config built in code is
held to the same rules as one loaded from a file.

A problem line always names the key, where the value came from (when known), what
was expected and the value as the user wrote it, e.g.
``QISD_DHT_KSIZE: dht.ksize: expected an integer from 1 to 64, got "x"``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RULES",
    "ConfigError",
    "Invalid",
    "Rule",
    "accept",
    "cross_problems",
    "format_hostport",
    "parse_hostport",
    "problem",
    "show",
    "toml_value",
]


class ConfigError(ValueError):
    """The configuration cannot be used. ``problems`` lists every issue found, each
    naming the key, its source and what was expected."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        #: The config of the valid values (the rest at defaults), when one was built.
        self.partial: Any = None
        super().__init__("\n".join(self.problems))


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


def format_hostport(host: str, port: int) -> str:
    """``host:port`` as :func:`parse_hostport` reads it (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` (IPv6 as ``"[::1]:4470"``) into ``(host, port)``,
    the host without brackets. Port 0 is allowed (bind any free port). Raises
    ValueError saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"expected a 'host:port' string, got {type(text).__name__}")
    if "://" in text:
        raise ValueError("give host:port, not a URL (e.g. 127.0.0.1:9470)")
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
        raise ValueError(f"port {port_text!r} is not a number from 0 to 65535")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is above 65535")
    return host, port


class Invalid(Exception):
    """One bad value; rendered into a problem line once its source is known."""

    def __init__(self, key: str, raw: Any, expected: str, detail: str = "") -> None:
        super().__init__(key)
        self.key, self.raw, self.expected, self.detail = key, raw, expected, detail

    def render(self, source: str | None) -> str:
        return problem(source, self.key, self.raw, self.expected, self.detail)


def problem(source: str | None, key: str, raw: Any, expected: str, detail: str = "") -> str:
    """One problem line: ``<source>: <key>: expected <expected>, got <raw> (<detail>)``."""
    where = f"{source}: " if source else ""
    tail = f" ({detail})" if detail else ""
    return f"{where}{key}: expected {expected}, got {show(raw)}{tail}"


def show(raw: Any) -> str:
    """A bad value as the user wrote it (TOML syntax), cut short if long."""
    if isinstance(raw, dict):
        return "a table"
    try:
        text = toml_value(raw)
    except TypeError:
        text = "a list" if isinstance(raw, list | tuple) else repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Rule:
    """What a key accepts: ``expected`` reads after "expected" in an error;
    ``check`` gets a value of the right type and returns it (normalised) or raises
    ValueError with an optional detail."""

    expected: str
    check: Callable[[Any], Any]


def _where(expected: str, ok: Callable[[Any], bool]) -> Rule:
    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError("")
        return value

    return Rule(expected, check)


def _ints(lo: int, hi: int | None = None) -> Rule:
    if hi is None:
        return _where(f"an integer >= {lo}", lambda v: v >= lo)
    return _where(f"an integer from {lo} to {hi}", lambda v: lo <= v <= hi)


_SECONDS = _where("a number of seconds > 0", lambda v: v > 0)
_RATE = _where("a rate > 0 (per second)", lambda v: v > 0)


def _address(*, allow_off: bool = False, allow_zero: bool = True) -> Rule:
    def check(value: str) -> str:
        if allow_off and value == "off":
            return value
        _host, port = parse_hostport(value)
        if port == 0 and not allow_zero:
            raise ValueError("a peer's port cannot be 0")
        return value

    expected = "'host:port' (IPv6 as '[::1]:port')"
    return Rule(expected + (" or 'off'" if allow_off else ""), check)


def _peers(value: tuple[str, ...]) -> tuple[str, ...]:
    for peer in value:
        try:
            _address(allow_zero=False).check(peer)
        except ValueError as exc:
            raise ValueError(f"{peer!r}: {exc}") from None
    return value


def parse_range(entry: str) -> tuple[str, tuple[float, float]]:
    """``"los_days=0:365"`` as ``("los_days", (0.0, 365.0))``; ValueError saying what
    is wrong otherwise."""
    name, sep, bounds = entry.partition("=")
    lo_text, colon, hi_text = bounds.partition(":")
    if not sep or not colon or not name.strip():
        raise ValueError(f"{entry!r} is not 'field=lo:hi'")
    try:
        lo, hi = float(lo_text), float(hi_text)
    except ValueError:
        raise ValueError(f"{entry!r}: lo and hi must be numbers") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi
            and math.isfinite(hi - lo)):
        raise ValueError(f"{entry!r}: lo and hi must be finite, lo <= hi (and hi - lo too)")
    return name.strip(), (lo, hi)


def _ranges(value: tuple[str, ...]) -> tuple[str, ...]:
    names = [parse_range(entry)[0] for entry in value]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"field {twice[0]!r} given twice")
    return value


def _choice(*options: str) -> Rule:
    def check(value: str) -> str:
        if value.lower() not in options:
            raise ValueError("")
        return value.lower()

    return Rule("one of " + ", ".join(options), check)


def _mode(value: str) -> str:
    if not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError("")
    return value


RULES: dict[str, Rule] = {
    "node.state_dir": Rule("a directory path, or '' for automatic", lambda v: v),
    "node.listen": _address(),
    "node.bootstrap": Rule("a list of peer addresses 'host:port'", _peers),
    "node.socket": Rule("a socket path, or '' for automatic", lambda v: v),
    "node.manifest": Rule("a manifest file path, or '' for the default swarm", lambda v: v),
    "metrics.listen": _address(allow_off=True),
    # A reply names at most k contacts, and peers accept at most 64 (which fit one
    # datagram even as IPv6): a larger k would answer with lists nobody takes.
    "dht.ksize": _ints(1, 64),
    "dht.alpha": _ints(1, 64),
    "dht.rpc_timeout": _SECONDS,
    "dht.rpc_retries": _ints(0, 10),
    "dht.max_outstanding": _ints(1),
    "dht.rate_per_peer": _RATE,
    "dht.rate_burst": _ints(1),
    "dht.rate_total": _RATE,
    "dht.refresh_interval": _SECONDS,
    "dht.republish_interval": _SECONDS,
    "dht.origin_republish_interval": _SECONDS,
    "dht.handoff_concurrency": _ints(1, 1024),
    "dht.max_peers_per_subnet": _ints(1),
    "dht.listen_ttl": _SECONDS,
    "dht.max_listens_per_peer": _ints(1),
    "store.max_packets": _ints(1),
    "store.max_bytes": _ints(1),
    "store.origin_quota": _where("a fraction > 0 and <= 1", lambda v: 0 < v <= 1),
    "store.key_quota": _ints(1),
    "store.expire_interval": _SECONDS,
    "store.cache_bytes": _ints(0),
    "synthesis.enabled": Rule("true or false", lambda v: v),
    "synthesis.synthesizer": _where(
        "an entry point name in group qisd.synthesizers",
        lambda v: re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", v) is not None,
    ),
    "synthesis.min_cohort": _ints(1),
    "synthesis.similarity": _where("a number from 0 to 1", lambda v: 0 <= v <= 1),
    "synthesis.interval": _SECONDS,
    "synthesis.min_new": _ints(1),
    "synthesis.epsilon": _where("a number >= 0 (0 = no noise)", lambda v: v >= 0),
    "synthesis.ranges": Rule("a list of 'field=lo:hi' (numbers, lo <= hi)", _ranges),
    "synthesis.channel_size": _ints(1),
    "control.socket_mode": Rule("an octal mode string such as '0660'", _mode),
    "control.max_request_bytes": _ints(1),
    "control.idle_timeout": _SECONDS,
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


def accept(key: str, kind: type, raw: Any, *, textual: bool) -> Any:
    """Coerce ``raw`` to ``kind`` (the type of the key's default, tuple meaning a
    list of strings) and check it against ``key``'s rule; raise Invalid saying why
    not."""
    rule = RULES[key]
    try:
        return rule.check(_coerce(kind, raw, textual=textual))
    except ValueError as exc:
        raise Invalid(key, raw, rule.expected, str(exc)) from None


def cross_problems(values: Mapping[str, Any], source: Callable[[str], str | None]) -> list[str]:
    """Checks between keys (only those whose keys are all in ``values``)."""
    problems = []
    alpha, ksize = values.get("dht.alpha"), values.get("dht.ksize")
    if alpha is not None and ksize is not None and alpha > ksize:
        # Kademlia 2.3: alpha parallel queries go to the alpha closest of the k known.
        problems.append(
            problem(source("dht.alpha"), "dht.alpha", alpha, f"at most dht.ksize ({ksize})")
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


def toml_value(value: Any) -> str:
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
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")
