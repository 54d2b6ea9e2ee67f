"""The client commands: ``qisd status``, ``peers``, ``emit``, ``query``, ``watch``,
``packets``, ``identity``, ``bootstrap``.

Each is a thin shell over :class:`qisd.Client`: it sends one request (or a stream of
them from ``--file``) and prints the reply, as a table for people or as the daemon's
map with ``--json`` (stable: keys are added, never renamed). Failures are one line
on stderr, and with ``--json`` also ``{"error": {"code", "message"}}`` on stdout
(:mod:`qisd.cli.output`); the exit status says which kind (:data:`EXIT_HELP`).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer

from qisd.cli import render
from qisd.cli.client_files import open_lines, query_file
from qisd.cli.emit_file import emit_file
from qisd.cli.output import Failure, JsonUsageCommand, echo, echo_json, failure, report, warn
from qisd.control.calls import SOCKET_ENV
from qisd.control.client import Client
from qisd.control.errors import ControlError
from qisd.control.protocol import MAX_K, MAX_LIMIT, check_params, loads

__all__ = ["EXIT_HELP", "parse_outcome", "parse_vector", "register"]

EXIT_HELP = (
    "Exit status: 0 done; 1 the request failed (the daemon refused it, bootstrap reached"
    " no peer, some lines of --file failed, or the run stopped part-way); 2 bad"
    " arguments, or no daemon on the socket. With --json, an error found once the options"
    ' parse is also printed on stdout as {"error": {"code": ..., "message": ...}}.'
)

SocketOption = Annotated[
    str | None,
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


#: A number exactly as JSON writes one (RFC 8259 section 6): no leading zeros, no
#: underscores, no sign but minus, digits on both sides of a point.
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")

OUTCOME_VALUES = (
    "A value is a number only if written as a plain JSON number (42, -0.5, 1e3; not"
    " 02139, 1_000, +1, .5 or one beyond float range) and an integer if it has no"
    " point or exponent; true/false are booleans; anything else is text, as written."
    " To force text, write it as a JSON string: -o 'zip=\"02139\"'."
)


def _scalar(key: str, text: str) -> int | float | bool | str:
    """One ``-o`` value by the rules of :data:`OUTCOME_VALUES`."""
    if text in ("true", "false"):
        return text == "true"
    if text.startswith('"'):
        try:
            forced = json.loads(text)
        except ValueError:
            forced = None
        if not isinstance(forced, str):
            raise typer.BadParameter(
                f"{key}: a value starting with a double quote must be one JSON string,"
                f" like \"02139\", got {text}", param_hint="--outcome")
        return forced
    number = _JSON_NUMBER.fullmatch(text)
    if number is None:
        return text
    if number.group(1) is None and number.group(2) is None:
        try:
            return int(text)
        except ValueError:  # past Python's int-from-text digit limit
            raise typer.BadParameter(f"{key}: integer of {len(text)} digits is too long",
                                     param_hint="--outcome") from None
    value = float(text)
    return value if math.isfinite(value) else text  # 1e400: beyond float range


def parse_outcome(pairs: list[str]) -> dict[str, int | float | bool | str]:
    """``key=value`` pairs; values become int, float, bool or str (see
    :data:`OUTCOME_VALUES`)."""
    outcome: dict[str, int | float | bool | str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}", param_hint="--outcome")
        if key in outcome:
            raise typer.BadParameter(f"key {key!r} given twice", param_hint="--outcome")
        scalar = _scalar(key, value)
        outcome[_text(key, "--outcome")] = (
            _text(scalar, "--outcome", f"{key}: ") if isinstance(scalar, str) else scalar)
    return outcome


def _text(value: str, option: str, prefix: str = "") -> str:
    """``value`` if it can be sent as UTF-8; an argument with bytes that are not
    UTF-8 reaches Python with surrogates in it, which JSON text cannot carry."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise typer.BadParameter(f"{prefix}{value!r} is not valid UTF-8 text",
                                 param_hint=option) from None
    return value


# -- plumbing ----------------------------------------------------------------------


def _fail(fail: Failure, as_json: bool, extra: dict[str, Any] | None = None) -> NoReturn:
    report(fail, as_json, extra)
    raise typer.Exit(fail.exit_code)


@contextmanager
def _connected(socket: str | None, as_json: bool) -> Iterator[Client]:
    """A client; any failure to talk to the daemon becomes one error and an exit."""
    if socket is not None and not socket:  # Path("") would be the current directory
        raise typer.BadParameter("is empty; give the daemon's control socket",
                                 param_hint="--socket")
    try:
        with Client(socket) as client:
            yield client
    except (ControlError, OSError) as exc:  # OSError: timeouts, a daemon gone mid-call
        _fail(failure(exc), as_json)
    except ValueError as exc:  # the client's own argument checks (qisd.control.calls)
        _fail(Failure("usage", str(exc), 2), as_json)


def _show(result: Mapping[str, Any], as_json: bool, render_fn: Any) -> None:
    # A reader that stopped reading (| head) is no error: the request was done.
    if as_json:
        echo_json(result)
    else:
        echo(render_fn(result))


