"""The client commands: ``qisd status``, ``peers``, ``emit``, ``query``, ``watch``,
``packets``, ``identity``, ``bootstrap``.

Each is a thin shell over :class:`qisd.Client`: it sends one request (or a stream of
them from ``--file``) and prints the reply, as a table for people or as the daemon's
map with ``--json`` (stable: keys are added, never renamed). Failures are one line
on stderr; the exit status says which kind (:data:`EXIT_HELP`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from qisd.cli import render
from qisd.cli.client_files import echo_json, emit_file, open_lines, query_file
from qisd.control.calls import SOCKET_ENV
from qisd.control.client import Client
from qisd.control.errors import ControlError, DaemonNotRunning
from qisd.control.protocol import check_params, loads

__all__ = ["EXIT_HELP", "parse_outcome", "parse_vector", "register"]

EXIT_HELP = (
    "Exit status: 0 done; 1 the daemon refused the request (or some lines of --file);"
    " 2 bad arguments, or no daemon on the socket."
)

SocketOption = Annotated[
    Path | None,
    typer.Option(
        "--socket", envvar=SOCKET_ENV, metavar="PATH", show_default=False,
        help="The daemon's control socket. Default: $QISD_SOCKET, else where"
             " `qisd run` puts it by default.",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the daemon's reply as JSON, for scripts."),
]
TopicOption = Annotated[str, typer.Option("--topic", "-t", help="The topic.")]
VectorOption = Annotated[
    str | None,
    typer.Option("--vector", metavar="JSON", help="Fingerprint: a JSON list of numbers,"
                 " e.g. '[0.1, 0.2]'.", show_default=False),
]
FileOption = Annotated[
    str | None,
    typer.Option("--file", "-f", metavar="FILE", show_default=False,
                 help="JSON lines, one object per line ('-' for stdin)."),
]


# -- argument parsing ----------------------------------------------------------------


def parse_vector(text: str, option: str = "--vector") -> list[float]:
    """A JSON list of finite numbers, else a usage error naming ``option``."""
    try:
        value = loads(text)
    except ValueError as exc:
        raise typer.BadParameter(
            f"must be a JSON list of numbers like '[0.1, 0.2]': {exc}", param_hint=option
        ) from None
    floats = _checked_vector(value)
    if not floats:
        raise typer.BadParameter(
            f"must be a non-empty JSON list of numbers like '[0.1, 0.2]', got {text!r}",
            param_hint=option,
        )
    return floats


def _checked_vector(value: Any) -> list[float] | None:
    # The protocol's own check, so the CLI accepts exactly what the server does.
    try:
        floats: list[float] = check_params("query", {"topic": "-", "vector": value})["vector"]
    except ControlError:
        return None
    return floats


def _scalar(text: str) -> int | float | bool | str:
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text  # "nan", "inf" stay text


def parse_outcome(pairs: list[str]) -> dict[str, int | float | bool | str]:
    """``key=value`` pairs; values become int, float, bool (true/false) or str."""
    outcome: dict[str, int | float | bool | str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}", param_hint="--outcome")
        if key in outcome:
            raise typer.BadParameter(f"key {key!r} given twice", param_hint="--outcome")
        outcome[key] = _scalar(value)
    return outcome


# -- plumbing ----------------------------------------------------------------------


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def _connected(socket: Path | None) -> Iterator[Client]:
    """A client; any failure to talk to the daemon becomes one line and an exit."""
    try:
        with Client(socket) as client:
            yield client
    except DaemonNotRunning as exc:
        _fail(str(exc), 2)
    except PermissionError as exc:
        _fail(exc.strerror or str(exc), 2)
    except ControlError as exc:
        _fail(f"{exc.code}: {exc.message}", 1)
    except OSError as exc:  # timeouts, a daemon that went away mid-call
        _fail(str(exc), 1)


def _show(result: Mapping[str, Any], as_json: bool, render_fn: Any) -> None:
    if as_json:
        echo_json(result)
    else:
        typer.echo(render_fn(result))


# -- commands --------------------------------------------------------------------------


def status(socket: SocketOption = None, as_json: JsonOption = False) -> None:
    """Show the node: id, UDP address, peers, stored packets, metrics URL, version."""
    with _connected(socket) as client:
        _show(client.call("status"), as_json, render.render_status)


def peers(socket: SocketOption = None, as_json: JsonOption = False) -> None:
    """List the peers in the node's routing table."""
    with _connected(socket) as client:
        _show(client.call("peers"), as_json, render.render_peers)


def identity(socket: SocketOption = None, as_json: JsonOption = False) -> None:
    """Show the node id and public key (what other sites see as this origin)."""
    with _connected(socket) as client:
        _show(client.call("identity"), as_json, render.key_values)


