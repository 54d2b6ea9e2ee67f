"""Packets arriving at this node: stored as a responsible node, served, pushed.

Every packet is decoded, its signature verified and admitted against the manifest
(off the trio thread, with the SQLite write in the same hop, many requests per
transaction: :mod:`qisd.dht.ingest`) before anything else sees it. A packet new to
this node becomes a delivery; a packet new under a key is pushed to the peers
listening to that key; both paths are bounded queues that
drop (and count) rather than wait, so storage never blocks on a slow consumer.

Every packet offered is counted as accepted or refused by reason
(:meth:`~qisd.dht.stats.Counters.packet_statuses`). A replayed packet is a
``duplicate``: the store holds it once, so it is neither delivered nor pushed again;
pushed packets (``notify``, no store involved) are remembered by id for the same
reason. A store that cannot write refuses with ``rejected:disk`` (see
:mod:`qisd.dht.ingest`); reads and the rest of the node go on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio
from kademlia.node import Node

from qisd.dht.api import Delivery, PutResult
from qisd.dht.ingest import Ingest
from qisd.dht.paging import batches, find_ids_reply, find_reply, get_reply, verify_all
from qisd.dht.recent import RecentStores
from qisd.packet import OutcomePacket, PacketError
from qisd.sketch import Sketch
from qisd.store import StoreError

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

#: Store outcomes that mean "held here" (``superseded``: a newer one of the series is).
OK_STATUSES = frozenset({"stored", "duplicate", "added_key", "superseded"})
#: New to this key: pushed to its listeners. Only ``stored`` (new to this node) is
#: also a delivery, so a packet held under several keys is synthesised once.
NEW_UNDER_KEY = frozenset({"stored", "added_key"})
#: Most keys tracked in memory; beyond it every request asks the store.
MAX_TRACKED_KEYS = 1_000_000
#: Ids of packets lately delivered by ``notify`` (a replay is not delivered again).
MAX_NOTIFIED = 8192


def status_text(result: PutResult) -> str:
    if result.status in OK_STATUSES:
        return result.status
    return f"rejected:{result.reason or 'refused'}"


class Inbound:
    def __init__(self, node: DHTNode) -> None:
        self.node = node
        #: Keys the store holds packets under (a superset: expired keys leave at the
        #: next sweep), or None while unknown. Most ``find_packets`` requests reach
        #: nodes on the way to a key, not its holders: they are answered from this set
        #: without a thread hop to SQLite.
        self.held: set[bytes] | None = None
        self.ingest = Ingest(node)
        #: Entries the key's other holders stored here lately: not republished meanwhile.
        self.recent = RecentStores()
        self._notified: OrderedDict[bytes, None] = OrderedDict()
        self.notify_send, self.notify_recv = trio.open_memory_channel[
            tuple[Node, bytes, list[bytes]]
        ](node.config.notify_queue)

    def may_hold(self, key: bytes) -> bool:
        return self.node.store is not None and (self.held is None or key in self.held)

    def note_held(self, key: bytes) -> None:
        if self.held is not None:
            self.held.add(key)
            if len(self.held) > MAX_TRACKED_KEYS:
                self.held = None

    async def reload_held(self) -> None:
        """Re-read the store's keys (at start, and after each expiry sweep)."""
        store = self.node.store
        if store is None:
            return
        keys = await self.node.in_thread(store.keys, self.node.wall_ms())
        self.held = set(keys) if len(keys) <= MAX_TRACKED_KEYS else None

    async def accept(
        self, key: bytes, raws: list[bytes], source: str, *, holder: bool = False
    ) -> list[str]:
        """Verify and store packets a peer sent for ``key``; a status per packet.

        What ``holder`` (the peer is one of the key's closest nodes) stored here
        counts as republished: it is not republished here for an interval
        (:mod:`qisd.dht.recent`).
        """
        checked, results = await self.ingest.submit(key, raws)
        good = [p for p in checked if isinstance(p, OutcomePacket)]
        self.after_store(key, good, results, source)
        stored = iter(results)
        statuses: list[str] = []
        held: list[tuple[bytes, int]] = []
        for item in checked:
            if isinstance(item, PacketError):
                statuses.append(f"rejected:{item.reason}")
            else:
                statuses.append(status_text(next(stored)))
                if holder and statuses[-1] in OK_STATUSES:
                    held.append((item.id, item.expires_ms))
        if held:
            self.recent.note(key, held, trio.current_time())
        self.node.counters.packet_statuses(statuses)
        return statuses

    async def store_local(
        self, key: bytes, packets: Sequence[OutcomePacket], source: str
    ) -> list[str]:
        """Store already-verified packets here (this node is responsible for ``key``)."""
        store = self.node.store
        assert store is not None
        items = [(key, p) for p in packets]
        try:
            results = await self.node.in_thread(
                store.put_many, items, now_ms=self.node.wall_ms()
            )
        except StoreError as exc:
            # Refused like a peer's refusal: the placement looks elsewhere, and the
            # caller (emit) learns why from ``store.failure``.
            results = self.ingest.refuse(exc, len(items))
        else:
            self.ingest.stored()
        self.after_store(key, packets, results, source)
        return [status_text(r) for r in results]

    def after_store(
        self,
        key: bytes,
        packets: Sequence[OutcomePacket],
        results: Sequence[PutResult],
        source: str,
    ) -> None:
        """Deliver what is new here; push what is new under ``key`` to its listeners."""
        node = self.node
        pushed = []
        if any(r.status in OK_STATUSES for r in results):
            self.note_held(key)
        for packet, result in zip(packets, results, strict=True):
            if result.status == "stored":
                node.deliver(Delivery(key, packet, source))
            if result.status in NEW_UNDER_KEY:
                pushed.append(packet.encoded)
        if not pushed:
            return
        listeners = node.listeners.for_key(key, trio.current_time())
        if not listeners:
            return
        for batch in batches(pushed):
            for peer in listeners:
                try:
                    self.notify_send.send_nowait((peer, key, batch))
                except trio.WouldBlock:
                    node.counters.dropped["notify_overflow"] += 1

    async def notify_worker(self) -> None:
        """Push queued notifications to listeners (several workers run at once)."""
        node = self.node
        async for peer, key, batch in self.notify_recv:
            await node.call(peer, "notify", [node.me.id, key, batch], evict=False)

    async def accept_notify(self, key: bytes, raws: list[bytes]) -> list[str]:
        node = self.node
        checked = await node.in_thread(verify_all, raws, node.manifest, now_ms=node.wall_ms())
        statuses = []
        for item in checked:
            if isinstance(item, PacketError):
                statuses.append(f"rejected:{item.reason}")
            elif item.id in self._notified:
                statuses.append("duplicate")
            else:
                self._notified[item.id] = None
                if len(self._notified) > MAX_NOTIFIED:
                    self._notified.popitem(last=False)
                node.deliver(Delivery(key, item, "notify"))
                statuses.append("accepted")
        node.counters.packet_statuses(statuses)
        return statuses

    async def serve_find(
        self,
        key: bytes,
        sketch: Sketch,
        limit: int,
        offset: int,
        nodes: list[list[Any]],
        *,
        ids: bool = False,
    ) -> dict[str, Any]:
        """A ``find_packets`` reply, or with ``ids`` a ``find_packet_ids`` one."""
        store = self.node.store
        assert store is not None
        now_ms, want = self.node.wall_ms(), limit + 1  # one more: is there more?
        if ids:
            top_ids = await self.node.in_thread(
                store.top_ids, key, sketch, want, now_ms=now_ms, offset=offset
            )
            return find_ids_reply(nodes, top_ids, limit)
        top = await self.node.in_thread(store.top, key, sketch, want, now_ms=now_ms, offset=offset)
        return find_reply(nodes, top, limit)

    async def serve_get(self, ids: list[bytes]) -> dict[str, Any]:
        store = self.node.store
        assert store is not None
        held = await self.node.in_thread(store.encoded, ids, now_ms=self.node.wall_ms())
        return get_reply([held[pid] for pid in dict.fromkeys(ids) if pid in held])