# -- commands --------------------------------------------------------------------------


def status(socket: SocketOption = None, as_json: JsonOption = False) -> None:
    """Show the node: id, UDP address, peers, stored packets, metrics URL, version."""
    with _connected(socket, as_json) as client:
        _show(client.call("status"), as_json, render.render_status)


def peers(socket: SocketOption = None, as_json: JsonOption = False) -> None:
    """List the peers in the node's routing table."""
    with _connected(socket, as_json) as client:
        _show(client.call("peers"), as_json, render.render_peers)


def identity(
    socket: SocketOption = None,
    as_json: JsonOption = False,
    state_dir: Annotated[str | None, typer.Option(
        "--state-dir", metavar="DIR", show_default=False,
        help="Read the key in this state directory instead of asking the daemon"
             " (created as `qisd run` would if missing): a member list for a closed"
             " swarm's manifest can be made before the nodes run.")] = None,
) -> None:
    """Show the node id and public key (what other sites see as this origin)."""
    if state_dir is not None:
        _show(_offline_identity(state_dir, as_json), as_json, render.key_values)
        return
    with _connected(socket, as_json) as client:
        _show(client.call("identity"), as_json, render.key_values)


def _offline_identity(state_dir: str, as_json: bool) -> dict[str, Any]:
    from pathlib import Path

    from qisd.identity import KEY_FILE_NAME, Identity, IdentityError

    if not state_dir:
        _fail(Failure("usage", "--state-dir is empty", 2), as_json)
    if Path(state_dir).exists() and not Path(state_dir).is_dir():
        _fail(Failure("usage", f"--state-dir {state_dir}: not a directory", 2), as_json)
    try:
        ident = Identity.load_or_create(Path(state_dir) / KEY_FILE_NAME)
    except IdentityError as exc:
        _fail(Failure("read_error", str(exc), 1), as_json)
    except OSError as exc:
        _fail(Failure("os_error", f"--state-dir {state_dir}: {exc.strerror or exc}", 1),
              as_json)
    return {"node_id": ident.node_id.hex(), "public_key": ident.public_key.hex()}


def packets(
    socket: SocketOption = None,
    as_json: JsonOption = False,
    topic: Annotated[str | None, typer.Option("--topic", "-t", help="Only this topic.",
                                              show_default=False)] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=MAX_LIMIT,
                                       help="At most this many.")] = 100,
) -> None:
    """List packets stored on this node, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if topic is not None:
        params["topic"] = _text(topic, "--topic")
    with _connected(socket, as_json) as client:
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
    """Join a swarm through one or more running nodes.

    Fails (exit 1) when none of them could be joined through, saying why for each.
    """
    checked = [_hostport(a) for a in addresses]
    with _connected(socket, as_json) as client:
        result = client.call("bootstrap", {"addresses": checked})
    reasons = _bootstrap_failures(result)
    # Peers already in the table answer the join's lookup too: what counts is whether
    # any address given here answered.
    if result.get("contacted") == 0 or all(a in reasons for a in checked):
        tried = ", ".join(f"{a} ({reasons[a]})" if a in reasons else a
                          for a in dict.fromkeys(checked))  # each address once
        peers = result.get("peers")
        if isinstance(peers, int) and peers > 0:
            fail = Failure("unreachable", f"none of the addresses given answered: {tried};"
                           f" this node still knows {peers} peer(s)")
        else:
            fail = Failure("unreachable", f"joined no swarm through: {tried}")
        if not as_json:
            echo(render.key_values(_without_failed(result)))
        _fail(fail, as_json, extra=result)
    _show(result, as_json, lambda r: render.key_values(_without_failed(r)))
    for address, reason in reasons.items():
        warn(f"warning: {address}: {reason}")


def _bootstrap_failures(result: Mapping[str, Any]) -> dict[str, str]:
    """address -> reason, from the reply's ``failed`` list if the daemon sent one."""
    failed = result.get("failed")
    if not isinstance(failed, list):
        return {}
    return {str(f.get("address")): str(f.get("reason")) for f in failed
            if isinstance(f, Mapping)}


def _without_failed(result: Mapping[str, Any]) -> dict[str, Any]:
    # Failures are printed one per line on stderr; a table cell would run them together.
    return {k: v for k, v in result.items() if k != "failed"}


