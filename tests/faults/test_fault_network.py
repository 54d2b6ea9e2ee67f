"""Network faults on real nodes (127.0.0.1, real UDP, SQLite stores): 5% loss and 50 ms
delay on every datagram, then a partition into two halves and its heal.

The scaled-down run of ``scripts/fault_network.py`` (same code; the full-size figures
in docs/reliability.md come from the script). This kernel has no ``tc netem``: the
loss, delay and partition are applied in each node's own datagram endpoint
(``faultlib.ImpairedEndpoint``), on every datagram it sends."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from fault_network import NetworkParams, render, run_network

pytestmark = pytest.mark.slow

PARAMS = NetworkParams(
    nodes=10,
    packets=20,
    queries=100,
    loss=0.05,
    delay=0.05,
    partition=3.0,
    split_packets=3,
    refresh=6.0,
    republish=6.0,
    failure_backoff=2.0,
    # All nodes share this one process and core: many queries at once lag the event
    # loop past the RPC timeout (a harness limit, not the network's), so 8 at a time.
    concurrency=8,
    rpc_timeout=1.0,
    seed=5,
    heal_timeout=25.0,
)


async def test_fault_network_loss_delay_then_partition_and_heal(tmp_path: Path) -> None:
    # A safety net only: it must exceed the phases' own bounds (the heal has 25 s), or a
    # slow query phase lets it cut the heal short (seen once in a suite run).
    with trio.fail_after(180):
        r = await run_network(PARAMS, tmp_path)
    print(render(r))
    assert r.put_ok == PARAMS.packets
    # The impairment really was there: about 5% of datagrams dropped, a real cut.
    assert r.datagrams > 1000 and 0.03 < r.dropped_by_loss / r.datagrams < 0.07
    assert r.query_p50_ms >= 4 * 1000 * PARAMS.delay  # at least two round trips
    assert r.queries == PARAMS.queries
    assert r.query_ok >= 0.99 * r.queries
    assert r.query_resent > 0  # lost requests and answers were sent again (rpc_retries 1)
    assert r.cut_datagrams > 0
    assert r.split_put_ok == 2 * PARAMS.split_packets
    # After the heal every packet, from before and during the cut, is found from both.
    assert r.heal_seconds is not None, "not every packet found from both halves"
    total = PARAMS.packets + 2 * PARAMS.split_packets
    assert r.asked_after_heal == total
    assert r.found_after_heal == {"side_a": total, "side_b": total}
