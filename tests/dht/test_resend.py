"""Unanswered requests are sent again within their timeout, and a peer serves a
resent copy of a request it is still working on only once (real UDP on loopback)."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
import trio
import umsgpack

from qisd.dht.calls import CallGroup
from qisd.dht.config import DHTConfig
from qisd.dht.resend import MIN_RESEND, RoundTrips
from qisd.dht.stats import Counters
from qisd.dht.transport import Deferred, Transport, open_udp_endpoint
from qisd.dht.wire import Address

TIMEOUT = 0.6


def echo(name: str, args: list[Any], addr: Address) -> Any:
    return [name, args]


class LossyPeer:
    """A raw UDP socket that ignores the first ``drop`` copies of each request (of
    every request, or of the ``lossy`` ones by arrival order of first copies) and
    answers the next one after ``delay`` seconds; it records every request datagram."""

    def __init__(self, drop: int, *, lossy: set[int] | None = None, delay: float = 0.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.drop = drop
        self.lossy = lossy
        self.delay = delay
        self.seen: list[tuple[float, bytes]] = []

    @property
    def address(self) -> Address:
        host, port = self.sock.getsockname()
        return host, port

    async def serve(self) -> None:
        copies: dict[bytes, int] = {}
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(self.sock)
                data, src = self.sock.recvfrom(9000)
                self.seen.append((trio.current_time(), data))
                msgid = data[1:21]
                if msgid not in copies:
                    copies[msgid] = 0
                ordinal = list(copies).index(msgid)
                copies[msgid] += 1
                drop = self.drop if self.lossy is None or ordinal in self.lossy else 0
                if copies[msgid] > drop:
                    nursery.start_soon(self._answer, msgid, src)

    async def _answer(self, msgid: bytes, src: Address) -> None:
        await trio.sleep(self.delay)
        self.sock.sendto(b"\x01" + msgid + umsgpack.packb("pong"), src)


async def _calls_to(
    peer: LossyPeer, retries: int, calls: int = 1
) -> tuple[list[tuple[bool, Any]], float, Counters]:
    """``calls`` pings to ``peer`` one after another: their outcomes, the last one's
    duration, and the caller's counters."""
    counters = Counters()
    ep = await open_udp_endpoint("127.0.0.1", 0)
    transport = Transport(ep, echo, counters, timeout=TIMEOUT, retries=retries)
    outcomes = []
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve)
        nursery.start_soon(peer.serve)
        for _ in range(calls):
            start = trio.current_time()
            outcomes.append(await transport.call(peer.address, "ping", [b"x" * 20]))
            took = trio.current_time() - start
        nursery.cancel_scope.cancel()
    ep.close()
    peer.sock.close()
    return outcomes, took, counters


async def _call_through(peer: LossyPeer, retries: int) -> tuple[tuple[bool, Any], float, Counters]:
    outcomes, took, counters = await _calls_to(peer, retries)
    return outcomes[0], took, counters


async def test_a_lost_request_is_sent_again_within_the_timeout() -> None:
    peer = LossyPeer(drop=1)
    (ok, result), took, counters = await _call_through(peer, retries=1)
    assert (ok, result) == (True, "pong")
    # The copy went out after half the timeout, and the call ended before the timeout.
    assert len(peer.seen) == 2 and peer.seen[0][1] == peer.seen[1][1]  # same bytes, same id
    assert TIMEOUT / 2 * 0.75 <= peer.seen[1][0] - peer.seen[0][0] < TIMEOUT
    assert took < TIMEOUT
    assert counters.resent == 1 and counters.rpcs[("ping", "out", "ok")] == 1


async def test_without_retries_a_lost_request_times_out() -> None:
    peer = LossyPeer(drop=1)
    (ok, _), took, counters = await _call_through(peer, retries=0)
    assert not ok and took >= TIMEOUT
    assert len(peer.seen) == 1 and counters.resent == 0
    assert counters.rpcs[("ping", "out", "timeout")] == 1


