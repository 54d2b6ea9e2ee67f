"""This node's own packets, kept for origin republish (mixed into the packet store).

A node re-places the packets it emitted, as their origin (paper 2.5), so an entry
whose every holder left comes back. The list must outlive a restart, or a daemon
restarted after an emit never republishes what it emitted before; so it lives in
the ``own`` table of the store's file, next to the packets it holds for others
(written in its own transaction; the same file is what the operator backs up).

Only the newest packet of a series is kept (a newer synthesis of a cohort
supersedes the older in every store, so re-placing the older is wasted work), and
at most ``limit`` packets, the oldest created dropped first.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager

from qisd.packet import OutcomePacket, packet_id
from qisd.storage import read_error
from qisd.store_reads import StoreReads

KEY_BYTES = 20

OWN_SCHEMA = """
CREATE TABLE IF NOT EXISTS own (
    id BLOB PRIMARY KEY,
    series BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    keys BLOB NOT NULL,
    data BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS own_by_created ON own(created_ms);
CREATE INDEX IF NOT EXISTS own_by_series ON own(series);
CREATE INDEX IF NOT EXISTS own_by_expiry ON own(expires_ms);
"""


class StoreOwn(StoreReads):
    """The ``own`` table: packets this node emitted and the keys it placed them under."""

    _conn: sqlite3.Connection
    _lock: threading.Lock
    #: Rows in the table, once counted (None: count again).
    _own_rows: int | None = None

    def _writing(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # provided by the store

    def remember_own(
        self, packet: OutcomePacket, keys: Sequence[bytes], *, limit: int
    ) -> list[bytes]:
        """Keep ``packet`` (placed under ``keys``) for republish; one transaction.

        Returns the ids it displaced: older packets of its series, and the oldest
        beyond ``limit``.
        """
        return self.remember_own_many([(packet, keys)], limit=limit)

    def remember_own_many(
        self, items: Sequence[tuple[OutcomePacket, Sequence[bytes]]], *, limit: int
    ) -> list[bytes]:
        """:meth:`remember_own` for each ``(packet, keys)`` in order, all in one
        transaction (a bulk emit): all are kept or, on an error, none."""
        for _, keys in items:
            if not keys or any(len(k) != KEY_BYTES for k in keys):
                raise ValueError(f"keys: each must be {KEY_BYTES} bytes, at least one")
        if not items:
            return []
        with self._lock, self._writing() as conn:
            try:
                dropped: list[bytes] = []
                for packet, keys in items:
                    dropped += self._remember(conn, packet, keys, limit)
                return dropped
            except BaseException:
                self._own_rows = None  # rolled back: count again
                raise

    def _remember(
        self, conn: sqlite3.Connection, packet: OutcomePacket, keys: Sequence[bytes], limit: int
    ) -> list[bytes]:
        dropped: list[bytes] = []
        if self._own_rows is None:
            self._own_rows = int(conn.execute("SELECT COUNT(*) FROM own").fetchone()[0])
        if packet.series:
            rows = conn.execute(
                "SELECT id, created_ms FROM own WHERE series=? AND id<>?",
                (packet.series, packet.id),
            ).fetchall()
            if any(created >= packet.created_ms for _, created in rows):
                return [packet.id]  # a newer one of its series is kept already
            dropped += [pid for pid, _ in rows]
            conn.executemany("DELETE FROM own WHERE id=?", [(pid,) for pid in dropped])
            self._own_rows -= len(dropped)
        added = conn.execute(
            "INSERT OR IGNORE INTO own VALUES (?,?,?,?,?,?)",
            (packet.id, packet.series, packet.created_ms, packet.expires_ms,
             b"".join(keys), packet.encoded),
        ).rowcount
        self._own_rows += added
        if self._own_rows > limit:
            oldest = conn.execute(
                "SELECT id FROM own ORDER BY created_ms, id LIMIT ?", (self._own_rows - limit,)
            ).fetchall()
            dropped += [r[0] for r in oldest]
            conn.executemany("DELETE FROM own WHERE id=?", oldest)
            self._own_rows -= len(oldest)
        return dropped

    def own_packets(self, now_ms: int) -> list[tuple[OutcomePacket, tuple[bytes, ...]]]:
        """The live packets kept for republish, oldest created first, with their keys."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT keys, data FROM own WHERE expires_ms > ? ORDER BY created_ms, id",
                    (now_ms,),
                ).fetchall()
            except sqlite3.Error as exc:
                if "no such table" in str(exc):
                    # A store from before this table, opened read-only: nothing kept yet.
                    return []
                # A failing disk is not "nothing kept": republish and the synthesis
                # resume must hear of it.
                raise read_error(exc, self.path) from None
        packets = {p.id: p for p in self._decoded(data for _, data in rows)}
        return [
            (packets[pid], tuple(_split(keys)))
            for keys, data in rows
            if (pid := packet_id(data)) in packets
        ]

    def _expire_own(self, conn: sqlite3.Connection, now_ms: int) -> int:
        self._own_rows = None
        return conn.execute("DELETE FROM own WHERE expires_ms <= ?", (now_ms,)).rowcount


def _split(keys: bytes) -> Iterator[bytes]:
    for i in range(0, len(keys), KEY_BYTES):
        yield keys[i : i + KEY_BYTES]
