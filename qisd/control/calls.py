"""What the blocking and the trio client share (pure, but for a ``stat`` of the socket
path once a connect has failed): finding the socket, turning Python arguments into
request params, and reading results out of replies.

Arguments are made JSON-ready here, before anything is sent: numpy arrays and
scalars become Python values, and what JSON cannot carry (a non-string key, NaN, a
set...) raises ValueError naming the argument (``outcome.age``, ``vector[3]``).
Whether a value makes sense (a vector's length, a ttl's range) is the daemon's to
say, so that its error can name it.
"""

from __future__ import annotations

import errno
import math
import os
import select
import stat
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from qisd.control.errors import ControlError, ControlSocketError, DaemonNotRunning
from qisd.control.protocol import BAD_REPLY, BAD_REQUEST, IDLE, Reply, RequestId

__all__ = [
    "MAX_REPLY_BYTES",
    "MAX_SOCKET_PATH_BYTES",
    "SOCKET_ENV",
    "addresses_list",
    "as_vector",
    "check_reply",
    "check_timeout",
    "connect_error",
    "emit_item",
    "emit_params",
    "idle_notice",
    "json_value",
    "merge_results",
    "outcome_map",
    "readable_now",
    "resolve_socket_path",
    "result_list",
    "result_str",
    "split_items",
    "topic_text",
    "watch_cut",
    "watch_ended",
]

#: The environment variable naming the control socket (as ``--socket`` does).
SOCKET_ENV = "QISD_SOCKET"
#: Where the systemd unit's daemon listens (RuntimeDirectory=qisd).
SERVICE_SOCKET = Path("/run/qisd/qisd.sock")
#: Longest reply line a client accepts (a page of packets is far smaller).
MAX_REPLY_BYTES = 64 << 20
#: Longest socket path connect() takes: sun_path holds 108 bytes on Linux, one the NUL.
MAX_SOCKET_PATH_BYTES = 107


