#!/usr/bin/env python3
"""Lookup cost vs swarm size: real qisd DHT nodes over the in-memory network.

Every node runs the production node code (routing, lookups, RPC handlers) over
``qisd.dht.memnet`` under a mock clock, joining one by one through a random earlier
node. Then random FIND_NODE lookups from random nodes; the table shows mean and p99
rounds (sequential round trips) and messages (RPCs) per lookup, and how often the
lookup found the true closest node of the whole swarm.

    .venv/bin/python scripts/sim_dht.py                 # N = 100, 1000, 10000
    .venv/bin/python scripts/sim_dht.py --sizes 100 1000 --lookups 500
"""

from __future__ import annotations

import argparse
import math
import time

import trio
import trio.testing

from qisd.dht.simulate import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--lookups", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("-k", "--ksize", type=int, default=20)
    parser.add_argument("--alpha", type=int, default=3)
    args = parser.parse_args()
    print(f"k={args.ksize} alpha={args.alpha} lookups={args.lookups} seed={args.seed}")
    header = (
        f"{'N':>7} {'log2N':>6} {'rounds mean':>11} {'p99':>4} "
        f"{'msgs mean':>9} {'p99':>4} {'exact':>6} {'overlap':>7} {'secs':>6}"
    )
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        started = time.perf_counter()
        result = trio.run(
            lambda n=n: simulate(
                n, lookups=args.lookups, seed=args.seed, ksize=args.ksize, alpha=args.alpha
            ),
            clock=trio.testing.MockClock(autojump_threshold=0),
        )
        took = time.perf_counter() - started
        print(
            f"{n:>7} {math.log2(n):>6.1f} {result.mean_rounds:>11.2f} {result.p99_rounds:>4} "
            f"{result.mean_messages:>9.1f} {result.p99_messages:>4} "
            f"{result.exact_closest / result.lookups:>6.1%} {result.overlap:>7.1%} {took:>6.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
