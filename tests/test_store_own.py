"""The store's ``own`` table: what this node emitted, kept for its republish across
restarts (real SQLite files)."""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

import nacl.signing
import pytest
from test_store import KEY_A, KEY_B, NOW, packet

from qisd.packet import KIND_SYNTHESIS
from qisd.storage import connect_read_only
from qisd.store import PacketStore


def test_own_packets_survive_a_reopen_with_their_keys(tmp_path: Path) -> None:
    store = PacketStore.open(tmp_path / "p.db")
    first, second = packet(1, created_ms=NOW), packet(2, created_ms=NOW + 5)
    assert store.remember_own(second, [KEY_A, KEY_B], limit=10) == []
    assert store.remember_own(first, [KEY_B], limit=10) == []
    # Held for the swarm and kept as own are separate: nothing was stored for others.
    assert store.statistics().packets == 0
    store.close()
    store = PacketStore.open(tmp_path / "p.db")
    assert store.own_packets(NOW) == [(first, (KEY_B,)), (second, (KEY_A, KEY_B))]
    store.close()


def test_own_keeps_the_newest_of_a_series_and_at_most_limit(tmp_path: Path) -> None:
    store = PacketStore.open(tmp_path / "p.db")
    k = nacl.signing.SigningKey(b"\x07" * 32)
    series = b"\x03" * 16
    old = packet(1, key=k, kind=KIND_SYNTHESIS, series=series, created_ms=NOW)
    new = packet(2, key=k, kind=KIND_SYNTHESIS, series=series, created_ms=NOW + 1)
    assert store.remember_own(old, [KEY_A], limit=10) == []
    assert store.remember_own(new, [KEY_A], limit=10) == [old.id]
    assert store.remember_own(old, [KEY_A], limit=10) == [old.id]  # late: not taken back
    assert [p for p, _ in store.own_packets(NOW)] == [new]
    plain = [packet(10 + i, created_ms=NOW + 10 + i) for i in range(3)]
    for p in plain:
        store.remember_own(p, [KEY_B], limit=3)
    assert [p for p, _ in store.own_packets(NOW)] == plain  # the oldest created went
    store.close()


def test_a_bulk_remember_is_one_transaction_with_the_same_rules(tmp_path: Path) -> None:
    """remember_own_many: series and limit applied in order within the batch, and a
    batch that fails part-way leaves nothing of itself behind."""
    store = PacketStore.open(tmp_path / "p.db")
    k = nacl.signing.SigningKey(b"\x07" * 32)
    series = b"\x03" * 16
    old = packet(1, key=k, kind=KIND_SYNTHESIS, series=series, created_ms=NOW)
    new = packet(2, key=k, kind=KIND_SYNTHESIS, series=series, created_ms=NOW + 1)
    plain = [packet(10 + i, created_ms=NOW + 10 + i) for i in range(3)]
    items = [(old, [KEY_A]), (new, [KEY_A]), *((p, [KEY_B]) for p in plain)]
    assert store.remember_own_many(items, limit=3) == [old.id, new.id]
    assert [p for p, _ in store.own_packets(NOW)] == plain
    # A bad item anywhere refuses the whole batch before anything is written.
    more = [packet(20 + i, created_ms=NOW + 20 + i) for i in range(2)]
    with pytest.raises(ValueError, match="keys"):
        store.remember_own_many([(more[0], [KEY_A]), (more[1], [b"short"])], limit=10)
    # A failure inside the transaction rolls back every row of the batch.
    with pytest.raises(AttributeError):
        store.remember_own_many(
            [(more[0], [KEY_A]), (more[1], [KEY_A]), (object(), [KEY_A])],  # type: ignore[list-item]
            limit=10,
        )
    assert [p for p, _ in store.own_packets(NOW)] == plain
    assert store.remember_own_many([], limit=10) == []
    store.close()
    with sqlite3.connect(tmp_path / "p.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM own").fetchone()[0] == 3


def test_own_packets_expire_with_the_store(tmp_path: Path) -> None:
    store = PacketStore.open(tmp_path / "p.db")
    short, long = packet(1, ttl_s=60), packet(2, ttl_s=3600)
    for p in (short, long):
        store.remember_own(p, [KEY_A], limit=10)
    assert [p for p, _ in store.own_packets(NOW + 61_000)] == [long]  # reads skip it
    store.expire(NOW + 61_000)
    with sqlite3.connect(tmp_path / "p.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM own").fetchone()[0] == 1
    store.close()


def test_own_refuses_bad_keys(tmp_path: Path) -> None:
    store = PacketStore.open(tmp_path / "p.db")
    for keys in ([], [b"short"]):
        with pytest.raises(ValueError, match="keys"):
            store.remember_own(packet(1), keys, limit=10)
    assert store.own_packets(NOW) == []
    store.close()


def test_a_store_from_before_the_own_table_opens_and_gains_it(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    PacketStore.open(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE own")
    # Read-only (as on a read-only mount): nothing kept, no error.
    read_only = PacketStore(
        connect_read_only(path), path,
        max_packets=10, max_bytes=1 << 20, origin_quota=1.0, key_quota=10, read_only=True,
    )
    assert read_only.own_packets(NOW) == []
    read_only.close()
    # Writable: the table is created on open.
    store = PacketStore.open(path)
    store.remember_own(packet(1), [KEY_A], limit=10)
    assert len(store.own_packets(NOW)) == 1
    store.close()


def test_rows_that_no_longer_decode_are_skipped_and_counted(tmp_path: Path) -> None:
    """A row written under laxer rules (here: a float beyond today's bound) does not
    break the reads of its key; it is left out and counted."""
    path = tmp_path / "p.db"
    store = PacketStore.open(path)
    good, old = packet(1), packet(2)
    store.put_many([(KEY_A, good), (KEY_A, old)], now_ms=NOW)
    store.remember_own(old, [KEY_A], limit=10)
    raw = old.encoded.replace(b"\xa1y\x02", b"\xa1y\xcb" + struct.pack(">d", 1e300))
    assert raw != old.encoded
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE packets SET data=? WHERE id=?", (raw, old.id))
        conn.execute("UPDATE own SET data=? WHERE id=?", (raw, old.id))
    assert [p.id for p in store.key_items(KEY_A, NOW)] == [good.id]
    assert [p.id for p in store.recent(topic=None, limit=10, now_ms=NOW)] == [good.id]
    assert store.own_packets(NOW) == []
    assert store.undecodable == 3
    store.close()
