"""The packets this node put as their origin, which it republishes (paper 2.5).

Held in memory for the republish timer and written through to the store's ``own``
table (:mod:`qisd.store_own`), so a restarted node still republishes what it
emitted before the restart. A node without a store (or whose store refuses the
write: disk full, read-only) keeps the list in memory only; the put itself has
succeeded by then, so that refusal is logged and counted, not raised.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qisd.logs import get_logger
from qisd.packet import OutcomePacket
from qisd.storage import StoreError

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

log = get_logger(__name__)
#: Own packets kept for origin republish (the oldest created is dropped first).
MAX_OWN = 10_000

Keys = tuple[bytes, ...]


class OwnPackets:
    def __init__(self, node: DHTNode, limit: int = MAX_OWN) -> None:
        self.node = node
        self.limit = limit
        self.items: OrderedDict[bytes, tuple[OutcomePacket, Keys]] = OrderedDict()
        #: Series -> the id of its newest packet held in ``items``.
        self._series: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self.items)

    async def load(self) -> None:
        """Read the list back from the store (at start)."""
        store = self.node.store
        if store is None:
            return
        try:
            kept = await self.node.in_thread(store.own_packets, self.node.wall_ms())
        except StoreError as exc:
            log.warning("cannot read own packets for republish", error=str(exc))
            return
        for packet, keys in kept[-self.limit :]:
            self._add(packet, keys)

    async def remember(self, packet: OutcomePacket, keys: Sequence[bytes]) -> None:
        await self.remember_many([(packet, keys)])

    async def remember_many(self, items: Sequence[tuple[OutcomePacket, Sequence[bytes]]]) -> None:
        """Hold each ``(packet, keys)`` for republish, and write them to the store in
        one transaction (a bulk emit is one write, not one per packet)."""
        kept = [(packet, tuple(keys)) for packet, keys in items if self._add(packet, tuple(keys))]
        store = self.node.store
        if store is None or not kept:
            return
        try:
            await self.node.in_thread(store.remember_own_many, kept, limit=self.limit)
        except StoreError as exc:
            log.warning("own packets kept for republish in memory only",
                        packets=len(kept), first=kept[0][0].id.hex(), code=exc.code,
                        error=str(exc))

    def forget_expired(self, now_ms: int) -> int:
        """Forget the packets expired by ``now_ms`` (the store's rows go at its own
        sweep); returns how many."""
        gone = [pid for pid, (packet, _) in self.items.items() if packet.expires_ms <= now_ms]
        for pid in gone:
            self._drop(pid)
        return len(gone)

    def live(self, now_ms: int) -> dict[bytes, list[OutcomePacket]]:
        """The live packets by key (expired ones are forgotten here)."""
        self.forget_expired(now_ms)
        by_key: dict[bytes, list[OutcomePacket]] = {}
        for packet, keys in self.items.values():
            for key in keys:
                by_key.setdefault(key, []).append(packet)
        return by_key

    def _add(self, packet: OutcomePacket, keys: Keys) -> bool:
        """Hold ``packet``; False if a newer packet of its series is held (a newer
        packet of a series supersedes the older in every store)."""
        if packet.series:
            held = self._series.get(packet.series)
            if held is not None and held != packet.id:
                if self.items[held][0].created_ms >= packet.created_ms:
                    return False
                self._drop(held)
            self._series[packet.series] = packet.id
        self.items[packet.id] = (packet, keys)
        self.items.move_to_end(packet.id)
        while len(self.items) > self.limit:
            self._drop(next(iter(self.items)))
        return True

    def _drop(self, pid: bytes) -> None:
        packet, _ = self.items.pop(pid)
        if packet.series and self._series.get(packet.series) == pid:
            del self._series[packet.series]
