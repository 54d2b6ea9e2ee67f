"""Iterative lookups: the pure state machine and the trio driver over a fake network."""

from __future__ import annotations

import random

import trio
import trio.testing
from kademlia.node import Node

from qisd.dht.lookup import Reply, iterate
from qisd.dht.traverse import LookupState

K = 8


class FakeNet:
    """Every node knows the K nodes closest to any target among a random half of the
    network: enough to route, not enough to answer in one hop."""

    def __init__(self, n: int, seed: int = 1, dead: float = 0.0) -> None:
        rng = random.Random(seed)
        self.nodes = [Node(rng.randbytes(20), "10.0.0.1", 1000 + i) for i in range(n)]
        self.dead = {x.id for x in rng.sample(self.nodes, int(n * dead))}
        self.known = {x.id: rng.sample(self.nodes, n // 2) for x in self.nodes}

    def answer(self, asked: Node, target: bytes) -> list[Node] | None:
        if asked.id in self.dead:
            return None
        t = Node(target)
        return sorted(self.known[asked.id], key=lambda x: x.distance_to(t))[:K]

    def truth(self, target: bytes, k: int) -> list[bytes]:
        t = Node(target)
        live = [x for x in self.nodes if x.id not in self.dead]
        return [x.id for x in sorted(live, key=lambda x: x.distance_to(t))[:k]]


def run_sync(net: FakeNet, state: LookupState, alpha: int) -> None:
    """Drive the state with no I/O: answers arrive in order."""
    while not state.done:
        batch = state.next_batch(alpha - state.in_flight)
        assert batch, "not done but nothing to ask"
        for node in batch:
            nodes = net.answer(node, state.target.id)
            if nodes is None:
                state.failed(node)
            else:
                state.answered(node, nodes)


def test_state_finds_true_closest() -> None:
    net = FakeNet(400)
    rng = random.Random(9)
    for _ in range(20):
        target = rng.randbytes(20)
        st = LookupState(target, net.nodes[:3], width=K)
        run_sync(net, st, alpha=3)
        assert [n.id for n in st.closest()] == net.truth(target, K)
        assert st.max_hop >= 1 and st.rpcs >= K


def test_state_drops_dead_nodes_and_terminates() -> None:
    net = FakeNet(400, dead=0.3)
    rng = random.Random(3)
    failures = 0
    for _ in range(20):
        target = rng.randbytes(20)
        seeds = [n for n in net.nodes if n.id not in net.dead][:3]
        st = LookupState(target, seeds, width=K)
        run_sync(net, st, alpha=3)
        got = [n.id for n in st.closest()]
        assert not set(got) & net.dead
        assert got == net.truth(target, K)
        failures += st.failures
    assert failures > 0


def test_state_edge_cases() -> None:
    st = LookupState(b"\x00" * 20, [], width=K)
    assert st.done and st.next_batch(3) == [] and st.closest() == []
    me = Node(b"\x01" * 20)
    st = LookupState(b"\x00" * 20, [me], width=K, exclude=[me.id])
    assert st.done
    seed = Node(b"\x02" * 20)
    st = LookupState(b"\x00" * 20, [seed], width=K)
    [asked] = st.next_batch(3)
    st.answered(asked, [seed, seed])  # duplicates and the asker itself change nothing
    assert st.done and st.closest() == [seed]


async def test_driver_keeps_alpha_in_flight_and_counts_hops() -> None:
    net = FakeNet(300, dead=0.2)
    active = 0
    peak = 0

    async def find(node: Node) -> Reply | None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await trio.sleep(0.01 if node.id not in net.dead else 1.0)
        finally:
            active -= 1
        nodes = net.answer(node, target)
        return None if nodes is None else Reply(nodes)

    target = b"\x42" * 20
    seeds = [n for n in net.nodes if n.id not in net.dead][:3]
    st = LookupState(target, seeds, width=K)
    stats = await iterate(st, find, alpha=3)
    assert peak == 3
    assert [n.id for n in st.closest()] == net.truth(target, K)
    assert stats.rpcs == st.rpcs and stats.failures == st.failures and stats.hops == st.max_hop
    assert stats.hops >= 2


async def test_driver_stops_at_first_value_and_cancels_the_rest() -> None:
    net = FakeNet(200)
    cancelled = 0
    target = b"\x11" * 20
    holder = net.truth(target, 1)[0]

    async def find(node: Node) -> Reply | None:
        nonlocal cancelled
        try:
            await trio.sleep(0.01 if node.id == holder else 0.02)
        except trio.Cancelled:
            cancelled += 1
            raise
        if node.id == holder:
            return Reply([], payload="value")
        return Reply(net.answer(node, target) or [])

    found = []

    def on_reply(node: Node, reply: Reply) -> bool:
        if reply.payload is not None:
            found.append(reply.payload)
            return True
        return False

    st = LookupState(target, net.nodes[:3], width=K)
    with trio.fail_after(5):
        await iterate(st, find, alpha=3, on_reply=on_reply)
    assert found == ["value"]
    assert cancelled > 0  # requests still in flight were abandoned
