"""State of one iterative lookup (paper 2.3), without any I/O (pure).

The shortlist holds every node heard of, ordered by XOR distance to the target. The
driver (:mod:`qisd.dht.lookup`) asks :meth:`LookupState.next_batch` whom to query
next, reports each answer or failure, and stops when :attr:`LookupState.done`: the
``width`` closest nodes that have not failed have all answered. That is the paper's
termination rule ("the initiator has queried and gotten responses from the k closest
nodes it has seen"); nodes that fail are dropped from the shortlist, so an
unresponsive peer never blocks the end of a lookup.

Hop counts: seeds are hop 1, a node first heard of from a hop-h node is hop h+1.
The deepest hop that answered is the number of sequential round trips the lookup
needed, which is what the simulation reports as "rounds".
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from kademlia.node import Node, NodeHeap

UNQUERIED = 0
IN_FLIGHT = 1
ANSWERED = 2
FAILED = 3


class Shortlist(NodeHeap):  # type: ignore[misc]
    """A :class:`kademlia.node.NodeHeap` with O(1) membership and per-node status.

    The stock heap rescans the whole list on every ``push`` and ``in``; a lookup
    pushes every node of every answer, so that is quadratic. Entries are kept in a
    sorted list (a few hundred at most) with a dict beside it.
    """

    def __init__(self, node: Node, maxsize: int) -> None:
        super().__init__(node, maxsize)
        self.order: list[tuple[int, bytes]] = []
        self.by_id: dict[bytes, Node] = {}
        self.status: dict[bytes, int] = {}

    def push(self, nodes: Node | list[Node]) -> None:
        target = self.node.long_id
        by_id, status, order = self.by_id, self.status, self.order
        for node in nodes if isinstance(nodes, list) else [nodes]:
            if node.id not in by_id:
                by_id[node.id] = node
                status[node.id] = UNQUERIED
                bisect.insort(order, (target ^ node.long_id, node.id))

    def __contains__(self, node: object) -> bool:
        return isinstance(node, Node) and node.id in self.by_id

    def get_node(self, node_id: bytes) -> Node | None:
        return self.by_id.get(node_id)

    def live(self) -> Iterable[Node]:
        """The ``maxsize`` closest nodes that have not failed, closest first."""
        found = 0
        for _, node_id in self.order:
            if self.status[node_id] != FAILED:
                yield self.by_id[node_id]
                found += 1
                if found == self.maxsize:
                    return

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self.live()))

    def __len__(self) -> int:
        return sum(1 for _ in self.live())

    def mark_contacted(self, node: Node) -> None:
        self.status[node.id] = IN_FLIGHT

    def get_uncontacted(self) -> list[Node]:
        return [n for n in self.live() if self.status[n.id] == UNQUERIED]

    def remove(self, peers: Iterable[bytes]) -> None:
        for node_id in peers:
            if node_id in self.status:
                self.status[node_id] = FAILED


class LookupState:
    """Bookkeeping for one lookup of ``target`` keeping the ``width`` closest."""

    def __init__(
        self,
        target: bytes,
        seeds: Iterable[Node],
        *,
        width: int,
        exclude: Iterable[bytes] = (),
    ) -> None:
        self.target = Node(target)
        self.width = width
        self.shortlist = Shortlist(self.target, width)
        self.exclude = set(exclude)
        self.hop: dict[bytes, int] = {}
        self.rpcs = 0
        self.failures = 0
        self.max_hop = 0
        self.in_flight = 0
        self.add(seeds, hop=1)

    def add(self, nodes: Iterable[Node], *, hop: int) -> None:
        fresh = []
        for node in nodes:
            if node.id in self.exclude:
                continue
            known = self.hop.get(node.id)
            if known is None:
                self.hop[node.id] = hop
                fresh.append(node)
            elif hop < known:
                self.hop[node.id] = hop
        self.shortlist.push(fresh)

    def next_batch(self, limit: int) -> list[Node]:
        """Up to ``limit`` unqueried nodes among the closest; marks them in flight."""
        if limit <= 0:
            return []
        shortlist = self.shortlist
        status, by_id = shortlist.status, shortlist.by_id
        batch: list[Node] = []
        live = 0
        # The same walk as Shortlist.live(), inlined: it runs once per answer.
        for _, node_id in shortlist.order:
            st = status[node_id]
            if st == FAILED:
                continue
            if st == UNQUERIED:
                status[node_id] = IN_FLIGHT
                batch.append(by_id[node_id])
                if len(batch) == limit:
                    break
            live += 1
            if live == self.width:
                break
        self.rpcs += len(batch)
        self.in_flight += len(batch)
        return batch

    def answered(self, node: Node, nodes: Iterable[Node]) -> None:
        self.in_flight -= 1
        self.shortlist.status[node.id] = ANSWERED
        hop = self.hop.get(node.id, 1)
        self.max_hop = max(self.max_hop, hop)
        self.add(nodes, hop=hop + 1)

    def failed(self, node: Node) -> None:
        self.in_flight -= 1
        self.failures += 1
        self.shortlist.remove([node.id])

    @property
    def done(self) -> bool:
        """True once every one of the ``width`` closest live nodes has answered."""
        status = self.shortlist.status
        live = 0
        for _, node_id in self.shortlist.order:
            st = status[node_id]
            if st == FAILED:
                continue
            if st != ANSWERED:
                return False
            live += 1
            if live == self.width:
                return True
        return True

    def closest(self, count: int | None = None) -> list[Node]:
        """Nodes that answered, closest first (at most ``count``, default ``width``)."""
        limit = self.width if count is None else count
        out: list[Node] = []
        for _, node_id in self.shortlist.order:
            if self.shortlist.status[node_id] == ANSWERED:
                out.append(self.shortlist.by_id[node_id])
                if len(out) == limit:
                    break
        return out
