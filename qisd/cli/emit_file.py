"""``qisd emit --file``: JSON lines in, emitted in bulk batches, and a summary that
accounts for every line: stored (with its id), refused (with the reason), sent
without an answer (it may or may not have been stored), or not sent.

A run stopped part-way (the daemon went away, a timeout, a full disk, a bug,
Ctrl-C) still ends with that summary. Ctrl-C is let through only while the daemon
is being asked: once a batch is answered, its answers are recorded before a Ctrl-C
held back meanwhile lands, so no line is counted twice or lost between the two.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

from qisd.cli import render
from qisd.cli.client_files import LINE_CODES, NOT_TEXT, InputError, line_ranges, numbered_lines
from qisd.cli.output import Failure, echo, echo_json, failure, warn
from qisd.control.client import Client
from qisd.control.errors import ControlError, ControlSocketError, DaemonNotRunning
from qisd.control.protocol import BAD_REPLY, BAD_REQUEST, INTERNAL, check_params
from qisd.storage import STORAGE_CODES

__all__ = ["EMIT_BATCH_BYTES", "EMIT_BATCH_ITEMS", "INTERRUPTED", "emit_file"]

#: Items per emit_many request, and a size bound well under the daemon's 1 MiB line.
EMIT_BATCH_ITEMS = 500
EMIT_BATCH_BYTES = 512 * 1024

#: An error reply to a whole batch that leaves open what was stored.
_UNSURE_CODES = frozenset({INTERNAL, BAD_REPLY})


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
        self._unsaid: list[str] = []
        self._progress = sys.stderr.isatty()

    def accept(self, lineno: int, result: Mapping[str, Any]) -> None:
        self.accepted += 1
        self.results.append({"line": lineno, **result})

    def reject(self, lineno: int, code: str, message: str, *, later: bool = False) -> None:
        """Record a rejected line and say so on stderr, now or (``later``) at
        :meth:`say`: a write to stderr can block, and Ctrl-C is held back while a
        batch's answers are recorded (see :func:`emit_file`)."""
        self.rejected += 1
        self.results.append({"line": lineno, "error": {"code": code, "message": message}})
        self._unsaid.append(f"line {lineno}: rejected: {code}: {message}")
        if not later:
            self.say()

    def say(self) -> None:
        """Print the rejections not yet said."""
        if self._unsaid:
            self._clear()
        while self._unsaid:
            warn(self._unsaid.pop(0))

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
        self.say()
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
    done = 0  # the last line read and queued or rejected
    answered = 0  # batches the daemon answered (or may have run)

    def flush() -> tuple[Failure, int | None] | None:
        """Send the batch; a failure that stops the run, with the first line not
        sent (None: all were sent). Ctrl-C gets through only while the daemon is
        asked (the lines are then unconfirmed): once it answered, the answers are
        recorded and the batch cleared before a Ctrl-C held back meanwhile lands,
        so every line is counted once, as what it is."""
        nonlocal size, answered
        if not batch:
            return None
        with _sigint(block=True):
            stop = send([lineno for lineno, _ in batch], [item for _, item in batch])
            batch.clear()
            size = 0
        tally.say()
        tally.progress()
        return stop

    def send(lines: list[int], items: list[dict[str, Any]]) -> tuple[Failure, int | None] | None:
        nonlocal answered
        try:
            with _sigint(block=False):
                results = client.emit_many(items)
            answered += 1
        except KeyboardInterrupt:  # the batch may or may not have reached the daemon
            tally.unconfirm(lines, INTERRUPTED)
            return INTERRUPTED, None
        except ControlError as exc:
            answered += 1
            if exc.code not in LINE_CODES and exc.code != "unavailable":
                fail = failure(exc)
                if exc.code in _UNSURE_CODES:
                    tally.unconfirm(lines, fail)
                else:  # the daemon refused the whole batch: nothing was stored
                    for lineno in lines:
                        tally.reject(lineno, exc.code, exc.message, later=True)
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
                tally.reject(lineno, code, message, later=True)
                if code in STORAGE_CODES:  # every later line would fail the same way
                    stop = Failure(code, message, 1, show_code=True)
            else:
                tally.accept(lineno, result)
        return None if stop is None else (stop, None)

    def read_and_send() -> tuple[Failure, int | None] | None:
        """Every line, batched; how the run stopped (None: it did not)."""
        nonlocal size, done
        try:
            for lineno, obj, problem in numbered_lines(fh):
                item, item_size = _emit_item(lineno, obj, problem, tally)
                if item is None:
                    done = lineno
                    continue
                if batch and (len(batch) >= EMIT_BATCH_ITEMS
                              or size + item_size > EMIT_BATCH_BYTES):
                    stopped = flush()
                    if stopped is not None:
                        fail, first = stopped
                        return fail, lineno if first is None else first
                batch.append((lineno, item))
                size += item_size
                done = lineno
        except InputError as exc:
            # What was read is still sent; the lines after the failed read are not.
            unread = Failure("read_error", str(exc))
            stopped = flush()
            if stopped is None:
                return unread, exc.after + 1
            warn(f"error: {unread.text}")
            return stopped[0], exc.after + 1 if stopped[1] is None else stopped[1]
        return flush()

    try:
        stopped = read_and_send()
    except KeyboardInterrupt:  # between batches: the lines read but not sent are not stored
        stopped = INTERRUPTED, batch[0][0] if batch else done + 1
    stop, not_sent_from = stopped if stopped is not None else (None, None)
    _print_emit_summary(tally, stop, not_sent_from, as_json)
    if stop is None:
        return 1 if tally.rejected else 0
    if stop.exit_code == 2 and (answered or tally.unconfirmed):
        return 1  # the daemon went away part-way, after it had taken some lines
    return stop.exit_code


def _emit_item(
    lineno: int, obj: Any, problem: str | None, tally: _Tally
) -> tuple[dict[str, Any] | None, int]:
    """The emit item of one read line and its size as JSON, or (None, 0) when the
    line is rejected here (recorded in ``tally``)."""
    if problem is None and not isinstance(obj, dict):
        problem = "must be a JSON object"
    if problem is None:
        try:
            item = check_params("emit", obj, label="field")
        except ControlError as exc:
            problem = exc.message
    if problem is not None:
        tally.reject(lineno, BAD_REQUEST, problem)
        return None, 0
    try:
        item_size = len(json.dumps(item, ensure_ascii=False).encode())
    except UnicodeEncodeError:
        tally.reject(lineno, BAD_REQUEST, NOT_TEXT)
        return None, 0
    if item_size > EMIT_BATCH_BYTES:
        tally.reject(lineno, "too_large", f"line is over {EMIT_BATCH_BYTES} bytes as JSON")
        return None, 0
    return item, item_size


@contextmanager
def _sigint(*, block: bool) -> Iterator[None]:
    """Ctrl-C held back (``block``) or let through for the block. One held back
    lands as KeyboardInterrupt as soon as it is let through again. (Only the main
    thread of a system with ``pthread_sigmask`` can; elsewhere this does nothing.)"""
    if not hasattr(signal, "pthread_sigmask") or (
            threading.current_thread() is not threading.main_thread()):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK if block else signal.SIG_UNBLOCK,
                                 {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

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