def resolve_socket_path(
    socket_path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Path:
    """``socket_path`` if given, else ``$QISD_SOCKET``, else where a daemon started in
    this environment binds: its config (``$QISD_CONFIG`` and the other ``QISD_*``
    variables, e.g. ``$QISD_STATE_DIR``) decides, as for ``qisd run``; with none of
    them, the default (:func:`qisd.paths.default_socket_path`), or, if nothing is
    there but the system service's socket exists, that one (an operator's shell has
    no ``$RUNTIME_DIRECTORY``). An empty ``socket_path`` is a ValueError:
    ``Path("")`` would quietly mean the current directory."""
    if socket_path is not None:
        if not os.fspath(socket_path):
            raise ValueError(
                "socket_path is empty: give the daemon's control socket, or None for"
                " the default"
            )
        return Path(socket_path)
    env = os.environ if env is None else env
    if env.get(SOCKET_ENV):
        return Path(env[SOCKET_ENV])
    configured = _configured_socket(env)
    if configured is not None:
        return configured
    from qisd.paths import default_socket_path  # the daemon's own choice of default

    path = default_socket_path(env)
    if not path.exists() and SERVICE_SOCKET.exists():
        return SERVICE_SOCKET
    return path


def _configured_socket(env: Mapping[str, str]) -> Path | None:
    """The socket a daemon run with ``env`` binds, when its config (``QISD_*``
    variables, the file they or systemd name) sets ``node.socket`` or
    ``node.state_dir``; None when it sets neither (the default applies, and with it
    the fallback to the system service's socket), or when it does not load (a
    daemon could not start on it either)."""
    if not any(k.startswith("QISD_") for k in env) and "CONFIGURATION_DIRECTORY" not in env:
        return None
    from qisd.config import ConfigError, load_config  # only when there is one to read

    try:
        config = load_config(env=env)
        if not {"node.socket", "node.state_dir"} & config.sources.keys():
            return None
        return config.resolved_socket()
    except (ConfigError, OSError):
        return None


def _not_a_socket(path: Path) -> str | None:
    """What is at ``path`` if it is something other than a socket, else None."""
    try:
        mode = os.stat(path).st_mode  # connect() follows symlinks too
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    return "not a socket"


def connect_error(path: Path, exc: OSError) -> OSError:
    """The error to raise when connecting to ``path`` failed with ``exc``: a
    :class:`ControlSocketError` naming the path when it cannot be a control socket
    (too long, a file, a directory), :class:`DaemonNotRunning` when no daemon
    answers there, else ``exc`` (with a clearer message for a permission error)."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:  # connect() says only "AF_UNIX path too long"
        return ControlSocketError(
            f"control socket path is too long for a Unix socket ({size} bytes, at most"
            f" {MAX_SOCKET_PATH_BYTES}): {path}"
        )
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return DaemonNotRunning(path, "no control socket")
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ENOTSOCK:
        what = _not_a_socket(path)
        if what is not None:  # connect() refuses these just like a dead socket
            return ControlSocketError(
                f"{path} is {what}, not a control socket; point --socket (or"
                f" ${SOCKET_ENV}) at the socket of a running qisd"
            )
        return DaemonNotRunning(path, "nothing is listening on the control socket")
    if isinstance(exc, PermissionError):
        return PermissionError(
            exc.errno,
            f"permission denied on the control socket {path}: run as the daemon's user,"
            " root, or a member of its group",
        )
    return exc


# -- arguments to params -----------------------------------------------------------


def _type_name(value: Any) -> str:
    return type(value).__name__


def _text(value: str, name: str) -> str:
    """``value`` if UTF-8 can carry it (a lone surrogate, e.g. from undecodable
    bytes, cannot be sent)."""
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{name} is not valid text: it holds a lone surrogate {value[exc.start]!r}"
        ) from None
    return value


def json_value(value: Any, name: str) -> Any:
    """``value`` as plain JSON data: numpy arrays and scalars become Python values,
    tuples become lists. Raises ValueError naming ``name`` (and the key or index
    inside it) for a non-string key, a non-finite number, or a type JSON cannot
    carry, rather than letting it be changed (``{1: 2}`` sent as ``{"1": 2}``) or
    fail inside the JSON encoder."""
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        value = value.tolist()  # numpy, without importing it
    if isinstance(value, str):
        return _text(value, name)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(f"{name} is out of float range") from None
        if not math.isfinite(number):
            raise ValueError(f"{name} must be a finite number, got {number}")
        return number
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"{name} keys must be strings, got {key!r} ({_type_name(key)})"
                )
            out[_text(key, f"{name} key")] = json_value(inner, f"{name}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [json_value(inner, f"{name}[{i}]") for i, inner in enumerate(value)]
    raise ValueError(
        f"{name} must be a string, number, boolean, None, list or map, got"
        f" {_type_name(value)}"
    )


def outcome_map(outcome: Any, name: str = "outcome") -> dict[str, Any]:
    """An outcome map made JSON-ready (see :func:`json_value`): each value a
    string, number or boolean, as a packet carries."""
    if not isinstance(outcome, Mapping):
        raise ValueError(f"{name} must be a map of name -> value, got {_type_name(outcome)}")
    for key, value in outcome.items():
        if hasattr(value, "tolist") and not isinstance(value, str | bytes):
            value = value.tolist()  # a numpy scalar
        if value is None or not isinstance(value, str | bool | Real):
            raise ValueError(f"{name}.{key} must be a string, number or boolean (what a"
                             f" packet carries), got {_type_name(value)}")
    checked: dict[str, Any] = json_value(outcome, name)
    return checked


#: The longest reply timeout a client takes: a week (the socket layer cannot wait
#: past ~292 years, and no request needs more than minutes).
MAX_TIMEOUT_S = 7 * 24 * 3600


def check_timeout(timeout: Any) -> float:
    """A client's reply timeout: a number of seconds in (0, a week] (ValueError
    otherwise; None for no timeout is refused too, a hung daemon would hang the
    caller)."""
    if (isinstance(timeout, bool) or not isinstance(timeout, int | float)
            or not 0 < timeout <= MAX_TIMEOUT_S):
        raise ValueError(
            f"timeout: must be a number of seconds > 0 and at most {MAX_TIMEOUT_S} "
            f"(a week), got {timeout!r}")
    return float(timeout)


def topic_text(topic: Any) -> str:
    """``topic`` as sent: a string (the daemon checks the rest of the rules)."""
    if not isinstance(topic, str):
        raise ValueError(f"topic must be a string, got {_type_name(topic)}")
    return str(json_value(topic, "topic"))


def as_vector(vector: Any, name: str = "vector") -> list[float]:
    """A list of finite floats from a list, tuple or numpy array of numbers; raises
    ValueError naming ``name`` otherwise."""
    if hasattr(vector, "tolist"):  # numpy arrays and scalars, without importing numpy
        vector = vector.tolist()
    if isinstance(vector, str | bytes | Mapping) or not isinstance(vector, Iterable):
        raise ValueError(f"{name} must be a sequence of numbers, got {_type_name(vector)}")
    out: list[float] = []
    for i, x in enumerate(vector):
        if isinstance(x, bool) or not isinstance(x, Real):
            raise ValueError(f"{name}[{i}] must be a number, got {_type_name(x)}")
        try:
            value = float(x)
        except OverflowError:  # an integer such as 10**400
            raise ValueError(f"{name}[{i}] is out of float range") from None
        if not math.isfinite(value):
            raise ValueError(f"{name}[{i}] must be finite, got {value}")
        out.append(value)
    return out


def emit_params(
    topic: Any, vector: Any, outcome: Any, n: Any, ttl: Any
) -> dict[str, Any]:
    """``emit``'s params, JSON-ready; raises ValueError naming a bad argument."""
    params: dict[str, Any] = {
        "topic": topic_text(topic), "vector": as_vector(vector),
        "outcome": outcome_map(outcome), "n": json_value(n, "n"),
    }
    if ttl is not None:
        params["ttl"] = json_value(ttl, "ttl")
    return params


