"""``--file`` for ``qisd emit`` and ``qisd query``: JSON lines in, one request per
line (emits in bulk batches), every bad line named with its number and reason.

A line is checked locally first with the protocol's own param checks, so a typo is
reported without a round trip; what passes goes to the daemon, whose refusals are
reported the same way. Nothing stops at a bad line: the summary counts them all.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

import typer

from qisd.cli import render
from qisd.control.client import Client
from qisd.control.errors import ControlError
from qisd.control.protocol import BAD_REQUEST, check_params, loads

__all__ = ["EMIT_BATCH_BYTES", "EMIT_BATCH_ITEMS", "echo_json", "emit_file", "numbered_lines",
           "open_lines", "query_file"]

#: Items per emit_many request, and a size bound well under the daemon's 1 MiB line.
EMIT_BATCH_ITEMS = 500
EMIT_BATCH_BYTES = 512 * 1024


def echo_json(value: Any) -> None:
    """One JSON value on one line of stdout (JSON lines)."""
    typer.echo(json.dumps(value, ensure_ascii=False))


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
    """(line number, parsed object, problem) for each non-blank line."""
    for lineno, raw in enumerate(fh, 1):
        if not raw.strip():
            continue
        try:
            yield lineno, loads(raw), None
        except UnicodeDecodeError:
            yield lineno, None, "not UTF-8 text"
        except ValueError as exc:
            yield lineno, None, f"not valid JSON: {exc}"


class _Tally:
    """Accepted and rejected lines of a --file run, reported as they are known."""

    def __init__(self) -> None:
        self.accepted = 0
        self.rejected = 0
        self.results: list[dict[str, Any]] = []
        self._progress = sys.stderr.isatty()

    def accept(self, lineno: int, result: Mapping[str, Any]) -> None:
        self.accepted += 1
        self.results.append({"line": lineno, **result})

    def reject(self, lineno: int, code: str, message: str) -> None:
        self.rejected += 1
        self.results.append({"line": lineno, "error": {"code": code, "message": message}})
        self._clear()
        typer.echo(f"line {lineno}: rejected: {code}: {message}", err=True)

    def progress(self) -> None:
        if self._progress:
            typer.echo(f"\r{self.accepted + self.rejected} lines done", err=True, nl=False)

    def _clear(self) -> None:
        if self._progress:
            typer.echo("\r\x1b[K", err=True, nl=False)

    def summary(self) -> dict[str, Any]:
        self._clear()
        results = sorted(self.results, key=lambda r: int(r["line"]))
        return {"accepted": self.accepted, "rejected": self.rejected, "results": results}


def emit_file(client: Client, fh: IO[bytes], as_json: bool) -> int:
    """Emit every line of ``fh`` in batches, print the summary; returns how many
    lines were rejected."""
    tally = _Tally()
    batch: list[tuple[int, dict[str, Any]]] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if not batch:
            return
        try:
            results = client.emit_many([item for _, item in batch])
        except ControlError as exc:
            if exc.code not in ("invalid", BAD_REQUEST, "unavailable", "too_large"):
                raise
            results = [{"error": {"code": exc.code, "message": exc.message}}] * len(batch)
        for (lineno, _), result in zip(batch, results, strict=True):
            error = result.get("error")
            if isinstance(error, Mapping):
                message = str(error.get("message"))
                # The daemon names items by their index in the batch; the line says more.
                tally.reject(lineno, str(error.get("code")), message.partition("]: ")[2]
                             if message.startswith("items[") else message)
            else:
                tally.accept(lineno, result)
        batch.clear()
        size = 0
        tally.progress()

    for lineno, obj, problem in numbered_lines(fh):
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
        item_size = len(json.dumps(item))
        if item_size > EMIT_BATCH_BYTES:
            tally.reject(lineno, "too_large", f"line is over {EMIT_BATCH_BYTES} bytes as JSON")
            continue
        if batch and (len(batch) >= EMIT_BATCH_ITEMS or size + item_size > EMIT_BATCH_BYTES):
            flush()
        batch.append((lineno, item))
        size += item_size
    flush()
    summary = tally.summary()
    if as_json:
        echo_json(summary)
    else:
        typer.echo(f"accepted={summary['accepted']} rejected={summary['rejected']}")
    return tally.rejected


def query_file(client: Client, fh: IO[bytes], as_json: bool) -> int:
    """Run one query per line of ``fh``, printing each answer in order; returns how
    many lines failed."""
    failed = 0
    for lineno, obj, problem in numbered_lines(fh):
        error: ControlError | None = None
        if problem is not None:
            error = ControlError(BAD_REQUEST, problem)
        elif not isinstance(obj, dict):
            error = ControlError(BAD_REQUEST, "must be a JSON object")
        else:
            try:
                result = client.call("query", check_params("query", obj, label="field"))
            except ControlError as exc:
                if exc.code not in ("invalid", BAD_REQUEST, "too_large"):
                    raise
                error = exc
        if error is not None:
            failed += 1
            typer.echo(f"line {lineno}: {error.code}: {error.message}", err=True)
            if as_json:
                echo_json({"line": lineno,
                            "error": {"code": error.code, "message": error.message}})
            continue
        if as_json:
            echo_json(result)
        else:
            typer.echo(f"line {lineno}: {obj['topic']}\n{render.render_query(result)}\n")
    return failed
