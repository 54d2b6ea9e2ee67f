"""Republish (paper 2.5): every holder re-places what it holds, except the entries a
peer stored here within the interval; the origin re-places its own, per key."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from dht_helpers import make_packet, member
from kademlia.node import Node

from qisd.dht import DHTConfig
from qisd.dht.maintenance import expire, republish, republish_own
from qisd.dht.recent import RecentStores
from qisd.identity import Identity
from qisd.manifest import Manifest

#: No timer fires during a test: each republish is called by hand.
QUIET = DHTConfig(republish_interval=600.0, origin_republish_interval=600.0, rpc_timeout=1.0)


def store_rpcs_out(node: object) -> int:
    rpcs = node.statistics().rpcs  # type: ignore[attr-defined]
    return sum(n for (method, way, _), n in rpcs.items()
               if method == "store_packets" and way == "out")


def test_recent_stores_remembers_within_the_interval() -> None:
    recent = RecentStores(max_entries=4)
    far = 10**15  # expiry (wall ms) of packets that outlive the test
    recent.note(b"k", [(b"a", far), (b"b", far)], now=100.0)
    assert recent.fresh(b"k", b"a", 150.0, within=60.0)
    assert not recent.fresh(b"k", b"a", 160.0, within=60.0)
    assert not recent.fresh(b"other", b"a", 150.0, within=60.0)
    recent.note(b"k", [(b"a", far)], now=130.0)  # stored again: fresh again, now newest
    recent.forget_older(now=170.0, age=60.0)
    assert len(recent) == 1 and recent.fresh(b"k", b"a", 170.0, within=60.0)
    recent.note(b"k", [(pid, far) for pid in (b"c", b"d", b"e", b"f")], now=200.0)
    assert len(recent) <= 4  # over the cap: the oldest half went
    assert not recent.fresh(b"k", b"a", 200.0, within=600.0)
    assert recent.fresh(b"k", b"f", 200.0, within=600.0)


def test_recent_stores_forget_expired_packets_under_every_key() -> None:
    recent = RecentStores()
    recent.note(b"k1", [(b"a", 1_000), (b"b", 5_000)], now=1.0)
    recent.note(b"k2", [(b"a", 1_000), (b"c", 9_000)], now=2.0)
    assert recent.forget_expired(999) == 0 and len(recent) == 4
    assert recent.forget_expired(1_000) == 2  # "a" under both keys
    assert not recent.fresh(b"k1", b"a", 3.0, within=60.0)
    assert recent.fresh(b"k1", b"b", 3.0, within=60.0)
    assert recent.fresh(b"k2", b"c", 3.0, within=60.0)
    assert recent.forget_expired(10_000) == 2 and len(recent) == 0
    assert recent._expires == {}  # nothing about forgotten packets is left behind


def key_in_order(members: list[Any], order: list[int], rng: random.Random) -> bytes:
    """A random key whose closest nodes, nearest first, are ``order``."""
    while True:
        key = rng.randbytes(20)
        target = Node(key)
        by_distance = sorted(range(len(members)),
                             key=lambda i: members[i].node.me.distance_to(target))
        if by_distance == order:
            return key


@asynccontextmanager
async def three(tmp_path: Path, manifest: Manifest) -> AsyncIterator[list[Any]]:
    ids = [Identity.from_seed(bytes([i]) * 32) for i in (21, 22, 23)]
    async with (
        member(ids[0], tmp_path / "a", manifest=manifest, config=QUIET) as a,
        member(ids[1], tmp_path / "b", manifest=manifest, config=QUIET) as b,
        member(ids[2], tmp_path / "c", manifest=manifest, config=QUIET) as c,
    ):
        for m in (b, c):
            await m.node.bootstrap([a.node.address])
        await a.node.bootstrap([b.node.address])
        assert all(len(m.node.table) == 2 for m in (a, b, c))
        yield [a, b, c]


def holds(m: Any, key: bytes, pid: bytes) -> bool:
    return pid in {p.id for p in m.store.key_items(key, m.node.wall_ms())}


async def test_a_holders_store_counts_a_put_or_a_replay_does_not(tmp_path: Path) -> None:
    rng = random.Random(3)
    manifest = Manifest(replicas=2)
    with trio.fail_after(30):
        async with three(tmp_path, manifest) as (a, b, c):
            key = key_in_order([a, b, c], [1, 2, 0], rng)  # b, then c, then a
            packet = make_packet(a.identity, rng, manifest=manifest)
            assert (await a.node.put_packet(packet, keys=[key])).ok
            assert holds(b, key, packet.id) and holds(c, key, packet.id)
            # a is not among the key's two closest: its put refreshes nobody (it may
            # have reached fewer than ``replicas`` nodes), so c republishes.
            await republish(c.node)
            assert c.node.statistics().republished == 1
            assert c.node.statistics().republish_skipped == 0
            assert holds(c, key, packet.id)
            # c is a holder: what it re-placed at b counts as b's republish.
            before = store_rpcs_out(b.node)
            await republish(b.node)
            assert b.node.statistics().republish_skipped == 1
            assert b.node.statistics().republished == 0
            assert store_rpcs_out(b.node) == before
            # An interval on (marks forgotten), a re-sends the packet to b: a replay
            # from outside the key's closest does not switch b's republish off.
            b.node.packets.recent = RecentStores()
            answer = await a.node.packets.store_remote(b.node.me, key, [packet.encoded])
            assert answer is not None and answer[0] == ["duplicate"]
            await republish(b.node)
            assert b.node.statistics().republished == 1
            # The origin's own republish is one placement per key.
            await republish_own(a.node)
            assert a.node.statistics().republished == 1


async def test_only_replica_holders_republish_the_origin_restores(tmp_path: Path) -> None:
    """A copy held outside the key's closest nodes is not republished by its holder;
    the origin's republish places the packet at the closest."""
    rng = random.Random(4)
    manifest = Manifest(replicas=2)
    with trio.fail_after(30):
        async with three(tmp_path, manifest) as (a, b, c):
            key = key_in_order([a, b, c], [1, 2, 0], rng)
            packet = make_packet(a.identity, rng, manifest=manifest)
            await a.node.packets.store_local(key, [packet], "local")
            a.node.packets.recent = RecentStores()
            await republish(a.node)
            assert a.node.statistics().republished == 0
            assert not holds(b, key, packet.id) and not holds(c, key, packet.id)
            await a.node.packets.own.remember(packet, [key])
            await republish_own(a.node)
            assert holds(b, key, packet.id) and holds(c, key, packet.id)


