"""The transport alone: timeouts, spoofed replies, bounds, busy answers, closing."""

from __future__ import annotations

import socket
from typing import Any

import trio
import trio.testing
import umsgpack

from qisd.dht.memnet import MemoryNetwork
from qisd.dht.stats import Counters
from qisd.dht.transport import Deferred, Transport, open_udp_endpoint
from qisd.dht.wire import Address


def echo(name: str, args: list[Any], addr: Address) -> Any:
    return [name, args]


async def test_serve_ends_when_socket_closes() -> None:
    ep = await open_udp_endpoint("127.0.0.1", 0)
    transport = Transport(ep, echo, Counters())
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.serve)
            ep.close()


async def test_timeout_and_spoofed_reply() -> None:
    counters = Counters()
    ep = await open_udp_endpoint("127.0.0.1", 0)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with silent, forger:
        silent.bind(("127.0.0.1", 0))
        transport = Transport(ep, echo, counters, timeout=0.3)
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.serve)

            async def forge() -> None:
                # Read the request at its real destination, answer from elsewhere.
                await trio.lowlevel.wait_readable(silent)
                data, src = silent.recvfrom(9000)
                forger.sendto(b"\x01" + data[1:21] + umsgpack.packb("forged"), src)

            nursery.start_soon(forge)
            ok, result = await transport.call(silent.getsockname(), "ping", [b"x" * 20])
            assert (ok, result) == (False, None)
            assert counters.dropped["wrong_source"] == 1
            assert counters.rpcs[("ping", "out", "timeout")] == 1
            assert transport.outstanding == 0
            nursery.cancel_scope.cancel()
    ep.close()


async def test_outstanding_calls_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    ep = net.endpoint()
    transport = Transport(ep, echo, Counters(), timeout=1.0, max_outstanding=2)
    peak = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve)

        async def call() -> None:
            await transport.call(("10.9.9.9", 1), "ping", [])

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, transport.outstanding)
                await trio.sleep(0.01)

        nursery.start_soon(watch)
        async with trio.open_nursery() as calls:
            for _ in range(6):
                calls.start_soon(call)
        nursery.cancel_scope.cancel()
    assert peak == 2
    assert trio.current_time() >= 3.0  # three waves of two timeouts


async def test_busy_answer_when_handlers_are_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    server_ep, client_ep = net.endpoint(), net.endpoint()
    release = trio.Event()

    async def slow() -> str:
        await release.wait()
        return "done"

    def handler(name: str, args: list[Any], addr: Address) -> Any:
        return Deferred(slow, busy="busy")

    counters = Counters()
    server = Transport(server_ep, handler, counters, max_handlers=1)
    client = Transport(client_ep, echo, Counters(), timeout=5.0)
    results: list[Any] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        await nursery.start(client.serve)

        async def call() -> None:
            results.append(await client.call(server_ep.local_address, "work", []))

        nursery.start_soon(call)
        await trio.sleep(0.1)
        await call()  # the one handler slot is taken: answered "busy" at once
        release.set()
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert results == [(True, "busy"), (True, "done")]
    assert counters.dropped["overloaded"] == 1


async def test_memnet_down_and_loss(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(loss=0.5, seed=3)
    a, b = net.endpoint(), net.endpoint()
    for _ in range(200):
        await a.sendto(b"x" * 30, b.local_address)
    assert 60 < net.delivered < 140 and net.delivered + net.lost == 200
    net.loss = 0.0
    lost = net.lost
    net.down.add(b.local_address)
    await a.sendto(b"y", b.local_address)
    await a.sendto(b"z" * 9000, a.local_address)  # over the datagram cap
    assert net.lost == lost + 2
    net.down.clear()
    b.close()
    await a.sendto(b"y", b.local_address)  # nobody there any more: lost, no error
    assert net.lost == lost + 3


async def test_a_reply_msgpack_cannot_carry_is_counted_not_fatal() -> None:
    """A handler bug (a result msgpack cannot encode) costs that answer, not the node."""

    def handler(name: str, args: list[Any], addr: Address) -> Any:
        return object() if name == "broken" else [name, args]

    counters = Counters()
    server_ep = await open_udp_endpoint("127.0.0.1", 0)
    client_ep = await open_udp_endpoint("127.0.0.1", 0)
    server = Transport(server_ep, handler, counters)
    client = Transport(client_ep, echo, Counters(), timeout=0.5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            await nursery.start(client.serve)
            assert await client.call(server_ep.local_address, "broken", []) == (False, None)
            assert counters.dropped["handler_error"] >= 1  # (the client sends it again)
            assert await client.call(server_ep.local_address, "ping", [1]) == (True,
                                                                               ["ping", [1]])
            nursery.cancel_scope.cancel()
    server_ep.close()
    client_ep.close()
