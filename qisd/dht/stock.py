"""Stock ``kademlia.network.Server`` values on a qisd node: ``set`` and ``get``.

Same keys (SHA-1 of the user's key), same RPCs (``store``, ``find_value``) and the
same placement as the stock server, so stock nodes and qisd nodes share values:
``set`` stores at the k closest nodes a FIND_NODE lookup finds (and here, if this
node is closer than the farthest of them); ``get`` answers from here or runs a
FIND_VALUE lookup that stops at the first value, then caches the value at the
closest node seen without it (paper 2.3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio
from kademlia.node import Node
from kademlia.utils import digest

from qisd.dht.lookup import Reply
from qisd.dht.traverse import LookupState
from qisd.dht.values import StockValue
from qisd.dht.wire import WireError, stock_value

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode


async def set_value(node: DHTNode, key: Any, value: StockValue) -> bool:
    """Store ``value`` under SHA-1(``key``) at the k closest nodes, as stock ``set``."""
    if type(value) not in (int, float, bool, str, bytes):
        raise TypeError("Value must be of type int, float, bool, str, or bytes")
    return await set_digest(node, digest(key), value)


async def set_digest(node: DHTNode, dkey: bytes, value: StockValue) -> bool:
    nodes, _ = await node.lookup_nodes(dkey)
    target = Node(dkey)
    local = not nodes or node.me.distance_to(target) < max(n.distance_to(target) for n in nodes)
    if local:
        node.values.put(dkey, value, trio.current_time())
    results = []

    async def store_at(peer: Node) -> None:
        ok, answer = await node.call(peer, "store", [node.me.id, dkey, value])
        results.append(ok and answer is True)

    async with trio.open_nursery() as nursery:
        for peer in nodes:
            nursery.start_soon(store_at, peer)
    return local or any(results)


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

    async def find(peer: Node) -> Reply | None:
        ok, result = await node.call(peer, "find_value", [node.me.id, dkey])
        if not ok:
            return None
        if isinstance(result, dict):
            try:
                return Reply(payload=stock_value("find_value", "value", result.get("value")))
            except WireError:
                node.counters.dropped["bad_reply"] += 1
                return None
        nodes = node.parse_nodes("find_value", result)
        return None if nodes is None else Reply(nodes)

    def on_reply(peer: Node, reply: Reply) -> bool:
        if reply.payload is not None:
            found.append((peer, reply.payload))
            return True
        return False

    await node.run_lookup(st, find, on_reply)
    if not found:
        return None
    holder, value = found[0]
    # Paper 2.3: cache the value at the closest node seen that lacked it.
    for peer in st.closest():
        if peer.id != holder.id:
            node.spawn(node.call, peer, "store", [node.me.id, dkey, value])
            break
    return value
