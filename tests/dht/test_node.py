"""A few real nodes on 127.0.0.1 (UDP, port 0): base RPCs, packets, state, listen."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from dht_helpers import eventually, make_packet, member, running_swarm, vector
from kademlia.node import Node

from qisd.dht import DHTConfig, open_node
from qisd.dht.routing import ADDED
from qisd.dht.state import FILE_NAME
from qisd.fingerprint import keys_for
from qisd.identity import Identity
from qisd.manifest import DEFAULT_MANIFEST, Manifest
from qisd.packet import PacketError
from qisd.sketch import make_sketch


async def test_ping_find_set_get_and_statistics(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with (
            member(Identity.generate(), tmp_path / "a") as a,
            member(Identity.generate(), tmp_path / "b") as b,
            member(Identity.generate(), tmp_path / "c") as c,
        ):
            assert await b.node.ping(a.node.address) is not None
            found = await c.node.bootstrap([a.node.address])
            assert {n.id for n in found} == {a.node.me.id, b.node.me.id}
            assert await a.node.set("colour", "blue")
            assert await c.node.get("colour") == "blue"
            assert await b.node.get("absent") is None
            stats = a.node.statistics()
            assert stats.peers == 2 and stats.buckets >= 1
            assert stats.rpcs[("ping", "in", "ok")] >= 1
            # A lookup whose query is the value's store (the fused set) counts as store_value.
            out_ok = stats.rpcs.get(("find_node", "out", "ok"), 0)
            out_ok += stats.rpcs.get(("store_value", "out", "ok"), 0)
            assert out_ok >= 1
            assert stats.bytes_in > 0 and stats.bytes_out > 0
            assert stats.lookups >= 1 and stats.lookup_rpcs.count == stats.lookups
            timed = [stats.rpc_latency[m].count for m in ("find_node", "store_value")
                     if m in stats.rpc_latency]
            assert sum(timed) >= 1
            with pytest.raises(TypeError):
                await a.node.set("k", [1, 2])  # type: ignore[arg-type]


async def test_a_failing_background_task_is_counted_not_fatal(tmp_path: Path) -> None:
    """E.g. caching a found value that fits a reply but not a store request."""

    async def boom() -> None:
        raise ValueError("an odd peer's value")

    with trio.fail_after(10):
        async with member(Identity.generate(), tmp_path / "a") as a, member(
            Identity.generate(), tmp_path / "b"
        ) as b:
            assert a.node.spawn(boom)
            await eventually(lambda: a.node.statistics().task_errors == 1)
            assert await b.node.ping(a.node.address) is not None  # still serving


async def test_single_node_stores_and_answers_its_own_queries(tmp_path: Path) -> None:
    rng = random.Random(1)
    ident = Identity.generate()
    async with member(ident, tmp_path) as solo:
        packet = make_packet(ident, rng)
        report = await solo.node.put_packet(packet)
        assert report.ok and all(p.local for p in report.placements)
        assert len(report.placements) == DEFAULT_MANIFEST.tables
        keys = [p.key for p in report.placements]
        found = await solo.node.find_packets(keys, packet.sketch, 5)
        assert [p.id for _, p in found] == [packet.id]
        assert found[0][0] == pytest.approx(1.0, abs=1e-6)
        delivery = solo.node.deliveries.receive_nowait()
        assert delivery.packet == packet and delivery.source == "local"
        # Other keys of the packet went to the same store: one delivery only.
        with pytest.raises(trio.WouldBlock):
            solo.node.deliveries.receive_nowait()
        assert await solo.node.set("x", 1) and await solo.node.get("x") == 1


async def test_put_refuses_inadmissible_packets(tmp_path: Path) -> None:
    rng = random.Random(2)
    ident = Identity.generate()
    other = Manifest(name="other-swarm")
    async with member(ident, tmp_path) as solo:
        with pytest.raises(PacketError) as info:
            await solo.node.put_packet(make_packet(ident, rng, manifest=other))
        assert info.value.reason == "wrong_swarm"


async def test_packets_placed_and_found_across_nodes(tmp_path: Path) -> None:
    rng = random.Random(3)
    manifest = Manifest(replicas=2)
    ids = [Identity.generate() for _ in range(5)]
    with trio.fail_after(30):
        async with (
            member(ids[0], tmp_path / "0", manifest=manifest) as n0,
            member(ids[1], tmp_path / "1", manifest=manifest) as n1,
            member(ids[2], tmp_path / "2", manifest=manifest) as n2,
            member(ids[3], tmp_path / "3", manifest=manifest) as n3,
            member(ids[4], tmp_path / "4", manifest=manifest) as n4,
        ):
            nodes = [n0, n1, n2, n3, n4]
            for m in nodes[1:]:
                await m.node.bootstrap([n0.node.address])
            packet = make_packet(ids[1], rng, manifest=manifest)
            report = await n1.node.put_packet(packet)
            assert report.ok
            assert all(p.stored == 2 and p.failed == 0 for p in report.placements)
            keys = [p.key for p in report.placements]
            for m in nodes:
                found = await m.node.find_packets(keys, packet.sketch, 3)
                assert [p.id for _, p in found] == [packet.id]
            # Responsible nodes got a delivery each time they stored a new packet.
            delivered = sum(m.node.statistics().deliveries for m in nodes)
            assert delivered >= 2


async def test_store_packets_rpc_rejects_bad_packets_with_reasons(tmp_path: Path) -> None:
    rng = random.Random(4)
    ident = Identity.generate()
    async with member(ident, tmp_path / "a") as a, member(Identity.generate(), tmp_path / "b") as b:
        good = make_packet(ident, rng)
        foreign = make_packet(ident, rng, manifest=Manifest(name="elsewhere"))
        tampered = bytearray(make_packet(ident, rng).encoded)
        tampered[-1] ^= 1
        key = b"\x07" * 20
        ok, reply = await b.node.transport.call(
            a.node.address,
            "store_packets",
            [b.node.me.id, key, [good.encoded, foreign.encoded, bytes(tampered), b"junk"]],
        )
        assert ok and reply["nodes"] == []  # a knows no node closer than itself but b
        assert reply["status"] == [
            "stored",
            "rejected:wrong_swarm",
            "rejected:bad_signature",
            "rejected:malformed",
        ]
        ok, again = await b.node.transport.call(
            a.node.address, "store_packets", [b.node.me.id, key, [good.encoded]]
        )
        assert ok and again["status"] == ["duplicate"]


async def test_find_packets_pages_past_one_datagram(tmp_path: Path) -> None:
    rng = random.Random(5)
    ident = Identity.generate()
    key = b"\x33" * 20
    base = vector(rng)
    packets = [
        make_packet(ident, rng, vec=[x + rng.gauss(0, 0.3) for x in base], outcome={"s": "x" * 60})
        for _ in range(70)
    ]
    async with member(ident, tmp_path / "a") as a, member(Identity.generate(), tmp_path / "b") as b:
        await b.node.bootstrap([a.node.address])
        placement = await a.node.packets.place(key, packets)
        assert placement.stored >= 1
        query = make_sketch(base)
        found = await b.node.find_packets([key], query, 70)
        # Far more than fit one 8 KiB reply, and more than one request may ask for.
        assert len(found) == 70
        assert [s for s, _ in found] == sorted((s for s, _ in found), reverse=True)
        top5 = await b.node.find_packets([key], query, 5)
        assert [p.id for _, p in top5] == [p.id for _, p in found[:5]]


async def test_state_file_restores_contacts(tmp_path: Path) -> None:
    ida, idb = Identity.generate(), Identity.generate()
    async with member(ida, tmp_path / "a") as a:
        port = a.node.address[1]
        async with member(idb, tmp_path / "b") as b:
            await b.node.bootstrap([a.node.address])
            # Saved at the join, not only every save_interval or at a clean stop: a
            # node killed now still knows its contacts when it restarts.
            assert (tmp_path / "b" / FILE_NAME).exists()
        saved = msgpack.unpackb((tmp_path / "b" / FILE_NAME).read_bytes(), raw=False)
        assert [c[0] for c in saved["contacts"]] == [ida.node_id]
        async with member(idb, tmp_path / "b") as b2:
            # Known from the file before any bootstrap.
            assert b2.node.table.get(ida.node_id) is not None
            assert b2.node.table.get(ida.node_id).port == port  # type: ignore[union-attr]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / FILE_NAME).write_bytes(b"\x92not state")
    async with member(Identity.generate(), tmp_path / "c") as c:  # corrupt file: ignored
        assert len(c.node.table) == 0


async def test_listen_and_notify(tmp_path: Path) -> None:
    rng = random.Random(6)
    ida, idb = Identity.generate(), Identity.generate()
    async with member(ida, tmp_path / "a") as a, member(idb, None, with_store=False) as b:
        await b.node.bootstrap([a.node.address])
        key = b"\x44" * 20
        assert await b.node.listen(key, 60) == 1
        packet = make_packet(ida, rng)
        await a.node.packets.place(key, [packet])
        with trio.fail_after(5):
            delivery = await b.node.deliveries.receive()
        assert delivery.source == "notify" and delivery.packet == packet and delivery.key == key
        b.node.unlisten(key)
        ok, statuses = await a.node.transport.call(
            b.node.address, "notify", [a.node.me.id, key, [packet.encoded]]
        )
        assert ok and statuses == ["rejected:not_subscribed"]


async def test_handoff_spreads_packets_when_peers_appear(tmp_path: Path) -> None:
    rng = random.Random(7)
    ida = Identity.generate()
    manifest = Manifest(replicas=1, tables=2)
    async with member(ida, tmp_path / "a", manifest=manifest) as a:
        packets = [make_packet(ida, rng, manifest=manifest) for _ in range(6)]
        for p in packets:
            assert (await a.node.put_packet(p)).ok
        async with member(Identity.generate(), tmp_path / "b", manifest=manifest) as b:
            await b.node.bootstrap([a.node.address])
            await eventually(lambda: a.node.statistics().handoffs > 0)
            # b now holds the keys it is closer to; a query from b finds everything.
            for p in packets:
                keys = keys_for(manifest, p.topic, p.sketch.to_array())
                found = await b.node.find_packets(keys, p.sketch, 1)
                assert found and found[0][1] == p
            held = b.store.keys(a.node.wall_ms())
            assert held, "nothing was handed to the closer node"


@pytest.mark.ipv6
async def test_ipv6_nodes(tmp_path: Path) -> None:
    async with (
        open_node(Identity.generate(), host="::1") as a,
        open_node(Identity.generate(), host="::1") as b,
    ):
        assert ":" in a.address[0]
        found = await b.bootstrap([a.address])
        assert [n.id for n in found] == [a.me.id]
        assert await b.set("v6", "yes") and await a.get("v6") == "yes"


@pytest.mark.ipv6
async def test_dual_stack_node_joins_ipv4_and_ipv6_peers(tmp_path: Path) -> None:
    """A node on ``::`` serves an IPv4-only and an IPv6-only peer on one socket; each
    sees the other's packets through it, and IPv4 peers are known by plain IPv4
    addresses (not ``::ffff:``), so node lists it sends an IPv4 node are usable."""
    rng = random.Random(7)
    with trio.fail_after(30):
        async with (
            member(Identity.generate(), tmp_path / "dual", host="::") as dual,
            member(Identity.generate(), tmp_path / "v4", host="127.0.0.1") as v4,
            member(Identity.generate(), tmp_path / "v6", host="::1") as v6,
        ):
            assert dual.node.transport.endpoint.dual_stack
            assert not v4.node.transport.endpoint.dual_stack
            assert not v6.node.transport.endpoint.dual_stack
            port = dual.node.address[1]
            # The dual node bootstraps to both families by their own literals...
            found = await dual.node.bootstrap([v4.node.address, v6.node.address])
            assert {n.id for n in found} == {v4.node.me.id, v6.node.me.id}
            # ...and each single-family node reaches it at its own loopback.
            assert {n.id for n in await v4.node.bootstrap([("127.0.0.1", port)])} >= {
                dual.node.me.id
            }
            assert {n.id for n in await v6.node.bootstrap([("::1", port)])} >= {dual.node.me.id}
            contacts = {n.id: n.ip for n in dual.node.table.find_neighbors(dual.node.me)}
            assert contacts[v4.node.me.id] == "127.0.0.1"
            assert contacts[v6.node.me.id] == "::1"
            # The IPv4 node never learns the IPv6 one (it could not reach it): the dual
            # node names each asker only contacts of the family it asked over.
            assert all(":" not in n.ip for n in v4.node.table.find_neighbors(v4.node.me))
            # (Its table holds just the two: each asker would be named the other.)
            assert len(dual.node.table) == 2
            for asker, dial in ((v4, ("127.0.0.1", port)), (v6, ("::1", port))):
                ok, named = await asker.node.transport.call(
                    dial, "find_node", [asker.node.me.id, rng.randbytes(20)]
                )
                assert ok and named == []

            from_v4 = make_packet(v4.identity, rng)
            from_v6 = make_packet(v6.identity, rng)
            assert (await v4.node.put_packet(from_v4)).ok
            assert (await v6.node.put_packet(from_v6)).ok
            for asker, packet in ((v6, from_v4), (v4, from_v6)):
                keys = keys_for(DEFAULT_MANIFEST, packet.topic, packet.sketch.to_array())
                got = await asker.node.find_packets(keys, packet.sketch, 5)
                assert packet.id in {p.id for _, p in got}


async def test_bootstrap_names_the_family_a_node_cannot_reach(tmp_path: Path) -> None:
    async with open_node(Identity.generate(), host="127.0.0.1") as a:
        nodes, failed = await a.join([("::1", 9)])
        assert nodes == [] and "not an IPv4 address" in failed[("::1", 9)]


async def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="ksize"):
        DHTConfig(ksize=0)
    with pytest.raises(ValueError, match="alpha"):
        DHTConfig(ksize=2, alpha=3)


def _sharing(node_id: bytes, bits: int) -> bytes:
    """An id whose common prefix with ``node_id`` is exactly ``bits`` long."""
    return (int.from_bytes(node_id, "big") ^ (1 << (159 - bits))).to_bytes(20, "big")


def _free_ports(count: int) -> list[int]:
    """Ports nobody listens on (bound, then closed): datagrams to them are lost."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("head_answers", [True, False])
