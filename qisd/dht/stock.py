"""Stock ``kademlia.network.Server`` values on a qisd node: ``set`` and ``get``.

Same keys (SHA-1 of the user's key), same RPCs (``store``, ``find_value``) and the
same placement as the stock server, so stock nodes and qisd nodes share values.

``set`` stores at the k closest nodes a lookup finds (and here, if this node is
closer than the farthest of them). Stock ``set`` runs a FIND_NODE lookup (about k
RPCs, each answered with k contacts) and then k STOREs. Towards qisd peers
(:mod:`qisd.dht.peerkind`) the two are one: the lookup's query is the store
(paper 2.3 with STORE as the query, as ``put_packet`` places packets)::

    store_value(nodeid, key, value, known) -> {"stored": bool, "nodes": [[id, ip, port]...]}

The asked node keeps the value unless it knows k contacts closer to the key than
itself, and names the contacts closer than itself but those the asker says it has
heard of (``known``: the last 4 bytes of each id in the lookup's shortlist), so
once the neighbourhood is known the answers are empty, and the first empty one
sends the value to the rest of the k closest at once. Stock peers (and peers not
yet known to be qisd) get ``find_node`` on the way and a ``store`` once the k
closest are known, as does any of the k closest that did not keep the value (say
it knew closer nodes that turned out dead). With every peer a qisd node, a ``set``
costs k RPCs instead of about 2k, and the answers carry no contacts.

``get`` answers from here or runs a FIND_VALUE lookup that stops at the first value,
then caches the value at the closest node seen without it (paper 2.3).

The requests of a lookup all go out from its own task through one
:class:`~qisd.dht.calls.PeerCalls` (no task per request).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import TYPE_CHECKING, Any

import trio
from kademlia.node import Node
from kademlia.utils import digest

from qisd.dht.calls import PeerCalls
from qisd.dht.lookup import Reply, iterate_calls
from qisd.dht.nearest import TAG_BYTES, NodeCache, closer_than, id_tag, wire_contacts
from qisd.dht.traverse import FAILED, LookupState
from qisd.dht.values import StockValue
from qisd.dht.wire import (
    MAX_PAYLOAD,
    Address,
    WireError,
    bad,
    check_arity,
    id20,
    pack,
    stock_value,
)

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

STORE_VALUE = "store_value"
#: Contacts a ``store_value`` request names as already heard of (by tag).
MAX_KNOWN = 128
#: Contacts heard of in replies, shared by the nodes of this process.
NODES = NodeCache()


def parse_contacts(node: DHTNode, rpc: str, value: Any) -> list[Node] | None:
    """:meth:`DHTNode.parse_nodes` with the contacts taken from the node cache."""
    return node.parse_nodes(rpc, value, NODES.get)


# -- set ---------------------------------------------------------------------------


async def set_value(node: DHTNode, key: Any, value: StockValue) -> bool:
    """Store ``value`` under SHA-1(``key``) at the k closest nodes, as stock ``set``."""
    if type(value) not in (int, float, bool, str, bytes):
        raise TypeError("Value must be of type int, float, bool, str, or bytes")
    return await set_digest(node, digest(key), value)


async def set_digest(node: DHTNode, dkey: bytes, value: StockValue) -> bool:
    me, kinds, k = node.me, node.kinds, node.config.ksize
    st = LookupState(dkey, node.seeds(dkey), width=k, exclude=[me.id])
    stored: set[bytes] = set()
    asked_to_store: list[Node] = []
    find_args: list[Any] = [me.id, dkey]
    heard = st.shortlist.by_id
    # Tags of the contacts the lookup has heard of (kept current), as many as fit
    # in the request beside the value.
    room = MAX_PAYLOAD - len(pack([STORE_VALUE, [me.id, dkey, value, b""]])) - 8
    max_tags = max(0, min(MAX_KNOWN, room // TAG_BYTES))
    known = [b""]

    def request(peer: Node) -> tuple[str, list[Any], bool]:
        if not kinds.is_qisd(peer):
            kinds.check(peer)
            return "find_node", find_args, True
        asked_to_store.append(peer)
        if len(known[0]) != TAG_BYTES * min(len(heard), max_tags):
            known[0] = b"".join(id_tag(i) for i in islice(heard, max_tags))
        # Silence is not eviction: it may be a stock node we took for qisd.
        return STORE_VALUE, [me.id, dkey, value, known[0]], False

    def parse(peer: Node, name: str, result: Any) -> Reply | None:
        if name != STORE_VALUE:
            nodes = parse_contacts(node, name, result)
            return None if nodes is None else Reply(nodes)
        if not isinstance(result, dict) or not isinstance(result.get("stored"), bool):
            node.counters.dropped["bad_reply"] += 1
            return None
        nodes = parse_contacts(node, STORE_VALUE, result.get("nodes"))
        if nodes is None:
            return None
        if result["stored"]:
            stored.add(peer.id)
        return Reply(nodes)

    with PeerCalls(node) as calls:
        # Once an asked node knows nobody closer that we have not heard of, the key's
        # neighbourhood is known: the rest of the k closest get the value at once.
        stats = await iterate_calls(st, calls, request, parse, alpha=node.config.alpha, widen=True)
    node.counters.lookup_done(stats.hops, stats.rpcs, stats.seconds)
    status = st.shortlist.status
    for peer in asked_to_store:
        if status.get(peer.id) == FAILED:
            kinds.doubt(peer)
    closest = st.closest()
    target = st.target
    local = not closest or me.distance_to(target) < closest[-1].distance_to(target)
    if local:
        node.values.put(dkey, value, trio.current_time())
    kept = any(p.id in stored for p in closest)
    missing = [p for p in closest if p.id not in stored]
    if missing:
        kept = await store_at(node, missing, dkey, value) or kept
    return local or kept


async def store_at(node: DHTNode, peers: list[Node], dkey: bytes, value: StockValue) -> bool:
    """Stock ``store`` at every one of ``peers`` at once; True if any kept it."""
    kept = False
    with PeerCalls(node) as calls:
        for peer in peers:
            await calls.send(peer, "store", [node.me.id, dkey, value])
        while (outcome := await calls.next()) is not None:
            kept = kept or (outcome[2] and outcome[3] is True)
    return kept


def serve_store_value(
    node: DHTNode, addr: Address, args: list[Any], sender_of: Callable[[Address, bytes], Node]
) -> dict[str, Any]:
    """``store_value(nodeid, key, value, known)``: keep the value if this node is
    among the k closest to the key that it knows of, and name the contacts closer
    than it, but those whose tag is in ``known`` (the asker has heard of them).

    ``sender_of(addr, nodeid)`` is the RPC server's: the sender as a contact,
    welcomed as any request's sender is.
    """
    rpc = STORE_VALUE
    check_arity(rpc, args, ("nodeid", "key", "value", "known"))
    nodeid = id20(rpc, "nodeid", args[0])
    key = id20(rpc, "key", args[1])
    value = stock_value(rpc, "value", args[2])
    tags = args[3]
    if not isinstance(tags, bytes) or len(tags) % TAG_BYTES or len(tags) > MAX_KNOWN * TAG_BYTES:
        raise bad(rpc, "known", f"must be up to {MAX_KNOWN} tags of {TAG_BYTES} bytes")
    sender = sender_of(addr, nodeid)
    node.kinds.saw_qisd(addr)
    k = node.config.ksize
    target = int.from_bytes(key, "big")
    mine = node.me.long_id ^ target
    table = node.table
    known = {tags[i : i + TAG_BYTES] for i in range(0, len(tags), TAG_BYTES)}
    closer, ahead = closer_than(table.buckets, target, mine, k, exclude=sender, known=known)
    # Keep it unless k contacts (the asker included) are closer to the key than us.
    keep = ahead < k
    if keep:
        node.values.put(key, value, trio.current_time())
    return {"stored": keep, "nodes": wire_contacts(closer)}


# -- get ---------------------------------------------------------------------------


async def get_value(node: DHTNode, key: Any) -> StockValue | None:
    """The value under SHA-1(``key``), here or in the network, as stock ``get``."""
    dkey = digest(key)
    local = node.values.get(dkey, trio.current_time())
    if local is not None:
        return local
    seeds = node.seeds(dkey)
    if not seeds:
        return None
    st = LookupState(dkey, seeds, width=node.config.ksize, exclude=[node.me.id])
    found: list[tuple[Node, StockValue]] = []
    args: list[Any] = [node.me.id, dkey]

    def request(peer: Node) -> tuple[str, list[Any], bool]:
        return "find_value", args, True

    def parse(peer: Node, name: str, result: Any) -> Reply | None:
        if isinstance(result, dict):
            try:
                return Reply(payload=stock_value("find_value", "value", result.get("value")))
            except WireError:
                node.counters.dropped["bad_reply"] += 1
                return None
        nodes = parse_contacts(node, "find_value", result)
        return None if nodes is None else Reply(nodes)

    def on_reply(peer: Node, reply: Reply) -> bool:
        if reply.payload is not None:
            found.append((peer, reply.payload))
            return True
        return False

    with PeerCalls(node) as calls:
        stats = await iterate_calls(
            st, calls, request, parse, alpha=node.config.alpha, on_reply=on_reply
        )
    node.counters.lookup_done(stats.hops, stats.rpcs, stats.seconds)
    if not found:
        return None
    holder, value = found[0]
    # Paper 2.3: cache the value at the closest node seen that lacked it.
    cache = [node.me.id, dkey, value]
    if len(pack(["store", cache])) > MAX_PAYLOAD:
        return value  # fits a reply, not a request with it: not cached
    for peer in st.closest():
        if peer.id != holder.id:
            node.spawn(node.call, peer, "store", cache)
            break
    return value