def packets(
    socket: SocketOption = None,
    as_json: JsonOption = False,
    topic: Annotated[str | None, typer.Option("--topic", "-t", help="Only this topic.",
                                              show_default=False)] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
) -> None:
    """List packets stored on this node, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if topic is not None:
        params["topic"] = topic
    with _connected(socket) as client:
        _show(client.call("packets", params), as_json, render.render_packets)


def _hostport(text: str) -> str:
    from qisd.config import parse_hostport

    try:
        _, port = parse_hostport(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r}: {exc}", param_hint="HOST:PORT") from None
    if port == 0:
        raise typer.BadParameter(f"{text!r}: port 0 cannot be contacted",
                                 param_hint="HOST:PORT")
    return text


def bootstrap(
    addresses: Annotated[list[str], typer.Argument(metavar="HOST:PORT",
                                                   help="Peers to join through.")],
    socket: SocketOption = None,
    as_json: JsonOption = False,
) -> None:
    """Join a swarm through one or more running nodes."""
    checked = [_hostport(a) for a in addresses]
    with _connected(socket) as client:
        _show(client.call("bootstrap", {"addresses": checked}), as_json, render.key_values)


def emit(
    socket: SocketOption = None,
    as_json: JsonOption = False,
    topic: Annotated[str | None, typer.Option("--topic", "-t", help="The topic.",
                                              show_default=False)] = None,
    vector: VectorOption = None,
    outcome: Annotated[list[str] | None, typer.Option(
        "--outcome", "-o", metavar="KEY=VALUE", show_default=False,
        help="An outcome field (repeat for more); values are read as int, float,"
             " true/false, else text.")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Cases this packet distils.")] = 1,
    ttl: Annotated[int | None, typer.Option("--ttl", min=1, show_default=False,
                                            help="Seconds to live (default: the swarm's)."
                                            )] = None,
    file: FileOption = None,
) -> None:
    """Sign and store an outcome packet, or many with --file.

    With --file: one JSON object per line, {"topic", "vector", "outcome", "n"?, "ttl"?}.

    Rejected lines are named on stderr with the reason; a summary accepted=N rejected=M follows.
    """
    if file is not None:
        given = [name for name, v in (("--topic", topic), ("--vector", vector),
                                      ("--outcome", outcome), ("--ttl", ttl),
                                      ("--n", n != 1)) if v]
        if given:
            raise typer.BadParameter(f"cannot be combined with {', '.join(given)}",
                                     param_hint="--file")
        with open_lines(file) as fh, _connected(socket) as client:
            rejected = emit_file(client, fh, as_json)
        raise typer.Exit(1 if rejected else 0)
    if not topic:
        raise typer.BadParameter("is required (or give --file)", param_hint="--topic")
    if vector is None:
        raise typer.BadParameter("is required (or give --file)", param_hint="--vector")
    if not outcome:
        raise typer.BadParameter("give at least one key=value", param_hint="--outcome")
    params: dict[str, Any] = {"topic": topic, "vector": parse_vector(vector),
                              "outcome": parse_outcome(outcome), "n": n}
    if ttl is not None:
        params["ttl"] = ttl
    with _connected(socket) as client:
        _show(client.call("emit", params), as_json, render.render_emit)


def query(
    socket: SocketOption = None,
    as_json: JsonOption = False,
    topic: Annotated[str | None, typer.Option("--topic", "-t", help="The topic.",
                                              show_default=False)] = None,
    vector: VectorOption = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="How many matches.")] = 10,
    file: FileOption = None,
) -> None:
    """Ask what happened to cases like this one.

    Prints the k most similar packets and the answer they give.

    With --file: one {"topic", "vector", "k"?} object per line (JSON lines out with --json).
    """
    if file is not None:
        given = [name for name, v in (("--topic", topic), ("--vector", vector)) if v]
        if given:
            raise typer.BadParameter(f"cannot be combined with {', '.join(given)}",
                                     param_hint="--file")
        with open_lines(file) as fh, _connected(socket) as client:
            failed = query_file(client, fh, as_json)
        raise typer.Exit(1 if failed else 0)
    if not topic:
        raise typer.BadParameter("is required (or give --file)", param_hint="--topic")
    if vector is None:
        raise typer.BadParameter("is required (or give --file)", param_hint="--vector")
    params = {"topic": topic, "vector": parse_vector(vector), "k": k}
    with _connected(socket) as client:
        _show(client.call("query", params), as_json, render.render_query)


def watch(
    topic: TopicOption,
    socket: SocketOption = None,
    as_json: JsonOption = False,
    vector: VectorOption = None,
) -> None:
    """Print packets of a topic as they arrive, until Ctrl-C.

    One line per packet (JSON lines with --json); with --vector, also the similarity to it.
    """
    params_vector = parse_vector(vector) if vector is not None else None
    with _connected(socket) as client:
        try:
            with client.watch(topic=topic, vector=params_vector) as events:
                if not as_json:
                    typer.echo(f"watching topic {topic!r}; Ctrl-C to stop", err=True)
                for event in events:
                    typer.echo(json.dumps(event, ensure_ascii=False) if as_json
                               else render.render_event(event))
        except KeyboardInterrupt:
            raise typer.Exit(0) from None
    _fail(f"the daemon ended the watch ({client.socket_path})", 1)


_COMMANDS = (
    ("status", status), ("peers", peers), ("emit", emit), ("query", query),
    ("watch", watch), ("packets", packets), ("identity", identity),
    ("bootstrap", bootstrap),
)


def register(app: typer.Typer) -> None:
    """Add the client commands to the ``qisd`` app."""
    for name, command in _COMMANDS:
        app.command(name, epilog=EXIT_HELP)(command)