async def test_the_origin_republishes_what_it_put_before_a_restart(tmp_path: Path) -> None:
    """The list of own packets is in the store: a restarted origin still re-places
    what it put before, after every holder lost it."""
    rng = random.Random(5)
    manifest = Manifest(replicas=2)
    ids = [Identity.from_seed(bytes([i]) * 32) for i in (31, 32, 33)]
    with trio.fail_after(30):
        async with (
            member(ids[1], tmp_path / "b", manifest=manifest, config=QUIET) as b,
            member(ids[2], tmp_path / "c", manifest=manifest, config=QUIET) as c,
        ):
            await c.node.bootstrap([b.node.address])
            async with member(ids[0], tmp_path / "a", manifest=manifest, config=QUIET) as a:
                await a.node.bootstrap([b.node.address])
                key = key_in_order([a, b, c], [1, 2, 0], rng)  # b, c, then a
                packet = make_packet(a.identity, rng, manifest=manifest)
                assert (await a.node.put_packet(packet, keys=[key])).ok
            for m in (b, c):  # every holder loses it
                assert holds(m, key, packet.id)
                m.store.expire(packet.expires_ms)
                assert not holds(m, key, packet.id)
            async with member(ids[0], tmp_path / "a", manifest=manifest, config=QUIET) as a:
                assert [p.id for p in a.node.packets.own.live(a.node.wall_ms())[key]] == [
                    packet.id
                ]
                await a.node.bootstrap([b.node.address])
                await republish_own(a.node)
                assert holds(b, key, packet.id) and holds(c, key, packet.id)


async def test_a_packet_expiring_on_the_way_does_not_cost_a_replica(tmp_path: Path) -> None:
    """A batch re-placed near its expiry: a peer refusing the expired packet still
    took the rest, and counts as holding them."""
    rng = random.Random(6)
    manifest = Manifest(replicas=2)
    with trio.fail_after(30):
        async with three(tmp_path, manifest) as (a, b, c):
            key = key_in_order([a, b, c], [1, 2, 0], rng)
            good = make_packet(a.identity, rng, manifest=manifest)
            dying = make_packet(a.identity, rng, manifest=manifest, ttl_s=1)
            await trio.sleep(1.1)  # it expires before it arrives
            placed = await a.node.packets.place(key, [good, dying])
            assert placed.stored == 2 and not placed.local
            assert placed.refusals == ()
            assert holds(b, key, good.id) and holds(c, key, good.id)


async def test_the_expiry_sweep_forgets_what_memory_held_about_expired_packets(
    tmp_path: Path,
) -> None:
    """Own packets kept for republish and other holders' recent stores follow their
    packets out at the expiry sweep, not an hour later at the next republish."""
    rng = random.Random(7)
    manifest = Manifest(replicas=2)
    with trio.fail_after(30):
        async with three(tmp_path, manifest) as (a, b, c):
            key = key_in_order([a, b, c], [1, 2, 0], rng)
            short = make_packet(a.identity, rng, manifest=manifest, ttl_s=1)
            long = make_packet(a.identity, rng, manifest=manifest)
            assert all(r.ok for r in await a.node.packets.put_packets([short, long], keys=[key]))
            ops = a.node.packets
            ops.recent.note(key, [(short.id, short.expires_ms), (long.id, long.expires_ms)],
                            trio.current_time())
            assert len(ops.own) == 2 and len(ops.recent) == 2
            await trio.sleep(1.1)
            await expire(a.node)
            assert list(ops.own.items) == [long.id]
            assert len(ops.recent) == 1
            assert ops.recent.fresh(key, long.id, trio.current_time(), within=60.0)
