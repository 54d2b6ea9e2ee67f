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
        #: Writes of the list the store refused (the packet is kept in memory only).
        self.unsaved = 0

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
            self.items[packet.id] = (packet, keys)

    async def remember(self, packet: OutcomePacket, keys: Sequence[bytes]) -> None:
        entry = (packet, tuple(keys))
        if self._superseded(packet):
            return
        self.items[packet.id] = entry
        self.items.move_to_end(packet.id)
        while len(self.items) > self.limit:
            self.items.popitem(last=False)
        store = self.node.store
        if store is None:
            return
        try:
            await self.node.in_thread(store.remember_own, packet, entry[1], limit=self.limit)
        except StoreError as exc:
            self.unsaved += 1
            log.warning(
                "own packet kept in memory only",
                packet=packet.id.hex(),
                code=exc.code,
                error=str(exc),
            )

    def live(self, now_ms: int) -> dict[bytes, list[OutcomePacket]]:
        """The live packets by key (expired ones are forgotten here)."""
        for pid, (packet, _) in list(self.items.items()):
            if packet.expires_ms <= now_ms:
                del self.items[pid]
        by_key: dict[bytes, list[OutcomePacket]] = {}
        for packet, keys in self.items.values():
            for key in keys:
                by_key.setdefault(key, []).append(packet)
        return by_key

    def _superseded(self, packet: OutcomePacket) -> bool:
        """Drop the older packets of ``packet``'s series (a newer packet of a series
        supersedes the older in every store); True if a newer one is held."""
        if not packet.series:
            return False
        same = [
            (pid, held)
            for pid, (held, _) in self.items.items()
            if held.series == packet.series and pid != packet.id
        ]
        if any(held.created_ms >= packet.created_ms for _, held in same):
            return True
        for pid, _ in same:
            del self.items[pid]
        return False
