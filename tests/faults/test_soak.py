"""Soak: real ``qisd run`` daemons under steady emit, bulk-emit, query and watch load.

The scaled-down run of ``scripts/soak.py`` (same code; seconds instead of minutes, so
it checks that the load and the bookkeeping work and nothing fails or is lost, not
the growth figures the full run is for)."""

from __future__ import annotations

from pathlib import Path

import pytest
from soak import SoakParams, render, run_soak

pytestmark = pytest.mark.slow


def test_soak_small_swarm_under_load_loses_nothing_and_stops_cleanly(workdir: Path) -> None:
    p = SoakParams(nodes=2, minutes=0.5, emit_rate=10.0, query_rate=5.0, batch=20, ttl=6,
                   expire_interval=3.0, sample=3.0, seed=5)
    r = run_soak(workdir, p)
    print(render(r))
    assert r.errors == 0, r.error_kinds
    assert r.exits == [0, 0]
    assert [c.clean for c in r.checks] == [True, True]
    # Packets acknowledged in the last ttl/2 seconds: every one held somewhere.
    assert r.recent_acked > 0 and r.recent_lost == 0
    # Every rate was kept up with: ~10 emits/s + 2 batches of 20 in 30 s, ~5 queries/s.
    assert r.emitted >= 0.8 * (10 * 30 + 2 * 20)
    assert r.queried >= 0.8 * 5 * 30 and r.empty_answers < r.queried / 10
    # The watch stream lived through the whole run.
    assert r.watch_ended_early == [] and r.watch_events_last_window > 0
    assert len(r.samples) >= 8 and r.steady
    # Expiry keeps up: no store holds more than what ~2 ttls of inflow can be.
    assert max(max(s.packets) for s in r.steady) < 2 * (10 + 20 / 10) * (p.ttl + p.expire_interval)
    first, last = r.steady[0], r.steady[-1]
    assert max(last.fds) <= max(first.fds) + 2