async def test_full_bucket_pings_its_head_even_in_backoff(head_answers: bool) -> None:
    # Paper 2.2: a full bucket's head is evicted only after it fails to answer a
    # ping. Being in failure backoff (it missed one request) is not such a failure.
    config = DHTConfig(ksize=2, alpha=2, rpc_timeout=0.5)
    async with (
        member(Identity.generate(), None, config=config, with_store=False) as a,
        member(Identity.generate(), None, config=config, with_store=False) as h,
    ):
        ports = _free_ports(3)
        if head_answers:
            head = Node(h.node.me.id, *h.node.address)
        else:
            head = Node(h.node.me.id, "127.0.0.1", ports[2])
        # Two contacts sharing exactly 100 bits (a multiple of 5, so their bucket does
        # not split, paper 4.2) fill it; a third sharing more is a newcomer to it.
        other = Node(_sharing(head.id, 100), "127.0.0.1", ports[0])
        newcomer = Node(_sharing(head.id, 120), "127.0.0.1", ports[1])
        table = a.node.table
        assert table.add_contact(head).action == ADDED
        assert table.add_contact(other).action == ADDED
        a.node.failed_peers.add((head.ip, head.port), trio.current_time())
        a.node.welcome(newcomer)
        assert head.id in a.node._pinging
        await eventually(lambda: not a.node._pinging)
        pings = a.node.statistics().rpcs
        if head_answers:
            assert pings[("ping", "out", "ok")] == 1
            assert table.get(head.id) is not None and table.get(newcomer.id) is None
        else:
            assert pings[("ping", "out", "timeout")] == 1
            assert table.get(head.id) is None and table.get(newcomer.id) is not None


