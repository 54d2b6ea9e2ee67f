#!/usr/bin/env python3
"""qisd's trio DHT against the stock ``kademlia`` package on the same work.

Each implementation runs in its own subprocess (so CPU seconds and peak RSS are its
own): N nodes on 127.0.0.1 in one event loop, every node bootstrapped through node 0,
k=20 (so each value is stored on 20 nodes, the stock default), then P puts of
512-byte values under distinct keys from random nodes and P gets of those keys from
other random nodes, 16 operations in flight; then P more puts under new keys (the
"warm" round: the nodes have met, so it shows the steady state, where the first round
also pays for a new swarm's first contacts). Datagrams are counted as received by all
nodes. Prints one table with the ratio qisd/stock for each figure, then the
packets-per-key check, and as its last line
``put_throughput_ratio=... get_p99_ratio=... success=...`` (the first round's puts).

    .venv/bin/python scripts/bench_dht.py            # N=100, 2,000 puts and gets
    .venv/bin/python scripts/bench_dht.py --quick    # N=100, 500 operations
    .venv/bin/python scripts/bench_dht.py --profile warm.prof   # where a warm put's CPU goes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from typing import Any

VALUE_BYTES = 512
CONCURRENCY = 16


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Rounds:
    """Put wall times and datagram counts of the cold and warm put rounds."""

    def __init__(self, datagrams: Any) -> None:
        self.datagrams = datagrams  # () -> datagrams received by all nodes so far
        self.figures: dict[str, float] = {}

    def start(self) -> None:
        self._t0, self._d0 = time.perf_counter(), self.datagrams()

    def stop(self, name: str, ops: int) -> float:
        wall = time.perf_counter() - self._t0
        self.figures[f"{name}_datagrams_per_put"] = (self.datagrams() - self._d0) / ops
        return wall


def summarise(kind: str, puts: list[float], gets: list[float], put_wall: float, get_wall: float,
              put_ok: int, get_ok: int, ops: int, extra: dict[str, Any]) -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "kind": kind,
        "put_throughput": ops / put_wall,
        "get_throughput": ops / get_wall,
        "put_p50": percentile(puts, 0.50), "put_p95": percentile(puts, 0.95),
        "put_p99": percentile(puts, 0.99),
        "get_p50": percentile(gets, 0.50), "get_p95": percentile(gets, 0.95),
        "get_p99": percentile(gets, 0.99),
        "put_success": put_ok / ops, "get_success": get_ok / ops,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        **extra,
    }


def workload(n: int, ops: int, seed: int) -> tuple[list[bytes], list[int], list[int]]:
    """Keys, putters and getters of ``ops`` operations, then as many warm-round puts."""
    rng = random.Random(seed)
    ops *= 2
    keys = [rng.randbytes(20) for _ in range(ops)]
    putters = [rng.randrange(n) for _ in range(ops)]
    getters = [(p + 1 + rng.randrange(n - 1)) % n for p in putters]  # never the putter
    return keys, putters, getters


def value_for(key: bytes) -> bytes:
    return (key * (VALUE_BYTES // len(key) + 1))[:VALUE_BYTES]


# -- stock kademlia (asyncio) ------------------------------------------------------


def run_stock(n: int, ops: int, seed: int) -> dict[str, Any]:
    import asyncio
    import logging

    from kademlia.network import Server
    from rpcudp.protocol import RPCProtocol

    logging.getLogger("kademlia").setLevel(logging.CRITICAL)
    logging.getLogger("rpcudp").setLevel(logging.CRITICAL)
    received = [0]
    original = RPCProtocol.datagram_received

    def counted(self: Any, data: bytes, addr: Any) -> None:
        received[0] += 1
        original(self, data, addr)

    RPCProtocol.datagram_received = counted  # type: ignore[method-assign]

    async def main() -> dict[str, Any]:
        servers = []
        for _ in range(n):
            s = Server(ksize=20, alpha=3)
            await s.listen(0, interface="127.0.0.1")
            servers.append(s)
        ports = [s.transport.get_extra_info("sockname")[1] for s in servers]
        t0 = time.perf_counter()
        for s in servers[1:]:
            await s.bootstrap([("127.0.0.1", ports[0])])
        join = time.perf_counter() - t0
        keys, putters, getters = workload(n, ops, seed)
        sem = asyncio.Semaphore(CONCURRENCY)
        puts: list[float] = []
        gets: list[float] = []
        ok = {"put": 0, "get": 0}

        async def put(i: int) -> None:
            async with sem:
                t = time.perf_counter()
                r = await servers[putters[i]].set(keys[i], value_for(keys[i]))
                puts.append(time.perf_counter() - t)
                ok["put"] += int(bool(r))

        async def get(i: int) -> None:
            async with sem:
                t = time.perf_counter()
                r = await servers[getters[i]].get(keys[i])
                gets.append(time.perf_counter() - t)
                ok["get"] += int(r == value_for(keys[i]))

        rounds = Rounds(lambda: received[0])
        rounds.start()
        await asyncio.gather(*(put(i) for i in range(ops)))
        put_wall = rounds.stop("cold", ops)
        t0 = time.perf_counter()
        await asyncio.gather(*(get(i) for i in range(ops)))
        get_wall = time.perf_counter() - t0
        cold_ok, cold_puts = ok["put"], puts[:]
        rounds.start()
        await asyncio.gather(*(put(i) for i in range(ops, 2 * ops)))
        warm_wall = rounds.stop("warm", ops)
        warm_ok, ok["put"] = ok["put"] - cold_ok, cold_ok
        # Packets per key: five values under one key from five nodes, read by a sixth.
        multi_key = b"multi-value-key"
        for j in range(5):
            await servers[1 + j].set(multi_key, f"value-{j}")
        got = await servers[7].get(multi_key)
        found = 1 if got is not None else 0
        for s in servers:
            s.stop()
        return summarise("stock", cold_puts, gets, put_wall, get_wall, ok["put"], ok["get"], ops,
                         {"join_seconds": join, "multi_found": found,
                          "warm_put_throughput": ops / warm_wall,
                          "warm_put_success": warm_ok / ops, **rounds.figures})

    return asyncio.run(main())


# -- qisd (trio) ----------------------------------------------------------------


def run_qisd(n: int, ops: int, seed: int, profile: str | None = None) -> dict[str, Any]:
    import cProfile
    import logging
    from contextlib import AsyncExitStack

    import nacl.signing
    import numpy as np
    import trio

    from qisd.dht import open_node
    from qisd.dht.config import DHTConfig
    from qisd.identity import Identity
    from qisd.manifest import DEFAULT_MANIFEST
    from qisd.packet import create_packet
    from qisd.sketch import make_sketch
    from qisd.store import PacketStore

    logging.getLogger("qisd").setLevel(logging.CRITICAL)

    async def main() -> dict[str, Any]:
        rng = random.Random(seed)
        config = DHTConfig(ksize=20, alpha=3, replicas=20)
        async with AsyncExitStack() as stack:
            nodes = []
            for i in range(n):
                ident = Identity.from_seed(rng.randbytes(32))
                store = PacketStore.open(":memory:")
                stack.callback(store.close)
                nodes.append(await stack.enter_async_context(
                    open_node(ident, DEFAULT_MANIFEST, store, host="127.0.0.1", port=0,
                              config=config)))
                del i
            t0 = time.perf_counter()
            for node in nodes[1:]:
                await node.bootstrap([nodes[0].address])
            join = time.perf_counter() - t0
            keys, putters, getters = workload(n, ops, seed)
            puts: list[float] = []
            gets: list[float] = []
            ok = {"put": 0, "get": 0}
            limiter = trio.CapacityLimiter(CONCURRENCY)

            async def put(i: int) -> None:
                async with limiter:
                    t = time.perf_counter()
                    r = await nodes[putters[i]].set(keys[i], value_for(keys[i]))
                    puts.append(time.perf_counter() - t)
                    ok["put"] += int(bool(r))

            async def get(i: int) -> None:
                async with limiter:
                    t = time.perf_counter()
                    r = await nodes[getters[i]].get(keys[i])
                    gets.append(time.perf_counter() - t)
                    ok["get"] += int(r == value_for(keys[i]))

            rounds = Rounds(lambda: sum(nd.statistics().datagrams_in for nd in nodes))
            rounds.start()
            async with trio.open_nursery() as nursery:
                for i in range(ops):
                    nursery.start_soon(put, i)
            put_wall = rounds.stop("cold", ops)
            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(ops):
                    nursery.start_soon(get, i)
            get_wall = time.perf_counter() - t0
            cold_ok, cold_puts = ok["put"], puts[:]
            prof = cProfile.Profile() if profile else None
            rounds.start()
            if prof is not None:
                prof.enable()
            async with trio.open_nursery() as nursery:
                for i in range(ops, 2 * ops):
                    nursery.start_soon(put, i)
            if prof is not None:
                prof.disable()
                prof.dump_stats(profile)
            warm_wall = rounds.stop("warm", ops)
            warm_ok, ok["put"] = ok["put"] - cold_ok, cold_ok
            # Packets per key: five packets under one key from five nodes, read by a sixth.
            multi_key = bytes(20)
            vec = np.ones(16)
            for j in range(5):
                signer = nacl.signing.SigningKey(rng.randbytes(32))
                p = create_packet(signer, swarm=DEFAULT_MANIFEST.swarm_id, topic="bench",
                                  sketch=make_sketch(vec + 0.01 * j), outcome={"j": j},
                                  ttl_s=3600)
                await nodes[1 + j].put_packet(p, keys=[multi_key])
            found = await nodes[7].find_packets([multi_key], make_sketch(vec), 10)
            return summarise("qisd", cold_puts, gets, put_wall, get_wall, ok["put"], ok["get"], ops,
                             {"join_seconds": join, "multi_found": len(found),
                              "resent": sum(nd.statistics().resent for nd in nodes),
                              "warm_put_throughput": ops / warm_wall,
                              "warm_put_success": warm_ok / ops, **rounds.figures})

    return trio.run(main)


# -- driver --------------------------------------------------------------------


ROWS = [
    ("put throughput (ops/s)", "put_throughput", "{:,.0f}"),
    ("get throughput (ops/s)", "get_throughput", "{:,.0f}"),
    ("put p50 (ms)", "put_p50", "ms"), ("put p95 (ms)", "put_p95", "ms"),
    ("put p99 (ms)", "put_p99", "ms"),
    ("get p50 (ms)", "get_p50", "ms"), ("get p95 (ms)", "get_p95", "ms"),
    ("get p99 (ms)", "get_p99", "ms"),
    ("put success", "put_success", "pct"), ("get success", "get_success", "pct"),
    ("datagrams per put", "cold_datagrams_per_put", "{:.1f}"),
    ("warm put throughput (ops/s)", "warm_put_throughput", "{:,.0f}"),
    ("warm datagrams per put", "warm_datagrams_per_put", "{:.1f}"),
    ("warm put success", "warm_put_success", "pct"),
    ("CPU seconds (whole run)", "cpu_seconds", "{:.1f}"),
    ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
    ("join time, N-1 bootstraps (s)", "join_seconds", "{:.1f}"),
    ("packets found of 5 under one key", "multi_found", "{:.0f}"),
]


def fmt(value: float, how: str) -> str:
    if how == "ms":
        return f"{value * 1000:.1f}"
    if how == "pct":
        return f"{value:.1%}"
    return how.format(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="N=100, 500 operations")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=["qisd", "stock"], help=argparse.SUPPRESS)
    ap.add_argument("--profile", metavar="FILE",
                    help="qisd only: cProfile the warm round into FILE, print its top 12")
    args = ap.parse_args()
    if args.quick:
        args.ops = 500
    if args.nodes < 8 or args.ops < 1:
        ap.error("--nodes must be at least 8 (the packets-per-key check uses eight nodes), "
                 "--ops at least 1")
    if args.profile:
        import pstats

        result = run_qisd(args.nodes, args.ops, args.seed, args.profile)
        print(f"warm put throughput (profiled): {result['warm_put_throughput']:,.0f} ops/s")
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(12)
        return 0
    if args.only:
        fn = run_qisd if args.only == "qisd" else run_stock
        print(json.dumps(fn(args.nodes, args.ops, args.seed)))
        return 0
    results = {}
    for kind in ("stock", "qisd"):
        proc = subprocess.run(
            [sys.executable, __file__, "--only", kind, "--nodes", str(args.nodes),
             "--ops", str(args.ops), "--seed", str(args.seed)],
            capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"),
        )
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    q, s = results["qisd"], results["stock"]
    print(f"N={args.nodes} nodes, k=20 (20 copies), {args.ops} puts then {args.ops} gets of "
          f"{VALUE_BYTES}-byte values, then {args.ops} warm puts, concurrency {CONCURRENCY}, "
          "127.0.0.1")
    print(f"{'measure':34s} {'qisd':>10s} {'stock':>10s} {'qisd/stock':>11s}")
    for label, key, how in ROWS:
        ratio = q[key] / s[key] if s[key] else float("inf")
        print(f"{label:34s} {fmt(q[key], how):>10s} {fmt(s[key], how):>10s} {ratio:>11.2f}")
    print(f"qisd requests resent while unanswered (dht.rpc_retries): {q['resent']:,}")
    print(f"put_throughput_ratio={q['put_throughput'] / s['put_throughput']:.2f} "
          f"get_p99_ratio={q['get_p99'] / s['get_p99']:.2f} "
          f"success={100 * min(q['put_success'], q['get_success'], q['warm_put_success']):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
