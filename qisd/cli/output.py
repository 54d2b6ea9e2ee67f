"""What the client commands write, and how their failures read.

* stdout: :func:`echo` / :func:`echo_json`. A reader that stops reading
  (``qisd watch --json | head -1``) ends the output quietly, as it does for
  well-behaved Unix tools: no traceback, no error line; the echo returns False so a
  streaming command can stop, and the exit status is the command's own. Any other
  failure to write (a full disk under ``> file``) raises :class:`OutputError`, which
  the entry point prints as one ``error:`` line (exit 1).
* failures: :func:`failure` turns an exception from the client into a
  :class:`Failure` (a code, a message, an exit status), and :func:`report` prints
  one: one ``error:`` line on stderr and, with ``--json``, also
  ``{"error": {"code", "message"}}`` on stdout, so a script reading stdout sees it.

Codes are the daemon's (``invalid``, ``storage_full``...) or, for failures on this
side of the socket, :data:`LOCAL_CODES`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import typer
import typer.core

from qisd.control.errors import ControlError, ControlSocketError, DaemonNotRunning

__all__ = ["LOCAL_CODES", "Failure", "JsonUsageCommand", "OutputError", "echo", "echo_json",
           "failure", "report", "silence_stdout", "warn"]

#: Error codes of failures the daemon did not report itself.
LOCAL_CODES = {
    "not_running": "no daemon answers on the control socket",
    "bad_socket": "the control socket path cannot be used (empty, too long, not a socket)",
    "permission_denied": "this user may not use the control socket",
    "timeout": "the daemon did not reply in time",
    "connection_lost": "the daemon closed the connection",
    "os_error": "another error of the operating system",
    "read_error": "the input file could not be read",
    "unreachable": "bootstrap: no peer answered",
    "watch_ended": "the daemon ended the watch",
    "usage": "bad arguments",
    "invalid_config": "the configuration (file or QISD_* variables) has problems",
}

#: click's UsageError (typer carries its own click; BadParameter is one of them).
_USAGE_ERROR: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError"
)


class JsonUsageCommand(typer.core.TyperCommand):
    """A command whose argument errors (a value out of range, an unknown option, a
    missing argument: found before the command runs) are, with ``--json``, also one
    ``{"error": {"code": "usage", ...}}`` line on stdout; typer still prints them
    with the usage on stderr and exits 2."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None,
                     **extra: Any) -> Any:
        # (the parser consumes ``args`` as it goes)
        options = args[: args.index("--")] if "--" in args else list(args)
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _USAGE_ERROR as exc:
            if "--json" in options:
                echo_json({"error": {"code": "usage", "message": _message(exc)}})
            raise


def _message(exc: Exception) -> str:
    format_message = getattr(exc, "format_message", None)
    return str(format_message()) if callable(format_message) else str(exc)


def silence_stdout() -> None:
    """Point the stdout fd at /dev/null, so the interpreter's last flush of what is
    still buffered does not fail again at exit."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class OutputError(Exception):
    """stdout cannot be written (not a closed pipe: a full disk, an I/O error).
    Not an OSError, so the handlers of the daemon's errors do not take it for one
    and try to print it on the same stdout."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"cannot write the output: {exc.strerror or exc}")


def echo(text: str, *, nl: bool = True) -> bool:
    """Print ``text`` on stdout; False once the reader has closed it."""
    try:
        typer.echo(text, nl=nl)
    except BrokenPipeError:
        silence_stdout()
        return False
    except OSError as exc:
        silence_stdout()
        raise OutputError(exc) from None
    return True


def echo_json(value: Any) -> bool:
    """One JSON value on one line of stdout (JSON lines); False once the reader
    has closed stdout."""
    return echo(json.dumps(value, ensure_ascii=False))


def warn(text: str, *, nl: bool = True) -> None:
    """A line on stderr (lost, quietly, if stderr cannot be written any more)."""
    with contextlib.suppress(OSError):  # a closed pipe, a full disk: nowhere to say it
        typer.echo(text, err=True, nl=nl)


@dataclass(frozen=True)
class Failure:
    """Why a command stopped: ``code`` and ``message`` as in an error reply, the
    exit status, and the stderr text (which shows the daemon's code)."""

    code: str
    message: str
    exit_code: int = 1
    show_code: bool = False

    @property
    def text(self) -> str:
        return f"{self.code}: {self.message}" if self.show_code else self.message

    def as_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def failure(exc: BaseException) -> Failure:
    """The failure an exception raised while talking to the daemon stands for."""
    if isinstance(exc, ControlError):
        return Failure(exc.code, exc.message, 1, show_code=True)
    if isinstance(exc, DaemonNotRunning):
        return Failure("not_running", str(exc), 2)
    if isinstance(exc, ControlSocketError):
        return Failure("bad_socket", str(exc), 2)
    if isinstance(exc, PermissionError):
        return Failure("permission_denied", exc.strerror or str(exc), 2)
    if isinstance(exc, TimeoutError):
        return Failure("timeout", str(exc), 1)
    if isinstance(exc, ConnectionError):
        return Failure("connection_lost", str(exc), 1)
    if isinstance(exc, OSError):
        return Failure("os_error", exc.strerror or str(exc), 1)
    return Failure("os_error", str(exc), 1)


def report(fail: Failure, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    """Print ``fail``: the ``error:`` line on stderr and, with ``as_json``, the JSON
    object ``{**extra, "error": {...}}`` on stdout."""
    if as_json:
        echo_json({**(extra or {}), "error": fail.as_json()})
    warn(f"error: {fail.text}")
