"""Upkeep and limits on real nodes: republish, rate limits, bounded deliveries."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from types import SimpleNamespace

import trio
import trio.testing
import umsgpack
from dht_helpers import eventually, make_packet, member

from qisd.dht import DHTConfig, maintenance
from qisd.dht.ratelimit import RateLimits
from qisd.dht.stats import Counters
from qisd.identity import Identity
from qisd.manifest import Manifest


async def test_origin_republishes_when_holders_leave(tmp_path: Path) -> None:
    rng = random.Random(8)
    manifest = Manifest(replicas=1)
    config = DHTConfig(
        republish_interval=3600, origin_republish_interval=0.5, rpc_timeout=0.5
    )
    origin_id, b_id, c_id = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))
    packet = make_packet(origin_id, rng, manifest=manifest)
    with trio.fail_after(30):
        async with (
            member(origin_id, None, manifest=manifest, config=config, with_store=False) as o,
            member(c_id, tmp_path / "c", manifest=manifest, config=config) as c,
        ):
            async with member(b_id, tmp_path / "b", manifest=manifest, config=config) as b:
                await b.node.bootstrap([o.node.address])
                await c.node.bootstrap([o.node.address])
                report = await o.node.put_packet(packet)
                keys = {p.key for p in report.placements}
                at_b = set(b.store.keys(o.node.wall_ms()))
                # Deterministic ids and vector: B holds some keys, C the others.
                assert at_b and at_b < keys
            # B is gone; within a republish interval C holds every key.
            await eventually(lambda: set(c.store.keys(o.node.wall_ms())) == keys)


async def test_rate_limit_per_source(tmp_path: Path) -> None:
    limits = RateLimits(per_source_rate=5, per_source_burst=10, total_rate=0)
    async with member(Identity.generate(), None, config=DHTConfig(limits=limits)) as node:
        addr = node.node.address
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with flood, other:
            for sock in (flood, other):
                sock.bind(("127.0.0.1", 0))
                sock.setblocking(False)
            ping = b"\x00" + os.urandom(20) + umsgpack.packb(["ping", [os.urandom(20)]])
            for _ in range(100):
                flood.sendto(ping, addr)
            other.sendto(ping, addr)
            await trio.sleep(0.5)
            answers = 0
            while True:
                try:
                    flood.recvfrom(9000)
                except BlockingIOError:
                    break
                answers += 1
            assert 10 <= answers <= 15  # the burst, plus what refilled meanwhile
            assert other.recvfrom(9000)[0][0] == 1  # another source is still served
        dropped = node.node.statistics().dropped
        assert dropped["rate_source"] >= 85


async def test_deliveries_never_block_storage(tmp_path: Path) -> None:
    rng = random.Random(9)
    ident = Identity.generate()
    manifest = Manifest(tables=1)
    config = DHTConfig(delivery_buffer=1)
    async with member(ident, tmp_path, manifest=manifest, config=config) as solo:
        for _ in range(3):
            assert (await solo.node.put_packet(make_packet(ident, rng, manifest=manifest))).ok
        stats = solo.node.statistics()
        assert stats.deliveries == 1 and stats.deliveries_dropped == 2
        assert solo.store.statistics().packets == 3


async def test_an_upkeep_job_that_fails_is_counted_and_runs_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs: list[int] = []

    async def broken(node: object) -> None:
        runs.append(1)
        raise OSError(5, "Input/output error")

    node = SimpleNamespace(rng=random.Random(1), counters=Counters())
    with trio.move_on_after(35):
        await maintenance.every(node, 10.0, broken)  # type: ignore[arg-type]
    assert len(runs) == 3 and node.counters.task_errors == 3
