#!/usr/bin/env python3
"""Core throughput: packet encode+sign, decode+verify (vs raw pynacl verify), store
inserts at 100k packets (batched), and top-10 similarity query latency on a 1,000-packet
key. Prints one table; figures are from a single run on this machine (medians of
repeated timings where noted).

    .venv/bin/python scripts/bench_core.py [--packets 100000] [--dim 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import msgpack
import nacl.signing
import numpy as np

from qisd.packet import create_packet, decode_packet
from qisd.sketch import make_sketch
from qisd.store import PacketStore

SWARM = bytes(32)
NOW = int(time.time() * 1000)
OUTCOME = {"survived": True, "los_days": 4.5, "drug": "abc", "score": 7}


def rate(fn, n: int, repeats: int = 5) -> float:
    """Median operations per second over ``repeats`` runs of ``n`` calls."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    key = nacl.signing.SigningKey(rng.bytes(32))
    sketch = make_sketch(rng.standard_normal(args.dim))
    rows: list[tuple[str, str]] = []

    def make() -> object:
        return create_packet(key, swarm=SWARM, topic="bench", sketch=sketch, outcome=OUTCOME,
                             ttl_s=86400, created_ms=NOW)

    p = create_packet(key, swarm=SWARM, topic="bench", sketch=sketch, outcome=OUTCOME,
                      ttl_s=86400, created_ms=NOW)
    rows.append((f"packet size ({args.dim}-d sketch, 4 outcome fields)", f"{len(p.encoded)} B"))
    rows.append(("encode+sign", f"{rate(make, 2000):,.0f} packets/s"))
    dec = rate(lambda: decode_packet(p.encoded), 3000)
    body = msgpack.packb({k: v for k, v in msgpack.unpackb(p.encoded).items() if k != "x"},
                         use_bin_type=True)
    vk = nacl.signing.VerifyKey(p.origin)
    raw = rate(lambda: vk.verify(body, p.signature), 3000)
    rows.append(("decode+verify", f"{dec:,.0f} packets/s"))
    rows.append(("raw pynacl verify (same run)", f"{raw:,.0f} /s"))
    rows.append(("decode+verify / raw verify", f"{dec / raw:.0%}"))

    # Store inserts: batches of 500 into a fresh file, 256 distinct keys.
    origins = [nacl.signing.SigningKey(rng.bytes(32)) for _ in range(16)]
    packets = []
    for i in range(args.packets):
        packets.append(create_packet(
            origins[i % 16], swarm=SWARM, topic="bench",
            sketch=make_sketch(rng.standard_normal(args.dim)), outcome={"i": i},
            ttl_s=86400, created_ms=NOW))
    keys = [rng.bytes(20) for _ in range(256)]
    with tempfile.TemporaryDirectory() as tmp:
        store = PacketStore.open(Path(tmp) / "bench.db", max_packets=10 * args.packets,
                                 origin_quota=1.0, key_quota=10 * args.packets)
        t0 = time.perf_counter()
        for start in range(0, len(packets), 500):
            stop = min(start + 500, len(packets))
            batch = [(keys[i % 256], packets[i]) for i in range(start, stop)]
            store.put_many(batch, now_ms=NOW)
        elapsed = time.perf_counter() - t0
        rows.append((f"store insert, {args.packets:,} packets, batches of 500",
                     f"{args.packets / elapsed:,.0f} packets/s"))
        # One key holding 1,000 packets; top-10 query latency, with the bucket cache
        # (repeated queries of a key, as a responsible node serves them) and without
        # it (each query reads the bucket: a key's first query, or one evicted).
        hot = b"H" * 20
        store.put_many([(hot, q) for q in packets[:1000]], now_ms=NOW)
        uncached = PacketStore.open(Path(tmp) / "bench.db", cache_bytes=0)
        for label, st in (("cached", store), ("cache off", uncached)):
            lat = []
            for _ in range(200):
                query = make_sketch(rng.standard_normal(args.dim))
                t0 = time.perf_counter()
                st.top(hot, query, 10, now_ms=NOW)
                lat.append(time.perf_counter() - t0)
            lat.sort()
            rows.append((f"top-10 query on a 1,000-packet key p50 ({label})",
                         f"{lat[len(lat) // 2] * 1000:.2f} ms"))
            rows.append((f"top-10 query on a 1,000-packet key p99 ({label})",
                         f"{lat[int(len(lat) * 0.99)] * 1000:.2f} ms"))
        uncached.close()
        store.close()

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 20}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
