"""Churn on real nodes (127.0.0.1, real UDP, SQLite stores): 30% stop at random, nothing
is lost, they restart with their stores, and replication comes back.

The scaled-down run of ``scripts/fault_churn.py`` (same code; the 50-node, 5,000-packet
figures in docs/reliability.md come from the script)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from fault_churn import ChurnParams, render, run_churn

pytestmark = pytest.mark.slow

PARAMS = ChurnParams(
    nodes=16,
    packets=160,
    stop=0.3,
    outage_packets=16,
    topics=2,
    republish=8.0,
    rpc_timeout=1.0,
    probe_sample=40,
    seed=7,
    settle_timeout=60.0,
)


async def test_fault_churn_30_percent_down_nothing_lost_then_restored(tmp_path: Path) -> None:
    with trio.fail_after(240):
        r = await run_churn(PARAMS, tmp_path)
    print(render(r))
    assert r.put_ok == PARAMS.packets
    assert len(r.stopped) == 5 and r.holders_stopped > 0
    # Placement leaves more than ``replicas`` copies, so no entry loses its last one.
    assert r.entries_lost == 0
    # Target >= 99.9%: at this size that means every packet.
    assert r.found_exact == r.asked_exact == PARAMS.packets
    assert r.found_probe == r.asked_probe == PARAMS.probe_sample
    assert r.outage_put_ok == PARAMS.outage_packets
    assert r.rereplicate_seconds is not None, "copies never came back to replicas"
    assert r.restarted_kept_store == len(r.stopped), r.restarted_store_mismatch
    assert r.restored_seconds is not None, "closest nodes never got every entry back"
    assert r.final_closest == 1.0 and r.final_full == 1.0
    assert r.found_after == r.asked_after == PARAMS.packets + PARAMS.outage_packets
