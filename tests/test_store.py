"""The packet store: real SQLite files, dedup, expiry, supersede, quotas, ranking."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import nacl.signing
import numpy as np
import pytest

from qisd.packet import KIND_SYNTHESIS, OutcomePacket, create_packet
from qisd.sketch import make_sketch
from qisd.store import PacketStore, StoreError

SWARM = bytes(32)
NOW = 1_700_000_000_000
KEY_A = b"A" * 20
KEY_B = b"B" * 20


def packet(
    seed: int,
    *,
    key: nacl.signing.SigningKey | None = None,
    vector: np.ndarray | None = None,
    ttl_s: int = 3600,
    created_ms: int = NOW,
    **kw: object,
) -> OutcomePacket:
    rng = np.random.default_rng(seed)
    return create_packet(
        key or nacl.signing.SigningKey(rng.bytes(32)),
        swarm=SWARM,
        topic="t",
        sketch=make_sketch(rng.standard_normal(32) if vector is None else vector),
        outcome={"y": seed},
        ttl_s=ttl_s,
        created_ms=created_ms,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path) -> PacketStore:
    s = PacketStore.open(tmp_path / "packets.db")
    yield s  # type: ignore[misc]
    s.close()


def test_many_packets_per_key_and_dedup(store: PacketStore) -> None:
    ps = [packet(i) for i in range(5)]
    results = store.put_many([(KEY_A, p) for p in ps], now_ms=NOW)
    assert [r.status for r in results] == ["stored"] * 5
    assert store.put(KEY_A, ps[0], now_ms=NOW).status == "duplicate"
    assert store.put(KEY_B, ps[0], now_ms=NOW).status == "added_key"
    assert {p.id for p in store.key_items(KEY_A, now_ms=NOW)} == {p.id for p in ps}
    assert store.statistics().packets == 5
    assert store.statistics().keys == 2
    assert sorted(store.keys_of(ps[0].id)) == [KEY_A, KEY_B]


def test_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    s = PacketStore.open(path)
    ps = [packet(i) for i in range(20)]
    s.put_many([(KEY_A, p) for p in ps], now_ms=NOW)
    s.close()
    s2 = PacketStore.open(path)
    got = s2.key_items(KEY_A, now_ms=NOW)
    assert sorted(p.encoded for p in got) == sorted(p.encoded for p in ps)
    s2.close()


def test_expiry(store: PacketStore) -> None:
    short, long = packet(1, ttl_s=10), packet(2, ttl_s=1000)
    store.put_many([(KEY_A, short), (KEY_A, long)], now_ms=NOW)
    assert len(store.key_items(KEY_A, now_ms=NOW + 20_000)) == 1  # hidden at once
    assert store.expire(NOW + 20_000) == 1
    assert store.get(short.id) is None and store.get(long.id) == long
    assert store.put(KEY_A, short, now_ms=NOW + 20_000).reason == "expired"


def test_newer_synthesis_of_a_series_supersedes_older(store: PacketStore) -> None:
    k = nacl.signing.SigningKey(b"\x09" * 32)
    series = b"\x01" * 16
    old = packet(1, key=k, kind=KIND_SYNTHESIS, series=series, created_ms=NOW)
    new = packet(2, key=k, kind=KIND_SYNTHESIS, series=series, created_ms=NOW + 1)
    other = packet(3, key=k, kind=KIND_SYNTHESIS, series=b"\x02" * 16, created_ms=NOW)
    store.put_many([(KEY_A, old), (KEY_B, old), (KEY_A, other)], now_ms=NOW)
    assert store.put(KEY_A, new, now_ms=NOW).status == "stored"
    assert store.get(old.id) is None
    assert store.keys_of(old.id) == []
    assert store.get(other.id) == other
    # The older one arriving late is not taken back.
    assert store.put(KEY_B, old, now_ms=NOW).status == "superseded"
    assert store.statistics().packets == 2


def truth(path: Path) -> tuple[int, int, int]:
    conn = sqlite3.connect(path)
    try:
        count, size = conn.execute("SELECT COUNT(*), SUM(size) FROM packets").fetchone()
        (keys,) = conn.execute("SELECT COUNT(DISTINCT key) FROM entries").fetchone()
    finally:
        conn.close()
    return count, size, keys


def test_totals_stay_exact_through_supersede_and_expiry_without_a_recount(
    tmp_path: Path,
) -> None:
    s = PacketStore.open(tmp_path / "t.db", key_quota=4, origin_quota=1.0)
    k = nacl.signing.SigningKey(b"\x0b" * 32)
    series = b"\x05" * 16
    first = packet(1, key=k, kind=KIND_SYNTHESIS, series=series, created_ms=NOW)
    s.put_many([(KEY_A, first), (KEY_B, first), (KEY_A, packet(2, ttl_s=10)),
                (KEY_A, packet(3)), (KEY_B, packet(4, ttl_s=10))], now_ms=NOW)
    statements: list[str] = []
    s._conn.set_trace_callback(statements.append)
    for gen in range(2, 6):  # each supersedes the last, under KEY_A (full unless freed)
        newer = packet(10 + gen, key=k, kind=KIND_SYNTHESIS, series=series,
                       created_ms=NOW + gen)
        assert s.put(KEY_A, newer, now_ms=NOW).status == "stored"
    assert s.expire(NOW + 20_000) == 2
    s.put(KEY_B, packet(5), now_ms=NOW + 20_000)
    recounts = [q for q in statements if "SUM(size)" in q and "WHERE" not in q]
    assert recounts == []
    st = s.statistics()
    assert (st.packets, st.bytes, st.keys) == truth(tmp_path / "t.db") == (3, st.bytes, 2)
    s.close()


def test_supersedes_free_the_origins_quota(tmp_path: Path) -> None:
    s = PacketStore.open(tmp_path / "o.db", max_packets=10, origin_quota=0.2)  # 2 each
    k = nacl.signing.SigningKey(b"\x0c" * 32)
    series = b"\x06" * 16
    assert s.put(KEY_A, packet(1, key=k), now_ms=NOW).status == "stored"
    for gen in range(4):
        newer = packet(10 + gen, key=k, kind=KIND_SYNTHESIS, series=series,
                       created_ms=NOW + gen)
        assert s.put(KEY_B, newer, now_ms=NOW).status == "stored"
    assert s.put(KEY_A, packet(2, key=k), now_ms=NOW).reason == "quota"
    st = s.statistics()
    assert (st.packets, st.bytes, st.keys) == truth(tmp_path / "o.db") and st.packets == 2
    s.close()


def test_scans_never_create_a_store_file_that_went_missing(tmp_path: Path) -> None:
    s = PacketStore.open(tmp_path / "gone.db")
    s.put(KEY_A, packet(1), now_ms=NOW)
    (tmp_path / "gone.db").unlink()
    assert s.keys(NOW) == [KEY_A]  # from the main connection, still open on it
    assert not (tmp_path / "gone.db").exists()
    s.close()


def test_statistics_count_keys_off_the_writers_connection(tmp_path: Path) -> None:
    s = PacketStore.open(tmp_path / "r.db")
    s.put_many([(bytes([i]) * 20, packet(i)) for i in range(1, 6)], now_ms=NOW)
    s.put(KEY_A, packet(1), now_ms=NOW)
    statements: list[str] = []
    s._conn.set_trace_callback(statements.append)
    st = s.statistics()
    assert (st.packets, st.bytes, st.keys) == truth(tmp_path / "r.db") and st.keys == 6
    assert not [q for q in statements if "entries" in q]  # the scan ran elsewhere
    s.put(KEY_B, packet(9), now_ms=NOW)
    assert s.statistics().keys == 7  # the reader sees later writes
    s.keys(NOW)
    # The reader holds no snapshot between scans: a checkpoint can empty the WAL.
    assert s._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0][0] == 0
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.statistics()


def test_keys_lists_the_keys_with_a_live_packet_off_the_writers_connection(
    store: PacketStore,
) -> None:
    store.put_many([(KEY_A, packet(1, ttl_s=10)), (KEY_B, packet(2, ttl_s=10)),
                    (KEY_B, packet(3, ttl_s=1000)), (b"C" * 20, packet(4, ttl_s=1000))],
                   now_ms=NOW)
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    assert set(store.keys(NOW)) == {KEY_A, KEY_B, b"C" * 20}
    assert set(store.keys(NOW + 20_000)) == {KEY_B, b"C" * 20}  # KEY_A's one has expired
    assert statements == []


def test_origin_quota(tmp_path: Path) -> None:
    s = PacketStore.open(tmp_path / "q.db", max_packets=100, origin_quota=0.1)
    k = nacl.signing.SigningKey(b"\x01" * 32)
    results = s.put_many([(KEY_A, packet(i, key=k)) for i in range(15)], now_ms=NOW)
    assert [r.status for r in results].count("stored") == 10
    assert {r.reason for r in results if not r.ok} == {"quota"}
    # Another origin still gets in.
    assert s.put(KEY_A, packet(99), now_ms=NOW).status == "stored"
    s.close()


def test_key_quota_and_full(tmp_path: Path) -> None:
    s = PacketStore.open(tmp_path / "k.db", key_quota=3, max_packets=5, origin_quota=1.0)
    r = s.put_many([(KEY_A, packet(i)) for i in range(4)], now_ms=NOW)
    assert [x.reason for x in r] == [None, None, None, "key_quota"]
    r = s.put_many([(KEY_B, packet(10 + i)) for i in range(3)], now_ms=NOW)
    assert [x.reason for x in r] == [None, None, "full"]
    s.close()


def test_a_refused_newer_packet_of_a_series_leaves_the_older(tmp_path: Path) -> None:
    s = PacketStore.open(tmp_path / "s.db", key_quota=1, origin_quota=1.0)
    k = nacl.signing.SigningKey(b"\x0a" * 32)
    series = b"\x04" * 16
    old = packet(1, key=k, kind=KIND_SYNTHESIS, series=series, created_ms=NOW)
    new = packet(2, key=k, kind=KIND_SYNTHESIS, series=series, created_ms=NOW + 1)
    assert s.put(KEY_A, old, now_ms=NOW).status == "stored"
    assert s.put(KEY_B, packet(3), now_ms=NOW).status == "stored"  # KEY_B is full
    result = s.put(KEY_B, new, now_ms=NOW)
    assert (result.status, result.reason) == ("rejected", "key_quota")
    assert s.get(old.id) == old and s.keys_of(old.id) == [KEY_A]  # nothing half-done
    assert s.get(new.id) is None and s.statistics().packets == 2
    assert s.put(KEY_A, new, now_ms=NOW).status == "stored"  # room once the old goes
    assert s.get(old.id) is None
    s.close()


def test_a_packet_is_held_under_at_most_32_keys(store: PacketStore) -> None:
    p = packet(1)
    keys = [bytes([i]) * 20 for i in range(40)]
    results = store.put_many([(key, p) for key in keys], now_ms=NOW)
    assert [r.status for r in results[:32]] == ["stored"] + ["added_key"] * 31
    assert {(r.status, r.reason) for r in results[32:]} == {("rejected", "packet_keys")}
    assert len(store.keys_of(p.id)) == 32


def test_top_ranks_by_cosine_and_pages(store: PacketStore) -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal(32)
    ps = []
    for i in range(50):
        v = base + rng.standard_normal(32) * (0.05 * i)
        ps.append((v, packet(i, vector=v)))
    store.put_many([(KEY_A, p) for _, p in ps], now_ms=NOW)
    query = make_sketch(base)
    top = store.top(KEY_A, query, 10, now_ms=NOW)
    unit = base / np.linalg.norm(base)
    exact = sorted(ps, key=lambda vp: -float(np.dot(vp[0], unit) / np.linalg.norm(vp[0])))
    assert [p.id for _, p in top][:5] == [p.id for _, p in exact[:5]]
    sims = [s for s, _ in top]
    assert sims == sorted(sims, reverse=True) and sims[0] > 0.99
    nxt = store.top(KEY_A, query, 10, now_ms=NOW, offset=10)
    assert not {p.id for _, p in top} & {p.id for _, p in nxt}
    assert store.top(KEY_B, query, 10, now_ms=NOW) == []
    # The ids-only ranking is the same ranking, page for page.
    assert store.top_ids(KEY_A, query, 10, now_ms=NOW) == [(s, p.id) for s, p in top]
    assert store.top_ids(KEY_A, query, 10, now_ms=NOW, offset=10) == [
        (s, p.id) for s, p in nxt
    ]


def test_encoded_returns_stored_bytes_of_live_packets(store: PacketStore) -> None:
    live, short = packet(1), packet(2, ttl_s=60)
    store.put_many([(KEY_A, live), (KEY_A, short)], now_ms=NOW)
    absent = bytes(16)
    assert store.encoded([live.id, short.id, absent], now_ms=NOW) == {
        live.id: live.encoded,
        short.id: short.encoded,
    }
    later = NOW + 61_000
    assert store.encoded([live.id, short.id, absent], now_ms=later) == {live.id: live.encoded}
    assert store.encoded([], now_ms=NOW) == {}


def test_page_walks_a_key(store: PacketStore) -> None:
    ps = [packet(i) for i in range(25)]
    store.put_many([(KEY_A, p) for p in ps], now_ms=NOW)
    seen = []
    after = None
    while batch := store.page(KEY_A, after=after, limit=7, now_ms=NOW):
        seen.extend(batch)
        after = batch[-1].id
    assert sorted(p.id for p in seen) == sorted(p.id for p in ps)
    assert len(seen) == 25


def test_failed_batch_leaves_nothing(store: PacketStore) -> None:
    good = packet(1)
    with pytest.raises(ValueError, match="20 bytes"):
        store.put_many([(KEY_A, good), (b"short", packet(2))], now_ms=NOW)
    assert store.get(good.id) is None
    assert store.statistics().packets == 0
    assert store.put(KEY_A, good, now_ms=NOW).status == "stored"


def test_read_only_store_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    PacketStore.open(path).close()
    ro = PacketStore(
        sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                        check_same_thread=False),
        path, max_packets=10, max_bytes=1 << 20, origin_quota=1.0, key_quota=10,
    )
    with pytest.raises(StoreError, match="write failed"):
        ro.put(KEY_A, packet(1), now_ms=NOW)
    assert ro.statistics().packets == 0  # reads still work
    ro.close()


def test_corrupt_file_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"bad\.db"):
        PacketStore.open(path)


class _Failing:
    """A connection whose statements fail with ``error``, as a sick disk or a
    damaged file makes them."""

    def __init__(self, error: sqlite3.Error) -> None:
        self.error = error

    def execute(self, *args: object, **kwargs: object) -> None:
        raise self.error

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("error", "said"), [
    (sqlite3.OperationalError("disk I/O error"), "the disk failed"),
    (sqlite3.DatabaseError("database disk image is malformed"), "the disk failed"),
], ids=["io", "malformed"])
def test_failed_reads_raise_a_coded_store_error(tmp_path: Path, error: sqlite3.Error,
                                                said: str) -> None:
    store = PacketStore.open(tmp_path / "s.db")
    store.put(KEY_A, packet(1), now_ms=NOW)
    store._conn, live = _Failing(error), store._conn  # type: ignore[assignment]
    store._reader = _Failing(error)  # type: ignore[assignment]
    store._totals = None
    store._buckets.clear()
    for read in (store.statistics, lambda: store.keys(NOW), lambda: store.get(packet(1).id),
                 lambda: store.recent(topic=None, limit=5, now_ms=NOW),
                 lambda: store.own_packets(NOW)):  # a failed read is not "none kept"
        with pytest.raises(StoreError, match=f"s\\.db: read failed, {said}") as info:
            read()
        assert info.value.code == "storage_error"
    store._conn = live
    store._reader = None
    store.close()


def test_a_busy_or_damaged_database_is_not_called_a_failed_disk() -> None:
    from qisd.storage import write_error

    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = 5  # type: ignore[attr-defined]
    assert "busy" in str(write_error(busy, Path("x.db")))
    bad = sqlite3.DatabaseError("database disk image is malformed")
    bad.sqlite_errorcode = 11  # type: ignore[attr-defined]
    assert "damaged" in str(write_error(bad, Path("x.db")))


KILL_SCRIPT = """
import sys, os, nacl.signing, numpy as np
from qisd.packet import create_packet
from qisd.sketch import make_sketch
from qisd.store import PacketStore
s = PacketStore.open(sys.argv[1])
rng = np.random.default_rng(0)
i = 0
while True:
    batch = []
    for _ in range(50):
        p = create_packet(nacl.signing.SigningKey(rng.bytes(32)), swarm=bytes(32), topic="t",
            sketch=make_sketch(rng.standard_normal(16)), outcome={"i": i}, ttl_s=3600,
            created_ms=1_700_000_000_000)
        batch.append((b"K" * 20, p))
        i += 1
    s.put_many(batch, now_ms=1_700_000_000_000)
    print(i, flush=True)