async def test_a_busy_closest_node_is_asked_again_not_passed_over(tmp_path: Path) -> None:
    """Overloaded, a node answers a store with ``rejected:busy``: the put waits and
    asks it again, so the copy lands at the closest nodes and not beyond them."""
    rng = random.Random(11)
    manifest = Manifest(replicas=2, tables=1)
    with trio.fail_after(30):
        async with running_swarm(tmp_path, manifest, 6) as swarm:
            packet = make_packet(swarm.members[5].identity, rng, manifest=manifest)
            key = keys_for(manifest, packet.topic, packet.sketch.to_array())[0]
            target = Node(key)
            order = sorted(swarm.members.values(), key=lambda m: target.distance_to(m.node.me))
            closest = order[0] if order[0] is not swarm.members[5] else order[1]
            refused: list[int] = []
            real = closest.node.rpc._methods["store_packets"]

            def busy_once(addr: Any, args: list[Any]) -> Any:
                if not refused:
                    refused.append(len(args[2]))
                    return {"status": ["rejected:busy"] * len(args[2]), "nodes": []}
                return real(addr, args)

            closest.node.rpc._methods["store_packets"] = busy_once
            report = await swarm.members[5].node.put_packet(packet)
            assert refused == [1] and report.ok
            assert closest.store.get(packet.id) is not None


