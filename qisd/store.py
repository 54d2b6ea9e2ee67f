"""The packet store: verified packets in one SQLite file (stdlib, WAL) in the state dir.

Many packets per 20-byte key (a node is responsible for several keys of the same
packet, so packets and key entries are separate tables); dedup by packet id; expiry;
supersede (a newer packet of the same origin and series replaces the older, so a
cohort's synthesis is kept once); quotas per origin and per key, and caps on the
whole store, each refusal with its reason.

Every write is one transaction: a crash mid-batch leaves the batch either wholly in
or wholly out, never a packet without its entries. ``synchronous=NORMAL`` in WAL mode
survives a killed process (the WAL is in the OS cache); a power cut may lose the last
transactions but never corrupts the file.

A write the disk refuses (full, read-only, I/O error) rolls its transaction back and
raises :class:`StoreError` with a code (:mod:`qisd.storage`); reads go on. A store
found read-only at start opens read-only. Either way the next write tries again (on
a fresh connection where the file was read-only), so writes resume without a
restart once the cause is gone; :attr:`PacketStore.failure` holds the last refusal
until a write succeeds.

Reads are in :mod:`qisd.store_reads`; the packets this node emitted (kept for
its republish as their origin) in :mod:`qisd.store_own`. The API is synchronous
and guarded by one lock (the passes over every key entry run on a reader connection
of their own, off that lock), so the daemon runs it in a worker thread
(``trio.to_thread.run_sync``) and batches writes with :meth:`PacketStore.put_many`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qisd.manifest import MAX_TABLES
from qisd.packet import KIND_SYNTHESIS, OutcomePacket
from qisd.storage import (
    STORAGE_FULL,
    STORAGE_READ_ONLY,
    StoreError,
    connect,
    connect_read_only,
    read_error,
    read_only_error,
    writable,
    write_error,
)
from qisd.store_cache import DEFAULT_CACHE_BYTES, BucketCache
from qisd.store_own import OWN_SCHEMA, StoreOwn

__all__ = ["PacketStore", "PutResult", "StoreError", "StoreStats"]

SCHEMA_VERSION = 1
#: Keys one packet may be held under: one per LSH table, at most MAX_TABLES.
MAX_KEYS_PER_PACKET = MAX_TABLES

_SCHEMA = """
CREATE TABLE IF NOT EXISTS packets (
    id BLOB PRIMARY KEY,
    origin BLOB NOT NULL,
    series BLOB NOT NULL,
    topic TEXT NOT NULL,
    kind INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    bits INTEGER NOT NULL,
    sketch BLOB NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    key BLOB NOT NULL,
    id BLOB NOT NULL REFERENCES packets(id) ON DELETE CASCADE,
    PRIMARY KEY (key, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_id ON entries(id);
CREATE INDEX IF NOT EXISTS packets_by_expiry ON packets(expires_ms);
CREATE INDEX IF NOT EXISTS packets_by_origin ON packets(origin, series);
CREATE INDEX IF NOT EXISTS packets_by_topic ON packets(topic, created_ms);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
""" + OWN_SCHEMA


@dataclass(frozen=True, slots=True)
class PutResult:
    """What happened to one (key, packet) of a batch.

    status: ``stored`` (new), ``duplicate`` (already held under this key), ``added_key``
    (packet held, now also under this key), ``superseded`` (a newer packet of the same
    series is held; this one is dropped) or ``rejected`` (``reason`` says why: quota,
    key_quota, full, expired, packet_keys).
    """

    status: str
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("stored", "duplicate", "added_key", "superseded")

    @property
    def new(self) -> bool:
        return self.status in ("stored", "added_key")


@dataclass(frozen=True, slots=True)
class StoreStats:
    packets: int
    bytes: int
    keys: int


class PacketStore(StoreOwn):
    """Packets by key in SQLite. Open with :meth:`open`; close with :meth:`close`."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path | None,
        *,
        max_packets: int,
        max_bytes: int,
        origin_quota: float,
        key_quota: int,
        read_only: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self.origin_limit = max(1, int(origin_quota * max_packets))
        self.key_quota = key_quota
        self._closed = False
        #: The last write's refusal (None once a write succeeds): why writes fail now.
        self.failure: StoreError | None = read_only_error(path) if read_only and path else None
        # The connection cannot write (opened read-only, or SQLite said read-only or
        # failed an I/O): the next write reconnects first.
        self._stale = read_only
        # Running totals so a put costs O(log n), not a COUNT(*) over the table; they
        # are dropped (and recounted on demand) after any bulk delete or rollback.
        self._totals: tuple[int, int] | None = None
        self._origin_counts: dict[bytes, int] = {}
        self._key_counts: dict[bytes, int] = {}
        self._reader: sqlite3.Connection | None = None  # see StoreReads._scan
        #: Buckets ready to rank (StoreReads.top_ids): every write to a key drops its own.
        self._buckets = BucketCache(cache_bytes)
        self._reader_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        max_packets: int = 1_000_000,
        max_bytes: int = 1 << 30,
        origin_quota: float = 0.25,
        key_quota: int = 10_000,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> PacketStore:
        """Open (creating if needed) the store at ``path``; ``":memory:"`` for tests.

        An existing store on a read-only filesystem opens read-only (reads work,
        writes raise ``storage_read_only`` until the filesystem is writable again).
        """
        file = None if str(path) == ":memory:" else Path(path)
        read_only = False
        try:
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
            conn = _open_read_write(path)
        except (sqlite3.Error, OSError) as exc:
            if file is None or not file.exists() or writable(file):
                raise _open_error(file or Path(str(path)), exc) from None
            try:
                conn = connect_read_only(file)
                _check_schema(conn, file)
            except sqlite3.Error as ro_exc:
                raise _open_error(file, ro_exc) from None
            read_only = True
        return cls(
            conn,
            file,
            max_packets=max_packets,
            max_bytes=max_bytes,
            origin_quota=origin_quota,
            key_quota=key_quota,
            read_only=read_only,
            cache_bytes=cache_bytes,
        )

    @property
    def read_only(self) -> bool:
        """True while the last write was refused because the file is read-only."""
        return self.failure is not None and self.failure.code == STORAGE_READ_ONLY

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # (Never the other way round: a scan holds the reader lock, never both.)
            with self._reader_lock:
                self._close_reader()
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.DatabaseError:
                pass  # closing must succeed even on a read-only or full disk
            self._conn.close()

    # -- writes -------------------------------------------------------------------

    def put(self, key: bytes, packet: OutcomePacket, *, now_ms: int) -> PutResult:
        return self.put_many([(key, packet)], now_ms=now_ms)[0]

    def put_many(
        self, items: Sequence[tuple[bytes, OutcomePacket]], *, now_ms: int
    ) -> list[PutResult]:
        """Store a batch in one transaction. The packets must already be verified."""
        with self._lock, self._writing():
            return [self._put_one(key, p, now_ms) for key, p in items]

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (the caller holds the lock): committed whole, or
        rolled back whole and, for a disk's refusal, raised as a StoreError."""
        conn = self._writable_connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                self._abort(conn)
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._abort(conn)
            failure = self.failure = write_error(exc, self.path)
            # Read-only or I/O: this connection may keep failing after the cause is
            # gone; a full disk clears on the same connection.
            self._stale = failure.code != STORAGE_FULL
            raise failure from None
        self.failure = None

    def _abort(self, conn: sqlite3.Connection) -> None:
        self._forget_counts()
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                # SQLite rolls back itself when it cannot go on (full disk, I/O
                # error); a fresh connection will find the file consistent.
                self._stale = True

    def _writable_connection(self) -> sqlite3.Connection:
        if self._closed:
            # Never reopened behind close(): a stopped node's store stays as it was left.
            raise StoreError(f"packet store {self.path or ':memory:'}: closed")
        if not self._stale or self.path is None:
            return self._conn
        if not writable(self.path):
            raise self.failure or read_only_error(self.path)
        try:
            conn = _open_read_write(self.path)
        except sqlite3.Error as exc:
            failure = self.failure = write_error(exc, self.path)
            raise failure from None
        old, self._conn = self._conn, conn
        old.close()
        self._stale = False
        self._forget_counts()
        return conn

    def _forget_counts(self) -> None:
        self._buckets.clear()
        self._totals = None
        self._origin_counts.clear()
        self._key_counts.clear()

    def _total(self) -> tuple[int, int]:
        if self._totals is None:
            row = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM packets"
            ).fetchone()
            self._totals = (int(row[0]), int(row[1]))
        return self._totals

    def _origin_count(self, origin: bytes) -> int:
        n = self._origin_counts.get(origin)
        if n is None:
            row = self._conn.execute(
                "SELECT COUNT(*) FROM packets WHERE origin=?", (origin,)
            ).fetchone()
            n = self._origin_counts[origin] = int(row[0])
        return n

    def _put_one(self, key: bytes, p: OutcomePacket, now_ms: int) -> PutResult:
        conn = self._conn
        if len(key) != 20:
            raise ValueError("key must be 20 bytes")
        if p.expires_ms <= now_ms:
            return PutResult("rejected", "expired")
        pid = p.id
        if conn.execute("SELECT 1 FROM packets WHERE id=?", (pid,)).fetchone():
            held_here = conn.execute(
                "SELECT 1 FROM entries WHERE key=? AND id=?", (key, pid)
            ).fetchone()
            if held_here:
                return PutResult("duplicate")
            (keys,) = conn.execute("SELECT COUNT(*) FROM entries WHERE id=?", (pid,)).fetchone()
            if keys >= MAX_KEYS_PER_PACKET:
                # A packet is routed under one key per LSH table: a peer naming more
                # keys for it would grow the entries without bound.
                return PutResult("rejected", "packet_keys")
            if not self._key_has_room(key):
                return PutResult("rejected", "key_quota")
            self._add_entry(key, pid)
            return PutResult("added_key")
        if p.series:
            newest = conn.execute(
                "SELECT MAX(created_ms) FROM packets WHERE origin=? AND series=?",
                (p.origin, p.series),
            ).fetchone()[0]
            if newest is not None and newest >= p.created_ms:
                return PutResult("superseded")
            # This packet replaces every older one of its series, under every key;
            # if it is refused after all (quota, full), the older ones stay.
            conn.execute("SAVEPOINT supersede")
            self._drop_series(p.origin, p.series)
            result = self._insert(key, p)
            if not result.ok:
                conn.execute("ROLLBACK TO supersede")
                self._forget_counts()
            conn.execute("RELEASE supersede")
            return result
        return self._insert(key, p)

    def _drop_series(self, origin: bytes, series: bytes) -> None:
        """Delete the held packets of ``origin``'s ``series``, keeping the running
        totals exact (a synthesis supersedes its previous one every few seconds; a
        recount of a large store's totals after each would be a table scan)."""
        conn = self._conn
        gone = conn.execute(
            "SELECT id, size FROM packets WHERE origin=? AND series=?", (origin, series)
        ).fetchall()
        if not gone:
            return
        for pid, _ in gone:
            for (key,) in conn.execute("SELECT key FROM entries WHERE id=?", (pid,)):
                self._buckets.drop(key)
                if key in self._key_counts:
                    self._key_counts[key] -= 1
        conn.execute("DELETE FROM packets WHERE origin=? AND series=?", (origin, series))
        if self._totals is not None:
            count, size = self._totals
            self._totals = (count - len(gone), size - sum(int(s) for _, s in gone))
        if origin in self._origin_counts:
            self._origin_counts[origin] -= len(gone)

    def _insert(self, key: bytes, p: OutcomePacket) -> PutResult:
        """A packet new to the store, under ``key``, if quotas and caps allow."""
        pid = p.id
        if not self._key_has_room(key):
            return PutResult("rejected", "key_quota")
        count, size = self._total()
        if count >= self.max_packets or size + len(p.encoded) > self.max_bytes:
            return PutResult("rejected", "full")
        held = self._origin_count(p.origin)
        if held >= self.origin_limit:
            return PutResult("rejected", "quota")
        self._conn.execute(
            "INSERT INTO packets VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                pid, p.origin, p.series, p.topic, 1 if p.kind == KIND_SYNTHESIS else 0,
                p.generation, p.created_ms, p.expires_ms, p.sketch.dim, p.sketch.bits,
                p.sketch.data, len(p.encoded), p.encoded,
            ),
        )
        self._add_entry(key, pid)
        self._totals = (count + 1, size + len(p.encoded))
        self._origin_counts[p.origin] = held + 1
        return PutResult("stored")

    def _key_has_room(self, key: bytes) -> bool:
        n = self._key_counts.get(key)
        if n is None:
            row = self._conn.execute("SELECT COUNT(*) FROM entries WHERE key=?", (key,)).fetchone()
            n = self._key_counts[key] = int(row[0])
        return n < self.key_quota

    def _add_entry(self, key: bytes, pid: bytes) -> None:
        self._conn.execute("INSERT INTO entries VALUES (?, ?)", (key, pid))
        self._buckets.drop(key)
        self._key_counts[key] = self._key_counts.get(key, 0) + 1

    def expire(self, now_ms: int) -> int:
        """Delete expired packets (and their entries, and own packets); returns how
        many packets held for the swarm went."""
        with self._lock, self._writing() as conn:
            self._expire_own(conn, now_ms)
            totals = self._totals
            if totals is not None:
                # By the expiry index: what goes, not a scan of what stays.
                (gone_bytes,) = conn.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM packets WHERE expires_ms <= ?",
                    (now_ms,),
                ).fetchone()
            cur = conn.execute("DELETE FROM packets WHERE expires_ms <= ?", (now_ms,))
            if cur.rowcount:
                # Per origin and per key: recounted by their indexes when next needed.
                self._forget_counts()
                if totals is not None:
                    self._totals = (totals[0] - cur.rowcount, totals[1] - int(gone_bytes))
            return cur.rowcount

    def statistics(self) -> StoreStats:
        """Packets, bytes and distinct keys held.

        The distinct keys take a pass over every key entry; in a file store it runs
        on a reader connection of its own (WAL: readers do not block the writer), so
        storage and queries go on meanwhile.
        """
        try:
            with self._lock:
                if self._closed:
                    raise StoreError(f"packet store {self.path or ':memory:'}: closed")
                count, size = self._total()
            keys = self._scan(_count_keys)
        except sqlite3.Error as exc:
            raise read_error(exc, self.path) from None
        return StoreStats(packets=int(count), bytes=int(size), keys=int(keys))