async def test_a_silent_peer_still_fails_after_one_timeout() -> None:
    # Two retries, nothing known of the peer: three copies a third of the timeout
    # apart, then the call fails at the timeout.
    peer = LossyPeer(drop=99)
    (ok, _), took, counters = await _call_through(peer, retries=2)
    assert not ok and TIMEOUT <= took < TIMEOUT * 1.5
    assert len(peer.seen) == 3 and counters.resent == 2
    gaps = [b[0] - a[0] for a, b in zip(peer.seen, peer.seen[1:], strict=False)]
    assert all(TIMEOUT / 3 * 0.6 < g < TIMEOUT / 3 * 1.6 for g in gaps), gaps


async def test_a_fast_peer_is_resent_to_soon_after_a_loss() -> None:
    # Three quick answers teach the caller this peer's round trip; the fourth
    # request is lost once and sent again after MIN_RESEND, not half the timeout.
    peer = LossyPeer(drop=1, lossy={3})
    outcomes, took, counters = await _calls_to(peer, retries=1, calls=4)
    assert all(ok for ok, _ in outcomes)
    assert counters.resent == 1 and len(peer.seen) == 5
    gap = peer.seen[4][0] - peer.seen[3][0]
    assert MIN_RESEND * 0.9 <= gap < TIMEOUT / 4, gap
    assert took < TIMEOUT / 4


async def test_a_slow_peer_is_not_resent_to() -> None:
    # It answers every request, 0.4 s late (two thirds of the timeout). After the
    # first (resent: nothing known yet) the estimate says silence that long is its
    # normal: no more copies, which would only add to its load.
    peer = LossyPeer(drop=0, delay=0.4)
    outcomes, _, counters = await _calls_to(peer, retries=1, calls=4)
    assert all(ok for ok, _ in outcomes)
    assert counters.resent == 1 and len(peer.seen) == 5


async def test_a_group_resends_only_what_was_lost() -> None:
    # Many requests in flight from one task (as lookups and stores send them): the
    # two whose first copies are lost are sent again and answered, within the timeout.
    peer = LossyPeer(drop=1, lossy={2, 5})
    counters = Counters()
    ep = await open_udp_endpoint("127.0.0.1", 0)
    transport = Transport(ep, echo, counters, timeout=TIMEOUT, retries=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve)
        nursery.start_soon(peer.serve)
        group: CallGroup[int] = CallGroup(transport)
        start = trio.current_time()
        for i in range(8):
            await group.send(peer.address, "ping", [i], i)
        answers = [await group.next() for _ in range(8)]
        took = trio.current_time() - start
        assert await group.next() is None
        nursery.cancel_scope.cancel()
    ep.close()
    peer.sock.close()
    assert sorted(a[0] for a in answers if a is not None and a[1]) == list(range(8))
    assert counters.resent == 2 and len(peer.seen) == 10
    assert took < TIMEOUT


async def test_no_copy_after_the_latest_moment_even_when_the_loop_stalled() -> None:
    # Nothing known of the peer, two retries: copies due at 0.2 and 0.4 s of a 0.6 s
    # timeout. The event loop is blocked from 0.1 to 0.5 s: by then an answer could
    # only be late, not lost, so no copy goes out (not two back to back).
    peer = LossyPeer(drop=99)

    async def stall() -> None:
        await trio.sleep(0.1)
        time.sleep(0.4)  # noqa: ASYNC251 -- blocks every task, as an overloaded loop would

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stall)
        (ok, _), _, counters = await _call_through(peer, retries=2)
    assert not ok and counters.resent == 0 and len(peer.seen) == 1


async def test_a_peer_that_went_silent_is_not_resent_to_on_its_old_speed() -> None:
    # Three quick answers, then silence: the fourth call is resent soon (its peer
    # was fast) and times out; the timeout raises the estimate, so the fifth call,
    # also unanswered, is not resent at all.
    peer = LossyPeer(drop=99, lossy={3, 4})
    outcomes, _, counters = await _calls_to(peer, retries=1, calls=5)
    assert [ok for ok, _ in outcomes] == [True, True, True, False, False]
    assert counters.resent == 1 and len(peer.seen) == 6


