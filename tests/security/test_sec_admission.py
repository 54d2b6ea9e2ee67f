"""Closed-swarm admission under forged and lost datagrams, over real UDP on 127.0.0.1.

A failed ``hello`` refuses only what it says something against: a forged request
from a member's address does not lock the member out, a lost hello reply costs a
short backoff (not a refusal, not the member's place in the table); requests that
arrive while a proof is pending wait for it (a bounded number of them); an active
peer is proven again before its proof lapses; one network cannot fill the proof
queue; and contacts restored from the state file prove their keys before they enter
the routing table.
"""

from __future__ import annotations

import os
import socket as stdsocket
from collections.abc import Hashable
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio
from kademlia.node import Node
from sec_helpers import (
    closed_manifest,
    eventually,
    honest_prover,
    member_peer,
    raw_peer,
    request,
    running_node,
    table_ids,
)

from qisd.dht import DHTConfig, DHTNode, admission
from qisd.dht.admission import MAX_VERIFYING_PER_GROUP, MAX_WAITING_PER_PEER, proof_group
from qisd.dht.state import FILE_NAME
from qisd.dht.wire import pack
from qisd.identity import Identity
from qisd.manifest import Manifest

CONFIG = DHTConfig(rpc_timeout=0.5, failure_backoff=0.5)


async def test_forged_id_from_a_member_address_does_not_lock_the_member_out(
    tmp_path: Path,
) -> None:
    a_id, b_id = Identity.generate(), Identity.generate()
    manifest = closed_manifest([a_id, b_id])
    forged = os.urandom(20)
    async with (
        running_node(a_id, manifest, tmp_path / "a", config=CONFIG) as a,
        member_peer(b_id, manifest) as b,
    ):
        # One datagram from b's address naming an id that is not b's (on a LAN, a
        # forged source; here b's own socket sends it). a asks b's address to prove
        # that id; b proves its own, real id instead.
        await b.send(request("ping", [forged]), a.address)
        await eventually(lambda: a.statistics().peers_refused.get("id_mismatch") == 1)
        # The member b, at that address, was proven by that answer and is welcome.
        assert table_ids(a) == {b.id}
        ok, answer = await b.call(a.address, "ping", [b.id], wait=1.0)
        assert ok and answer == a.me.id
        # The forged id stays refused there, without another hello.
        ok, _ = await b.call(a.address, "ping", [forged], wait=0.3)
        assert not ok
        stats = a.statistics()
        assert dict(stats.peers_refused) == {"id_mismatch": 1}
        assert stats.dropped["id_mismatch"] == 2
        assert forged not in table_ids(a)


async def test_a_lost_hello_reply_costs_a_short_backoff_only(tmp_path: Path) -> None:
    a_id, b_id = Identity.generate(), Identity.generate()
    manifest = closed_manifest([a_id, b_id])
    async with (
        running_node(a_id, manifest, tmp_path / "a", config=CONFIG) as a,
        raw_peer(b_id.node_id, None) as b,  # its hello reply is lost
    ):
        ok, _ = await b.call(a.address, "find_node", [b.id, os.urandom(20)], wait=1.0)
        assert not ok
        assert dict(a.statistics().peers_refused) == {"no_answer": 1}
        # The network heals: once the backoff (failure_backoff, not 300 s) is over,
        # the next request proves b and is answered.
        b.prover = honest_prover(b_id, manifest)
        await trio.sleep(CONFIG.failure_backoff)
        ok, answer = await b.call(a.address, "ping", [b.id], wait=1.0)
        assert ok and answer == a.me.id
        assert table_ids(a) == {b.id}


