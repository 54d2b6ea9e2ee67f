"""The ``qisd`` command line: one typer app, one module per group of commands.

* ``config_cmd`` -- ``qisd config check`` / ``qisd config show``
* ``manifest_cmd`` -- ``qisd manifest new`` / ``qisd manifest show``
* ``run_cmd``    -- ``qisd run``, the daemon
* ``client_cmd`` -- ``qisd status``, ``emit``, ``query``... talking to a running daemon
  (``client_files``, ``emit_file``: their ``--file`` runs; ``render``: tables;
  ``output``: stdout, stderr and how failures read)

Each module exposes ``register(app)``. The daemon returns data and the CLI renders it
(a table, or the raw result with ``--json``), so commands stay thin.
"""

from __future__ import annotations

import errno
import importlib
import importlib.metadata
import sys
from typing import Annotated, NoReturn

import typer

from qisd.cli.output import OutputError, silence_stdout, warn

__all__ = ["app", "main"]

app = typer.Typer(
    name="qisd",
    help=(
        "qisd: a peer-to-peer daemon that routes signed outcome packets by semantic"
        " fingerprint over a Kademlia DHT."
    ),
    no_args_is_help=True,
    # Locals in a traceback could include key material; never print them.
    pretty_exceptions_show_locals=False,
)


def _version() -> str:
    try:
        return importlib.metadata.version("qisd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"qisd {_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """qisd: a peer-to-peer daemon that routes signed outcome packets by semantic
    fingerprint over a Kademlia DHT."""


def _register() -> None:
    from qisd.cli import config_cmd, manifest_cmd

    config_cmd.register(app)
    manifest_cmd.register(app)
    for name in ("run_cmd", "client_cmd"):
        try:
            module = importlib.import_module(f"qisd.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"qisd.cli.{name}":
                raise
            continue
        module.register(app)


_register()


def main() -> None:
    """Console script entry point (``qisd = "qisd.cli:main"``)."""
    try:
        app(prog_name="qisd")
    except OutputError as exc:
        _cannot_write(str(exc))
    except OSError as exc:  # click's own output (--help, usage) to a full disk
        if exc.errno not in _WRITE_ERRNOS:
            raise
        _cannot_write(f"cannot write the output: {exc.strerror or exc}")


#: Errors of a write that a full or failing disk gives (a closed pipe is EPIPE,
#: which click and :func:`qisd.cli.output.echo` end quietly).
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def _cannot_write(message: str) -> NoReturn:
    warn(f"error: {message}")
    silence_stdout()
    sys.exit(1)