def _count_keys(conn: sqlite3.Connection) -> int:
    # Not COUNT(DISTINCT key): SQLite builds a temporary b-tree for that, where
    # DISTINCT over the primary key's order streams (scripts/bench_store.py).
    rows = conn.execute("SELECT COUNT(*) FROM (SELECT DISTINCT key FROM entries)").fetchall()
    return int(rows[0][0])


def _open_read_write(path: Path | str) -> sqlite3.Connection:
    conn = connect(path)
    try:
        conn.executescript(_SCHEMA)
        _check_schema(conn, path, create=True)
    except BaseException:
        conn.close()
        raise
    return conn


def _check_schema(conn: sqlite3.Connection, path: Path | str, *, create: bool = False) -> None:
    row = conn.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
    if row is None and create:
        conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
    elif row is None or row[0] != SCHEMA_VERSION:
        found = "none" if row is None else row[0]
        raise StoreError(f"{path}: store schema {found}, this qisd reads {SCHEMA_VERSION}")


def _open_error(path: Path, exc: Exception) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if not path.exists() and not writable(path):
        return StoreError(
            f"{path}: cannot create the packet store, its directory is not writable "
            f"({detail}); make it writable",
            code=STORAGE_READ_ONLY,
        )
    return StoreError(f"{path}: cannot open packet store ({detail})")