def emit_item(item: Any, name: str = "item") -> dict[str, Any]:
    """One ``emit_many`` item made JSON-ready; raises ValueError naming ``name`` (and
    the field). Missing or unknown fields are left for the daemon to name."""
    if not isinstance(item, Mapping):
        raise ValueError(f"{name} must be a map of emit fields, got {_type_name(item)}")
    out: dict[str, Any] = {}
    for key, value in item.items():
        if not isinstance(key, str):
            raise ValueError(f"{name} keys must be strings, got {key!r} ({_type_name(key)})")
        try:
            if key == "vector":
                out[key] = as_vector(value)
            elif key == "outcome":
                out[key] = outcome_map(value)
            else:
                out[key] = json_value(value, key)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return out


def split_items(items: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any] | None]]:
    """``emit_many``'s items as (the ones to send, one slot per item): a slot is
    None for an item to send, else that item's own error result (``bad_request``
    naming ``items[i]``), so one bad item does not sink the batch (see
    :func:`merge_results`). Raises ValueError if ``items`` is not a sequence."""
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise ValueError(f"items must be a sequence of maps, got {_type_name(items)}")
    send: list[dict[str, Any]] = []
    slots: list[dict[str, Any] | None] = []
    for i, item in enumerate(items):
        try:
            send.append(emit_item(item, f"items[{i}]"))
        except ValueError as exc:
            slots.append({"error": {"code": BAD_REQUEST, "message": str(exc)}})
            continue
        slots.append(None)
    return send, slots


