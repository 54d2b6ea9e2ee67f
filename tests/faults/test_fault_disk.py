"""Disk full and read-only state directory, on a real tmpfs of its own (root only).

The store on its own first (a full disk and a read-only mount, seen through SQLite),
then the scaled-down run of ``scripts/fault_disk.py``: a real ``qisd run`` whose state
directory fills up and is remounted read-only, driven through its control socket."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import nacl.signing
import numpy as np
import pytest
from fault_disk import DiskParams, render, run_disk
from faultproc import MountError, fill, mount_problem, remount, tmpfs

from qisd.packet import OutcomePacket, create_packet
from qisd.sketch import make_sketch
from qisd.storage import STORAGE_FULL, STORAGE_READ_ONLY
from qisd.store import PacketStore, StoreError

NOW = 1_700_000_000_000
KEY = b"K" * 20


@pytest.fixture
def small_fs(workdir: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs at ``workdir/fs``, or a skip saying why it cannot be had."""
    why = mount_problem()
    if why:
        pytest.skip(why)
    try:
        with tmpfs(workdir / "fs", 1 << 20) as path:
            yield path
    except MountError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")


def packets(count: int, seed: int = 0) -> list[OutcomePacket]:
    rng = np.random.default_rng(seed)
    return [
        create_packet(nacl.signing.SigningKey(rng.bytes(32)), swarm=bytes(32), topic="t",
                      sketch=make_sketch(rng.standard_normal(64)), outcome={"i": i},
                      ttl_s=3600, created_ms=NOW)
        for i in range(count)
    ]


def integrity(path: Path) -> str:
    conn = sqlite3.connect(str(path))
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def test_full_disk_refuses_a_batch_whole_and_recovers_on_the_same_store(small_fs: Path) -> None:
    store = PacketStore.open(small_fs / "packets.db")
    try:
        first = packets(20)
        store.put_many([(KEY, p) for p in first], now_ms=NOW)
        fill(small_fs / "filler")
        batch = packets(400, seed=1)  # more than the pages SQLite already holds
        with pytest.raises(StoreError) as info:
            for i in range(0, len(batch), 50):
                store.put_many([(KEY, p) for p in batch[i : i + 50]], now_ms=NOW)
        assert info.value.code == STORAGE_FULL
        assert str(small_fs / "packets.db") in str(info.value)
        assert "disk is full" in str(info.value)
        assert store.failure is not None and store.failure.code == STORAGE_FULL
        held = store.statistics().packets
        # Reads go on; the refused batch left nothing behind (whole batches only).
        assert (held - len(first)) % 50 == 0
        assert len(store.key_items(KEY, NOW)) == held
        assert store.get(first[0].id) is not None
        (small_fs / "filler").unlink()
        store.put_many([(KEY, p) for p in batch], now_ms=NOW)
        assert store.failure is None
        assert store.statistics().packets == len(first) + len(batch)
    finally:
        store.close()
    assert integrity(small_fs / "packets.db") == "ok"


def test_read_only_mount_opens_read_only_and_writes_resume_after_remount(
    small_fs: Path,
) -> None:
    path = small_fs / "packets.db"
    kept = packets(5)
    store = PacketStore.open(path)
    store.put_many([(KEY, p) for p in kept], now_ms=NOW)
    store.close()
    remount(small_fs, read_only=True)
    store = PacketStore.open(path)
    try:
        assert store.read_only
        assert {p.id for p in store.key_items(KEY, NOW)} == {p.id for p in kept}
        with pytest.raises(StoreError) as info:
            store.put(KEY, packets(1, seed=2)[0], now_ms=NOW)
        assert info.value.code == STORAGE_READ_ONLY
        assert str(path) in str(info.value) and "read-only" in str(info.value)
        with pytest.raises(StoreError):
            store.expire(NOW + 10**9)
        assert store.statistics().packets == len(kept)
        remount(small_fs, read_only=False)
        assert store.put(KEY, packets(1, seed=3)[0], now_ms=NOW).status == "stored"
        assert not store.read_only and store.failure is None
    finally:
        store.close()
    assert integrity(path) == "ok"


def test_read_only_mount_without_a_store_is_a_clear_startup_error(small_fs: Path) -> None:
    remount(small_fs, read_only=True)
    with pytest.raises(StoreError) as info:
        PacketStore.open(small_fs / "packets.db")
    assert info.value.code == STORAGE_READ_ONLY
    assert "not writable" in str(info.value) and str(small_fs) in str(info.value)
    remount(small_fs, read_only=False)


@pytest.mark.slow
def test_fault_disk_daemon_stays_up_refuses_with_a_code_and_recovers(workdir: Path) -> None:
    why = mount_problem()
    if why:
        pytest.skip(why)
    params = DiskParams(packets=30, attempts=5, batch=5, peer_packets=5)
    try:
        r = run_disk(params, workdir)
    except MountError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    print(render(r))
    full, ro = r.full, r.read_only
    # Disk full: every emit refused with the code, naming the file; queries, status go on.
    assert full.tried == full.refused == 1 + params.attempts + params.batch
    assert full.codes == {"storage_full": full.tried}
    assert full.named_the_file == full.tried
    assert full.found == full.queries >= params.packets
    assert full.status_state == "storage_full"
    assert full.recovered_s is not None and full.recovered_s < 2.0
    # Inbound copies refused and counted by reason, the node stays up.
    assert r.peer_acked == r.peer_sent == params.peer_packets
    assert r.refused_disk_metric >= 1
    assert r.swarm_emit_ok and r.peer_holds_swarm_emit
    # Read-only at start: it comes up, refuses with the code, answers every query.
    assert ro.tried == ro.refused == params.attempts
    assert ro.codes == {"storage_read_only": ro.tried}
    assert ro.named_the_file == ro.tried
    assert ro.found == ro.queries > full.queries
    assert ro.status_state == "storage_read_only"
    assert ro.recovered_s is not None and ro.recovered_s < 2.0
    # Nothing corrupt, nothing acknowledged lost, clean exits, no failed task.
    for phase in (full, ro):
        assert phase.check is not None and phase.check.clean, phase.check
    assert r.exits == [0, 0, 0]
    assert r.errors_logged == 0


def test_a_closed_store_is_never_reopened_by_a_late_write(workdir: Path) -> None:
    """A write that arrives after close() (a stopping node's last request) is refused;
    the recovery path must not bring the connection back."""
    store = PacketStore.open(workdir / "packets.db")
    store.put(KEY, packets(1)[0], now_ms=NOW)
    store.close()
    for _ in range(2):  # the second try would take the reconnect path
        with pytest.raises(StoreError, match="closed"):
            store.put(KEY, packets(1, seed=4)[0], now_ms=NOW)
