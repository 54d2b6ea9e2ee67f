"""A search fetches ids first, then only the best packets (real UDP, 127.0.0.1).

One swarm of eight stores and one store-less querier, every packet of a key at its
``replicas`` closest nodes. The querier's ``packet_call`` is wrapped to see what it
asks for; the holders' serving methods are wrapped to make them lie or withhold.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from dht_helpers import Swarm, make_packet, member
from kademlia.node import Node

from qisd.dht import DHTConfig, DHTNode
from qisd.dht.paging import get_reply
from qisd.dht.search import Offers
from qisd.dht.wire import MAX_PAYLOAD
from qisd.identity import Identity
from qisd.manifest import DEFAULT_MANIFEST
from qisd.packet import OutcomePacket
from qisd.sketch import Sketch, cosine
from qisd.storage import StoreError

N = 8
CONFIG = DHTConfig(rpc_timeout=0.5)


class Calls:
    """What the querier asked: ``get_packets`` calls and the ids in them."""

    def __init__(self, querier: DHTNode) -> None:
        self.gets = 0
        self.ids_asked: list[bytes] = []
        ops = querier.packets
        real = ops.packet_call

        async def counting(peer: Node, name: str, args: list[Any]) -> tuple[bool, Any]:
            if name == "get_packets":
                self.gets += 1
                self.ids_asked += args[1]
            return await real(peer, name, args)

        ops.packet_call = counting  # type: ignore[method-assign]


@asynccontextmanager
async def swarm_with(
    tmp: Path, packets: list[OutcomePacket], key: bytes
) -> AsyncIterator[tuple[Swarm, DHTNode]]:
    async with trio.open_nursery() as nursery:
        swarm = Swarm(nursery, tmp, config=CONFIG)
        first = await swarm.start_joined(N)
        report = await first.node.packets.place(key, packets)
        assert report.stored == DEFAULT_MANIFEST.replicas
        async with member(Identity.generate(), None, config=CONFIG) as q:
            await q.node.bootstrap([first.node.address])
            yield swarm, q.node
        nursery.cancel_scope.cancel()


def scene(seed: int, count: int) -> tuple[random.Random, bytes, list[OutcomePacket], Sketch]:
    """A seeded rng, a key, ``count`` packets of one origin, and a query sketch."""
    rng = random.Random(seed)
    origin, key = Identity.generate(), rng.randbytes(20)
    packets = [make_packet(origin, rng) for _ in range(count)]
    return rng, key, packets, make_packet(origin, rng).sketch


@dataclass
class TwoHolders:
    """A swarm, a querier, two real holders of the key, and the truth to check."""

    q: DHTNode
    honest: Node
    liar: Node
    query: Sketch
    order: list[bytes]
    sims: dict[bytes, float]

    async def fetch(self, offers: Offers, m: int) -> list[bytes]:
        found: dict[bytes, Any] = {}
        await self.q.packets.search.fetch_best(found, offers, self.query, m,
                                               now_ms=self.q.wall_ms())
        best = sorted(found.values(), key=lambda item: (-item[0], item[1].id))[:m]
        return [p.id for _, p in best]


@asynccontextmanager
async def two_holders(tmp: Path, seed: int) -> AsyncIterator[TwoHolders]:
    _, key, packets, query = scene(seed, 30)
    sims = {p.id: cosine(query, p.sketch) for p in packets}
    async with swarm_with(tmp, packets, key) as (swarm, q):
        honest, liar = holders_of(swarm, key)[:2]
        yield TwoHolders(q, honest, liar, query, truth(packets, query), sims)


def truth(packets: list[OutcomePacket], query: Sketch) -> list[bytes]:
    """Every packet id, best first (ties by id), as the search must rank them."""
    ranked = sorted(packets, key=lambda p: (-cosine(query, p.sketch), p.id))
    return [p.id for p in ranked]


async def test_only_the_best_packets_cross_once(tmp_path: Path) -> None:
    _, key, packets, query = scene(1, 30)
    with trio.fail_after(60):
        async with swarm_with(tmp_path, packets, key) as (_, q):
            calls = Calls(q)
            found = await q.find_packets([key], query, 5)
            assert [p.id for _, p in found] == truth(packets, query)[:5]
            assert all(abs(s - cosine(query, p.sketch)) < 1e-9 for s, p in found)
            # Two holders reported the same five ids: each fetched once, in one call.
            assert sorted(calls.ids_asked) == sorted(p.id for _, p in found)
            assert calls.gets == 1


def holders_of(swarm: Swarm, key: bytes) -> list[Node]:
    target = Node(key)
    nodes = sorted((m.node.me for m in swarm.members.values()), key=target.distance_to)
    return nodes[: DEFAULT_MANIFEST.replicas]


async def test_a_node_that_overstates_or_invents_is_dropped_with_its_reports(
    tmp_path: Path,
) -> None:
    """One honest holder reports the true top five; a second real holder reports
    the worst packet as a perfect match and twenty ids of nothing just below it.
    The first round fetches the inventions from it (they top the ranking) and
    catches it; everything it said goes, and the true top five are fetched next."""
    rng = random.Random(2)
    with trio.fail_after(60):
        async with two_holders(tmp_path, 2) as t:
            offers = Offers()
            for pid in t.order[:5]:
                offers.add(pid, t.sims[pid], t.honest)
            offers.add(t.order[-1], 1.0, t.liar)
            for _ in range(20):
                offers.add(rng.randbytes(16), 0.999, t.liar)
            calls = Calls(t.q)
            assert await t.fetch(offers, 5) == t.order[:5]
            assert all(t.liar.id not in r for r in offers.reports.values())
            assert calls.gets == 2
            assert dict(t.q.statistics().query_peers_dropped) == {"withheld": 1}


async def test_an_overstated_figure_alone_gets_a_node_dropped(tmp_path: Path) -> None:
    """The second holder returns everything it offered, but said the worst packet
    was a perfect match: it is dropped with its other reports all the same."""
    with trio.fail_after(60):
        async with two_holders(tmp_path, 7) as t:
            offers = Offers()
            for pid in t.order[:6]:
                offers.add(pid, t.sims[pid], t.honest)
            for pid in t.order[1:4]:
                offers.add(pid, t.sims[pid], t.liar)
            offers.add(t.order[-1], 1.0, t.liar)
            offers.add(t.order[10], t.sims[t.order[10]], t.liar)  # only it reported this
            assert await t.fetch(offers, 5) == t.order[:5]
            assert all(t.liar.id not in r for r in offers.reports.values())
            assert t.order[10] not in offers.reports
            assert dict(t.q.statistics().query_peers_dropped) == {"overstated": 1}


async def test_a_holder_that_says_more_forever_costs_one_call(tmp_path: Path) -> None:
    _, key, packets, query = scene(8, 30)
    junk = make_packet(Identity.generate(), random.Random(0)).encoded
    with trio.fail_after(60):
        async with swarm_with(tmp_path, packets, key) as (swarm, q):
            for m in swarm.members.values():

                async def endless(ids: list[bytes]) -> dict[str, Any]:
                    return {"packets": [junk], "more": True}

                m.node.packets.serve_get = endless  # type: ignore[method-assign]
            calls = Calls(q)
            assert await q.find_packets([key], query, 5) == []
            # Each holder asked once; nothing it says keeps the loop going.
            assert calls.gets <= DEFAULT_MANIFEST.replicas


async def test_a_reply_with_a_similarity_no_cosine_can_have_is_refused(tmp_path: Path) -> None:
    rng, key, packets, query = scene(5, 12)
    with trio.fail_after(60):
        async with swarm_with(tmp_path, packets, key) as (swarm, q):
            for m in swarm.members.values():
                ops = m.node.packets
                real = ops.serve_find

                async def boasting(*args: Any, _real: Any = real, **kw: Any) -> dict[str, Any]:
                    reply: dict[str, Any] = await _real(*args, **kw)
                    if reply.get("ids"):
                        reply["ids"] = [rng.randbytes(16), *reply["ids"]]
                        reply["sims"] = [1e300, *reply["sims"]]
                    return reply

                ops.serve_find = boasting  # type: ignore[method-assign]
            before = q.statistics().dropped.get("bad_reply", 0)
            assert await q.find_packets([key], query, 5) == []
            assert q.statistics().dropped.get("bad_reply", 0) > before


async def test_a_querier_that_holds_its_best_fetches_nothing(tmp_path: Path) -> None:
    _, key, packets, query = scene(6, 20)
    with trio.fail_after(60):
        async with swarm_with(tmp_path, packets, key) as (swarm, _):
            holder_id = holders_of(swarm, key)[0].id
            holder = next(m.node for m in swarm.members.values() if m.node.me.id == holder_id)
            calls = Calls(holder)
            found = await holder.find_packets([key], query, 5)
            assert [p.id for _, p in found] == truth(packets, query)[:5]
            assert calls.gets == 0


async def test_a_packet_no_holder_returns_is_left_out_after_one_retry(tmp_path: Path) -> None:
    """The best packet is reported but every holder withholds it: one holder is
    asked, then all the others that reported it at once; then it is left out and
    the other four stand (the holders reported their top five: nobody named a
    sixth)."""
    _, key, packets, query = scene(3, 30)
    order = truth(packets, query)
    best = order[0]
    with trio.fail_after(60):
        async with swarm_with(tmp_path, packets, key) as (swarm, q):
            for m in swarm.members.values():
                ops = m.node.packets
                real = ops.serve_get

                async def withholding(ids: list[bytes], _real: Any = real) -> dict[str, Any]:
                    reply: dict[str, Any] = await _real([i for i in ids if i != best])
                    return reply

                ops.serve_get = withholding  # type: ignore[method-assign]
            calls = Calls(q)
            found = await q.find_packets([key], query, 5)
            assert [p.id for _, p in found] == order[1:5]
            # Asked of each holder that reported it (at least find_holders), once.
            asked = calls.ids_asked.count(best)
            assert CONFIG.find_holders <= asked <= DEFAULT_MANIFEST.replicas
            assert calls.gets == 1 + (asked - 1)


async def test_more_packets_than_a_datagram_holds_come_in_several_calls(
    tmp_path: Path,
) -> None:
    """m = 90: ids page past the 64 a reply carries, and the packets come in as many
    get_packets calls as their bytes need, all from the one holder asked."""
    _, key, packets, query = scene(4, 100)
    per_reply = MAX_PAYLOAD // max(len(p.encoded) for p in packets)
    with trio.fail_after(60):
        async with swarm_with(tmp_path, packets, key) as (_, q):
            calls = Calls(q)
            found = await q.find_packets([key], query, 90)
            assert [p.id for _, p in found] == truth(packets, query)[:90]
            assert sorted(calls.ids_asked) != [] and len(set(calls.ids_asked)) == 90
            # Each reply as full as fits: no more calls than the bytes need, plus
            # one where a 64-id request ends.
            assert -(-90 // per_reply) <= calls.gets <= -(-90 // per_reply) + 2


def test_get_reply_keeps_the_order_asked_and_says_more() -> None:
    raws = [bytes([i]) * 1000 for i in range(12)]
    reply = get_reply(raws)
    assert reply["packets"] == raws[: len(reply["packets"])]
    assert 0 < len(reply["packets"]) < 12 and reply["more"] is True
    assert get_reply(raws[:3]) == {"packets": raws[:3], "more": False}


class _FailingConnection:
    """A SQLite connection whose every statement fails as a dying disk's would."""

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    def close(self) -> None:
        pass


async def test_a_holder_whose_own_store_cannot_be_read_still_answers_from_peers(
    tmp_path: Path,
) -> None:
    """A disk that fails under a node's store must not fail its queries: what the
    other holders have still answers them (the local read is counted and logged)."""
    _, key, packets, query = scene(4, 30)
    with trio.fail_after(60):
        async with swarm_with(tmp_path, packets, key) as (swarm, _):
            holder_id = holders_of(swarm, key)[0].id
            holder = next(m for m in swarm.members.values() if m.node.me.id == holder_id)
            store = holder.store
            store._buckets.clear()
            store._conn = _FailingConnection()  # type: ignore[assignment]
            store._reader = _FailingConnection()  # type: ignore[assignment]
            with pytest.raises(StoreError, match="read failed, the disk failed"):
                store.top(key, query, 5, now_ms=holder.node.wall_ms())
            found = await holder.node.find_packets([key], query, 5)
            assert [p.id for _, p in found] == truth(packets, query)[:5]
            assert holder.node.counters.dropped["store_read_error"] >= 1
