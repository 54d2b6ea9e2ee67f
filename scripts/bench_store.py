#!/usr/bin/env python3
"""The packet store at scale: the passes over every key entry, and whether writers wait.

Fills a store file through ``PacketStore.put_many`` with ``--packets`` signed packets,
each under ``--keys-per-packet`` of ``--keys`` keys (LSH keys: few, each holding many
packets), then times the reads that visit every entry -- ``keys()`` (the held keys,
read by hand-off, republish and the delivery filter), ``statistics()`` (each metrics
scrape and ``qisd status``) and ``recent()`` without a topic (``qisd packets``) -- and,
while each runs in a thread, the longest a writer waits for the store's lock. Medians
of ``--repeats`` runs.

    .venv/bin/python scripts/bench_store.py [--packets 200000] [--keys 512]

Uses only the store's public API (and its lock), so the same script measures an
older build: ``PYTHONPATH=<older checkout> .venv/bin/python scripts/bench_store.py``.

``--daemon`` instead fills a state directory with packets of the default swarm under
their real LSH keys and runs ``qisd run`` on it: how long until it is ready, and the
median latency of ``status``, a metrics scrape and ``query`` (a new vector each time,
and one vector again) through the control socket while it holds that store; twice,
with the bucket cache (``store.cache_bytes``) and without it.

    .venv/bin/python scripts/bench_store.py --daemon [--packets 200000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nacl.signing
import numpy as np

from qisd.packet import create_packet
from qisd.sketch import make_sketch
from qisd.store import PacketStore

SWARM = bytes(32)
NOW = int(time.time() * 1000)


def fill(store: PacketStore, args: argparse.Namespace, rng: np.random.Generator) -> float:
    origins = [nacl.signing.SigningKey(rng.bytes(32)) for _ in range(64)]
    keys = [rng.bytes(20) for _ in range(args.keys)]
    t0 = time.perf_counter()
    batch: list[tuple[bytes, object]] = []
    for i in range(args.packets):
        p = create_packet(origins[i % 64], swarm=SWARM, topic=f"topic{i % 4}",
                          sketch=make_sketch(rng.standard_normal(16)), outcome={"i": i},
                          ttl_s=86400, created_ms=NOW - i)
        for k in rng.choice(args.keys, size=args.keys_per_packet, replace=False):
            batch.append((keys[int(k)], p))
        if len(batch) >= 4000:
            store.put_many(batch, now_ms=NOW)  # type: ignore[arg-type]
            batch = []
    if batch:
        store.put_many(batch, now_ms=NOW)  # type: ignore[arg-type]
    return time.perf_counter() - t0


def timed(store: PacketStore, read: Callable[[], object]) -> tuple[float, float]:
    """(seconds the read took, longest wait for the lock by a writer meanwhile)."""
    done = threading.Event()
    waits = [0.0]

    def writer() -> None:
        while not done.is_set():
            t = time.perf_counter()
            with store._lock:
                pass
            waits.append(time.perf_counter() - t)
            time.sleep(0.005)

    th = threading.Thread(target=writer)
    th.start()
    t0 = time.perf_counter()
    read()
    took = time.perf_counter() - t0
    done.set()
    th.join()
    return took, max(waits)


def fill_state(state: Path, args: argparse.Namespace, rng: np.random.Generator) -> float:
    """A daemon's store: default-swarm packets of 4 topics, each under its LSH keys."""
    from qisd.fingerprint import keys_for
    from qisd.manifest import DEFAULT_MANIFEST

    store = PacketStore.open(state / "packets.db")
    origins = [nacl.signing.SigningKey(rng.bytes(32)) for _ in range(64)]
    centres = [rng.standard_normal(16) for _ in range(32)]
    t0 = time.perf_counter()
    batch: list[tuple[bytes, object]] = []
    for i in range(args.packets):
        topic = f"topic{i % 4}"
        vec = centres[int(rng.integers(32))] + 0.3 * rng.standard_normal(16)
        p = create_packet(origins[i % 64], swarm=DEFAULT_MANIFEST.swarm_id, topic=topic,
                          sketch=make_sketch(vec), outcome={"survived": bool(i % 3)},
                          ttl_s=86400, created_ms=NOW - i)
        batch += [(key, p) for key in keys_for(DEFAULT_MANIFEST, topic, vec)]
        if len(batch) >= 4000:
            store.put_many(batch, now_ms=NOW)  # type: ignore[arg-type]
            batch = []
    if batch:
        store.put_many(batch, now_ms=NOW)  # type: ignore[arg-type]
    st = store.statistics()
    store.close()
    print(f"state: {st.packets:,} packets under {st.keys:,} keys, {st.bytes / 1e6:,.0f} MB; "
          f"filled in {time.perf_counter() - t0:.0f} s")
    return time.perf_counter() - t0