"""


def test_kill_9_mid_batch_leaves_whole_batches(tmp_path: Path) -> None:
    path = tmp_path / "kill.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    acknowledged = 0
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged >= 1000:
            break
    os.kill(proc.pid, 9)
    proc.wait()
    proc.stdout.close()
    s = PacketStore.open(path)
    count = s.statistics().packets
    # Every acknowledged batch is there, and only whole batches of 50.
    assert count >= acknowledged and count % 50 == 0
    items = s.key_items(b"K" * 20, now_ms=NOW)
    assert len(items) == count
    assert sorted(int(p.outcome["i"]) for p in items) == list(range(count))
    s.close()


def ranked(store: PacketStore, key: bytes, query: object, now_ms: int) -> list[bytes]:
    """The bucket's order computed from scratch: cosine of every live packet."""
    from qisd.sketch import cosine

    items = store.key_items(key, now_ms)
    scored = sorted((-cosine(query, p.sketch), p.id) for p in items)  # type: ignore[arg-type]
    return [pid for _, pid in scored]


def test_ranking_from_the_bucket_cache_follows_every_write(store: PacketStore) -> None:
    rng = np.random.default_rng(3)
    near_q = rng.standard_normal(32)
    q = make_sketch(near_q)
    store.put_many([(KEY_A, packet(i)) for i in range(30)], now_ms=NOW)

    def top() -> list[bytes]:
        return [pid for _, pid in store.top_ids(KEY_A, q, 50, now_ms=NOW)]

    assert top() == ranked(store, KEY_A, q, NOW)
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    assert top() == ranked(store, KEY_A, q, NOW) and not [s for s in statements if "p.sketch" in s]
    # A new packet under the key is ranked at once.
    best = packet(100, vector=near_q)
    store.put(KEY_A, best, now_ms=NOW)
    assert top()[0] == best.id
    # A superseded one leaves the ranking; a newer one of its series joins it.
    k = nacl.signing.SigningKey(b"\x0d" * 32)
    old = packet(101, key=k, vector=near_q * 1.01, kind=KIND_SYNTHESIS, series=b"\x07" * 16)
    store.put(KEY_A, old, now_ms=NOW)
    assert old.id in top()[:2]
    newer = packet(102, key=k, kind=KIND_SYNTHESIS, series=b"\x07" * 16, created_ms=NOW + 1)
    store.put(KEY_B, newer, now_ms=NOW)  # under another key: KEY_A's bucket loses old
    assert old.id not in top() and top() == ranked(store, KEY_A, q, NOW)
    # An expired packet is left out before any sweep, and after it.
    brief = packet(103, vector=near_q, ttl_s=10)
    store.put(KEY_A, brief, now_ms=NOW)
    later = NOW + 20_000
    assert brief.id not in [pid for _, pid in store.top_ids(KEY_A, q, 50, now_ms=later)]
    store.expire(later)
    assert [pid for _, pid in store.top_ids(KEY_A, q, 50, now_ms=later)] == ranked(
        store, KEY_A, q, later)
    # A batch rolled back leaves the ranking as the store is.
    with pytest.raises(ValueError):
        store.put_many([(KEY_A, packet(104, vector=near_q)), (b"short", packet(105))],
                       now_ms=NOW)
    assert top() == ranked(store, KEY_A, q, NOW) and top()[0] == best.id


