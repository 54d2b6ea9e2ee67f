"""XOR-nearest contacts read from as few k-buckets as possible, and contact interning (pure).

``RoutingTable.find_neighbors`` scores every contact of the table to answer one
FIND_NODE. A bucket covers an id range inside the aligned block of ids (those
sharing a prefix), so no contact in it can be closer to a target than that block's
XOR distance to it: :func:`nearest` reads buckets by increasing bound and
stops once it holds ``count`` contacts all closer than the next bucket's bound
(for a random key and a table of a hundred contacts, one or two buckets of twenty).
The result is exactly the table's XOR order.

:class:`NodeCache` interns the :class:`kademlia.node.Node` objects built from the
contact triples of replies: a lookup hears of the same few dozen nodes over and
over, and building a Node (hex-decoding its id into an int) costs more than a dict
hit.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Sequence
from operator import itemgetter
from typing import Any

from kademlia.node import Node

#: Interned contacts kept before the cache starts over.
NODE_CACHE_SIZE = 8192
#: Bytes of a node id that name it in a list of contacts an asker already knows.
TAG_BYTES = 4
NO_LIMIT = 1 << 161
_first = itemgetter(0)


def bucket_bound(lower: int, upper: int, target: int) -> int:
    """A lower bound on the XOR distance from ``target`` to any id in ``[lower, upper]``.

    Bucket splits (stock and ours) make ranges ``[a*2**s + 1, (a+1)*2**s]`` (or
    ``[0, 2**s]``): all but the top id lie in one aligned block of ``2**s`` ids,
    whose distance to ``target`` is that of their common prefix. For any other
    range the common-prefix block is still a superset, so the bound still holds.
    """
    if upper <= lower:
        return lower ^ target
    shift = (lower ^ (upper - 1)).bit_length()
    return min(((lower ^ target) >> shift) << shift, upper ^ target)


def bucket_run(buckets: Sequence[Any], target: int, below: int) -> Sequence[Any]:
    """The buckets that may hold a contact at distance < ``below`` from ``target``.

    Every such id shares all bits above ``below.bit_length()`` with ``target``:
    they form one aligned run of ids, so only the run of buckets covering it
    (found by bisection; a table keeps its buckets sorted) needs reading.
    """
    span = below.bit_length()
    first = (target >> span) << span
    uppers = [b.range[1] for b in buckets]
    start = bisect.bisect_left(uppers, first)
    stop = bisect.bisect_left(uppers, first + (1 << span) - 1) + 1
    return buckets[start:stop]


def candidate_buckets(
    buckets: Sequence[Any], target: int, below: int | None
) -> list[tuple[int, Any]]:
    """``(bound, bucket)`` for the buckets that may hold a contact at distance <
    ``below`` from ``target`` (any distance if None), by increasing
    :func:`bucket_bound`."""
    chosen = buckets if below is None else bucket_run(buckets, target, below)
    limit = NO_LIMIT if below is None else below
    order = []
    for b in chosen:
        if b.nodes:
            bound = bucket_bound(b.range[0], b.range[1], target)
            if bound < limit:
                order.append((bound, b))
    order.sort(key=_first)  # bounds of far buckets may tie
    return order


def nearest(
    buckets: Sequence[Any],
    target: int,
    count: int,
    *,
    below: int | None = None,
    exclude: Node | None = None,
    known: Collection[bytes] = (),
) -> list[Node]:
    """The ``count`` contacts XOR-closest to ``target``, closest first.

    ``buckets`` are k-buckets (``range`` and ``nodes`` as in ``kademlia.routing``),
    sorted by range as a table keeps them. Only contacts at distance < ``below``
    count, if given; ``exclude`` (by id, or by address) is left out, as the asker
    is left out of its own answer, and so is every contact whose :func:`id_tag` is
    in ``known``.
    """
    limit = NO_LIMIT if below is None else below
    if exclude is not None:
        ex_id, ex_ip, ex_port = exclude.id, exclude.ip, exclude.port
    else:
        ex_id, ex_ip, ex_port = None, None, None
    found: list[tuple[int, Node]] = []
    for bound, bucket in candidate_buckets(buckets, target, below):
        if bound >= limit:
            break
        for n in bucket.nodes.values():
            d = n.long_id ^ target
            if (
                d < limit
                and n.id != ex_id
                and not (n.port == ex_port and n.ip == ex_ip)
                and (not known or n.id[-TAG_BYTES:] not in known)
            ):
                found.append((d, n))
        if len(found) >= count:
            # Ids are unique in a table, so no two distances tie.
            found.sort(key=_first)
            del found[count:]
            limit = found[-1][0]
    found.sort(key=_first)
    return [n for _, n in found[:count]]


def id_tag(node_id: bytes) -> bytes:
    """A short tag of a node id (its last bytes; ids are SHA-1, so uniform)."""
    return node_id[-TAG_BYTES:]


def closer_than(
    buckets: Sequence[Any],
    target: int,
    distance: int,
    count: int,
    *,
    exclude: Node | None = None,
    known: Collection[bytes] = (),
) -> tuple[list[Node], int]:
    """The ``count`` contacts closest to ``target`` among those closer than
    ``distance``, leaving out ``exclude`` (by id or address) and those whose
    :func:`id_tag` is in ``known``; and how many contacts in all (none left out)
    are closer than ``distance``. One pass over :func:`bucket_run`."""
    if exclude is not None:
        ex_id, ex_ip, ex_port = exclude.id, exclude.ip, exclude.port
    else:
        ex_id, ex_ip, ex_port = None, None, None
    total = 0
    fresh: list[tuple[int, Node]] = []
    for bucket in bucket_run(buckets, target, distance):
        for n in bucket.nodes.values():
            d = n.long_id ^ target
            if d < distance:
                total += 1
                if (
                    n.id != ex_id
                    and not (n.port == ex_port and n.ip == ex_ip)
                    and (not known or n.id[-TAG_BYTES:] not in known)
                ):
                    fresh.append((d, n))
    fresh.sort(key=_first)
    return [n for _, n in fresh[:count]], total


def wire_contacts(nodes: Iterable[Node]) -> list[list[Any]]:
    """``[[id, ip, port], ...]``, the node list of stock ``find_node`` answers."""
    return [[n.id, n.ip, n.port] for n in nodes]


class NodeCache:
    """Interned Node objects by (id, ip, port); bounded, emptied when full."""

    def __init__(self, max_items: int = NODE_CACHE_SIZE) -> None:
        self.max_items = max_items
        self._nodes: dict[tuple[bytes, str, int], Node] = {}

    def get(self, node_id: bytes, ip: str, port: int) -> Node:
        key = (node_id, ip, port)
        node = self._nodes.get(key)
        if node is None:
            if len(self._nodes) >= self.max_items:
                self._nodes.clear()
            node = self._nodes[key] = Node(node_id, ip, port)
        return node

    def __len__(self) -> int:
        return len(self._nodes)
