"""Crash: ``kill -9`` a ``qisd run`` daemon during a bulk emit; on restart the store opens,
holds every acknowledged packet, and nothing half-written.

The scaled-down run of ``scripts/fault_crash.py`` (same code, fewer kill cycles)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fault_crash import QisdProcess, check_store, emit_until_killed, render, run_crash

pytestmark = pytest.mark.slow


def test_fault_crash_kill_9_during_bulk_emit_loses_nothing_acknowledged(workdir: Path) -> None:
    r = run_crash(workdir, cycles=4, batch=100, seed=11)
    print(render(r))
    assert r.acked >= 100, "the kills came before anything was acknowledged"
    assert sum(c.in_flight_at_kill for c in r.cycles) >= 1, "no kill landed mid-batch"
    for c in r.cycles:
        assert c.check.integrity == "ok"
        assert c.check.foreign_key_violations == 0
        assert c.check.bad_packets == 0
        assert c.check.packets_without_entries == 0
        assert c.check.missing_acked == 0
        assert c.check.packets >= c.acked_before_kill
    assert r.final is not None and r.final.clean and r.final_exit == 0


def test_fault_crash_check_detects_a_missing_or_broken_packet(workdir: Path) -> None:
    """The store check itself: a lost acknowledged id and a corrupted row are seen."""
    import random
    import sqlite3

    daemon = QisdProcess(workdir)
    daemon.start()
    try:
        ids, _ = emit_until_killed(daemon, random.Random(3), batch=20, kill_after=1.0)
    finally:
        daemon.kill()
    db = daemon.state_dir / "packets.db"
    assert ids and check_store(db, set(ids)).clean
    assert check_store(db, {*ids, "00" * 16}).missing_acked == 1
    pid = bytes.fromhex(ids[0])
    conn = sqlite3.connect(str(db))
    with conn:
        (data,) = conn.execute("SELECT data FROM packets WHERE id = ?", (pid,)).fetchone()
        broken = bytes(data[:-1]) + bytes([data[-1] ^ 1])  # one bit flipped
        conn.execute("UPDATE packets SET data = ? WHERE id = ?", (broken, pid))
    conn.close()
    assert check_store(db, set(ids)).bad_packets == 1
