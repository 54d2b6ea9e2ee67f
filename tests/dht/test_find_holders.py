"""A key's FIND_PACKET_IDS lookup stops at ``find_holders`` holders (real UDP, 127.0.0.1).

One swarm of ten stores and one store-less querier. The querier runs each lookup
twice, once as before (``find_holders`` out of reach: every one of the ``replicas``
closest nodes is asked) and once with the default early stop, and the test compares
the find_packet_ids requests sent, the bytes every node sent, and the results.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from dht_helpers import Swarm, make_packet, member
from kademlia.node import Node

from qisd.dht import DHTConfig, DHTNode
from qisd.dht.search import holders_among_closest
from qisd.dht.traverse import LookupState
from qisd.identity import Identity
from qisd.manifest import DEFAULT_MANIFEST
from qisd.packet import OutcomePacket
from qisd.sketch import Sketch

N = 10
CONFIG = DHTConfig(rpc_timeout=0.5)
#: ``find_holders`` no lookup reaches: it runs to its natural end, as before.
FULL = 1_000_000


class Meter:
    """find_packet_ids requests a node sends, and the bytes all nodes send meanwhile."""

    def __init__(self, querier: DHTNode, nodes: Sequence[DHTNode]) -> None:
        self.nodes = [querier, *nodes]
        self.requests = 0
        ops = querier.packets
        real = ops.packet_call

        async def counting(peer: Node, name: str, args: list[Any]) -> tuple[bool, Any]:
            if name == "find_packet_ids":
                self.requests += 1
            return await real(peer, name, args)

        ops.packet_call = counting  # type: ignore[method-assign]

    def sent(self) -> int:
        return sum(n.statistics().bytes_out for n in self.nodes)

    async def wait_quiet(self) -> None:
        """Until nobody sends for a while: late answers to cancelled requests count."""
        last = -1
        with trio.fail_after(10):
            while (now := self.sent()) != last:
                last = now
                await trio.sleep(0.2)

    async def measure(
        self, querier: DHTNode, holders: int, keys: list[bytes], query: Sketch, m: int
    ) -> tuple[list[bytes], int, int]:
        """Packet ids found, requests sent and bytes sent by all, for one query."""
        querier.config = dataclasses.replace(querier.config, find_holders=holders)
        await self.wait_quiet()
        requests, sent = self.requests, self.sent()
        found = await querier.find_packets(keys, query, m)
        await self.wait_quiet()
        return [p.id for _, p in found], self.requests - requests, self.sent() - sent


async def open_swarm(nursery: Any, tmp: Path) -> Swarm:
    swarm = Swarm(nursery, tmp, config=CONFIG)
    first = await swarm.start(0)
    for i in range(1, N):
        m = await swarm.start(i)
        await m.node.bootstrap([first.node.address])
    for m in swarm.members.values():
        await m.node.bootstrap([first.node.address])
    assert all(len(m.node.table) == N - 1 for m in swarm.members.values())
    return swarm


def closest_members(swarm: Swarm, key: bytes, count: int) -> list[int]:
    target = Node(key)
    order = sorted(swarm.members, key=lambda i: swarm.members[i].node.me.distance_to(target))
    return order[:count]


async def place(swarm: Swarm, key: bytes, packets: list[OutcomePacket]) -> None:
    report = await swarm.members[0].node.packets.place(key, packets)
    assert report.stored == DEFAULT_MANIFEST.replicas


def held(swarm: Swarm, i: int, key: bytes) -> set[bytes]:
    m = swarm.members[i]
    query = make_packet(m.identity, random.Random(0)).sketch
    return {p.id for _, p in m.store.top(key, query, 1000, now_ms=m.node.wall_ms())}


async def test_early_stop_bounds_rpcs_and_bytes_and_keeps_the_top_m(tmp_path: Path) -> None:
    rng = random.Random(7)
    replicas, alpha = DEFAULT_MANIFEST.replicas, CONFIG.alpha
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            swarm = await open_swarm(nursery, tmp_path)
            origin = swarm.members[0].identity
            keys = [rng.randbytes(20) for _ in range(4)]
            for key in keys:
                await place(swarm, key, [make_packet(origin, rng) for _ in range(12)])
            # A bucket over one datagram: the holders page on (``more``).
            big = rng.randbytes(20)
            await place(swarm, big, [make_packet(origin, rng) for _ in range(80)])
            for key in [*keys, big]:
                assert all(held(swarm, i, key) for i in closest_members(swarm, key, replicas))

            async with member(Identity.generate(), None, config=CONFIG) as q:
                await q.node.bootstrap([swarm.members[0].node.address])
                assert len(q.node.table) == N
                meter = Meter(q.node, [m.node for m in swarm.members.values()])
                # Warm up: the swarm's reactions to the new contact (hand-off offers to
                # it, table updates) are over before anything is counted.
                await q.node.find_packets([*keys, big], make_packet(origin, rng).sketch, 1)
                cases = [([key], m) for key in keys for m in (1, 5, 12)] + [([big], 80)]
                for key_list, m in cases:
                    query = make_packet(origin, rng).sketch
                    full_ids, full_rpcs, full_bytes = await meter.measure(
                        q.node, FULL, key_list, query, m
                    )
                    ids, rpcs, sent = await meter.measure(q.node, 2, key_list, query, m)
                    assert ids == full_ids and len(ids) == m
                    # Every one of the replicas closest before (paging aside); now
                    # alpha in flight plus one sent after the first holder answered.
                    assert full_rpcs >= replicas
                    if m <= 12:
                        assert full_rpcs == replicas
                        assert rpcs <= alpha + 2 - 1
                        # Answers carry ids, not packets, and the packets are fetched
                        # once either way: a third fewer lookup RPCs, ~20% fewer bytes.
                        assert sent <= 0.85 * full_bytes, (sent, full_bytes)
                    else:
                        assert rpcs < full_rpcs

            nursery.cancel_scope.cancel()


async def test_a_partial_closest_holder_is_covered_by_the_union(tmp_path: Path) -> None:
    """The closest replica lacks the newest packets (a fresh closest node that
    hand-off has not filled, a replica that was down during a put): the union of two
    holders still has them."""
    rng = random.Random(8)
    replicas = DEFAULT_MANIFEST.replicas
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            swarm = await open_swarm(nursery, tmp_path)
            origin = swarm.members[0].identity
            key = rng.randbytes(20)
            old = [make_packet(origin, rng) for _ in range(6)]
            await place(swarm, key, old)
            closest = closest_members(swarm, key, replicas)
            # The newest packets reach every replica but the closest one.
            new = [make_packet(origin, rng) for _ in range(6)]
            for i in closest[1:]:
                await swarm.members[i].node.packets.store_local(key, new, "local")
            assert held(swarm, closest[0], key) == {p.id for p in old}

            async with member(Identity.generate(), None, config=CONFIG) as q:
                await q.node.bootstrap([swarm.members[0].node.address])
                meter = Meter(q.node, [m.node for m in swarm.members.values()])
                for packet in new:
                    ids, rpcs, _ = await meter.measure(q.node, 2, [key], packet.sketch, 12)
                    assert set(ids) == {p.id for p in old + new}
                    assert rpcs < replicas
                    ids, _, _ = await meter.measure(q.node, 2, [key], packet.sketch, 1)
                    assert ids == [packet.id]
            nursery.cancel_scope.cancel()


async def test_no_holder_runs_the_lookup_to_its_end(tmp_path: Path) -> None:
    rng = random.Random(9)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            swarm = await open_swarm(nursery, tmp_path)
            async with member(Identity.generate(), None, config=CONFIG) as q:
                await q.node.bootstrap([swarm.members[0].node.address])
                meter = Meter(q.node, [m.node for m in swarm.members.values()])
                query = make_packet(swarm.members[0].identity, rng).sketch
                ids, rpcs, _ = await meter.measure(q.node, 2, [rng.randbytes(20)], query, 5)
                assert ids == [] and rpcs == DEFAULT_MANIFEST.replicas
            nursery.cancel_scope.cancel()


async def test_dead_replicas_do_not_block_the_stop(tmp_path: Path) -> None:
    """Two of the three closest replicas are gone: their slots pass to the next
    closest, and the lookup still stops at two live holders with every packet."""
    rng = random.Random(10)
    replicas = DEFAULT_MANIFEST.replicas
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            swarm = await open_swarm(nursery, tmp_path)
            origin = swarm.members[0].identity
            key = rng.randbytes(20)
            packets = [make_packet(origin, rng) for _ in range(8)]
            await place(swarm, key, packets)
            closest = closest_members(swarm, key, replicas)
            entry = next(i for i in swarm.members if i not in closest[:2])
            async with member(Identity.generate(), None, config=CONFIG) as q:
                await q.node.bootstrap([swarm.members[entry].node.address])
                for i in closest[:2]:
                    await swarm.stop(i)
                found = await q.node.find_packets([key], packets[0].sketch, 8)
                assert {p.id for _, p in found} == {p.id for p in packets}
            nursery.cancel_scope.cancel()


def _node(distance: int) -> Node:
    return Node(distance.to_bytes(20, "big"))


@pytest.mark.parametrize("here", [None, 3, 9])
def test_only_holders_among_the_closest_known_count(here: int | None) -> None:
    """A node passed on the way (far from the key, maybe an old partial copy) stops
    counting once closer nodes are known; this node counts where it ranks."""
    st = LookupState(bytes(20), [_node(d) for d in (100, 200, 300)], width=3)
    far = {_node(100).id, _node(200).id}
    me = None if here is None else _node(here)
    # Only the far seeds are known: they are the closest known, so they count.
    assert holders_among_closest(st, far, here=me) == (2 if here is None else 3)
    st.next_batch(3)
    st.answered(_node(100), [_node(d) for d in (1, 2, 4)])
    # Closer nodes are known now: the far holders are out of the window.
    assert holders_among_closest(st, far, here=me) == (1 if here == 3 else 0)
    near = far | {_node(1).id, _node(2).id}
    assert holders_among_closest(st, near, here=me) == 2 + (here == 3)
    # A node that fails leaves the window; the next closest known takes its slot
    # (here the far holder 100: nothing closer is known).
    assert [n.id for n in st.next_batch(3)] == [_node(d).id for d in (1, 2, 4)]
    st.failed(_node(1))
    assert holders_among_closest(st, near, here=me) == 2
