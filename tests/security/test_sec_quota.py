"""Store quotas through the DHT: one origin cannot hold more than its share of a node's
store (``origin_quota`` x ``max_packets``); the rest of its packets are refused with
reason ``quota`` (counted, not delivered), and other origins are still accepted."""

from __future__ import annotations

import random
from pathlib import Path

from sec_helpers import KEY, now_ms, packet, running_node

from qisd.dht import DHTConfig
from qisd.identity import Identity
from qisd.manifest import DEFAULT_MANIFEST

CONFIG = DHTConfig(rpc_timeout=1.0)
MAX_PACKETS = 40
SHARE = 0.25  # -> 10 packets per origin


async def test_one_origin_cannot_fill_the_store(tmp_path: Path) -> None:
    rng = random.Random(4)
    greedy, honest = Identity.generate(), Identity.generate()
    store_options = {"max_packets": MAX_PACKETS, "origin_quota": SHARE}
    limit = int(MAX_PACKETS * SHARE)
    async with (
        running_node(
            Identity.generate(), DEFAULT_MANIFEST, tmp_path / "t", config=CONFIG,
            store_options=store_options,
        ) as target,
        # Storeless senders: every copy has to go to the target.
        running_node(greedy, DEFAULT_MANIFEST, None, config=CONFIG) as flooder,
        running_node(honest, DEFAULT_MANIFEST, None, config=CONFIG) as other,
    ):
        await flooder.bootstrap([target.address])
        await other.bootstrap([target.address])
        reports = [
            await flooder.put_packet(packet(greedy, DEFAULT_MANIFEST, rng), keys=[KEY])
            for _ in range(3 * limit)
        ]
        assert all(r.ok for r in reports[:limit])
        for r in reports[limit:]:
            assert not r.ok
            assert "rejected:quota" in r.placements[0].refusals
        # Other origins still get in (and keep getting in while the greedy one is refused).
        for _ in range(limit):
            report = await other.put_packet(packet(honest, DEFAULT_MANIFEST, rng), keys=[KEY])
            assert report.ok
            late = await flooder.put_packet(packet(greedy, DEFAULT_MANIFEST, rng), keys=[KEY])
            assert not late.ok

        stats = target.statistics()
        assert stats.packets_rejected["quota"] == 3 * limit
        assert stats.packets_accepted == 2 * limit
        assert stats.deliveries == 2 * limit
        assert target.store is not None
        held = target.store.key_items(KEY, now_ms())
        origins = [p.origin for p in held]
        assert origins.count(greedy.public_key) == limit
        assert origins.count(honest.public_key) == limit
