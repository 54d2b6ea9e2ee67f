"""The synthesis loop in a real 10-daemon swarm: 2,000 packets in 20 clusters of
similar cases, emitted from random sites; syntheses stay bounded, capped in
generation, and stop when the input stops."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from daemon_helpers import Daemon

from qisd import Client

pytestmark = pytest.mark.slow

CLUSTERS = 20
PACKETS = 2000
DIM = 16


def synthesised(clients: list[Client]) -> list[int]:
    return [int(c.status()["synthesised"]) for c in clients]


def wait_quiet(clients: list[Client], interval: float, timeout: float = 90.0) -> list[int]:
    """Wait until no node has published a synthesis for three worker intervals."""
    deadline = time.monotonic() + timeout
    last = synthesised(clients)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = synthesised(clients)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= 3 * interval:
            return now
    raise AssertionError(f"synthesis never settled: {last}")


def test_synthesis_is_bounded_and_settles(workdir: Path, daemons: list[Daemon]) -> None:
    extra = ["--log-level", "warning"]
    first = Daemon(workdir, "s0", extra=extra).start()
    daemons.append(first)
    for i in range(1, 10):
        daemons.append(Daemon(workdir, f"s{i}", bootstrap=[first.address], extra=extra)
                       .start())
    clients = [Client(d.socket, timeout=120) for d in daemons]
    try:
        _run(clients)
    finally:
        for c in clients:
            c.close()


def _run(clients: list[Client]) -> None:
    env_interval = 1.0
    deadline = time.monotonic() + 30
    while min(c.status()["peers"] for c in clients) < 9:
        assert time.monotonic() < deadline, "swarm did not form"
        time.sleep(0.2)

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((CLUSTERS, DIM))
    labels = rng.integers(0, CLUSTERS, PACKETS)
    vectors = centres[labels] + 0.05 * rng.standard_normal((PACKETS, DIM))
    sites = rng.integers(0, 10, PACKETS)
    for site in range(10):
        idx = np.flatnonzero(sites == site)
        items = [{"topic": "syn", "vector": vectors[j].tolist(),
                  "outcome": {"y": bool(labels[j] % 2), "v": float(labels[j])}} for j in idx]
        for start in range(0, len(items), 250):
            results = clients[site].emit_many(items[start:start + 250])
            assert all("id" in r for r in results), results[:3]

    counts = wait_quiet(clients, env_interval)
    assert sum(counts) > 0, "no synthesis at all"

    held: dict[str, dict] = {}
    per_node_ids = []
    for c in clients:
        packets = c.packets(topic="syn", limit=10_000)
        ids = [p["id"] for p in packets]
        assert len(ids) == len(set(ids)), "a node holds a packet twice"
        per_node_ids.append(ids)
        for p in packets:
            held[p["id"]] = p
    observations = {i for i, p in held.items() if p["kind"] == "observation"}
    syntheses = {i: p for i, p in held.items() if p["kind"] == "synthesis"}
    assert len(observations) == PACKETS
    assert all(p["generation"] == 1 for p in syntheses.values())
    # One live synthesis per cohort series in the swarm; cohorts are about the clusters
    # (a cluster can straddle table-0 codes and so have more than one synthesiser).
    series = {p["series"] for p in syntheses.values()}
    assert len(series) <= 4 * CLUSTERS, (len(series), CLUSTERS)
    assert len(syntheses) <= 2 * len(series) + CLUSTERS, (len(syntheses), len(series))
    # Every cohort's synthesis covers at least the minimum cohort of cases.
    assert all(p["n"] >= 5 for p in syntheses.values())

    # A second pass with no new input emits nothing.
    time.sleep(4 * env_interval)
    assert synthesised(clients) == counts
