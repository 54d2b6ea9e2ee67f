"""The packet store's SQLite file: opening it (read-write, or read-only as a fallback)
and naming why a write failed.

A full disk, a read-only filesystem or an I/O error must not take the daemon down:
the store keeps answering reads, refuses writes with a :class:`StoreError` whose
``code`` says which (the control API passes the code on unchanged) and whose message
names the file, and writes work again once the cause is gone. SQLite reports these
as ``SQLITE_FULL``, ``SQLITE_READONLY``, ``SQLITE_IOERR`` and ``SQLITE_CANTOPEN``
(primary result codes, https://www.sqlite.org/rescode.html).

A WAL database on a read-only filesystem cannot be opened the usual way (SQLite must
create the ``-shm`` file): :func:`connect_read_only` opens it ``mode=ro`` and, when
no unmerged ``-wal`` is left behind, ``immutable=1`` (no locking, no ``-shm``).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

#: Error codes of a store that cannot write (control API codes, metrics labels).
STORAGE_FULL = "storage_full"
STORAGE_READ_ONLY = "storage_read_only"
STORAGE_ERROR = "storage_error"
STORAGE_CODES = (STORAGE_FULL, STORAGE_READ_ONLY, STORAGE_ERROR)

# SQLite primary result codes (the low byte of an extended code).
_SQLITE_READONLY = 8
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26

_WHAT = {
    STORAGE_FULL: "the disk is full",
    STORAGE_READ_ONLY: "the state directory is read-only",
    STORAGE_ERROR: "the disk failed",
}
_FIX = {
    STORAGE_FULL: "free space on that filesystem; writes resume by themselves",
    STORAGE_READ_ONLY: "make it writable; writes resume by themselves",
    STORAGE_ERROR: "check the disk and the kernel log",
}


class StoreError(Exception):
    """The store cannot be used or cannot write; ``code`` says why (one of
    :data:`STORAGE_CODES`) and the message names the file."""

    def __init__(self, message: str, *, code: str = STORAGE_ERROR) -> None:
        super().__init__(message)
        self.code = code


def writable(path: Path) -> bool:
    """True if the file (or, while it does not exist, its directory) can be written.
    ``os.access`` also answers False on a read-only mount, for root too."""
    if path.exists():
        return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
    return os.access(path.parent, os.W_OK)


def code_of(exc: sqlite3.Error, path: Path | None) -> str:
    primary = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if primary == _SQLITE_FULL:
        return STORAGE_FULL
    if primary == _SQLITE_READONLY:
        return STORAGE_READ_ONLY
    if primary == _SQLITE_CANTOPEN and path is not None and not writable(path):
        return STORAGE_READ_ONLY
    return STORAGE_ERROR


def _what_and_fix(exc: sqlite3.Error, code: str) -> tuple[str, str]:
    """What happened and what to do, for a ``storage_error`` by SQLite's own code
    (a busy or damaged database is not a failed disk)."""
    primary = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == STORAGE_ERROR and primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return ("the database is busy (another process holds it)",
                "make sure no other process writes to it")
    if code == STORAGE_ERROR and primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return ("the database file is damaged",
                "stop the daemon and move the file away: a new one is made at the next"
                " start, and republish by the swarm brings its packets back")
    return _WHAT[code], _FIX[code]


def write_error(exc: sqlite3.Error, path: Path | None) -> StoreError:
    """A failed write as a StoreError: what happened, to which file, what to do."""
    code = code_of(exc, path)
    what, fix = _what_and_fix(exc, code)
    where = path if path is not None else ":memory:"
    return StoreError(
        f"packet store {where}: write failed, {what} ({exc}); nothing was "
        f"stored and the store is unchanged; {fix}",
        code=code,
    )


def read_error(exc: sqlite3.Error, path: Path | None) -> StoreError:
    """A failed read as a StoreError (code ``storage_error``): the caller answers
    without what the store holds, or says why it cannot."""
    what, fix = _what_and_fix(exc, STORAGE_ERROR)
    where = path if path is not None else ":memory:"
    return StoreError(f"packet store {where}: read failed, {what} ({exc}); {fix}",
                      code=STORAGE_ERROR)


def read_only_error(path: Path) -> StoreError:
    return StoreError(
        f"packet store {path}: opened read-only, {_WHAT[STORAGE_READ_ONLY]}; "
        f"nothing was stored; {_FIX[STORAGE_READ_ONLY]}",
        code=STORAGE_READ_ONLY,
    )


def connect(path: Path | str) -> sqlite3.Connection:
    """A read-write connection in WAL mode (``":memory:"`` for tests)."""
    conn = sqlite3.connect(
        str(path), isolation_level=None, check_same_thread=False, timeout=5.0
    )
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def connect_reader(path: Path) -> sqlite3.Connection:
    """A second, read-only connection to a live store: in WAL mode it reads a
    snapshot while the main connection goes on writing. Refused (``sqlite3.Error``)
    if the store is not in WAL mode, where a long read would hold back commits."""
    uri = f"file:{quote(str(path))}?mode=ro"  # (never creates a missing file)
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                           timeout=5.0)
    try:
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"journal mode {mode}: readers would block writes")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to an existing store on a filesystem that cannot be
    written. ``immutable=1`` only when no ``-wal`` holds transactions not yet merged
    (after a crash it does, and ``mode=ro`` reads it, given its ``-shm``)."""
    uri = f"file:{quote(str(path))}?mode=ro"
    wal = path.with_name(path.name + "-wal")
    pending = wal.exists() and wal.stat().st_size > 0
    attempts = [uri] if pending else [uri, uri + "&immutable=1"]
    error: sqlite3.Error | None = None
    for target in attempts:
        conn = sqlite3.connect(
            target, uri=True, isolation_level=None, check_same_thread=False, timeout=5.0
        )
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            conn.close()
            error = exc
            continue
        return conn
    assert error is not None
    raise error
