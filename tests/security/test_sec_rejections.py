"""Every class of hostile packet sent over real UDP is refused, counted by reason, and
neither stored, delivered nor relayed.

The target node is in a closed swarm; the sender is a raw UDP peer holding a member
key (it answers the target's ``hello`` challenge), so the packets themselves are what
is judged. Packets are made with ``create_packet`` and then tampered with, or made
for a foreign swarm, or by a non-member key: nothing on the sending side checks them.
A second raw peer listens to the key (``listen``), so a relayed packet would show up
as a ``notify`` to it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import trio
from sec_helpers import (
    KEY,
    closed_manifest,
    member_peer,
    now_ms,
    packet,
    running_node,
    table_ids,
    tamper_signature,
)

from qisd.dht import DHTConfig, DHTNode
from qisd.identity import Identity
from qisd.packet import KIND_SYNTHESIS

CONFIG = DHTConfig(rpc_timeout=1.0)


def hostile_packets(
    sender: Identity, outsider: Identity, manifest: Any, rng: random.Random
) -> dict[str, bytes]:
    """One encoded packet per refusal reason."""
    foreign = closed_manifest([sender], name="another-swarm")
    big = {f"field{i:02d}": "x" * 60 for i in range(12)}
    return {
        "bad_signature": tamper_signature(packet(sender, manifest, rng).encoded),
        "wrong_swarm": packet(sender, foreign, rng).encoded,
        "expired": packet(sender, manifest, rng, created_ms=now_ms() - 7_200_000, ttl_s=60)
        .encoded,
        "future": packet(sender, manifest, rng, created_ms=now_ms() + 3_600_000).encoded,
        "too_large": packet(sender, manifest, rng, outcome=big).encoded,
        "generation": packet(sender, manifest, rng, kind=KIND_SYNTHESIS, generation=2).encoded,
        "not_member": packet(outsider, manifest, rng).encoded,
        "malformed": b"\x81\xa1v\x01",
    }


def drain(node: DHTNode) -> list[Any]:
    out = []
    while True:
        try:
            out.append(node.deliveries.receive_nowait())
        except trio.WouldBlock:
            return out


async def test_hostile_packets_via_store_packets(tmp_path: Path) -> None:
    rng = random.Random(1)
    sender, target_id, listener_id, outsider = (Identity.generate() for _ in range(4))
    manifest = closed_manifest([sender, target_id, listener_id], packet_max_bytes=512)
    cases = hostile_packets(sender, outsider, manifest, rng)
    assert len(cases["too_large"]) > manifest.packet_max_bytes
    good = packet(sender, manifest, rng)

    async with (
        running_node(target_id, manifest, tmp_path / "t", config=CONFIG) as target,
        member_peer(sender, manifest) as raw,
        member_peer(listener_id, manifest) as listener,
    ):
        addr = target.address
        ok, granted = await listener.call(addr, "listen", [listener.id, KEY, 60])
        assert ok and granted > 0
        for reason, data in cases.items():
            ok, result = await raw.call(addr, "store_packets", [raw.id, KEY, [data]])
            assert ok, reason
            assert result["status"] == [f"rejected:{reason}"], reason
        # The good packet is stored once; its replay is a duplicate.
        for expected in ("stored", "duplicate"):
            ok, result = await raw.call(addr, "store_packets", [raw.id, KEY, [good.encoded]])
            assert ok and result["status"] == [expected]
        # A batch mixing all of them: only the good one (a duplicate by now) is held.
        batch = [*cases.values(), good.encoded]
        ok, result = await raw.call(addr, "store_packets", [raw.id, KEY, batch])
        assert ok
        assert result["status"] == [f"rejected:{r}" for r in cases] + ["duplicate"]

        # The listener hears of the good packet exactly once, and of nothing else.
        await trio.sleep(0.3)
        pushed = [args[2] for name, args in listener.requests if name == "notify"]
        assert pushed == [[good.encoded]]

        stats = target.statistics()
        for reason in cases:
            assert stats.packets_rejected[reason] == 2, reason
        assert stats.packets_rejected["duplicate"] == 2
        assert stats.packets_accepted == 1
        assert target.store is not None
        held = target.store.key_items(KEY, now_ms())
        assert [p.id for p in held] == [good.id]
        assert target.store.statistics().packets == 1
        deliveries = drain(target)
        assert [d.packet.id for d in deliveries] == [good.id]
        # Both raw peers proved their keys and were admitted.
        assert {raw.id, listener.id} <= table_ids(target)


async def test_hostile_packets_via_notify(tmp_path: Path) -> None:
    rng = random.Random(2)
    sender, target_id, outsider = (Identity.generate() for _ in range(3))
    manifest = closed_manifest([sender, target_id], packet_max_bytes=512)
    cases = hostile_packets(sender, outsider, manifest, rng)
    good = packet(sender, manifest, rng)

    async with (
        running_node(target_id, manifest, tmp_path / "t", config=CONFIG) as target,
        member_peer(sender, manifest) as raw,
    ):
        addr = target.address
        # Not subscribed: refused (and counted) as such.
        ok, result = await raw.call(addr, "notify", [raw.id, KEY, [good.encoded]])
        assert ok and result == ["rejected:not_subscribed"]
        target.subscriptions[KEY] = trio.current_time() + 60
        for reason, data in cases.items():
            ok, result = await raw.call(addr, "notify", [raw.id, KEY, [data]])
            assert ok and result == [f"rejected:{reason}"], reason
        for expected in ("accepted", "duplicate"):
            ok, result = await raw.call(addr, "notify", [raw.id, KEY, [good.encoded]])
            assert ok and result == [expected]

        stats = target.statistics()
        assert dict(stats.packets_rejected) == {
            **{reason: 1 for reason in cases},
            "duplicate": 1,
            "not_subscribed": 1,
        }
        assert stats.packets_accepted == 1
        assert [d.packet.id for d in drain(target)] == [good.id]
        assert target.store is not None and target.store.statistics().packets == 0
