"""Lookup cost grows with log N: the real node code over the in-memory network."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from qisd.dht.simulate import simulate

pytestmark = pytest.mark.slow


async def test_lookup_cost_is_logarithmic(autojump_clock: trio.testing.MockClock) -> None:
    small = await simulate(100, lookups=100, seed=1)
    big = await simulate(1000, lookups=200, seed=2)
    for result in (small, big):
        # Correct first: every lookup ends at the true closest node of the swarm.
        assert result.exact_closest == result.lookups
        assert result.overlap >= 0.95
    log_n = math.log2(big.nodes)
    k, alpha = 20, 3
    assert big.mean_rounds <= log_n / 2
    assert big.p99_rounds <= log_n
    assert big.mean_messages <= k + alpha * log_n
    # Ten times the nodes adds a few round trips, not ten times as many.
    assert big.mean_rounds - small.mean_rounds <= math.log2(10)
    assert big.mean_messages <= 2 * small.mean_messages