def merge_results(
    slots: Sequence[dict[str, Any] | None], results: Sequence[Any]
) -> list[dict[str, Any]]:
    """The daemon's ``results`` for the items sent, put back in their slots: one
    result per item, in order. The daemon numbers items by their place in what was
    sent; an ``items[j]`` in its messages is renumbered to the caller's index."""
    sent = [i for i, slot in enumerate(slots) if slot is None]
    if len(results) != len(sent):
        raise ControlError(
            BAD_REPLY, f"daemon sent {len(results)} results for {len(sent)} items"
        )
    merged: list[Any] = list(slots)
    for j, (i, result) in enumerate(zip(sent, results, strict=True)):
        merged[i] = _renumbered(result, j, i) if i != j else result
    return merged


def _renumbered(result: Any, sent_index: int, index: int) -> Any:
    error = result.get("error") if isinstance(result, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return result
    prefix = f"items[{sent_index}]: "
    message: str = error["message"]
    if not message.startswith(prefix):
        return result
    renamed = f"items[{index}]: {message.removeprefix(prefix)}"
    return {**result, "error": {**error, "message": renamed}}


def addresses_list(addresses: Any) -> list[str]:
    """One ``"host:port"`` or a sequence of them; raises ValueError naming what is
    wrong (the daemon checks the host and port)."""
    expected = 'addresses must be a "host:port" string or a sequence of them'
    if isinstance(addresses, str):
        addresses = [addresses]
    elif isinstance(addresses, bytes | bytearray):
        raise ValueError(f"{expected}, got {_type_name(addresses)} (decode it first)")
    elif isinstance(addresses, Mapping) or not isinstance(addresses, Iterable):
        raise ValueError(f"{expected}, got {_type_name(addresses)}")
    out = list(addresses)
    if not out:
        raise ValueError(f"{expected}, got none")
    for i, address in enumerate(out):
        if not isinstance(address, str) or not address:
            got = "an empty string" if address == "" else _type_name(address)
            raise ValueError(f'addresses[{i}] must be a "host:port" string, got {got}')
    return out


# -- replies ------------------------------------------------------------------------


def watch_cut(path: Path) -> ConnectionError:
    """A watch whose connection closed without the daemon ending it."""
    return ConnectionError(
        f"the daemon closed the watch ({path}) without ending it: it died or was killed, or this"
        " reader fell behind past the daemon's write deadline and was cut off; packets"
        " after the last event were not delivered here"
    )


def watch_ended(reply: Reply) -> bool:
    """True for the daemon's last line of a watch whose stream ended."""
    return reply.event is None and reply.error is None and reply.result == {"ended": True}


def readable_now(sock: Any) -> bool:
    """True if ``sock`` (anything with ``fileno()``) has something to read at once:
    between requests that is the daemon closing it (or its ``idle`` notice), never a
    reply, so the connection must not carry another request."""
    poller = select.poll()  # (select() cannot take descriptors from 1024 up)
    try:
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed under us
        return True


def idle_notice(reply: Reply | None) -> bool:
    """True for the daemon's notice that it closed an idle connection (it ran no
    request after it): the request can go again on a new connection."""
    return (reply is not None and reply.id is None and reply.error is not None
            and reply.error.code == IDLE)


def check_reply(reply: Reply, rid: RequestId) -> dict[str, Any]:
    """The result of a reply to request ``rid``; raises its ControlError. A reply
    with a null id is a connection-level error (forbidden, too many connections)."""
    if reply.event is not None:
        raise ControlError(BAD_REPLY, "daemon sent a watch event outside a watch")
    if reply.id is not None and reply.id != rid:
        raise ControlError(BAD_REPLY, f"reply for request {reply.id!r}, expected {rid!r}")
    if reply.error is not None:
        raise reply.error
    assert reply.result is not None  # decode_reply guarantees one of the three
    return reply.result


def result_list(result: Mapping[str, Any], key: str) -> list[Any]:
    value = result.get(key)
    if not isinstance(value, list):
        raise ControlError(BAD_REPLY, f"daemon reply has no {key!r} list")
    return value


def result_str(result: Mapping[str, Any], key: str) -> str:
    value = result.get(key)
    if not isinstance(value, str):
        raise ControlError(BAD_REPLY, f"daemon reply has no {key!r} string")
    return value