def test_round_trip_estimate() -> None:
    rtt = RoundTrips(max_routes=2)
    a, b, c = (("10.0.0.1", 1), "ping"), (("10.0.0.2", 1), "ping"), (("10.0.0.1", 1), "store")
    assert rtt.resend_after(a) is None
    rtt.observe(a, 0.2)  # first sample: srtt 0.2, rttvar 0.1 -> 0.6
    assert rtt.resend_after(a) == pytest.approx(0.6)
    for _ in range(60):
        rtt.observe(a, 0.2)  # steady: the variation decays
    assert rtt.resend_after(a) == pytest.approx(0.2, abs=0.01)
    rtt.observe(b, 0.001)
    assert rtt.resend_after(b) == MIN_RESEND  # never sooner than the floor
    rtt.observe(a, 0.2)  # a is now the most recently updated
    rtt.observe(c, 0.5)  # another method of the same peer has its own estimate
    assert len(rtt) == 2 and rtt.resend_after(b) is None  # the least recent went
    assert rtt.resend_after(a) == pytest.approx(0.2, abs=0.01)
    assert rtt.resend_after(c) == pytest.approx(1.5)


async def test_answered_calls_are_not_resent_nor_kept() -> None:
    counters = Counters()
    server_ep = await open_udp_endpoint("127.0.0.1", 0)
    client_ep = await open_udp_endpoint("127.0.0.1", 0)
    server = Transport(server_ep, echo, Counters())
    client = Transport(client_ep, echo, counters, timeout=1.0, retries=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        await nursery.start(client.serve)
        group: CallGroup[int] = CallGroup(client)
        for i in range(200):
            await group.send(server_ep.local_address, "ping", [i], i)
        answers = [await group.next() for _ in range(200)]
        assert all(a is not None and a[1] for a in answers)
        await trio.sleep(0.8)  # past every resend time
        assert counters.resent == 0 and client.outstanding == 0
        nursery.cancel_scope.cancel()
    server_ep.close()
    client_ep.close()


async def test_a_copy_of_a_request_being_served_is_dropped() -> None:
    runs = 0

    def slow(name: str, args: list[Any], addr: Address) -> Any:
        async def work() -> str:
            nonlocal runs
            runs += 1
            await trio.sleep(0.3)
            return "stored"
        return Deferred(work, busy="busy")

    counters = Counters()
    ep = await open_udp_endpoint("127.0.0.1", 0)
    transport = Transport(ep, slow, counters)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with client:
        client.bind(("127.0.0.1", 0))
        client.settimeout(2)
        request = b"\x00" + b"m" * 20 + umsgpack.packb(["store_packets", [1]])
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.serve)
            client.sendto(request, ep.local_address)
            await trio.sleep(0.1)
            client.sendto(request, ep.local_address)  # resent while the first is served
            reply = await trio.to_thread.run_sync(client.recvfrom, 9000)
            assert umsgpack.unpackb(reply[0][21:]) == "stored"
            assert runs == 1 and counters.dropped["duplicate_request"] == 1
            # Once answered, a late copy is served again (handlers are idempotent).
            client.sendto(request, ep.local_address)
            await trio.to_thread.run_sync(client.recvfrom, 9000)
            assert runs == 2
            nursery.cancel_scope.cancel()
    ep.close()


def test_rpc_retries_bounds() -> None:
    assert DHTConfig(rpc_retries=0).rpc_retries == 0
    with pytest.raises(ValueError, match=r"rpc_retries must be 0\.\.10"):
        DHTConfig(rpc_retries=11)
    with pytest.raises(ValueError, match=r"rpc_retries must be 0\.\.10"):
        DHTConfig(rpc_retries=-1)