async def test_requests_wait_for_a_pending_proof(tmp_path: Path) -> None:
    a_id, b_id = Identity.generate(), Identity.generate()
    manifest = closed_manifest([a_id, b_id])
    honest = honest_prover(b_id, manifest)
    asked = trio.Event()

    def prover(verifier: bytes, nonce: bytes) -> object:
        asked.set()
        return honest(verifier, nonce)

    async with (
        running_node(a_id, manifest, tmp_path / "a", config=CONFIG) as a,
        raw_peer(b_id.node_id, prover) as b,
    ):
        b.hello_delay = 0.2
        results: list[bool] = []

        async def ask() -> None:
            ok, _ = await b.call(a.address, "find_node", [b.id, os.urandom(20)], wait=1.0)
            results.append(ok)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await asked.wait()
            # b's proof is on its way (0.2 s): two more requests wait for it.
            nursery.start_soon(ask)
            nursery.start_soon(ask)
        assert results == [True] * 3
        assert a.statistics().dropped.get("unproven", 0) == 0


async def test_requests_waiting_on_a_proof_are_bounded(tmp_path: Path) -> None:
    a_id, b_id = Identity.generate(), Identity.generate()
    manifest = closed_manifest([a_id, b_id])
    extra = 2
    async with (
        running_node(a_id, manifest, tmp_path / "a", config=CONFIG) as a,
        raw_peer(b_id.node_id, None) as b,  # never answers hello: requests wait it out
    ):
        for _ in range(MAX_WAITING_PER_PEER + extra):
            await b.send(request("ping", [b.id]), a.address)
        await eventually(
            lambda: a.statistics().dropped.get("no_answer") == MAX_WAITING_PER_PEER
        )
        stats = a.statistics()
        assert stats.dropped["unproven"] == extra
        assert dict(stats.peers_refused) == {"no_answer": 1}


async def test_an_active_member_is_proven_again_before_its_proof_lapses(
    tmp_path: Path,
) -> None:
    a_id, b_id = Identity.generate(), Identity.generate()
    manifest = closed_manifest([a_id, b_id])
    honest = honest_prover(b_id, manifest)
    hellos: list[bytes] = []

    def counting(verifier: bytes, nonce: bytes) -> object:
        hellos.append(nonce)
        return honest(verifier, nonce)

    async with (
        running_node(a_id, manifest, tmp_path / "a", config=CONFIG) as a,
        raw_peer(b_id.node_id, counting) as b,
    ):
        # Proofs that last 3 s, renewed by traffic in their last 2 s.
        a.admission.proven_ttl = 3.0
        a.admission.reprove_before = 2.0
        ok, _ = await b.call(a.address, "ping", [b.id], wait=1.0)
        assert ok and len(hellos) == 1
        contact = Node(b.id, *b.address)
        # b keeps talking for twice the proof's lifetime: never dropped, proven again.
        with trio.fail_after(10):
            for _ in range(12):
                assert a.admission.admitted(contact)
                ok, _ = await b.call(a.address, "ping", [b.id], wait=1.0)
                assert ok
                await trio.sleep(0.5)
        assert len(hellos) >= 2
        assert a.statistics().dropped.get("unproven", 0) == 0
        assert table_ids(a) == {b.id}

        # A lost re-proof leaves a proven member proven and in the table.
        b.prover = None
        a.admission.reprove_before = 3.0  # every request re-proves now
        ok, _ = await b.call(a.address, "ping", [b.id], wait=1.0)
        assert ok
        await eventually(lambda: a.statistics().peers_refused.get("no_answer") == 1)
        assert table_ids(a) == {b.id}
        ok, _ = await b.call(a.address, "ping", [b.id], wait=1.0)
        assert ok


async def test_one_network_cannot_fill_the_proof_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_id, b_id = Identity.generate(), Identity.generate()
    manifest = closed_manifest([a_id, b_id])
    # Loopback groups are per address and port (local swarms); here 127.0.0.2-41
    # stand for one public /24 whose addresses an attacker can forge.
    real = admission.proof_group

    def group(addr: tuple[str, int], *, exempt_private: bool = True) -> Hashable:
        return "spoofed /24" if addr[0] != "127.0.0.1" else real(addr)

    monkeypatch.setattr(admission, "proof_group", group)
    async with (
        running_node(a_id, manifest, tmp_path / "a", config=CONFIG) as a,
        member_peer(b_id, manifest) as b,
    ):
        with ExitStack() as stack:
            # 40 sources (each within its own rate and handler share), unknown ids,
            # silent to hello: more than the whole queue (MAX_VERIFYING = 32).
            for i in range(2, 42):
                sock = stack.enter_context(trio.socket.socket(type=stdsocket.SOCK_DGRAM))
                await sock.bind((f"127.0.0.{i}", 0))
                await sock.sendto(request("ping", [os.urandom(20)]), a.address)
            await eventually(
                lambda: a.statistics().dropped.get("verifying_group")
                == 40 - MAX_VERIFYING_PER_GROUP
            )
            # A member from elsewhere is proven and answered meanwhile.
            ok, answer = await b.call(a.address, "ping", [b.id], wait=0.4)
            assert ok and answer == a.me.id