def test_bucket_cache_keeps_the_recent_buckets_within_its_bytes() -> None:
    from qisd.store_cache import Bucket, BucketCache

    def bucket(rows: int) -> Bucket:
        return Bucket([(bytes([i]) * 16, NOW, 64, 8, bytes(64)) for i in range(rows)])

    one = bucket(10).nbytes
    cache = BucketCache(max_bytes=3 * one)
    for key in (b"a", b"b", b"c"):
        cache.put(key, bucket(10))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"d", bucket(10))
    assert [k in cache for k in (b"a", b"b", b"c", b"d")] == [True, False, True, True]
    assert cache.bytes == 3 * one
    cache.put(b"huge", bucket(40))  # more than the whole budget: not kept
    assert b"huge" not in cache and len(cache) == 3


def test_bucket_cache_keeps_no_stale_empty_or_closed_buckets(
    store: PacketStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qisd.store_reads
    from qisd.store_cache import Bucket

    q = make_sketch(np.ones(32))
    assert store.top_ids(KEY_A, q, 10, now_ms=NOW) == [] and len(store._buckets) == 0
    store.put(KEY_A, packet(1), now_ms=NOW)
    late = packet(2, vector=np.ones(32))

    def racing(rows: list[tuple[bytes, int, int, int, bytes]]) -> Bucket:
        store.put(KEY_A, late, now_ms=NOW)  # a write while the bucket is being built
        return Bucket(rows)

    monkeypatch.setattr(qisd.store_reads, "Bucket", racing)
    assert [pid for _, pid in store.top_ids(KEY_A, q, 10, now_ms=NOW)] == [packet(1).id]
    monkeypatch.undo()
    assert KEY_A not in store._buckets  # read before that write: not kept
    assert store.top_ids(KEY_A, q, 10, now_ms=NOW)[0][1] == late.id
    assert KEY_A in store._buckets
    store.put(KEY_B, packet(3, ttl_s=10), now_ms=NOW)
    store.expire(NOW + 20_000)
    assert len(store._buckets) == 0  # a sweep that deleted packets clears the cache
    store.top_ids(KEY_A, q, 10, now_ms=NOW)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.top_ids(KEY_A, q, 10, now_ms=NOW)