def run_daemon(args: argparse.Namespace, rng: np.random.Generator) -> None:
    import tempfile as tf

    with tf.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(tmp)
        state = root / "state"
        state.mkdir()
        fill_state(state, args, rng)
        # The same store twice: with the bucket cache (default) and without it.
        for cache in (None, 0):
            serve_and_time(root, state, args, np.random.default_rng(2), cache)


def serve_and_time(root: Path, state: Path, args: argparse.Namespace,
                   rng: np.random.Generator, cache_bytes: int | None) -> None:
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    from qisd import Client

    notify_path = root / "notify"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(300)
    sock = root / "qisd.sock"
    cmd = [sys.executable, "-m", "qisd", "run", "--state-dir", str(state),
           "--socket", str(sock), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
           "--log-level", "warning"]
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
    if cache_bytes is not None:
        env["QISD_STORE_CACHE_BYTES"] = str(cache_bytes)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        ready = time.perf_counter() - t0
        with Client(sock, timeout=60) as client:
            url = str(client.status()["metrics"])
            again = list(rng.standard_normal(16))
            rows: list[tuple[str, Callable[[], object]]] = [
                ("status", client.status),
                ("metrics scrape", lambda: urllib.request.urlopen(url, timeout=60).read()),
                ("query, k=10, new vector each time", lambda: client.query(
                    topic="topic1", vector=list(rng.standard_normal(16)), k=10)),
                ("query, k=10, one vector again", lambda: client.query(
                    topic="topic2", vector=again, k=10)),
            ]
            client.query(topic="topic2", vector=again, k=10)  # its buckets read once
            label = "default" if cache_bytes is None else str(cache_bytes)
            print(f"qisd run, store.cache_bytes {label}: READY after {ready:.2f} s")
            print(f"{'request':<34}  {'median ms':>9}  {'max ms':>7}")
            for name, call in rows:
                took = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    call()
                    took.append(time.perf_counter() - t)
                print(f"{name:<34}  {statistics.median(took) * 1000:>9.1f}  "
                      f"{max(took) * 1000:>7.1f}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        notify.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--keys", type=int, default=512)
    ap.add_argument("--keys-per-packet", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--daemon", action="store_true",
                    help="run qisd on a filled state directory instead (see above)")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    if args.daemon:
        run_daemon(args, rng)
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = PacketStore.open(Path(tmp) / "bench.db", max_packets=10 * args.packets,
                                 origin_quota=1.0, key_quota=10 * args.packets)
        filled = fill(store, args, rng)
        st = store.statistics()
        print(f"store: {st.packets:,} packets, {st.keys:,} keys, "
              f"{args.packets * args.keys_per_packet:,} entries, {st.bytes / 1e6:,.0f} MB; "
              f"filled in {filled:.0f} s")
        reads: list[tuple[str, Callable[[], object]]] = [
            ("keys() (held keys)", lambda: store.keys(NOW)),
            ("statistics()", store.statistics),
            ("recent(topic=None, limit=20)", lambda: store.recent(topic=None, limit=20,
                                                                  now_ms=NOW)),
        ]
        width = max(len(name) for name, _ in reads)
        print(f"{'read':<{width}}  {'median s':>9}  {'writer waited, max s':>20}")
        for name, read in reads:
            runs = [timed(store, read) for _ in range(args.repeats)]
            took = statistics.median(r[0] for r in runs)
            waited = max(r[1] for r in runs)
            print(f"{name:<{width}}  {took:>9.3f}  {waited:>20.3f}")
        store.close()


if __name__ == "__main__":
    main()
