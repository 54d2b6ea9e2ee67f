#!/usr/bin/env python3
"""The floor under scripts/bench_dht.py: its put round's datagrams with no DHT at all.

N UDP sockets on 127.0.0.1 in one event loop; a "put" sends a request (rpcudp
framing, msgpack, a 512-byte value) from a random socket to 20 random others and
waits for their 20 answers, 16 puts in flight: the datagrams of a warm qisd put
(20 acknowledged copies), and none of the work (no routing table, no lookup state,
no rate limits, no checks of what arrives). What is left is the event loop, the
system calls and msgpack: the most any implementation on that loop could reach.

- ``asyncio``: a ``DatagramProtocol`` per socket (the stock library's transport).
- ``trio sockets``: ``trio.socket`` calls, awaited (they yield to the scheduler).
- ``trio raw``: non-blocking stdlib sockets drained after ``wait_readable``, sends
  straight to the socket (what :mod:`qisd.dht.udp` does).

    .venv/bin/python scripts/bench_floor.py            # N=100, 2,000 puts each
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
import trio

FANOUT = 20
CONCURRENCY = 16
VALUE = bytes(512)
REPLY = msgpack.packb({"stored": True, "nodes": []})


class Run:
    """The shared bookkeeping of one variant: message ids, waiters, counts."""

    def __init__(self, n: int, ops: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n, self.ops = n, ops
        self.received = 0
        self._next = 0

    def msgid(self) -> bytes:
        self._next += 1
        return self._next.to_bytes(20, "big")

    def requests(self, addrs: list[Any]) -> tuple[int, list[tuple[bytes, bytes, Any]]]:
        """One put: its sender and ``(msgid, datagram, destination)`` per request."""
        src, dests = self.plan()
        out = []
        for d in dests:
            msgid = self.msgid()
            data = b"\x00" + msgid + msgpack.packb(["store", [bytes(20), bytes(20), VALUE]])
            out.append((msgid, data, addrs[d]))
        return src, out

    def answer(self, data: bytes) -> bytes:
        msgpack.unpackb(data[21:])
        return b"\x01" + data[1:21] + REPLY

    def plan(self) -> tuple[int, list[int]]:
        """A random sender and ``FANOUT`` other sockets it puts to."""
        src = self.rng.randrange(self.n)
        others = self.rng.sample(range(self.n - 1), FANOUT)
        return src, [d + (d >= src) for d in others]


def timed(fn: Callable[[], None], run: Run) -> dict[str, float]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    pairs = run.received / 2
    return {"puts": run.ops / wall, "datagrams": run.received / run.ops,
            "us_per_pair": cpu / pairs * 1e6 if pairs else float("nan")}


def bench_asyncio(n: int, ops: int, seed: int) -> dict[str, float]:
    run = Run(n, ops, seed)
    waiters: dict[bytes, asyncio.Future[bytes]] = {}

    class Endpoint(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            run.received += 1
            if data[0] == 0:
                self.transport.sendto(run.answer(data), addr)
            else:
                future = waiters.pop(data[1:21], None)
                if future is not None:
                    future.set_result(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ends: list[Endpoint] = []
        for _ in range(n):
            _, end = await loop.create_datagram_endpoint(Endpoint, local_addr=("127.0.0.1", 0))
            ends.append(end)
        addrs = [e.transport.get_extra_info("sockname") for e in ends]
        limit = asyncio.Semaphore(CONCURRENCY)

        async def put() -> None:
            async with limit:
                src, requests = run.requests(addrs)
                futures = []
                for msgid, data, addr in requests:
                    futures.append(waiters.setdefault(msgid, loop.create_future()))
                    ends[src].transport.sendto(data, addr)
                await asyncio.gather(*futures)

        await asyncio.gather(*(put() for _ in range(ops)))
        for e in ends:
            e.transport.close()

    return timed(lambda: asyncio.run(main()), run)


def bench_trio(n: int, ops: int, seed: int, *, raw: bool) -> dict[str, float]:
    run = Run(n, ops, seed)
    waiters: dict[bytes, trio.Event] = {}

    async def serve_awaited(sock: Any) -> None:
        while True:
            data, addr = await sock.recvfrom(8192)
            await handle(data, addr, sock.sendto)

    async def serve_raw(sock: socket.socket) -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data, addr = sock.recvfrom(8192)
                except BlockingIOError:
                    break
                await handle(data, addr, None, sock)

    async def handle(data: bytes, addr: Any, send: Any, sock: Any = None) -> None:
        run.received += 1
        if data[0] == 0:
            if send is None:
                sock.sendto(run.answer(data), addr)
            else:
                await send(run.answer(data), addr)
        else:
            event = waiters.pop(data[1:21], None)
            if event is not None:
                event.set()

    async def main() -> None:
        socks: list[Any] = []
        for _ in range(n):
            if raw:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setblocking(False)
                s.bind(("127.0.0.1", 0))
            else:
                s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                await s.bind(("127.0.0.1", 0))
            socks.append(s)
        addrs = [s.getsockname() for s in socks]
        limit = trio.CapacityLimiter(CONCURRENCY)

        async def put() -> None:
            async with limit:
                src, requests = run.requests(addrs)
                events = []
                for msgid, data, addr in requests:
                    events.append(waiters.setdefault(msgid, trio.Event()))
                    if raw:
                        socks[src].sendto(data, addr)
                    else:
                        await socks[src].sendto(data, addr)
                for event in events:
                    await event.wait()

        async with trio.open_nursery() as servers:
            for s in socks:
                servers.start_soon(serve_raw if raw else serve_awaited, s)
            async with trio.open_nursery() as puts:
                for _ in range(ops):
                    puts.start_soon(put)
            servers.cancel_scope.cancel()
        for s in socks:
            s.close()

    return timed(lambda: trio.run(main), run)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.nodes <= FANOUT or args.ops < 1:
        ap.error(f"--nodes must be above {FANOUT} (each put reaches {FANOUT} others), "
                 "--ops at least 1")
    rows = [
        ("asyncio", bench_asyncio(args.nodes, args.ops, args.seed)),
        ("trio sockets", bench_trio(args.nodes, args.ops, args.seed, raw=False)),
        ("trio raw", bench_trio(args.nodes, args.ops, args.seed, raw=True)),
    ]
    print(f"N={args.nodes} sockets, {args.ops} puts of {FANOUT} request/answer pairs "
          f"({len(VALUE)}-byte values), concurrency {CONCURRENCY}, 127.0.0.1, no DHT")
    print(f"{'loop':14s} {'puts/s':>8s} {'datagrams/put':>14s} {'CPU us per pair':>16s}")
    for name, r in rows:
        print(f"{name:14s} {r['puts']:>8,.0f} {r['datagrams']:>14.1f} {r['us_per_pair']:>16.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
