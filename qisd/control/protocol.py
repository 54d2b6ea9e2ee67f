"""The control protocol, version 1: framing, messages, method signatures (pure).

Newline-delimited JSON over a Unix stream socket. Each request is one line::

    {"v": 1, "id": 7, "method": "query", "params": {"topic": "t", "vector": [0.1, 0.2], "k": 5}}

``id`` is an integer or a string chosen by the client and echoed in the reply;
``params`` may be left out when a method takes none. Each reply is one line::

    {"v": 1, "id": 7, "ok": true, "result": {...}}
    {"v": 1, "id": 7, "ok": false, "error": {"code": "bad_request", "message": "..."}}

Replies come in request order, so a client may pipeline several requests on one
connection. Blank lines are ignored. When the daemon stops (SIGTERM) it closes idle
connections and watches at once; a request being handled finishes and is answered,
then its connection closes (requests pipelined behind it are not run); a request
read as the stop began is answered ``unavailable``. Error codes:

===================== ==========================================================
``bad_request``       not JSON (a key named twice in one object included), not an
                      object, a missing/unknown/ill-typed field or param (the
                      message names it)
``unknown_method``    no such method
``unsupported_version`` ``v`` is not 1
``too_large``         the request line is longer than the server's limit (1 MiB by
                      default); the rest of that line is skipped
``invalid``           the daemon refused the content (a bad vector, outcome, topic)
``unavailable``       the daemon cannot do it now (too many connections, or it is
                      stopping: the request was not run)
``storage_full``      the packet store's disk is full: nothing was stored; reads
                      and queries still work, writes resume once space is freed
``storage_read_only`` the packet store's directory is read-only (same behaviour)
``storage_error``     the packet store's disk failed (an I/O error)
``forbidden``         the peer's uid/gid may not use this socket; the server closes
``idle``              no request came for ``[control] idle_timeout`` seconds (60);
                      the server closes (with ``"id": null``; no request was run)
``internal``          a bug in the daemon; the connection stays usable
===================== ==========================================================

A reply to a line whose ``id`` could not be read carries ``"id": null``.

Methods and params (types are JSON types; ``?`` marks optional, with its default):

* ``status`` / ``peers`` / ``identity`` -- no params; ``peers`` -> ``{"peers":
  [{"node_id", "address", "last_seen_s", "failures"}, ...]}``: seconds since the peer
  last sent or answered something (null: not since the daemon started, a contact
  read from the saved table) and the RPCs it failed to answer in a row
* ``emit`` -- ``topic`` string, ``vector`` array of numbers, ``outcome`` object,
  ``n?`` integer (1), ``ttl?`` integer or null (the swarm's default) -> ``{"id": hex, ...}``.
  Outcome values are strings, booleans, or numbers within +-2**63; a field name has
  no ``=``, ``?`` or ``~`` and at most 27 characters for numbers, 31 otherwise
  (synthesis packets carry each field under a derived name: ``los_days.mean``,
  ``survived?true``)
* ``emit_many`` -- ``items``: array of emit params -> ``{"results": [{"id": hex} |
  {"error": {...}}, ...]}``, one per item, in order
* ``query`` -- ``topic``, ``vector``, ``k?`` (10) -> ``{"matches": [...], "answer": {...},
  "notes": [...]}``; only packets of the query's dimension are compared, and a note
  says how many of the topic's packets of other dimensions were left out
* ``packets`` -- ``topic?`` string or null, ``limit?`` (100) -> ``{"packets": [...]}``
* ``bootstrap`` -- ``addresses``: array of ``"host:port"`` -> ``{"contacted", "peers",
  "failed": [{"address", "reason"}, ...]}`` (the addresses that did not answer, and why)
* ``watch`` -- ``topic``, ``vector?`` (null): streaming. The reply is an ack
  ``{"v": 1, "id": 3, "ok": true, "result": {"watching": "<topic>"}}`` followed by one
  line per packet, ``{"v": 1, "id": 3, "event": {...packet summary...}}``, until the
  client closes the connection. An event carries ``"missed": N`` when the client was
  too slow to take N packets since its previous event (its buffer was full). A
  watching connection takes no further requests; if the stream fails, a final error
  reply with the watch's id ends it (code ``unavailable`` when the daemon is
  stopping), and a stream that ends ends with the result ``{"ended": true}``. A
  connection closed without either was cut: the daemon died, or the client read so
  slowly that a write waited past the daemon's write deadline (10 s); packets after
  the last event were not delivered to it. A watch
  refused before its ack leaves the connection open for requests.

Try it by hand (the socket is ``/run/qisd/qisd.sock`` under systemd; ``qisd status``
names the one in use in its error when no daemon runs there)::

    SOCK=/run/qisd/qisd.sock
    echo '{"v":1,"id":1,"method":"status"}' | socat - UNIX-CONNECT:$SOCK
    python3 -c 'import socket as S,sys; s=S.socket(S.AF_UNIX); s.connect(sys.argv[1])
    s.sendall(sys.argv[2].encode()+b"\\n"); print(s.makefile().readline())' \\
        "$SOCK" '{"v":1,"id":1,"method":"status"}'
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qisd.control.errors import ControlError
from qisd.storage import STORAGE_CODES

__all__ = [
    "BAD_REQUEST",
    "DEFAULT_MAX_REQUEST_BYTES",
    "ERROR_CODES",
    "FORBIDDEN",
    "IDLE",
    "INTERNAL",
    "INVALID",
    "METHODS",
    "PROTOCOL_VERSION",
    "STREAMING_METHODS",
    "TOO_LARGE",
    "UNAVAILABLE",
    "UNKNOWN_METHOD",
    "UNSUPPORTED_VERSION",
    "Param",
    "Rejection",
    "Reply",
    "Request",
    "check_params",
    "decode_reply",
    "encode_error",
    "encode_event",
    "encode_request",
    "encode_result",
    "loads",
    "parse_request",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_REQUEST_BYTES = 1 << 20

BAD_REQUEST = "bad_request"
UNKNOWN_METHOD = "unknown_method"
UNSUPPORTED_VERSION = "unsupported_version"
TOO_LARGE = "too_large"
INVALID = "invalid"
UNAVAILABLE = "unavailable"
FORBIDDEN = "forbidden"
IDLE = "idle"
INTERNAL = "internal"
ERROR_CODES = frozenset(
    {BAD_REQUEST, UNKNOWN_METHOD, UNSUPPORTED_VERSION, TOO_LARGE, INVALID, UNAVAILABLE,
     FORBIDDEN, IDLE, INTERNAL, *STORAGE_CODES}
)
#: Client-side only: the daemon's reply did not follow this protocol.
BAD_REPLY = "bad_reply"

RequestId = int | str


@dataclass(frozen=True)
class Param:
    """One param of a method: its name, JSON type (a key of ``_CHECKS``) and, when
    optional, its default."""

    name: str
    type: str
    required: bool = True
    default: Any = None


_TOPIC = Param("topic", "string")
_VECTOR = Param("vector", "vector")
_EMIT = (
    _TOPIC, _VECTOR, Param("outcome", "object"),
    Param("n", "integer", False, 1), Param("ttl", "integer|null", False, None),
)

#: Every method and its params, in the order the daemon's methods declare them
#: (a test checks this against :class:`qisd.control.api.ControlAPI`).
METHODS: Mapping[str, tuple[Param, ...]] = {
    "status": (),
    "peers": (),
    "identity": (),
    "emit": _EMIT,
    "emit_many": (Param("items", "object_list"),),
    "query": (_TOPIC, _VECTOR, Param("k", "integer", False, 10)),
    "watch": (_TOPIC, Param("vector", "vector|null", False, None)),
    "packets": (Param("topic", "string|null", False, None),
                Param("limit", "integer", False, 100)),
    "bootstrap": (Param("addresses", "string_list"),),
}
STREAMING_METHODS = frozenset({"watch"})


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_value(kind: str, value: Any) -> tuple[bool, Any]:
    """(accepted, normalised value) of ``value`` for a param of type ``kind``."""
    if kind.endswith("|null"):
        if value is None:
            return True, None
        kind = kind.removesuffix("|null")
    if kind == "string":
        return isinstance(value, str), value
    if kind == "integer":
        return type(value) is int, value
    if kind == "object":
        return isinstance(value, dict), value
    if kind == "vector":
        if not (isinstance(value, list) and all(_is_number(x) for x in value)):
            return False, value
        # The daemon gets finite floats whatever the client wrote (1 and 1.0 alike).
        try:
            floats = [float(x) for x in value]
        except OverflowError:  # an integer beyond float range
            return False, value
        return all(math.isfinite(x) for x in floats), floats
    if kind == "string_list":
        return isinstance(value, list) and all(isinstance(x, str) for x in value), value
    if kind == "object_list":
        return isinstance(value, list) and all(isinstance(x, dict) for x in value), value
    raise AssertionError(f"unknown param type {kind!r}")


_EXPECTED = {
    "string": "a string",
    "integer": "an integer",
    "object": "an object",
    "vector": "an array of finite numbers",
    "string_list": "an array of strings",
    "object_list": "an array of objects",
}


def _expected(kind: str) -> str:
    base = kind.removesuffix("|null")
    return _EXPECTED[base] + (" or null" if kind.endswith("|null") else "")


def check_params(
    method: str, params: Mapping[str, Any], *, label: str = "param"
) -> dict[str, Any]:
    """``params`` checked against ``METHODS[method]``, defaults filled in and vectors
    as floats; raises ControlError(bad_request) naming the first wrong ``label``."""
    spec = METHODS[method]
    names = {p.name for p in spec}
    for name in params:
        if name not in names:
            allowed = ", ".join(sorted(names)) or "none"
            raise ControlError(
                BAD_REQUEST, f"unknown {label} {name!r} for {method} (allowed: {allowed})"
            )
    out: dict[str, Any] = {}
    for p in spec:
        if p.name not in params:
            if p.required:
                raise ControlError(BAD_REQUEST, f"missing {label} {p.name!r} for {method}")
            out[p.name] = p.default
            continue
        ok, value = _check_value(p.type, params[p.name])
        if not ok:
            raise ControlError(
                BAD_REQUEST,
                f"{label} {p.name!r} must be {_expected(p.type)},"
                f" got {_json_type(params[p.name])}",
            )
        out[p.name] = value
    return out


# -- requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    id: RequestId
    method: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Rejection:
    """A request line refused before dispatch; ``id`` is None when unreadable.
    ``method`` is the method name once known, ``"unknown"`` for a name that is not
    a method, ``"-"`` before that (a bounded label for statistics)."""

    id: RequestId | None
    error: ControlError
    method: str = "-"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


class NotUnicode(ValueError):
    """A JSON string escapes a lone UTF-16 surrogate (``"\\ud800"``): valid JSON
    syntax, but not Unicode text, and it cannot be written back out as UTF-8.
    ``value`` is what the line parsed to (so a request's id can still be answered)."""

    def __init__(self, message: str, value: Any) -> None:
        super().__init__(message)
        self.value = value


#: Where a lone surrogate can come from: a ``\\uD800``-``\\uDFFF`` escape.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
#: The same in text, where a lone surrogate can also stand as itself (text made from
#: undecodable bytes with ``surrogateescape``).
_SURROGATE_IN_TEXT = re.compile("\\\\u[dD][89abcdefABCDEF]|[\ud800-\udfff]")


def loads(line: bytes | str) -> Any:
    """Strict JSON: raises ValueError for anything else, including ``NaN``,
    ``Infinity`` and numbers beyond float range, which would reach the daemon as
    non-finite floats, an object naming a key twice (JSON parsers disagree on
    which one wins; here neither is silently dropped), and :class:`NotUnicode` for
    a string with a lone surrogate (paired surrogates, as ``"\\ud83d\\ude00"``,
    are one character and fine)."""
    value = json.loads(
        line, parse_constant=_reject_constant, parse_float=_finite_float,
        object_pairs_hook=_unique_keys,
    )
    suspect = (_SURROGATE_IN_TEXT.search(line) if isinstance(line, str)
               else _SURROGATE_ESCAPE.search(line))
    if suspect:
        where = _lone_surrogate(value, "")
        if where is not None:
            raise NotUnicode(f"{where or 'the value'}: a lone surrogate escape "
                             "(\\ud800-\\udfff not in a pair)", value)
    return value


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (or key) in ``value`` that is not Unicode text."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return at
        elif isinstance(item, dict):
            for key, inner in reversed(item.items()):
                here = f"{at}.{key}" if at else str(key)
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return f"{at}.{key!a}" if at else f"{key!a}"
                stack.append((inner, here))
        elif isinstance(item, list):
            stack.extend((inner, f"{at}[{i}]") for i, inner in reversed(list(enumerate(item))))
    return None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


#: Bounds the daemon holds ``query``'s ``k`` and ``packets``' ``limit`` to.
MAX_K = 200
MAX_LIMIT = 10_000

_REQUEST_FIELDS = frozenset({"v", "id", "method", "params"})


def parse_request(line: bytes) -> Request | Rejection:
    """Decide what one request line asks for, or why it is refused."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection(None, ControlError(
            BAD_REQUEST, f"request is not UTF-8 text: byte 0x{line[exc.start]:02x} at offset"
                         f" {exc.start} ({exc.reason})"))
    try:
        msg = loads(text)
    except NotUnicode as exc:
        rid = exc.value.get("id") if isinstance(exc.value, dict) else None
        if (not isinstance(rid, int | str) or isinstance(rid, bool)
                or _lone_surrogate(rid, "") is not None):
            rid = None  # answered as a connection-level error
        return Rejection(rid, ControlError(BAD_REQUEST, f"request is not Unicode text: {exc}"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 alike
        return Rejection(None, ControlError(BAD_REQUEST, f"request is not valid JSON: {exc}"))
    if not isinstance(msg, dict):
        return Rejection(
            None, ControlError(BAD_REQUEST, f"request must be an object, got {_json_type(msg)}")
        )
    rid = msg.get("id")
    if not isinstance(rid, int | str) or isinstance(rid, bool):
        what = "missing field 'id'" if "id" not in msg else (
            f"field 'id' must be an integer or a string, got {_json_type(rid)}")
        return Rejection(None, ControlError(BAD_REQUEST, what))

    def reject(code: str, message: str) -> Rejection:
        return Rejection(rid, ControlError(code, message))

    unknown = sorted(set(msg) - _REQUEST_FIELDS)
    if unknown:
        return reject(BAD_REQUEST, f"unknown field {unknown[0]!r} in request")
    if "v" not in msg:
        return reject(BAD_REQUEST, "missing field 'v' (the protocol version, 1)")
    if type(msg["v"]) is not int or msg["v"] != PROTOCOL_VERSION:
        return reject(
            UNSUPPORTED_VERSION,
            f"protocol version {msg['v']!r} is not supported (this daemon speaks 1)",
        )
    method = msg.get("method")
    if not isinstance(method, str):
        what = "missing field 'method'" if "method" not in msg else (
            f"field 'method' must be a string, got {_json_type(method)}")
        return reject(BAD_REQUEST, what)
    params = msg.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return reject(BAD_REQUEST, f"field 'params' must be an object, got {_json_type(params)}")
    if method not in METHODS:
        return Rejection(rid, ControlError(
            UNKNOWN_METHOD,
            f"unknown method {method!r} (known: {', '.join(sorted(METHODS))})",
        ), "unknown")
    try:
        checked = check_params(method, params)
    except ControlError as exc:
        return Rejection(rid, exc, method)
    return Request(rid, method, checked)


# -- encoding -----------------------------------------------------------------------


def _dumps(msg: Mapping[str, Any]) -> bytes:
    """One line of compact JSON; raises ValueError/TypeError for what JSON cannot
    carry (NaN, bytes, sets...)."""
    text = json.dumps(msg, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.encode() + b"\n"


def encode_request(rid: RequestId, method: str, params: Mapping[str, Any]) -> bytes:
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": rid, "method": method}
    if params:
        msg["params"] = dict(params)
    return _dumps(msg)


def encode_result(rid: RequestId | None, result: Mapping[str, Any]) -> bytes:
    return _dumps({"v": PROTOCOL_VERSION, "id": rid, "ok": True, "result": result})


def encode_error(rid: RequestId | None, code: str, message: str) -> bytes:
    return _dumps(
        {"v": PROTOCOL_VERSION, "id": rid, "ok": False,
         "error": {"code": code, "message": message}}
    )


def encode_event(rid: RequestId, event: Mapping[str, Any]) -> bytes:
    return _dumps({"v": PROTOCOL_VERSION, "id": rid, "event": event})


@dataclass(frozen=True)
class Reply:
    """One line from the daemon: exactly one of ``result``, ``error``, ``event``."""

    id: RequestId | None
    result: dict[str, Any] | None = None
    error: ControlError | None = None
    event: dict[str, Any] | None = None


def decode_reply(line: bytes) -> Reply:
    """Parse a reply line; raises ControlError(bad_reply) if it breaks the protocol."""
    try:
        msg = loads(line)
    except (ValueError, RecursionError) as exc:
        raise ControlError(BAD_REPLY, f"daemon sent a line that is not JSON: {exc}") from None
    if not isinstance(msg, dict) or msg.get("v") != PROTOCOL_VERSION:
        raise ControlError(BAD_REPLY, f"daemon sent an unexpected line: {line[:200]!r}")
    rid = msg.get("id")
    if "event" in msg and isinstance(msg["event"], dict):
        return Reply(rid, event=msg["event"])
    if msg.get("ok") is True and isinstance(msg.get("result"), dict):
        return Reply(rid, result=msg["result"])
    err = msg.get("error")
    if msg.get("ok") is False and isinstance(err, dict):
        code, message = err.get("code"), err.get("message")
        return Reply(rid, error=ControlError(str(code), str(message)))
    raise ControlError(BAD_REPLY, f"daemon sent an unexpected line: {line[:200]!r}")
