"""Thirty real nodes on 127.0.0.1 in one trio run: put, find, churn, restart."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
from dht_helpers import Swarm, eventually, make_packet

from qisd.dht import DHTConfig
from qisd.manifest import Manifest
from qisd.packet import OutcomePacket

pytestmark = pytest.mark.slow

N = 30
PACKETS = 6
CONFIG = DHTConfig(rpc_timeout=0.5)
#: Four LSH tables instead of eight: half the lookups per query, same DHT work.
MANIFEST = Manifest(tables=4)


async def found_everywhere(swarm: Swarm, packets: list[tuple[OutcomePacket, list[bytes]]]) -> None:
    """Every packet is found by every running node, by its own sketch and keys."""
    # All thirty nodes share one Python process here: a few queries at a time keep
    # replies well inside the RPC timeout.
    limiter = trio.CapacityLimiter(4)

    async def check(i: int) -> None:
        node = swarm.members[i].node
        async with limiter:
            for packet, keys in packets:
                hits = await node.find_packets(keys, packet.sketch, 3)
                assert hits and hits[0][1].id == packet.id, f"node {i} misses a packet"

    async with trio.open_nursery() as nursery:
        for i in list(swarm.members):
            nursery.start_soon(check, i)


async def test_swarm_put_find_churn_restart(tmp_path: Path) -> None:
    rng = random.Random(30)
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery:
            swarm = Swarm(nursery, tmp_path, config=CONFIG, manifest=MANIFEST)
            first = await swarm.start(0)
            for i in range(1, N):
                m = await swarm.start(i)
                await m.node.bootstrap([first.node.address])
            assert all(len(m.node.table) >= N // 2 for m in swarm.members.values())

            # Puts from random nodes: every key gets its full set of copies.
            packets = []
            for _ in range(PACKETS):
                origin = swarm.members[rng.randrange(N)]
                packet = make_packet(origin.identity, rng, manifest=MANIFEST)
                report = await origin.node.put_packet(packet)
                assert report.ok
                replicas = origin.node.replicas
                assert all(p.stored == replicas for p in report.placements)
                packets.append((packet, [p.key for p in report.placements]))
            await found_everywhere(swarm, packets)

            # Five nodes stop (holders among them): every packet is still found.
            holders = [i for i, m in swarm.members.items() if m.store.statistics().packets > 0]
            stopped = (
                rng.sample(holders, 3) + rng.sample([i for i in range(N) if i not in holders], 2)
                if len(holders) < N - 2
                else rng.sample(holders, 5)
            )
            kept = {i: swarm.members[i].store.statistics().packets for i in stopped}
            for i in stopped:
                await swarm.stop(i)
            await found_everywhere(swarm, packets)

            # A stopped holder restarts on its port with its store and routing state:
            # it kept its packets, rejoins, and answers for them again.
            back = max(stopped, key=lambda i: kept[i])
            m = await swarm.start(back, port=swarm.ports[back])
            assert m.store.statistics().packets == kept[back] > 0
            assert len(m.node.table) > 0  # known from the state file, no bootstrap
            await eventually(lambda: m.node.statistics().lookups > 0)  # the rejoin lookup
            # The nodes it contacted while rejoining hold it in their tables again.
            knowing = [
                i for i, x in swarm.members.items() if i != back and x.node.table.get(m.node.me.id)
            ]
            assert len(knowing) >= 5
            await found_everywhere(swarm, packets)
            await swarm.stop_all()