def emit(
    socket: SocketOption = None,
    as_json: JsonOption = False,
    topic: Annotated[str | None, typer.Option("--topic", "-t", help="The topic.",
                                              show_default=False)] = None,
    vector: VectorOption = None,
    outcome: Annotated[list[str] | None, typer.Option(
        "--outcome", "-o", metavar="KEY=VALUE", show_default=False,
        help="An outcome field (repeat for more). " + OUTCOME_VALUES)] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, show_default=False,
                                          help="Cases this packet distils (default 1).")
                 ] = None,
    ttl: Annotated[int | None, typer.Option("--ttl", min=1, show_default=False,
                                            help="Seconds to live (default: the swarm's)."
                                            )] = None,
    file: FileOption = None,
) -> None:
    """Sign and store an outcome packet, or many with --file.

    With --file: one JSON object per line, {"topic", "vector", "outcome", "n"?, "ttl"?}.

    Rejected lines are named on stderr with the reason; a summary accepted=N rejected=M follows.
    If the run stops part-way (the daemon went away, a timeout, a full disk, Ctrl-C),
    the summary still comes: the lines stored with their ids, those sent without an
    answer (they may or may not be stored), and the first line not sent. Exit status
    1, or 130 after Ctrl-C.
    """
    if file is not None:
        given = [name for name, v in (("--topic", topic), ("--vector", vector),
                                      ("--outcome", outcome), ("--ttl", ttl),
                                      ("--n", n)) if v is not None]
        if given:
            raise typer.BadParameter(f"cannot be combined with {', '.join(given)}",
                                     param_hint="--file")
        with open_lines(file) as fh, _connected(socket, as_json) as client:
            status = emit_file(client, fh, as_json)
        raise typer.Exit(status)
    if not topic:
        raise typer.BadParameter("is required (or give --file)", param_hint="--topic")
    if vector is None:
        raise typer.BadParameter("is required (or give --file)", param_hint="--vector")
    if not outcome:
        raise typer.BadParameter("give at least one key=value", param_hint="--outcome")
    params: dict[str, Any] = {"topic": _text(topic, "--topic"), "vector": parse_vector(vector),
                              "outcome": parse_outcome(outcome), "n": 1 if n is None else n}
    if ttl is not None:
        params["ttl"] = ttl
    with _connected(socket, as_json) as client:
        _show(client.call("emit", params), as_json, render.render_emit)


def query(
    socket: SocketOption = None,
    as_json: JsonOption = False,
    topic: Annotated[str | None, typer.Option("--topic", "-t", help="The topic.",
                                              show_default=False)] = None,
    vector: VectorOption = None,
    k: Annotated[int | None, typer.Option("-k", "--k", min=1, max=MAX_K, show_default=False,
                                          help="How many matches (default 10).")] = None,
    file: FileOption = None,
) -> None:
    """Ask what happened to cases like this one.

    Prints the k most similar packets and the answer they give.

    With --file: one {"topic", "vector", "k"?} object per line (JSON lines out with
    --json, each with its "line").
    """
    if file is not None:
        given = [name for name, v in (("--topic", topic), ("--vector", vector), ("-k", k))
                 if v is not None]
        if given:
            raise typer.BadParameter(
                f"cannot be combined with {', '.join(given)} (give them on each line)",
                param_hint="--file")
        with open_lines(file) as fh, _connected(socket, as_json) as client:
            status = query_file(client, fh, as_json)
        raise typer.Exit(status)
    if not topic:
        raise typer.BadParameter("is required (or give --file)", param_hint="--topic")
    if vector is None:
        raise typer.BadParameter("is required (or give --file)", param_hint="--vector")
    params = {"topic": _text(topic, "--topic"), "vector": parse_vector(vector),
              "k": 10 if k is None else k}
    with _connected(socket, as_json) as client:
        _show(client.call("query", params), as_json, render.render_query)


def watch(
    topic: TopicOption,
    socket: SocketOption = None,
    as_json: JsonOption = False,
    vector: VectorOption = None,
) -> None:
    """Print packets of a topic as they arrive, until Ctrl-C.

    One line per packet (JSON lines with --json); with --vector, also the similarity to it.
    Ends quietly (exit 0) on Ctrl-C or when the reader of its output stops reading.
    """
    _text(topic, "--topic")
    params_vector = parse_vector(vector) if vector is not None else None
    with _connected(socket, as_json) as client:
        try:
            with client.watch(topic=topic, vector=params_vector) as events:
                if not as_json:
                    warn(f"watching topic {topic!r}; Ctrl-C to stop")
                for event in events:
                    if not echo(json.dumps(event, ensure_ascii=False) if as_json
                                else render.render_event(event)):
                        raise typer.Exit(0)  # | head: the reader has what it wanted
        except KeyboardInterrupt:
            raise typer.Exit(0) from None
    _fail(Failure("watch_ended", f"the daemon ended the watch ({client.socket_path})"),
          as_json)


_COMMANDS = (
    ("status", status), ("peers", peers), ("emit", emit), ("query", query),
    ("watch", watch), ("packets", packets), ("identity", identity),
    ("bootstrap", bootstrap),
)


def _json_usage_errors(command: Callable[..., None]) -> Callable[..., None]:
    """``command``, printing with --json its usage errors (a bad --vector...) also
    as a JSON error on stdout; click still prints them with the usage and exits 2."""

    @functools.wraps(command)
    def run(**params: Any) -> None:
        try:
            command(**params)
        except typer.BadParameter as exc:
            if params.get("as_json"):
                echo_json({"error": {"code": "usage", "message": exc.format_message()}})
            raise

    return run


def register(app: typer.Typer) -> None:
    """Add the client commands to the ``qisd`` app."""
    for name, command in _COMMANDS:
        app.command(name, epilog=EXIT_HELP, cls=JsonUsageCommand)(_json_usage_errors(command))
