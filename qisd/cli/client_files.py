"""``--file`` for ``qisd emit`` and ``qisd query``: JSON lines in, one request per
line (emits in bulk batches), every bad line named with its number and reason.

A line is checked locally first with the protocol's own param checks, so a typo is
reported without a round trip; what passes goes to the daemon, whose refusals are
reported the same way. Nothing stops at a bad line: the summary counts them all.

What does stop a run (the daemon went away, a timeout, a full disk, a bug) still
ends with the summary so far, so no line is left unaccounted for: an emit run says
which lines were stored (with their ids), refused, sent without an answer (they may
or may not have been stored), and from which line on nothing was sent; a query run
says from which line on nothing was answered. The exit status is then the failure's
(1, or 2 when no daemon answers).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

import typer

from qisd.cli import render
from qisd.cli.output import Failure, echo, echo_json, failure, warn
from qisd.control.client import Client
from qisd.control.errors import ControlError, ControlSocketError, DaemonNotRunning
from qisd.control.protocol import BAD_REPLY, BAD_REQUEST, INTERNAL, check_params, loads
from qisd.storage import STORAGE_CODES

__all__ = ["EMIT_BATCH_BYTES", "EMIT_BATCH_ITEMS", "InputError", "echo_json", "emit_file",
           "line_ranges", "numbered_lines", "open_lines", "query_file"]

#: Items per emit_many request, and a size bound well under the daemon's 1 MiB line.
EMIT_BATCH_ITEMS = 500
EMIT_BATCH_BYTES = 512 * 1024

#: Error codes about the lines themselves: the line (or batch) is refused and the run
#: goes on. Any other failure stops it.
_LINE_CODES = frozenset({"invalid", BAD_REQUEST, "too_large"})
#: Why a line whose JSON escapes decode to a lone surrogate (``"\\ud800"``) is refused.
_NOT_TEXT = "holds a \\uD800-\\uDFFF escape that is not part of a pair: not valid text"
#: An error reply to a whole batch that leaves open what was stored.
_UNSURE_CODES = frozenset({INTERNAL, BAD_REPLY})


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


def _lines_word(lines: Sequence[int]) -> str:
    return f"line{'s' if len(lines) > 1 else ''} {line_ranges(lines)}"


def _before_sending(exc: OSError) -> bool:
    """True if ``exc`` means the request never left: no connection could be made."""
    return isinstance(exc, DaemonNotRunning | ControlSocketError | PermissionError)


class _Tally:
    """Accepted, rejected and unconfirmed lines of an emit --file run, reported as
    they are known."""

    def __init__(self) -> None:
        self.accepted = 0
        self.rejected = 0
        self.unconfirmed: list[int] = []
        self.results: list[dict[str, Any]] = []
        self._progress = sys.stderr.isatty()

    def accept(self, lineno: int, result: Mapping[str, Any]) -> None:
        self.accepted += 1
        self.results.append({"line": lineno, **result})

    def reject(self, lineno: int, code: str, message: str) -> None:
        self.rejected += 1
        self.results.append({"line": lineno, "error": {"code": code, "message": message}})
        self._clear()
        warn(f"line {lineno}: rejected: {code}: {message}")

    def unconfirm(self, lines: Sequence[int], fail: Failure) -> None:
        """Lines sent whose fate is unknown: the run stopped before their answer."""
        self.unconfirmed += lines
        message = f"no answer, it may or may not have been stored: {fail.text}"
        self.results += [{"line": n, "error": {"code": fail.code, "message": message},
                          "unconfirmed": True} for n in lines]

    def progress(self) -> None:
        if self._progress:
            warn(f"\r{self.accepted + self.rejected} lines done", nl=False)

    def _clear(self) -> None:
        if self._progress:
            warn("\r\x1b[K", nl=False)

    def summary(self, stop: Failure | None, not_sent_from: int | None) -> dict[str, Any]:
        self._clear()
        results = sorted(self.results, key=lambda r: int(r["line"]))
        return {"accepted": self.accepted, "rejected": self.rejected,
                "unconfirmed": len(self.unconfirmed), "not_sent_from": not_sent_from,
                "error": None if stop is None else stop.as_json(), "results": results}


#: Why a run stopped on Ctrl-C (exit status 130, as a shell reports SIGINT).
INTERRUPTED = Failure("interrupted", "stopped by Ctrl-C", 130)


def emit_file(client: Client, fh: IO[bytes], as_json: bool) -> int:
    """Emit every line of ``fh`` in batches and print the summary; returns the exit
    status (0 all stored, 1 some lines rejected or the run stopped, 2 no daemon and
    nothing sent, 130 Ctrl-C). A stopped run, Ctrl-C included, still prints the
    summary: which lines were stored, which were sent without an answer, and the
    first line not sent."""
    tally = _Tally()
    batch: list[tuple[int, dict[str, Any]]] = []
    size = 0
    last_read = 0
    answered = 0  # batches the daemon answered (or may have run)

    def flush() -> tuple[Failure, int | None] | None:
        """Send the batch; a failure that stops the run, with the first line not
        sent (None: all were sent)."""
        nonlocal size, answered
        if not batch:
            return None
        lines = [lineno for lineno, _ in batch]
        items = [item for _, item in batch]
        batch.clear()
        size = 0
        try:
            results = client.emit_many(items)
            answered += 1
        except KeyboardInterrupt:  # the batch may or may not have reached the daemon
            tally.unconfirm(lines, INTERRUPTED)
            return INTERRUPTED, None
        except ControlError as exc:
            answered += 1
            if exc.code not in _LINE_CODES and exc.code != "unavailable":
                fail = failure(exc)
                if exc.code in _UNSURE_CODES:
                    tally.unconfirm(lines, fail)
                else:  # the daemon refused the whole batch: nothing was stored
                    for lineno in lines:
                        tally.reject(lineno, exc.code, exc.message)
                return fail, None
            results = [{"error": {"code": exc.code, "message": exc.message}}] * len(lines)
        except OSError as exc:
            fail = failure(exc)
            if _before_sending(exc):
                return fail, lines[0]
            tally.unconfirm(lines, fail)
            return fail, None
        stop: Failure | None = None
        for lineno, result in zip(lines, results, strict=True):
            error = result.get("error")
            if isinstance(error, Mapping):
                code, message = str(error.get("code")), str(error.get("message"))
                # The daemon names items by their index in the batch; the line says more.
                if message.startswith("items["):
                    message = message.partition("]: ")[2] or message
                tally.reject(lineno, code, message)
                if code in STORAGE_CODES:  # every later line would fail the same way
                    stop = Failure(code, message, 1, show_code=True)
            else:
                tally.accept(lineno, result)
        tally.progress()
        return None if stop is None else (stop, None)

    stopped: tuple[Failure, int | None] | None = None
    try:
        for lineno, obj, problem in numbered_lines(fh):
            last_read = lineno
            if problem is None and not isinstance(obj, dict):
                problem = "must be a JSON object"
            if problem is None:
                try:
                    item = check_params("emit", obj, label="field")
                except ControlError as exc:
                    problem = exc.message
            if problem is not None:
                tally.reject(lineno, BAD_REQUEST, problem)
                continue
            try:
                item_size = len(json.dumps(item, ensure_ascii=False).encode())
            except UnicodeEncodeError:
                tally.reject(lineno, BAD_REQUEST, _NOT_TEXT)
                continue
            if item_size > EMIT_BATCH_BYTES:
                tally.reject(lineno, "too_large",
                             f"line is over {EMIT_BATCH_BYTES} bytes as JSON")
                continue
            if batch and (len(batch) >= EMIT_BATCH_ITEMS
                          or size + item_size > EMIT_BATCH_BYTES):
                stopped = flush()
                if stopped is not None:
                    fail, first = stopped
                    stopped = fail, lineno if first is None else first
                    break
            batch.append((lineno, item))
            size += item_size
    except InputError as exc:
        # What was read is still sent; the lines after the failed read are not.
        unread = Failure("read_error", str(exc))
        stopped = flush()
        if stopped is None:
            stopped = unread, exc.after + 1
        else:
            warn(f"error: {unread.text}")
            stopped = stopped[0], exc.after + 1 if stopped[1] is None else stopped[1]
    except KeyboardInterrupt:  # between batches: those read but not sent are not stored
        stopped = INTERRUPTED, batch[0][0] if batch else last_read + 1
    else:
        if stopped is None:
            stopped = flush()
    stop, not_sent_from = stopped if stopped is not None else (None, None)
    _print_emit_summary(tally, stop, not_sent_from, as_json)
    if stop is None:
        return 1 if tally.rejected else 0
    if stop.exit_code == 2 and (answered or tally.unconfirmed):
        return 1  # the daemon went away part-way, after it had taken some lines
    return stop.exit_code


def _print_emit_summary(
    tally: _Tally, stop: Failure | None, not_sent_from: int | None, as_json: bool
) -> None:
    summary = tally.summary(stop, not_sent_from)
    if stop is not None:
        warn(f"error: {stop.text}")
        if tally.unconfirmed:
            warn(f"{_lines_word(tally.unconfirmed)}: sent, but no answer came; they may or"
                 " may not have been stored")
        if not_sent_from is not None:
            warn(f"line {not_sent_from} and after: not sent")
    if as_json:
        echo_json(summary)
        return
    counts = f"accepted={summary['accepted']} rejected={summary['rejected']}"
    if stop is None:
        echo(counts)
        return
    stored = [(r["line"], r.get("id")) for r in summary["results"] if "error" not in r]
    if stored:
        echo(render.table(("line", "id"), stored))
    echo(f"{counts} unconfirmed={summary['unconfirmed']}"
         f" not_sent_from={render.cell(summary['not_sent_from'])}")


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
                    error = ControlError(BAD_REQUEST, _NOT_TEXT)
                except ControlError as exc:
                    if exc.code not in _LINE_CODES:
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
