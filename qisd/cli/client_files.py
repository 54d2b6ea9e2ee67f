"""``--file`` for ``qisd emit`` and ``qisd query``: reading JSON lines (numbered, each
bad one named with its number and reason), and the query run, one request per line.
The emit run, in bulk batches, is :mod:`qisd.cli.emit_file`.

A line is checked locally first with the protocol's own param checks, so a typo is
reported without a round trip; what passes goes to the daemon, whose refusals are
reported the same way. Nothing stops at a bad line. What does stop a run (the daemon
went away, a timeout, a bug) still says from which line on nothing was answered; the
exit status is then the failure's (1, or 2 when no daemon answers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

import typer

from qisd.cli import render
from qisd.cli.output import Failure, echo, echo_json, failure, warn
from qisd.control.client import Client
from qisd.control.errors import ControlError
from qisd.control.protocol import BAD_REQUEST, check_params, loads

__all__ = ["LINE_CODES", "NOT_TEXT", "InputError", "line_ranges", "numbered_lines",
           "open_lines", "query_file"]

#: Error codes about the lines themselves: the line (or batch) is refused and the run
#: goes on. Any other failure stops it.
LINE_CODES = frozenset({"invalid", BAD_REQUEST, "too_large"})
#: Why a line whose JSON escapes decode to a lone surrogate (``"\\ud800"``) is refused.
NOT_TEXT = "holds a \\uD800-\\uDFFF escape that is not part of a pair: not valid text"


class InputError(Exception):
    """The input could not be read past line ``after``."""

    def __init__(self, after: int, exc: OSError) -> None:
        super().__init__(f"cannot read the input after line {after}: {exc.strerror or exc}")
        self.after = after


@contextmanager
def open_lines(source: str) -> Iterator[IO[bytes]]:
    """``source`` opened for reading bytes (``-``: stdin); a usage error names it
    if it cannot be read."""
    if source == "-":
        yield typer.get_binary_stream("stdin")
        return
    try:
        fh = open(source, "rb")  # noqa: SIM115 -- closed below, after the with body
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {source}: {exc.strerror or exc}", param_hint="--file"
        ) from None
    with fh:
        yield fh


def numbered_lines(fh: IO[bytes]) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object, problem) for each non-blank line; raises
    InputError if reading fails part-way."""
    lineno = 0
    lines = iter(fh)
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except OSError as exc:
            raise InputError(lineno, exc) from None
        lineno += 1
        if not raw.strip():
            continue
        try:
            yield lineno, loads(raw), None
        except UnicodeDecodeError:
            yield lineno, None, "not UTF-8 text"
        except ValueError as exc:
            yield lineno, None, f"not valid JSON: {exc}"


def line_ranges(lines: Sequence[int]) -> str:
    """Sorted line numbers as ``3-7, 9, 11-12``."""
    spans: list[list[int]] = []
    for n in sorted(lines):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def query_file(client: Client, fh: IO[bytes], as_json: bool) -> int:
    """Run one query per line of ``fh``, printing each answer in order; returns the
    exit status (0 all answered, 1 some lines failed or the run stopped, 2 no
    daemon)."""
    failed = 0
    stop: Failure | None = None
    not_answered_from: int | None = None
    try:
        for lineno, obj, problem in numbered_lines(fh):
            error: ControlError | None = None
            if problem is not None:
                error = ControlError(BAD_REQUEST, problem)
            elif not isinstance(obj, dict):
                error = ControlError(BAD_REQUEST, "must be a JSON object")
            else:
                try:
                    params = check_params("query", obj, label="field")
                    json.dumps(params, ensure_ascii=False).encode()
                    result = client.call("query", params)
                except UnicodeEncodeError:
                    error = ControlError(BAD_REQUEST, NOT_TEXT)
                except ControlError as exc:
                    if exc.code not in LINE_CODES:
                        stop, not_answered_from = failure(exc), lineno
                        break
                    error = exc
                except OSError as exc:
                    stop, not_answered_from = failure(exc), lineno
                    break
            if error is not None:
                failed += 1
                warn(f"line {lineno}: {error.code}: {error.message}")
                shown = (echo_json({"line": lineno, "error": {"code": error.code,
                                                              "message": error.message}})
                         if as_json else True)
            elif as_json:
                shown = echo_json({"line": lineno, **result})
            else:
                shown = echo(f"line {lineno}: {obj['topic']}\n{render.render_query(result)}\n")
            if not shown:  # the reader is gone: the answers would go nowhere
                break
    except InputError as exc:
        stop, not_answered_from = Failure("read_error", str(exc)), exc.after + 1
    if stop is None:
        return 1 if failed else 0
    warn(f"error: {stop.text}")
    warn(f"line {not_answered_from} and after: not answered")
    if as_json:
        echo_json({"error": stop.as_json(), "not_answered_from": not_answered_from})
    return stop.exit_code