def last_member_batch(
    swarm: Any, manifest: Manifest, *, seed: int, count: int
) -> tuple[Any, list[Any]]:
    """The swarm's last member and ``count`` packets of its own (seeded)."""
    rng = random.Random(seed)
    origin = swarm.members[max(swarm.members)]
    return origin, [make_packet(origin.identity, rng, manifest=manifest) for _ in range(count)]


async def test_put_packets_places_a_batch_once_per_key(tmp_path: Path) -> None:
    """Forty packets of one topic over 8 keys (2 tables x 2 bits): one placement per
    key carries every packet under it, and each lands at its key's closest nodes."""
    manifest = Manifest(tables=2, bits=2, replicas=3)
    with trio.fail_after(60):
        async with running_swarm(tmp_path, manifest, 8) as swarm:
            origin, packets = last_member_batch(swarm, manifest, seed=12, count=40)
            stores = 0
            real = origin.node.packets.packet_call

            async def counting(peer: Node, name: str, args: list[Any]) -> tuple[bool, Any]:
                nonlocal stores
                stores += name == "store_packets"
                return await real(peer, name, args)

            origin.node.packets.packet_call = counting  # type: ignore[method-assign]
            reports = await origin.node.put_packets(packets)
            assert [r.packet_id for r in reports] == [p.id for p in packets]
            assert all(r.ok and r.copies >= manifest.replicas for r in reports)
            keys = {k for p in packets for k in keys_for(manifest, p.topic, p.sketch.to_array())}
            # One placement per key: about replicas RPCs each, not per packet.
            assert stores <= len(keys) * (manifest.replicas + 2) < len(packets) * 2
            for packet in packets:
                for key in keys_for(manifest, packet.topic, packet.sketch.to_array()):
                    target = Node(key)
                    near = sorted(swarm.members.values(),
                                  key=lambda m: target.distance_to(m.node.me))
                    held = [m for m in near[: manifest.replicas]
                            if m.store.get(packet.id) is not None]
                    assert len(held) == manifest.replicas


