"""Closed swarms over real UDP: members prove their keys (``hello``) and work normally;
an outsider who knows the manifest never enters a member's routing table, gets no
answer to anything but ``hello``, and its packets are refused; a peer whose node id
is not SHA-1 of the key it presents is refused even when it holds a member key."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio
from kademlia.node import Node
from sec_helpers import (
    KEY,
    closed_manifest,
    eventually,
    honest_prover,
    member_peer,
    now_ms,
    packet,
    raw_peer,
    request,
    running_node,
    table_ids,
)

from qisd.dht import DHTConfig, DHTNode, open_node
from qisd.dht.hello import hello_message, prove
from qisd.identity import Identity
from qisd.manifest import DEFAULT_MANIFEST, Manifest

CONFIG = DHTConfig(rpc_timeout=0.5, failure_backoff=0.5)


def contact(node: DHTNode) -> Node:
    return Node(node.me.id, *node.address)


async def test_outsider_stays_out_and_members_work(tmp_path: Path) -> None:
    rng = random.Random(3)
    members = [Identity.generate() for _ in range(3)]
    outsider = Identity.generate()
    manifest = closed_manifest(members)

    async with (
        running_node(members[0], manifest, tmp_path / "a", config=CONFIG) as a,
        running_node(members[1], manifest, tmp_path / "b", config=CONFIG) as b,
        running_node(members[2], manifest, tmp_path / "c", config=CONFIG) as c,
        running_node(outsider, manifest, tmp_path / "o", config=CONFIG) as o,
    ):
        nodes = [a, b, c]
        # The outsider knocks first: no member answers it.
        assert await o.bootstrap([a.address, b.address, c.address]) == []
        assert len(o.table) == 0
        # Members join through a and find each other.
        await b.bootstrap([a.address])
        await c.bootstrap([a.address])
        ids = {n.me.id for n in nodes}
        for n in nodes:
            await eventually(lambda n=n: table_ids(n) == ids - {n.me.id})

        # The outsider pushes packets straight at every member, skipping its own
        # client-side checks: its own packet, and a genuine member packet it replays.
        own = packet(outsider, manifest, rng)
        replayed = packet(members[1], manifest, rng)

        async def knock(n: DHTNode) -> None:
            raws = [own.encoded, replayed.encoded]
            assert await o.packets.store_remote(contact(n), KEY, raws) is None
            ok, _ = await o.transport.call(n.address, "find_node", [o.me.id, KEY])
            assert not ok
            ok, _ = await o.transport.call(n.address, "stun", [])
            assert not ok

        async with trio.open_nursery() as nursery:
            for n in nodes:
                nursery.start_soon(knock, n)

        # Members place and find packets as usual.
        vec = [rng.gauss(0, 1) for _ in range(16)]
        mine = packet(members[0], manifest, rng, vec=vec)
        report = await a.put_packet(mine, keys=[KEY])
        assert report.ok and report.copies == 3
        found = await c.find_packets([KEY], mine.sketch, 5)
        assert [p.id for _, p in found] == [mine.id]

        for n in nodes:
            assert o.me.id not in table_ids(n)
            assert n.store is not None
            held = {p.id for p in n.store.key_items(KEY, now_ms())}
            assert held == {mine.id}
            stats = n.statistics()
            assert stats.peers_refused["not_member"] == 1  # one hello, then remembered
            # Each copy of the unanswered request (the outsider resends it) refused anew.
            assert stats.packets_rejected["not_member"] == 2 * (1 + o.config.rpc_retries)
            assert stats.dropped["not_member"] >= 4
        # Members never had to be refused among themselves.
        assert all(set(n.statistics().peers_refused) == {"not_member"} for n in nodes)
        assert len(o.table) == 0


async def test_node_id_must_be_sha1_of_the_presented_key(tmp_path: Path) -> None:
    holder, target_id = Identity.generate(), Identity.generate()
    manifest = closed_manifest([holder, target_id])
    claimed = os.urandom(20)

    def forger(verifier: bytes, nonce: bytes) -> list[bytes]:
        # A member key and a valid signature, but over an id the key does not hash to.
        message = hello_message(manifest.swarm_id, verifier, nonce, claimed)
        return [holder.public_key, holder.signing_key.sign(message).signature]

    async with (
        running_node(target_id, manifest, tmp_path / "t", config=CONFIG) as target,
        raw_peer(claimed, forger) as fake,
    ):
        ok, _ = await fake.call(target.address, "ping", [fake.id], wait=1.0)
        assert not ok
        ok, _ = await fake.call(target.address, "find_node", [fake.id, KEY], wait=0.5)
        assert not ok
        assert claimed not in table_ids(target)
        stats = target.statistics()
        assert dict(stats.peers_refused) == {"id_mismatch": 1}
        assert stats.dropped["id_mismatch"] == 2


async def test_proofs_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    holder, target_id, stranger = (Identity.generate() for _ in range(3))
    manifest = closed_manifest([holder, target_id])
    other_swarm = closed_manifest([holder, target_id], name="elsewhere")

    def stale(verifier: bytes, nonce: bytes) -> list[bytes]:  # wrong nonce
        return prove(holder.signing_key, manifest.swarm_id, verifier, bytes(32)).to_wire()

    def replayed(verifier: bytes, nonce: bytes) -> list[bytes]:  # another swarm's proof
        return prove(holder.signing_key, other_swarm.swarm_id, verifier, nonce).to_wire()

    def junk(verifier: bytes, nonce: bytes) -> object:
        return {"key": holder.public_key}

    def outsider(verifier: bytes, nonce: bytes) -> list[bytes]:
        return prove(stranger.signing_key, manifest.swarm_id, verifier, nonce).to_wire()

    async with running_node(target_id, manifest, tmp_path / "t", config=CONFIG) as target:
        provers = ((stale, holder), (replayed, holder), (junk, holder), (outsider, stranger))
        for i, (prover, who) in enumerate((*provers, (None, holder)), 1):
            async with raw_peer(who.node_id, prover) as peer:
                await peer.send(request("ping", [peer.id]), target.address)
                await eventually(
                    lambda i=i: sum(target.statistics().peers_refused.values()) == i
                )
        assert len(target.table) == 0
        assert ("ping", "in", "ok") not in target.statistics().rpcs
        assert dict(target.statistics().peers_refused) == {
            "bad_proof": 3,
            "not_member": 1,
            "no_answer": 1,
        }
        # The honest holder of the same key, from yet another socket, gets in.
        async with member_peer(holder, manifest) as peer:
            ok, answer = await peer.call(target.address, "ping", [peer.id])
            assert ok and answer == target.me.id
            assert table_ids(target) == {holder.node_id}


async def test_unsigned_closed_manifest_is_refused() -> None:
    me = Identity.generate()
    unsigned = Manifest(membership="closed", members=(me.public_key,))
    with pytest.raises(ValueError, match="creator signature"):
        async with open_node(me, unsigned):
            pass


async def test_open_swarm_requires_no_hello(tmp_path: Path) -> None:
    ids = [Identity.generate() for _ in range(3)]
    async with (
        running_node(ids[0], DEFAULT_MANIFEST, None, config=CONFIG) as a,
        running_node(ids[1], DEFAULT_MANIFEST, None, config=CONFIG) as b,
        raw_peer() as stranger,  # any id, no key, never answers hello
    ):
        await b.bootstrap([a.address])
        ok, answer = await stranger.call(a.address, "ping", [stranger.id])
        assert ok and answer == a.me.id
        ok, nodes = await stranger.call(a.address, "find_node", [stranger.id, KEY])
        assert ok and [n[0] for n in nodes] == [b.me.id]
        assert table_ids(a) == {b.me.id, stranger.id}
        assert not any(n.statistics().peers_refused for n in (a, b))
        # A node answers hello when asked (it costs one signature).
        ok, proof = await stranger.call(a.address, "hello", [stranger.id, bytes(32)])
        assert ok and proof[0] == ids[0].public_key


async def test_lookups_ask_only_members_named_in_replies(tmp_path: Path) -> None:
    """A member's find_node answer naming a non-member: the lookup does not ask it
    (nor challenge it), so no outsider can steer a closed swarm's lookups."""
    members = [Identity.generate() for _ in range(2)]
    outsider = Identity.generate()
    manifest = closed_manifest(members)
    async with (
        running_node(members[0], manifest, tmp_path / "a", config=CONFIG) as a,
        member_peer(members[1], manifest) as m,
        raw_peer(outsider.node_id, honest_prover(outsider, manifest)) as o,
    ):
        m.replies["find_node"] = [[o.id, o.address[0], o.address[1]], [m.id, *m.address]]
        assert await a.bootstrap([m.address]) != []
        assert table_ids(a) == {m.id}
        await a.lookup_nodes(os.urandom(20))
        assert any(name == "find_node" for name, _ in m.requests)
        assert o.heard == 0
        assert a.statistics().dropped["not_member_contact"] >= 1