def test_proof_groups() -> None:
    assert proof_group(("93.184.216.7", 4000)) == proof_group(("93.184.216.200", 1))
    assert proof_group(("93.184.216.7", 4000)) != proof_group(("93.184.217.7", 4000))
    assert proof_group(("2a00:1450:1:2::1", 4000)) == proof_group(("2a00:1450:1:ffff::9", 5))
    assert proof_group(("2a00:1450:1::1", 4000)) != proof_group(("2a00:1450:2::1", 4000))
    # Loopback: each node of a local swarm is its own group.
    assert proof_group(("127.0.0.1", 4000)) != proof_group(("127.0.0.1", 4001))
    assert proof_group(("::1", 4000)) != proof_group(("::1", 4001))
    # Private ranges: per host by default (a LAN swarm), per /24 if not exempt.
    assert proof_group(("192.168.1.2", 4000)) != proof_group(("192.168.1.3", 4000))
    assert proof_group(("192.168.1.2", 1), exempt_private=False) == proof_group(
        ("192.168.1.3", 2), exempt_private=False
    )


def write_state(path: Path, manifest: Manifest | None, nodes: list[DHTNode]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    state: dict[str, object] = {
        "version": 1,
        "node_id": bytes(20),
        "contacts": [[n.me.id, *n.address] for n in nodes],
    }
    if manifest is not None:
        state["swarm"] = manifest.swarm_id
    (path / FILE_NAME).write_bytes(pack(state))


async def test_restored_contacts_prove_their_keys_first(tmp_path: Path) -> None:
    a_id, b_id, outsider = (Identity.generate() for _ in range(3))
    manifest = closed_manifest([a_id, b_id])
    async with (
        running_node(b_id, manifest, None, config=CONFIG) as b,
        running_node(outsider, manifest, None, config=CONFIG) as o,
    ):
        write_state(tmp_path / "a", manifest, [b, o])
        async with running_node(a_id, manifest, tmp_path / "a", config=CONFIG) as a:
            assert o.me.id not in table_ids(a)  # a saved table proves nothing
            await eventually(lambda: table_ids(a) == {b.me.id})
            await eventually(lambda: a.statistics().peers_refused.get("not_member") == 1)
            assert table_ids(a) == {b.me.id}


async def test_state_of_another_swarm_is_ignored(tmp_path: Path) -> None:
    a_id, b_id = Identity.generate(), Identity.generate()
    old, new = Manifest(name="before-rekey"), Manifest(name="after-rekey")
    async with running_node(b_id, old, None, config=CONFIG) as b:
        async with running_node(a_id, old, tmp_path / "a", config=CONFIG) as a:
            await a.bootstrap([b.address])
            assert table_ids(a) == {b.me.id}
        # Saved with its swarm id: the same swarm restores it...
        async with running_node(a_id, old, tmp_path / "a", config=CONFIG) as a:
            assert table_ids(a) == {b.me.id}
        # ...another swarm (a re-keyed one) does not.
        async with running_node(a_id, new, tmp_path / "a", config=CONFIG) as a:
            assert len(a.table) == 0
        # Nor does a file that records no swarm.
        write_state(tmp_path / "c", None, [b])
        async with running_node(a_id, old, tmp_path / "c", config=CONFIG) as a:
            assert len(a.table) == 0
