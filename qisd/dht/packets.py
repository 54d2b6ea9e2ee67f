"""Packet placement and search over the DHT (the client side of the packet RPCs).

- :meth:`PacketOps.put_packet`: for each key, a lookup whose query is
  ``store_packets`` itself (see :meth:`PacketOps.place`): the ``replicas`` closest
  nodes end up holding the packet (this node among them when it is that close; a
  node that fails or refuses is replaced by the next closest). With no peer
  reachable the packet stays here, and hand-off moves it once peers appear.
- :meth:`PacketOps.find_packets`: for each key, a FIND_PACKETS lookup (width
  ``replicas``) that collects the packets the responsible nodes return and stops
  once ``find_holders`` of the ``replicas`` closest have answered with packets (see
  :meth:`PacketOps.lookup_packets`), pages further where a node says ``more``, then
  verifies each packet once and ranks all by cosine to the query here (a peer's
  similarity figure is never trusted).
- Stock nodes ignore packet RPCs: a peer that never answered one but answers a
  ping is remembered as such (not evicted) and left out of placement; lookups
  still route through it with ``find_node``. An overloaded qisd peer says "busy"
  instead, and is asked again after a short backoff.

Server-side handling of stored and pushed packets is in :mod:`qisd.dht.inbound`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import trio
from kademlia.node import Node

from qisd.dht.api import KeyPlacement, PutReport
from qisd.dht.inbound import OK_STATUSES, Inbound
from qisd.dht.lookup import Reply
from qisd.dht.own import OwnPackets
from qisd.dht.paging import MAX_BATCH, batches, verify_all
from qisd.dht.traverse import FAILED, LookupState
from qisd.dht.wire import ID_BYTES
from qisd.fingerprint import keys_for
from qisd.packet import OutcomePacket, PacketError, check_admissible, packet_id
from qisd.sketch import Sketch, cosine_many

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

T = TypeVar("T")
EXPIRED = "rejected:expired"
#: A busy peer is asked this many times, after BUSY_BACKOFF, 2x, 4x... seconds.
BUSY_RETRIES = 3
BUSY_BACKOFF = 0.05


class FindReply(NamedTuple):
    nodes: list[Node]
    packets: list[bytes]
    more: bool
    busy: bool


def holders_among_closest(
    state: LookupState, holders: set[bytes], *, here: Node | None = None
) -> int:
    """How many of the ``width`` closest live nodes ``state`` knows are in ``holders``.

    ``here`` (this node, when its own store answered with packets) takes its place
    among them by distance and counts as a holder if it is that close.
    """
    status = state.shortlist.status
    window: list[tuple[int, bool]] = []
    for distance, node_id in state.shortlist.order:
        if status[node_id] == FAILED:
            continue
        window.append((distance, node_id in holders))
        if len(window) == state.width:
            break
    if here is not None:
        window.append((state.target.long_id ^ here.long_id, True))
        window.sort()
    return sum(held for _, held in window[: state.width])


class PacketOps(Inbound):
    def __init__(self, node: DHTNode) -> None:
        super().__init__(node)
        #: What this node put as origin, for its republish.
        self.own = OwnPackets(node)
        #: Peers being checked (ping) after ignoring a packet RPC.
        self._classifying: set[tuple[str, int]] = set()

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
        node = self.node
        check_admissible(packet, node.manifest, now_ms=node.wall_ms())
        if keys is None:
            keys = keys_for(node.manifest, packet.topic, packet.sketch.to_array())
        if not keys:
            raise PacketError("keys", "at least one key")
        for key in keys:
            if not isinstance(key, bytes) or len(key) != ID_BYTES:
                raise PacketError("keys", f"each key must be {ID_BYTES} bytes")
        placements = await self.each_key(keys, lambda key: self.place(key, [packet]))
        if any(p.stored for p in placements):
            # Republished as its origin; a packet no one took (the emit fails) is not.
            await self.own.remember(packet, keys)
        return PutReport(packet.id, tuple(placements))

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
        return KeyPlacement(key, stored, local, st.failures, tuple(refusals))

    async def store_remote(
        self, peer: Node, key: bytes, raws: list[bytes]
    ) -> tuple[list[str], list[Node]] | None:
        """``store_packets`` in datagram-sized batches: the statuses and the closer
        nodes the peer named, or None if it did not answer properly."""
        node = self.node
        statuses: list[str] = []
        closer: list[Node] = []
        for batch in batches(raws):
            ok, result = await self.packet_call(peer, "store_packets", [node.me.id, key, batch])
            if not ok:
                return None
            parsed = self.parse_store_reply(result, len(batch))
            if parsed is None:
                return None
            statuses.extend(parsed[0])
            closer = closer or parsed[1]
        return statuses, closer

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
        if not 1 <= m <= 10_000:
            raise ValueError(f"find_packets: m must be in 1..10000, got {m}")
        node = self.node
        now_ms = node.wall_ms()
        found: dict[bytes, tuple[float, OutcomePacket]] = {}
        unverified: dict[bytes, bytes] = {}

        async def one(key: bytes) -> None:
            found_here: Sequence[tuple[float, OutcomePacket]] = ()
            if node.store is not None and self.may_hold(key):
                found_here = await node.in_thread(node.store.top, key, query, m, now_ms=now_ms)
                for sim, packet in found_here:
                    found[packet.id] = (float(sim), packet)
            for raw in await self.lookup_packets(key, query, m, held_here=bool(found_here)):
                pid = packet_id(raw)
                if pid not in found:
                    unverified.setdefault(pid, raw)

        await self.each_key(keys, one)
        fresh = [raw for pid, raw in unverified.items() if pid not in found]
        if fresh:
            checked = await node.in_thread(verify_all, fresh, node.manifest, now_ms=now_ms)
            good = [p for p in checked if isinstance(p, OutcomePacket)]
            if len(good) < len(checked):
                node.counters.dropped["bad_packet"] += len(checked) - len(good)
                node.counters.packet_statuses(
                    f"rejected:{p.reason}" for p in checked if isinstance(p, PacketError)
                )
            if good:
                sims = cosine_many(query, [p.sketch for p in good])
                for packet, sim in zip(good, sims, strict=True):
                    found[packet.id] = (float(sim), packet)
        ranked = sorted(found.values(), key=lambda item: (-item[0], item[1].id))
        return ranked[:m]

    async def lookup_packets(
        self, key: bytes, query: Sketch, m: int, *, held_here: bool = False
    ) -> list[bytes]:
        """FIND_PACKETS for one key: the encoded packets the responsible nodes hold.

        Every replica of a key holds the same packets in a settled swarm, so asking
        all ``replicas`` closest nodes (the lookup's natural end) returns the same
        top ``m`` that many times over. The lookup stops instead once
        ``find_holders`` (default 2) nodes have answered with at least one packet
        *and* are, when the answer arrives, among the ``replicas`` closest live
        nodes the lookup knows (this node too, when ``held_here``: its own store
        answered with packets and it is that close). Their answers are unioned, and
        each of them is paged to its own top ``m`` afterwards (``more``), so the
        result misses a packet only if every counted holder lacks it: one stale or
        partial replica (a fresh closest node that hand-off has not filled yet, a
        replica that was down during a put) is covered by the other.

        Why "among the closest known" and not just "any two holders": placement
        stores at every node it asks (:meth:`place`), and old replicas keep their
        copies until expiry, so nodes passed on the way to the key may hold an
        extra, older or partial set. Such a node answers early (it is asked first)
        but names closer nodes, which push it out of the window before it can
        count; holders only count once the lookup has reached the key's
        neighbourhood. A stricter "every node closer than the counted holders has
        answered" would also wait for slow or in-flight closer replicas, which
        costs latency and RPCs when answers arrive out of order, for no gain when
        replicas agree. Here a replica still in flight keeps its place in the window
        but is not waited for, and one that fails leaves it (the next closest takes
        its place), so dead or slow replicas never block the stop.

        With no holder in reach (nobody holds anything, or fewer than
        ``find_holders`` replicas are up) the lookup runs to its normal end, as
        before. Stopping cancels the requests still in flight
        (:func:`~qisd.dht.lookup.iterate`); their late answers are dropped.
        """
        node, me = self.node, self.node.me
        limit = min(m, MAX_BATCH)
        wire_sketch = [query.dim, query.bits, query.data]
        collected: list[bytes] = []
        more_from: list[tuple[Node, int]] = []
        holders: set[bytes] = set()
        need = node.config.find_holders
        here = me if held_here else None

        async def find(peer: Node) -> Reply | None:
            if node.stock_peers.has((peer.ip, peer.port), trio.current_time()):
                return await node.find_node_reply(key, peer)
            reply = await self.ask_find(peer, [me.id, key, wire_sketch, limit, 0])
            if reply is None:
                return None
            return Reply(reply.nodes, payload=(reply.packets, reply.more))

        def on_reply(peer: Node, reply: Reply) -> bool:
            if reply.payload is not None:
                packets, more = reply.payload
                collected.extend(packets)
                if more and 0 < len(packets) < m:
                    more_from.append((peer, len(packets)))
                if packets:
                    holders.add(peer.id)
            # Checked on every answer: closer nodes it names can push a holder out.
            return len(holders) + held_here >= need and (
                holders_among_closest(st, holders, here=here) >= need
            )

        width = max(1, self.node.replicas)
        st = LookupState(key, node.seeds(key), width=width, exclude=[me.id])
        await node.run_lookup(st, find, on_reply)

        async def pages(peer: Node, got: int) -> None:
            for _ in range(node.config.max_pages - 1):
                want = min(m - got, MAX_BATCH)
                reply = await self.ask_find(peer, [me.id, key, wire_sketch, want, got])
                if reply is None:
                    return
                collected.extend(reply.packets)
                got += len(reply.packets)
                if not (reply.more and reply.packets and got < m):
                    return

        async with trio.open_nursery() as nursery:
            for peer, got in more_from:
                nursery.start_soon(pages, peer, got)
        return collected

    async def ask_find(self, peer: Node, args: list[Any]) -> FindReply | None:
        """One ``find_packets`` call, asked again (with backoff) while the peer is busy."""
        node = self.node
        reply = None
        for attempt in range(BUSY_RETRIES):
            ok, result = await self.packet_call(peer, "find_packets", args)
            reply = self.parse_find_reply(result) if ok else None
            if reply is None or not reply.busy:
                return reply
            await trio.sleep(BUSY_BACKOFF * 2**attempt * (0.5 + node.rng.random()))
        assert reply is not None
        return FindReply(reply.nodes, [], False, True)

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

    def parse_find_reply(self, result: Any) -> FindReply | None:
        node = self.node
        if not isinstance(result, dict):
            node.counters.dropped["bad_reply"] += 1
            return None
        nodes = node.parse_nodes("find_packets", result.get("nodes", []))
        packets = result.get("packets", [])
        cap = node.manifest.packet_max_bytes
        if nodes is None or not (
            isinstance(packets, list)
            and len(packets) <= MAX_BATCH
            and all(isinstance(p, bytes) and 0 < len(p) <= cap for p in packets)
        ):
            node.counters.dropped["bad_reply"] += 1
            return None
        return FindReply(nodes, packets, result.get("more") is True, result.get("busy") is True)

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
