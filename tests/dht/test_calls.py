"""Many requests from one task: answers, timeouts, abandon, and the node's books."""

from __future__ import annotations

import random
from collections.abc import Callable, Container
from typing import Any

import pytest
import trio
import trio.testing
from kademlia.node import Node
from test_lookup import FakeNet
from test_lookup import K as K_FAKE

from qisd.dht.calls import CallGroup, PeerCalls
from qisd.dht.lookup import Reply, iterate_calls
from qisd.dht.memnet import MemoryNetwork
from qisd.dht.node import open_node
from qisd.dht.simulate import sim_config
from qisd.dht.stats import Counters
from qisd.dht.transport import Transport
from qisd.dht.traverse import LookupState
from qisd.dht.wire import Address
from qisd.identity import Identity


def echo(name: str, args: list[Any], addr: Address) -> Any:
    return [name, args]


async def test_group_answers_timeouts_and_close(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    server_ep, client_ep = net.endpoint(), net.endpoint()
    silent = ("10.9.9.9", 4000)  # no endpoint there: the datagram is lost
    counters = Counters()
    server = Transport(server_ep, echo, Counters())
    client = Transport(client_ep, echo, counters, timeout=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        await nursery.start(client.serve)
        group: CallGroup[int] = CallGroup(client)
        await group.send(silent, "ping", [], 0)
        for tag in (1, 2, 3):
            await group.send(server_ep.local_address, "ping", [tag], tag)
        group.settle(4, False)
        assert group.in_flight == 5
        started = trio.current_time()
        outcomes = []
        while (outcome := await group.next()) is not None:
            outcomes.append(outcome)
        assert sorted(o for o in outcomes if o[1]) == [
            (1, True, ["ping", [1]]),
            (2, True, ["ping", [2]]),
            (3, True, ["ping", [3]]),
        ]
        assert (4, False, None) in outcomes
        assert outcomes[-1] == (0, False, None)  # the silent one, after the timeout
        assert trio.current_time() - started >= 2.0
        assert group.in_flight == 0 and client.outstanding == 0
        assert counters.rpcs[("ping", "out", "timeout")] == 1
        assert counters.rpcs[("ping", "out", "ok")] == 3

        # Closing forgets what is still out; a late answer is dropped and counted.
        late: CallGroup[int] = CallGroup(client)
        await late.send(server_ep.local_address, "ping", [], 9)
        late.close()
        assert client.outstanding == 0 and late.in_flight == 0
        await trio.sleep(0.1)
        assert counters.dropped["unknown_msgid"] == 1
        assert counters.rpcs[("ping", "out", "timeout")] == 1  # abandoned: not a timeout
        nursery.cancel_scope.cancel()


async def test_peer_calls_keep_the_node_books(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    config = sim_config(ksize=8)
    async with (
        open_node(Identity.generate(), endpoint=net.endpoint(), config=config) as a,
        open_node(Identity.generate(), endpoint=net.endpoint(), config=config) as b,
    ):
        await a.bootstrap([b.address])
        live = Node(b.me.id, *b.address)
        gone = Node(b"\x07" * 20, "10.9.9.9", 4000)
        kept = Node(b"\x08" * 20, "10.9.9.8", 4000)
        for contact in (gone, kept):
            a.table.add_contact(contact)
        with PeerCalls(a) as calls:
            await calls.send(live, "ping", [a.me.id])
            await calls.send(gone, "ping", [a.me.id])
            await calls.send(kept, "ping", [a.me.id], evict=False)
            seen = {}
            while (outcome := await calls.next()) is not None:
                seen[outcome[0].id] = outcome[2]
        assert seen == {live.id: True, gone.id: False, kept.id: False}
        # Silence counts against the contact (paper 4.1) only where asked to.
        assert a.table.failures(gone.id) == 1
        assert a.table.failures(kept.id) == 0 and a.table.failures(live.id) == 0
        # Silence puts a peer in backoff: it fails again at once, nothing is sent.
        sent = a.counters.datagrams_out
        with PeerCalls(a) as calls:
            await calls.send(kept, "ping", [a.me.id], evict=False)
            assert await calls.next() == (kept, "ping", False, None)
        assert a.counters.datagrams_out == sent
        # A request skipped for backoff was never sent: it counts against no one.
        with PeerCalls(a) as calls:
            await calls.send(gone, "ping", [a.me.id])
            assert await calls.next() == (gone, "ping", False, None)
        assert await a.call(gone, "ping", [a.me.id]) == (False, None)
        assert a.table.failures(gone.id) == 1
        assert a.counters.datagrams_out == sent


class FakeCalls:
    """Answers from a FakeNet after one scheduler pass; dead nodes never answer.

    With ``heard``, a node names only nodes the asker has not heard of (as
    ``store_value`` leaves out the contacts whose tags the asker sent).
    """

    def __init__(
        self, net: FakeNet, target: bytes, heard: Callable[[], Container[bytes]] | None = None
    ) -> None:
        self.net = net
        self.target = target
        self.heard = heard
        self.ready: list[tuple[Node, str, bool, Any]] = []
        self.sent: list[Node] = []
        self.closed = False
        self.max_in_flight = 0

    async def send(self, peer: Node, name: str, args: list[Any], *, evict: bool = True) -> None:
        self.sent.append(peer)
        nodes = self.net.answer(peer, self.target)
        if nodes is not None and self.heard is not None:
            known = self.heard()
            nodes = [n for n in nodes if n.id not in known]
        self.ready.append((peer, name, nodes is not None, nodes))
        self.max_in_flight = max(self.max_in_flight, len(self.ready))

    async def next(self) -> tuple[Node, str, bool, Any] | None:
        await trio.lowlevel.checkpoint()
        return self.ready.pop(0) if self.ready else None

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("widen", [False, True])
async def test_iterate_calls_finds_the_closest_and_drops_the_dead(widen: bool) -> None:
    net = FakeNet(300, seed=4, dead=0.2)
    rng = random.Random(8)
    alpha = 3
    widened = 0
    for _ in range(10):
        target = rng.randbytes(20)
        st = LookupState(target, net.nodes[:6], width=K_FAKE)
        # Widening lookups send what they heard of, so answers can come back empty.
        calls = FakeCalls(net, target, heard=(lambda st=st: st.hop) if widen else None)

        def request(node: Node) -> tuple[str, list[Any], bool]:
            return "find_node", [], True

        def parse(node: Node, name: str, result: Any) -> Reply | None:
            return Reply(list(result))

        stats = await iterate_calls(st, calls, request, parse, alpha=alpha, widen=widen)
        assert [n.id for n in st.closest()] == net.truth(target, K_FAKE)
        assert calls.closed and stats.rpcs == len(calls.sent)
        assert stats.failures == sum(1 for n in calls.sent if n.id in net.dead)
        if widen:
            widened += calls.max_in_flight > alpha
        else:
            assert calls.max_in_flight <= alpha
    # Once a node names nothing new, the rest of the closest are asked at once.
    assert not widen or widened >= 1


async def test_iterate_calls_stops_on_reply_and_skips_unasked() -> None:
    net = FakeNet(100, seed=5)
    target = bytes(20)
    st = LookupState(target, net.nodes[:10], width=K_FAKE)
    calls = FakeCalls(net, target)
    first = min(net.nodes[:10], key=lambda n: n.distance_to(Node(target)))
    skipped = {first.id}  # would be asked first: fails without a request

    def request(node: Node) -> tuple[str, list[Any], bool] | None:
        return None if node.id in skipped else ("find_value", [], True)

    def parse(node: Node, name: str, result: Any) -> Reply | None:
        return Reply(list(result), payload="value")

    stats = await iterate_calls(
        st, calls, request, parse, alpha=3, on_reply=lambda node, reply: True
    )
    assert len(calls.sent) == 2 and first not in calls.sent
    assert stats.failures == 1 and stats.rpcs == 3 and calls.closed
