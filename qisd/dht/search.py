"""Finding packets over the DHT: ids first, then only the best packets (trio).

A query names many keys (multi-probe LSH: 32 by default) and wants the best ``m``
packets over all of them. Every holder of a key ranks its bucket against the query
sketch, and the same good packets sit under several of the probed keys and at
several replicas of each. Moving the packets themselves in every answer moved each
of the winners many times over (a query's traffic was ~3/4 packets). So a search
runs in two steps, as a search engine's query-then-fetch:

1. **Ids.** For each key, a FIND_PACKET_IDS lookup (width ``replicas``) collects the
   ids and similarities the responsible nodes report, and stops once
   ``find_holders`` of the ``replicas`` closest have answered with some (see
   :meth:`PacketSearch.lookup_ids`); a node that says ``more`` is paged.
2. **Packets.** The ids are ranked by the reported similarity together with the
   packets this node holds itself; the packets of the best ``m`` not held here are
   fetched with ``get_packets`` from nodes that reported them (fewest calls: ids
   grouped by holder), verified, and ranked by the cosine computed here.

A peer's similarity figure only chooses what to fetch; it is never trusted for the
ranking: a fetched packet must hash to the id asked for and verify, and then takes
its place by its own similarity (a figure outside [-1, 1] makes the whole answer
bad). A node caught out (no usable answer, less than half of what it offered,
bytes that do not verify, or an overstated figure: :meth:`PacketSearch.fetch_round`)
is dropped with everything it reported, and the next round fetches what then ranks
among the best ``m``: an id whose node did not return it from :data:`RETRY_FANOUT`
other nodes that reported it. So one lying or withholding node costs a round, not
the answer; a search runs at most :data:`MAX_ROUNDS` rounds, and stops after
:data:`FETCH_ROUNDS` in which nobody was caught.

``find_packet_ids`` and ``get_packets`` are this protocol's query RPCs: a node of a
build without them does not answer them, so a swarm upgrades to them together.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import trio
from kademlia.node import Node

from qisd.dht.busy import BUSY_RETRIES, busy_backoff
from qisd.dht.lookup import Reply
from qisd.dht.paging import MAX_BATCH, verify_all
from qisd.dht.traverse import FAILED, LookupState
from qisd.logs import get_logger
from qisd.packet import PACKET_ID_BYTES, OutcomePacket, PacketError, packet_id
from qisd.sketch import Sketch, cosine_many
from qisd.storage import StoreError

if TYPE_CHECKING:
    from qisd.dht.packets import PacketOps

#: Rounds of ``get_packets`` per search in which no node was caught out (the first
#: fetches the best ids; the others replace what failed or ranked lower than
#: reported). A round that catches a node lying, withholding or failing does not
#: count here (every such node is dropped), only against MAX_ROUNDS.
FETCH_ROUNDS = 4
#: Rounds of ``get_packets`` per search at most, caught nodes or not (colluding
#: liars can each cost a round; they cannot cost more than this).
MAX_ROUNDS = 2 * FETCH_ROUNDS
#: Nodes asked at once for an id whose first node did not return it.
RETRY_FANOUT = 2
#: Reasons a fetched packet may fail here with nobody at fault (clocks differ, or
#: it lapsed between the two steps): the id is dropped, its nodes are not.
NO_FAULT = frozenset({"expired", "future"})
#: How far a node's similarity figure may exceed the cosine computed here (both
#: are float64 over the same quantized sketches; they differ in the last bits).
SIM_SLACK = 1e-4
#: A reported similarity outside [-MAX_SIM, MAX_SIM] is no cosine: the answer is bad.
MAX_SIM = 1.0 + SIM_SLACK
#: Seconds between log lines about an unreadable local store.
READ_LOG_INTERVAL = 60.0

log = get_logger(__name__)


class IdsReply(NamedTuple):
    nodes: list[Node]
    ids: list[bytes]
    sims: list[float]
    more: bool
    busy: bool


class Offers:
    """Ids nodes reported, with each node's similarity figure for each."""

    def __init__(self) -> None:
        self.reports: dict[bytes, dict[bytes, float]] = {}
        self.peers: dict[bytes, Node] = {}

    def add(self, pid: bytes, sim: float, peer: Node) -> None:
        self.peers[peer.id] = peer
        reports = self.reports.setdefault(pid, {})
        reports[peer.id] = max(sim, reports.get(peer.id, -1.0))

    def sim(self, pid: bytes) -> float:
        """The best figure any node still trusted gave for ``pid``."""
        return max(self.reports[pid].values())

    def holders(self, pid: bytes) -> list[Node]:
        return [self.peers[peer_id] for peer_id in self.reports[pid]]

    def drop(self, pid: bytes) -> None:
        del self.reports[pid]

    def forget(self, pid: bytes, peer_id: bytes) -> None:
        """``peer_id`` no longer has ``pid`` (it expired or was superseded there)."""
        reports = self.reports.get(pid)
        if reports is not None:
            reports.pop(peer_id, None)
            if not reports:
                del self.reports[pid]

    def drop_peer(self, peer_id: bytes) -> None:
        """Forget everything ``peer_id`` reported (it lied, withheld or failed); ids
        only it reported go with it."""
        for pid in [pid for pid, r in self.reports.items() if peer_id in r]:
            del self.reports[pid][peer_id]
            if not self.reports[pid]:
                del self.reports[pid]

    def overstated(self, pid: bytes, sim: float) -> list[bytes]:
        """Nodes whose figure for ``pid`` is above ``sim`` (its cosine here)."""
        return [peer_id for peer_id, s in self.reports.get(pid, {}).items() if s > sim + SIM_SLACK]


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


