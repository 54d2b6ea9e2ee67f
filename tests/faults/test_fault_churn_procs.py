"""Churn with one real ``qisd run`` process per node: 30% get SIGTERM, every packet is
still found by ``query`` through the control socket, they restart on their old ports
with their stores, and replication comes back.

The scaled-down run of ``scripts/fault_churn_procs.py`` (same code; the 50-process
figures in docs/reliability.md come from the script)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from fault_churn_procs import ProcChurnParams, render, run_churn

pytestmark = pytest.mark.slow

PARAMS = ProcChurnParams(
    nodes=12,
    packets=120,
    stop=0.3,
    outage_packets=12,
    topics=2,
    republish=8.0,
    rpc_timeout=1.0,
    batch=10,
    concurrency=8,
    seed=7,
    settle_timeout=90.0,
)


async def test_fault_churn_procs_30_percent_sigterm_nothing_lost_then_restored(
    workdir: Path,
) -> None:
    with trio.fail_after(300):
        r = await run_churn(PARAMS, workdir)
    print(render(r))
    assert r.emit_ok == PARAMS.packets and r.emit_errors == 0
    assert len(r.stopped) == 4 and set(r.stop_exit_codes) == {0}
    assert r.entries_lost == 0 and r.packets_without_copy == 0
    # Target >= 99.9%: at this size that means every packet.
    assert r.found_down == r.asked_down == PARAMS.packets and r.query_errors_down == 0
    assert r.outage_emit_ok == PARAMS.outage_packets
    assert r.rereplicate_seconds is not None, "copies never came back to replicas"
    assert r.restarted_kept_store == len(r.stopped), r.restarted_store_mismatch
    assert r.restored_seconds is not None, "closest nodes never got every entry back"
    assert r.final_closest == 1.0
    assert r.found_after == r.asked_after == PARAMS.packets + PARAMS.outage_packets
    assert r.query_errors_after == 0
    assert set(r.cpu_busy) >= {"emit", "queries while down"}
