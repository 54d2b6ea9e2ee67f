"""Packet placement and search over the DHT (the client side of the packet RPCs).

- :meth:`PacketOps.put_packet`: for each key, a lookup whose query is
  ``store_packets`` itself (see :meth:`PacketOps.place`): the ``replicas`` closest
  nodes end up holding the packet (this node among them when it is that close; a
  node that fails or refuses is replaced by the next closest). With no peer
  reachable the packet stays here, and hand-off moves it once peers appear.
- :meth:`PacketOps.find_packets`: ids first (a FIND_PACKET_IDS lookup per key),
  then only the best packets (``get_packets``), verified and ranked here; see
  :mod:`qisd.dht.search`.
- Stock nodes ignore packet RPCs: a peer that never answered one but answers a
  ping is remembered as such (not evicted) and left out of placement; lookups
  still route through it with ``find_node``. An overloaded qisd peer says "busy"
  instead, and is asked again after a short backoff.

Server-side handling of stored and pushed packets is in :mod:`qisd.dht.inbound`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from kademlia.node import Node

from qisd.dht.api import KeyPlacement, PutReport
from qisd.dht.busy import BUSY, BUSY_RETRIES, busy_backoff
from qisd.dht.inbound import OK_STATUSES, Inbound
from qisd.dht.lookup import Reply
from qisd.dht.own import OwnPackets
from qisd.dht.paging import batches
from qisd.dht.search import PacketSearch
from qisd.dht.traverse import LookupState
from qisd.dht.wire import ID_BYTES
from qisd.fingerprint import keys_for
from qisd.packet import OutcomePacket, PacketError, check_admissible
from qisd.sketch import Sketch

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

T = TypeVar("T")
EXPIRED = "rejected:expired"
class PacketOps(Inbound):
    def __init__(self, node: DHTNode) -> None:
        super().__init__(node)
        #: What this node put as origin, for its republish.
        self.own = OwnPackets(node)
        #: Peers being checked (ping) after ignoring a packet RPC.
        self._classifying: set[tuple[str, int]] = set()
        #: The query side: ids first, then the best packets.
        self.search = PacketSearch(self)

    async def each_key(self, keys: Sequence[bytes], fn: Callable[[bytes], Awaitable[T]]) -> list[T]:
        """``fn(key)`` for every key, ``key_concurrency`` at a time, results in order."""
        results: dict[int, T] = {}
        limiter = trio.CapacityLimiter(self.node.config.key_concurrency)

        async def one(i: int, key: bytes) -> None:
            async with limiter:
                results[i] = await fn(key)

        async with trio.open_nursery() as nursery:
            for i, key in enumerate(keys):
                nursery.start_soon(one, i, key)
        return [results[i] for i in range(len(keys))]

    # -- put ----------------------------------------------------------------------

    async def put_packet(
        self, packet: OutcomePacket, *, keys: Sequence[bytes] | None = None
    ) -> PutReport:
        return (await self.put_packets([packet], keys=keys))[0]

    async def put_packets(
        self, packets: Sequence[OutcomePacket], *, keys: Sequence[bytes] | None = None
    ) -> list[PutReport]:
        """:meth:`put_packet` for many packets at once, one report each.

        Packets that share a key are placed together: one placement lookup per key
        and datagram's worth of packets, so a bulk emit costs a placement per key
        (per ~8 KB under it), not one per packet and key. A topic has at most
        ``tables`` x 2^``bits`` keys (128 by default). Where any node refused part
        of a group (quota, full, disk), its packets are placed again one by one, so
        each reports its own copies, not its siblings'. Every packet is checked
        before anything is sent (:class:`PacketError` names the first bad one).
        ``keys``, when given, replace every packet's own (tests and benchmarks).
        Packets some node took are remembered for republish as their origin; a
        packet no one took (the emit fails) is not.
        """
        node = self.node
        now_ms = node.wall_ms()
        if keys is not None:
            if not keys:
                raise PacketError("keys", "at least one key")
            for key in keys:
                if not isinstance(key, bytes) or len(key) != ID_BYTES:
                    raise PacketError("keys", f"each key must be {ID_BYTES} bytes")
        keys_of: list[list[bytes]] = []
        by_key: dict[bytes, dict[bytes, OutcomePacket]] = {}
        for packet in packets:
            check_admissible(packet, node.manifest, now_ms=now_ms)
            own = keys_for(node.manifest, packet.topic, packet.sketch.to_array())
            keys_of.append(own if keys is None else list(keys))
            for key in keys_of[-1]:
                by_key.setdefault(key, {})[packet.id] = packet
        groups: list[tuple[bytes, list[OutcomePacket]]] = []
        for key, members in by_key.items():
            pending = list(members.values())
            for chunk in batches([p.encoded for p in pending]):
                groups.append((key, pending[: len(chunk)]))
                pending = pending[len(chunk) :]
        placed: dict[tuple[bytes, bytes], KeyPlacement] = {}

        async def place_group(key: bytes, group: list[OutcomePacket]) -> None:
            async with limiter:
                placement = await self.place(key, group)
                if len(group) > 1 and placement.refusals:
                    for packet in group:
                        placed[key, packet.id] = await self.place(key, [packet])
                    return
            for packet in group:
                placed[key, packet.id] = placement

        limiter = trio.CapacityLimiter(node.config.key_concurrency)
        async with trio.open_nursery() as nursery:
            for key, group in groups:
                nursery.start_soon(place_group, key, group)
        reports: list[PutReport] = []
        taken: list[tuple[OutcomePacket, list[bytes]]] = []
        for packet, its_keys in zip(packets, keys_of, strict=True):
            report = PutReport(packet.id, tuple(placed[key, packet.id] for key in its_keys))
            if any(p.stored for p in report.placements):
                taken.append((packet, its_keys))
            reports.append(report)
        await self.own.remember_many(taken)
        return reports

    async def place(self, key: bytes, packets: Sequence[OutcomePacket]) -> KeyPlacement:
        """Store ``packets`` under ``key`` at the ``replicas`` closest willing nodes.

        The placement is itself the lookup (paper 2.3 with STORE as the query): each
        node asked stores the packets and names the nodes it knows closer to the key,
        and the lookup ends when the ``replicas`` closest live nodes have all stored
        them. A node that fails or refuses drops out and the next closest is asked.
        Once the routing table knows the key's neighbourhood this costs ``replicas``
        RPCs, not a FIND_NODE lookup followed by as many stores. A node passed on the
        way may keep an extra copy; expiry removes it.
        """
        node, me = self.node, self.node.me
        raws = [p.encoded for p in packets]
        width = max(1, node.replicas)
        stored_at: set[bytes] = set()
        refusals: list[str] = []

        async def store(peer: Node) -> Reply | None:
            if node.stock_peers.has((peer.ip, peer.port), trio.current_time()):
                return None  # a stock node takes no packets
            answer = await self.store_remote(peer, key, raws)
            if answer is None:
                return None
            statuses, closer = answer
            # A packet that expired on the way holds no one back: the peer still
            # took the rest (a batch re-placed near its expiry, a peer's clock ahead).
            taken = [s for s in statuses if s != EXPIRED]
            if taken and all(s in OK_STATUSES for s in taken):
                stored_at.add(peer.id)
                return Reply(closer)
            refusals.extend(s for s in statuses if s not in OK_STATUSES)
            return None

        st = LookupState(key, node.seeds(key), width=width, exclude=[me.id])
        await node.run_lookup(st, store)
        closest = st.closest(width)
        target = Node(key)
        local = node.store is not None and (
            len(closest) < width or me.distance_to(target) < closest[-1].distance_to(target)
        )
        stored = sum(1 for n in closest[: width - local] if n.id in stored_at)
        if local or (stored == 0 and node.store is not None):
            # Among the closest, or nobody took it: keep it here (hand-off moves it
            # to closer nodes when they appear).
            statuses = await self.store_local(key, packets, "local")
            local = True
            stored += all(s in OK_STATUSES for s in statuses)
            refusals.extend(s for s in statuses if s not in OK_STATUSES and s != EXPIRED)
        return KeyPlacement(key, stored, local, st.failures, tuple(refusals))

    async def store_remote(
        self, peer: Node, key: bytes, raws: list[bytes]
    ) -> tuple[list[str], list[Node]] | None:
        """``store_packets`` in datagram-sized batches: the statuses and the closer
        nodes the peer named, or None if it did not answer properly."""
        statuses: list[str] = []
        closer: list[Node] = []
        for batch in batches(raws):
            parsed = await self.store_batch(peer, key, batch)
            if parsed is None:
                return None
            statuses.extend(parsed[0])
            closer = closer or parsed[1]
        return statuses, closer

    async def store_batch(
        self, peer: Node, key: bytes, batch: list[bytes]
    ) -> tuple[list[str], list[Node]] | None:
        """One ``store_packets`` call, asked again (with backoff) while the peer says
        every packet is ``busy``: it is still one of the closest nodes."""
        node = self.node
        parsed: tuple[list[str], list[Node]] | None = None
        for attempt in range(BUSY_RETRIES):
            if attempt:
                await busy_backoff(node.rng, attempt - 1)
            ok, result = await self.packet_call(peer, "store_packets", [node.me.id, key, batch])
            parsed = self.parse_store_reply(result, len(batch)) if ok else None
            if parsed is None or not all(s == BUSY for s in parsed[0]):
                return parsed
        return parsed

    def parse_store_reply(self, result: Any, count: int) -> tuple[list[str], list[Node]] | None:
        node = self.node
        if isinstance(result, dict):
            status = result.get("status")
            nodes = node.parse_nodes("store_packets", result.get("nodes", []))
            if (
                nodes is not None
                and isinstance(status, list)
                and len(status) == count
                and all(isinstance(s, str) and len(s) <= 64 for s in status)
            ):
                return status, nodes
        node.counters.dropped["bad_reply"] += 1
        return None

    # -- find ---------------------------------------------------------------------

    async def find_packets(
        self, keys: Sequence[bytes], query: Sketch, m: int
    ) -> list[tuple[float, OutcomePacket]]:
        return await self.search.find_packets(keys, query, m)

    async def packet_call(self, peer: Node, name: str, args: list[Any]) -> tuple[bool, Any]:
        """A packet RPC. Silence from a peer not yet seen speaking them is checked with a
        ping (in the background): a stock node answers that and is remembered as one,
        so it is neither evicted nor asked for packets again; a dead one is evicted."""
        node = self.node
        addr = (peer.ip, peer.port)
        known = node.packet_peers.has(addr, trio.current_time())
        ok, result = await node.call(peer, name, args, evict=known)
        if ok:
            node.packet_peers.add(addr, trio.current_time())
        elif not known and addr not in self._classifying and len(self._classifying) < 64:
            self._classifying.add(addr)
            node.spawn(self._classify, peer)
        return ok, result

    async def _classify(self, peer: Node) -> None:
        node = self.node
        addr = (peer.ip, peer.port)
        try:
            if await node.ping(addr) is None:
                node.table.remove_contact(peer)
            elif not node.packet_peers.has(addr, trio.current_time()):
                node.stock_peers.add(addr, trio.current_time())
        finally:
            self._classifying.discard(addr)

    # -- listen -------------------------------------------------------------------

    async def listen(self, key: bytes, ttl_s: float) -> int:
        if not isinstance(key, bytes) or len(key) != ID_BYTES:
            raise ValueError(f"listen: key must be {ID_BYTES} bytes")
        if ttl_s <= 0:
            raise ValueError("listen: ttl_s must be > 0")
        self.node.subscriptions[key] = trio.current_time() + ttl_s
        return await self.register(key)

    async def register(self, key: bytes) -> int:
        """(Re)register a subscription at the key's responsible nodes; grants counted."""
        node = self.node
        remaining = node.subscriptions.get(key, 0.0) - trio.current_time()
        ttl = int(min(remaining, node.config.listen_ttl_max))
        if ttl < 1:
            return 0
        nodes, _ = await node.lookup_nodes(key)
        now = trio.current_time()
        chosen = [n for n in nodes if not node.stock_peers.has((n.ip, n.port), now)]
        granted = 0

        async def one(peer: Node) -> None:
            nonlocal granted
            ok, result = await node.call(peer, "listen", [node.me.id, key, ttl], evict=False)
            if ok and type(result) is int and result > 0:
                granted += 1

        async with trio.open_nursery() as nursery:
            for peer in chosen[: node.replicas]:
                nursery.start_soon(one, peer)
        return granted