def fetch_plan(
    want: Sequence[bytes], offers: Offers, tried: dict[bytes, set[bytes]]
) -> dict[bytes, tuple[Node, list[bytes]]]:
    """Which node to ask for which ids, by node id. An id not asked for before comes
    from one node that reported it, the one that reported the most of ``want``
    (fewest calls); an id asked for before (its node did not return it) is asked of
    :data:`RETRY_FANOUT` other nodes that reported it at once. Ids with no such node
    left are not planned."""
    reach: dict[bytes, int] = defaultdict(int)
    for pid in want:
        for peer_id in offers.reports[pid]:
            reach[peer_id] += 1
    plan: dict[bytes, tuple[Node, list[bytes]]] = {}
    for pid in want:
        choices = [p for p in offers.holders(pid) if p.id not in tried[pid]]
        choices.sort(key=lambda p: (-reach[p.id], p.id))
        choices = choices[: 1 if not tried[pid] else RETRY_FANOUT]
        for peer in choices:
            plan.setdefault(peer.id, (peer, []))[1].append(pid)
    return plan


class PacketSearch:
    """The query side of the packet RPCs (see the module docstring)."""

    def __init__(self, ops: PacketOps) -> None:
        self.ops = ops
        self.node = ops.node
        #: When a failed read of the local store was last logged (trio clock).
        self._read_logged = -READ_LOG_INTERVAL

    def _read_failed(self, exc: StoreError) -> None:
        """Count a failed local read (the query goes on with what peers hold), and
        log it at most once a minute."""
        self.node.counters.dropped["store_read_error"] += 1
        now = trio.current_time()
        if now - self._read_logged >= READ_LOG_INTERVAL:
            self._read_logged = now
            log.warning("local store unreadable; queries answered from peers",
                        code=exc.code, error=str(exc))

    async def find_packets(
        self, keys: Sequence[bytes], query: Sketch, m: int
    ) -> list[tuple[float, OutcomePacket]]:
        if not 1 <= m <= 10_000:
            raise ValueError(f"find_packets: m must be in 1..10000, got {m}")
        node, ops = self.node, self.ops
        now_ms = node.wall_ms()
        found: dict[bytes, tuple[float, OutcomePacket]] = {}
        offers = Offers()

        async def one(key: bytes) -> None:
            found_here: Sequence[tuple[float, OutcomePacket]] = ()
            if node.store is not None and ops.may_hold(key):
                try:
                    found_here = await node.in_thread(node.store.top, key, query, m,
                                                      now_ms=now_ms)
                except StoreError as exc:  # the disk failed: what peers hold still counts
                    self._read_failed(exc)
                for sim, packet in found_here:
                    found[packet.id] = (float(sim), packet)
            for pid, sim, peer in await self.lookup_ids(key, query, m, held_here=bool(found_here)):
                offers.add(pid, sim, peer)

        await ops.each_key(keys, one)
        await self.fetch_best(found, offers, query, m, now_ms=now_ms)
        ranked = sorted(found.values(), key=lambda item: (-item[0], item[1].id))
        return ranked[:m]

    async def fetch_best(
        self,
        found: dict[bytes, tuple[float, OutcomePacket]],
        offers: Offers,
        query: Sketch,
        m: int,
        *,
        now_ms: int,
    ) -> None:
        """Fetch into ``found`` the offered packets that rank among the best ``m``.

        After each round, a node caught out (see :meth:`fetch_round`) is dropped
        with everything it reported, and the ranking is made again.
        """
        tried: dict[bytes, set[bytes]] = defaultdict(set)
        clean = rounds = 0
        while clean < FETCH_ROUNDS and rounds < MAX_ROUNDS:
            rounds += 1
            while True:
                ranking = [(sim, pid) for pid, (sim, _) in found.items()]
                ranking += [(offers.sim(pid), pid) for pid in offers.reports if pid not in found]
                ranking.sort(key=lambda item: (-item[0], item[1]))
                want = [pid for _, pid in ranking[:m] if pid not in found]
                plan = fetch_plan(want, offers, tried)
                planned = {pid for _, ids in plan.values() for pid in ids}
                gone = [pid for pid in want if pid not in planned]
                if not gone:
                    break
                for pid in gone:
                    offers.drop(pid)  # every node that reported it was asked: the
                    # next best takes its place (ranked again, in this same round)
            if not plan:
                return
            for peer, ids in plan.values():
                for pid in ids:
                    tried[pid].add(peer.id)
            caught = await self.fetch_round(plan.values(), found, offers, query, now_ms=now_ms)
            for peer_id, reason in caught.items():
                offers.drop_peer(peer_id)
                self.node.counters.query_peers_dropped[reason] += 1
            clean += not caught

    async def fetch_round(
        self,
        plan: Iterable[tuple[Node, list[bytes]]],
        found: dict[bytes, tuple[float, OutcomePacket]],
        offers: Offers,
        query: Sketch,
        *,
        now_ms: int,
    ) -> dict[bytes, str]:
        """One round of ``get_packets``: verified packets into ``found`` by their
        cosine here; the ids of the nodes caught out, and why. A node is caught when it gave
        no usable answer (down, busy, malformed), returned less than half of what it
        offered (an honest node lacks an id only when it lapsed or was superseded
        since), returned bytes that do not verify, or gave a figure above the cosine
        computed here for any fetched packet. Ids a node returned most but not all
        of are forgotten for it alone; a packet refused for its time (``expired``,
        ``future``: clocks differ) is dropped with no one blamed."""
        node = self.node
        caught: dict[bytes, str] = {}
        fresh: dict[bytes, tuple[bytes, bytes]] = {}  # id -> (bytes, who sent them)
        for peer, ids, (by_id, answered) in await self.fetch(plan):
            if not answered:
                caught[peer.id] = "no_answer"
            elif 2 * len(by_id) < len(ids):
                caught[peer.id] = "withheld"
            else:
                for pid in set(ids) - by_id.keys():
                    offers.forget(pid, peer.id)
            fresh.update((pid, (raw, peer.id)) for pid, raw in by_id.items())
        if not fresh:
            return caught
        raws = [raw for raw, _ in fresh.values()]
        checked = await node.in_thread(verify_all, raws, node.manifest, now_ms=now_ms)
        good = [p for p in checked if isinstance(p, OutcomePacket)]
        if len(good) < len(checked):
            node.counters.dropped["bad_packet"] += len(checked) - len(good)
            node.counters.packet_statuses(
                f"rejected:{p.reason}" for p in checked if isinstance(p, PacketError)
            )
            for (pid, (_, sender)), result in zip(fresh.items(), checked, strict=True):
                if isinstance(result, PacketError):
                    offers.reports.pop(pid, None)
                    if result.reason not in NO_FAULT:
                        caught.setdefault(sender, "bad_packet")
        if good:
            sims = cosine_many(query, [p.sketch for p in good])
            for packet, sim in zip(good, sims, strict=True):
                found[packet.id] = (float(sim), packet)
                for peer_id in offers.overstated(packet.id, float(sim)):
                    caught.setdefault(peer_id, "overstated")  # the first reason found
        return caught

    async def fetch(
        self, plan: Iterable[tuple[Node, list[bytes]]]
    ) -> list[tuple[Node, list[bytes], tuple[dict[bytes, bytes], bool]]]:
        """``get_packets`` from every node of the plan at once: what each returned."""
        results: list[tuple[Node, list[bytes], tuple[dict[bytes, bytes], bool]]] = []

        async def get(peer: Node, ids: list[bytes]) -> None:
            results.append((peer, ids, await self.get_packets(peer, ids)))

        async with trio.open_nursery() as nursery:
            for peer, ids in plan:
                nursery.start_soon(get, peer, ids)
        return results

    async def lookup_ids(
        self, key: bytes, query: Sketch, m: int, *, held_here: bool = False
    ) -> list[tuple[bytes, float, Node]]:
        """FIND_PACKET_IDS for one key: ``(id, similarity, holder)`` as the responsible
        nodes report them.

        Every replica of a key holds the same packets in a settled swarm, so asking
        all ``replicas`` closest nodes (the lookup's natural end) returns the same
        top ``m`` that many times over. The lookup stops instead once
        ``find_holders`` (default 2) nodes have answered with at least one id *and*
        are, when the answer arrives, among the ``replicas`` closest live nodes the
        lookup knows (this node too, when ``held_here``: its own store answered
        with packets and it is that close). Their answers are unioned, and each of
        them is paged to its own top ``m`` afterwards (``more``), so the result
        misses a packet only if every counted holder lacks it: one stale or
        partial replica (a fresh closest node that hand-off has not filled yet, a
        replica that was down during a put) is covered by the other.

        Why "among the closest known" and not just "any two holders": placement
        stores at every node it asks (:meth:`PacketOps.place`), and old replicas
        keep their copies until expiry, so nodes passed on the way to the key may
        hold an extra, older or partial set. Such a node answers early (it is asked
        first) but names closer nodes, which push it out of the window before it
        can count; holders only count once the lookup has reached the key's
        neighbourhood. A stricter "every node closer than the counted holders has
        answered" would also wait for slow or in-flight closer replicas, which
        costs latency and RPCs when answers arrive out of order, for no gain when
        replicas agree. Here a replica still in flight keeps its place in the
        window but is not waited for, and one that fails leaves it (the next
        closest takes its place), so dead or slow replicas never block the stop.

        With no holder in reach (nobody holds anything, or fewer than
        ``find_holders`` replicas are up) the lookup runs to its normal end. Stopping
        cancels the requests still in flight (:func:`~qisd.dht.lookup.iterate`);
        their late answers are dropped.
        """
        node, me = self.node, self.node.me
        limit = min(m, MAX_BATCH)
        wire_sketch = [query.dim, query.bits, query.data]
        width = max(1, node.replicas)
        # Contacts per answer: twice the width leaves the lookup room to replace
        # nodes that fail, at well under half the bytes of k contacts.
        contacts = min(2 * width, node.config.ksize)
        collected: list[tuple[bytes, float, Node]] = []
        more_from: list[tuple[Node, int]] = []
        holders: set[bytes] = set()
        need = node.config.find_holders
        here = me if held_here else None

        async def find(peer: Node) -> Reply | None:
            if node.stock_peers.has((peer.ip, peer.port), trio.current_time()):
                return await node.find_node_reply(key, peer)
            reply = await self.ask_ids(peer, [me.id, key, wire_sketch, limit, 0, contacts])
            if reply is None:
                return None
            return Reply(reply.nodes, payload=(reply.ids, reply.sims, reply.more))

        def on_reply(peer: Node, reply: Reply) -> bool:
            if reply.payload is not None:
                ids, sims, more = reply.payload
                collected.extend((pid, sim, peer) for pid, sim in zip(ids, sims, strict=True))
                if more and 0 < len(ids) < m:
                    more_from.append((peer, len(ids)))
                if ids:
                    holders.add(peer.id)
            # Checked on every answer: closer nodes it names can push a holder out.
            return len(holders) + held_here >= need and (
                holders_among_closest(st, holders, here=here) >= need
            )

        st = LookupState(key, node.seeds(key), width=width, exclude=[me.id])
        await node.run_lookup(st, find, on_reply)

        async def pages(peer: Node, got: int) -> None:
            for _ in range(node.config.max_pages - 1):
                want = min(m - got, MAX_BATCH)
                reply = await self.ask_ids(peer, [me.id, key, wire_sketch, want, got, contacts])
                if reply is None:
                    return
                pairs = zip(reply.ids, reply.sims, strict=True)
                collected.extend((pid, sim, peer) for pid, sim in pairs)
                got += len(reply.ids)
                if not (reply.more and reply.ids and got < m):
                    return

        async with trio.open_nursery() as nursery:
            for peer, got in more_from:
                nursery.start_soon(pages, peer, got)
        return collected

    async def ask_ids(self, peer: Node, args: list[Any]) -> IdsReply | None:
        """One ``find_packet_ids`` call, asked again (with backoff) while the peer is busy."""
        reply = None
        for attempt in range(BUSY_RETRIES):
            ok, result = await self.ops.packet_call(peer, "find_packet_ids", args)
            reply = self.parse_ids_reply(result) if ok else None
            if reply is None or not reply.busy:
                return reply
            await busy_backoff(self.node.rng, attempt)
        assert reply is not None
        return IdsReply(reply.nodes, [], [], False, True)

    async def get_packets(
        self, peer: Node, ids: list[bytes]
    ) -> tuple[dict[bytes, bytes], bool]:
        """The encodings ``peer`` returns for ``ids`` (those it holds), by id, asking
        again for the rest while it says ``more`` (they did not fit) or ``busy``; and
        whether it gave a usable answer at all.

        Only packets of ids asked for count (the id is the hash of the bytes, so a
        node cannot pass off another packet as the one it reported), and every
        answer must shrink what is left (or end the loop), so a peer that says
        ``more`` forever with junk costs one call: at most ``len(ids)`` calls plus
        the busy retries in all.
        """
        node = self.node
        out: dict[bytes, bytes] = {}
        remaining = list(ids)
        busy = 0
        answered = False
        while remaining:
            asked = remaining[:MAX_BATCH]
            ok, result = await self.ops.packet_call(peer, "get_packets", [node.me.id, asked])
            parsed = self.parse_get_reply(result) if ok else None
            if parsed is None:
                break
            packets, more, is_busy = parsed
            if is_busy:
                busy += 1
                if busy >= BUSY_RETRIES:
                    break
                await busy_backoff(node.rng, busy - 1)
                continue
            answered = True
            wanted = set(asked)
            got = {pid: raw for raw in packets if (pid := packet_id(raw)) in wanted}
            out.update(got)
            if more and not got:
                break
            # Without ``more`` the asked ids it did not return are not held there.
            done = got.keys() if more else wanted
            remaining = [pid for pid in remaining if pid not in done]
        return out, answered

    def parse_ids_reply(self, result: Any) -> IdsReply | None:
        node = self.node
        if not isinstance(result, dict):
            node.counters.dropped["bad_reply"] += 1
            return None
        nodes = node.parse_nodes("find_packet_ids", result.get("nodes", []))
        ids = result.get("ids", [])
        sims = result.get("sims", [])
        if nodes is None or not (
            isinstance(ids, list)
            and isinstance(sims, list)
            and len(ids) == len(sims) <= MAX_BATCH
            and all(isinstance(p, bytes) and len(p) == PACKET_ID_BYTES for p in ids)
            and all(type(s) is float and -MAX_SIM <= s <= MAX_SIM for s in sims)
        ):
            node.counters.dropped["bad_reply"] += 1
            return None
        return IdsReply(nodes, ids, sims, result.get("more") is True, result.get("busy") is True)

    def parse_get_reply(self, result: Any) -> tuple[list[bytes], bool, bool] | None:
        node = self.node
        packets = result.get("packets") if isinstance(result, dict) else None
        cap = node.manifest.packet_max_bytes
        if not (
            isinstance(packets, list)
            and len(packets) <= MAX_BATCH
            and all(isinstance(p, bytes) and 0 < len(p) <= cap for p in packets)
        ):
            node.counters.dropped["bad_reply"] += 1
            return None
        assert isinstance(result, dict)
        return packets, result.get("more") is True, result.get("busy") is True
