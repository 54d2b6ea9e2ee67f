"""What the blocking and the trio client share (pure): finding the socket, turning
Python arguments into request params, and reading results out of replies."""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

from qisd.control.errors import ControlError, DaemonNotRunning
from qisd.control.protocol import BAD_REPLY, Reply, RequestId

__all__ = [
    "MAX_REPLY_BYTES",
    "SOCKET_ENV",
    "addresses_list",
    "as_vector",
    "check_reply",
    "connect_error",
    "emit_item",
    "emit_params",
    "resolve_socket_path",
    "result_list",
    "result_str",
]

#: The environment variable naming the control socket (as ``--socket`` does).
SOCKET_ENV = "QISD_SOCKET"
#: Where the systemd unit's daemon listens (RuntimeDirectory=qisd).
SERVICE_SOCKET = Path("/run/qisd/qisd.sock")
#: Longest reply line a client accepts (a page of packets is far smaller).
MAX_REPLY_BYTES = 64 << 20


def resolve_socket_path(
    socket_path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Path:
    """``socket_path`` if given, else ``$QISD_SOCKET``, else where the daemon binds by
    default (:func:`qisd.paths.default_socket_path`); if nothing is there but the
    system service's socket exists, that one (an operator's shell has no
    ``$RUNTIME_DIRECTORY``)."""
    if socket_path is not None:
        return Path(socket_path)
    env = os.environ if env is None else env
    if env.get(SOCKET_ENV):
        return Path(env[SOCKET_ENV])
    from qisd.paths import default_socket_path  # the daemon's own choice of default

    path = default_socket_path(env)
    if not path.exists() and SERVICE_SOCKET.exists():
        return SERVICE_SOCKET
    return path


def connect_error(path: Path, exc: OSError) -> OSError:
    """The error to raise when connecting to ``path`` failed with ``exc``."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return DaemonNotRunning(path, "no control socket")
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ENOTSOCK:
        return DaemonNotRunning(path, "nothing is listening on the control socket")
    if isinstance(exc, PermissionError):
        return PermissionError(
            exc.errno,
            f"permission denied on the control socket {path}: run as the daemon's user,"
            " root, or a member of its group",
        )
    return exc


def as_vector(vector: Any, name: str = "vector") -> list[float]:
    """A list of finite floats from a list, tuple or numpy array of numbers; raises
    ValueError naming ``name`` otherwise."""
    if hasattr(vector, "tolist"):  # numpy arrays and scalars, without importing numpy
        vector = vector.tolist()
    if isinstance(vector, str | bytes | Mapping) or not isinstance(vector, Iterable):
        raise ValueError(f"{name} must be a sequence of numbers, got {type(vector).__name__}")
    out: list[float] = []
    for i, x in enumerate(vector):
        if isinstance(x, bool) or not isinstance(x, Real):
            raise ValueError(f"{name}[{i}] must be a number, got {type(x).__name__}")
        value = float(x)
        if not math.isfinite(value):
            raise ValueError(f"{name}[{i}] must be finite, got {value}")
        out.append(value)
    return out


def emit_params(
    topic: str, vector: Any, outcome: Mapping[str, Any], n: int, ttl: int | None
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "topic": topic, "vector": as_vector(vector), "outcome": dict(outcome), "n": n,
    }
    if ttl is not None:
        params["ttl"] = ttl
    return params


def emit_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """One ``emit_many`` item with its vector made JSON-ready (other fields are left
    for the daemon to check, so it can name what is wrong)."""
    out = dict(item)
    if "vector" in out:
        out["vector"] = as_vector(out["vector"])
    return out


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


def addresses_list(addresses: str | Sequence[str]) -> list[str]:
    """One ``"host:port"`` or several."""
    return [addresses] if isinstance(addresses, str) else list(addresses)
