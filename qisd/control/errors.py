"""Errors of the control API, shared by the server, the clients and the daemon.

:class:`ControlError` is the one error that crosses the socket: the daemon raises it
with a code from :data:`qisd.control.protocol.ERROR_CODES`, the server turns it into
an error reply, and the clients raise it again from that reply. The socket errors are
local: the server raises them when it cannot take its path, the clients when no
daemon answers on it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ControlError",
    "ControlSocketError",
    "ControlSocketInUse",
    "DaemonNotRunning",
]


class ControlError(Exception):
    """An error reply: ``code`` is machine-readable, ``message`` says what is wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControlSocketError(OSError):
    """The control socket cannot be bound or connected to at its path (not a socket, path too long,
    no permission...). The message names the path."""


class ControlSocketInUse(ControlSocketError):
    """A live daemon already answers on the socket path."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"another qisd is running on {path} (its control socket accepts connections);"
            " stop it first or choose another --socket"
        )
        self.path = path


class DaemonNotRunning(ConnectionError):
    """No daemon answers on the socket path (missing or dead socket file)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"qisd is not running: {reason} at {path}; start it with: qisd run"
        )
        self.path = path