async def test_a_packet_refused_in_a_batch_does_not_sink_its_siblings(tmp_path: Path) -> None:
    """Every node refuses one packet of the batch (as over quota): the others still
    land at their closest nodes and say so; the refused one reports its own copies
    (only the origin's store took it)."""
    manifest = Manifest(tables=1, bits=1, replicas=3)
    with trio.fail_after(60):
        async with running_swarm(tmp_path, manifest, 6) as swarm:
            origin, packets = last_member_batch(swarm, manifest, seed=13, count=12)
            refused = packets[3]
            for m in swarm.members.values():
                if m is origin:
                    continue
                real = m.node.rpc._methods["store_packets"]

                def picky(addr: Any, args: list[Any], _real: Any = real) -> Any:
                    from qisd.packet import packet_id

                    if any(packet_id(raw) == refused.id for raw in args[2]):
                        return {"status": ["rejected:quota"] * len(args[2]), "nodes": []}
                    return _real(addr, args)

                m.node.rpc._methods["store_packets"] = picky
            reports = {r.packet_id: r for r in await origin.node.put_packets(packets)}
            for packet in packets:
                placement = reports[packet.id].placements[0]
                if packet is refused:
                    assert placement.stored == 1 and placement.local
                    assert "rejected:quota" in placement.refusals
                else:
                    assert placement.stored >= manifest.replicas, placement
