"""Inbound RPCs: validate every argument, then answer with the stock meaning.

Base RPCs as in ``kademlia.protocol.KademliaProtocol``: ``ping(nodeid) -> nodeid``,
``store(nodeid, key, value) -> True``, ``find_node(nodeid, key) -> [[id, ip, port]]``,
``find_value(nodeid, key) -> {"value": v} | nodes``, ``stun() -> [ip, port]``.

Packet RPCs (qisd additions; stock nodes ignore them):

- ``store_packets(nodeid, key, [packet...]) -> {"status": [...], "nodes": [...]}``:
  each packet decoded, signature verified and admitted against the manifest, then
  stored; ``nodes`` are the contacts closer to ``key`` than this node (a put is a
  lookup whose query is the store itself); each status is
  ``stored``, ``duplicate``, ``added_key``, ``superseded`` or ``rejected:<reason>``
  (``rejected:busy``: the node is overloaded, try later or elsewhere).
- ``find_packets(nodeid, key, [dim, bits, sketch], limit, offset) ->
  {"nodes", "packets", "sims", "more"}``: the closer nodes, plus the best packets
  under ``key`` by cosine to the sketch from ``offset`` on, as many as fit
  (``"busy": true`` and no packets when overloaded: ask again).
- ``listen(nodeid, key, ttl) -> granted_ttl``: push new packets under ``key`` to the
  caller until the ttl lapses (0: refused, a cap is reached).
- ``notify(nodeid, key, [packet...]) -> [status...]``: new packets for a key this
  node listens to.

Arguments are checked before the sender enters the routing table, so a malformed
request leaves no trace but a counter.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from kademlia.node import Node

from qisd.dht.paging import MAX_BATCH
from qisd.dht.transport import Deferred
from qisd.dht.wire import (
    Address,
    WireError,
    bad,
    bytes_list,
    check_arity,
    id20,
    integer,
    stock_value,
)
from qisd.sketch import FingerprintError, Sketch

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

MAX_OFFSET = 100_000
#: Status of each packet when the node is too busy to look at them: ask again later.
BUSY = "rejected:busy"
MAX_LISTEN_TTL = 2**31 - 1


def sketch_arg(rpc: str, value: Any) -> Sketch:
    if not isinstance(value, list) or len(value) != 3:
        raise bad(rpc, "query_sketch", "must be [dim, bits, bytes]")
    dim, bits, data = value
    if type(dim) is not int or type(bits) is not int or not isinstance(data, bytes):
        raise bad(rpc, "query_sketch", "must be [int, int, bytes]")
    try:
        return Sketch(dim, bits, data)
    except FingerprintError as exc:
        raise bad(rpc, "query_sketch", f"is invalid ({exc})") from None


class RpcServer:
    def __init__(self, node: DHTNode) -> None:
        self.node = node
        self._methods: dict[str, Callable[[Address, list[Any]], Any]] = {
            "ping": self.ping,
            "stun": self.stun,
            "store": self.store,
            "find_node": self.find_node,
            "find_value": self.find_value,
            "store_packets": self.store_packets,
            "find_packets": self.find_packets,
            "listen": self.listen,
            "notify": self.notify,
        }

    def dispatch(self, name: str, args: list[Any], addr: Address) -> Any:
        method = self._methods.get(name)
        if method is None:
            raise WireError("unknown_rpc", f"no RPC named {name!r}")
        return method(addr, args)

    def _sender(self, addr: Address, nodeid: bytes) -> Node:
        contact = Node(nodeid, addr[0], addr[1])
        self.node.welcome(contact)
        return contact

    def _neighbors(self, key: bytes, sender: Node) -> list[list[Any]]:
        found = self.node.table.find_neighbors(Node(key), exclude=sender)
        return [[n.id, n.ip, n.port] for n in found]

    # -- base RPCs ----------------------------------------------------------------

    def ping(self, addr: Address, args: list[Any]) -> bytes:
        check_arity("ping", args, ("nodeid",))
        self._sender(addr, id20("ping", "nodeid", args[0]))
        own: bytes = self.node.me.id
        return own

    def stun(self, addr: Address, args: list[Any]) -> list[Any]:
        check_arity("stun", args, ())
        return [addr[0], addr[1]]

    def store(self, addr: Address, args: list[Any]) -> bool:
        check_arity("store", args, ("nodeid", "key", "value"))
        nodeid = id20("store", "nodeid", args[0])
        key = id20("store", "key", args[1])
        value = stock_value("store", "value", args[2])
        self._sender(addr, nodeid)
        self.node.values.put(key, value, trio.current_time())
        return True

    def find_node(self, addr: Address, args: list[Any]) -> list[list[Any]]:
        check_arity("find_node", args, ("nodeid", "key"))
        nodeid = id20("find_node", "nodeid", args[0])
        key = id20("find_node", "key", args[1])
        return self._neighbors(key, self._sender(addr, nodeid))

    def find_value(self, addr: Address, args: list[Any]) -> Any:
        check_arity("find_value", args, ("nodeid", "key"))
        nodeid = id20("find_value", "nodeid", args[0])
        key = id20("find_value", "key", args[1])
        sender = self._sender(addr, nodeid)
        value = self.node.values.get(key, trio.current_time())
        if value is None:
            return self._neighbors(key, sender)
        return {"value": value}

    # -- packet RPCs --------------------------------------------------------------

    def _packet_args(self, rpc: str, args: list[Any]) -> tuple[bytes, bytes, list[bytes]]:
        check_arity(rpc, args, ("nodeid", "key", "packets"))
        nodeid = id20(rpc, "nodeid", args[0])
        key = id20(rpc, "key", args[1])
        raws = bytes_list(
            rpc,
            "packets",
            args[2],
            max_items=MAX_BATCH,
            max_bytes=self.node.manifest.packet_max_bytes,
        )
        return nodeid, key, raws

    def _packet_peer(self, addr: Address) -> None:
        now = trio.current_time()
        self.node.packet_peers.add(addr, now)
        self.node.stock_peers.discard(addr)

    def _closer(self, key: bytes, sender: Node) -> list[list[Any]]:
        """The contacts closer to ``key`` than this node (what a put-lookup needs)."""
        target = Node(key)
        mine = self.node.me.distance_to(target)
        found = self.node.table.find_neighbors(target, exclude=sender)
        return [[n.id, n.ip, n.port] for n in found if n.distance_to(target) < mine]

    def store_packets(self, addr: Address, args: list[Any]) -> Any:
        nodeid, key, raws = self._packet_args("store_packets", args)
        sender = self._sender(addr, nodeid)
        self._packet_peer(addr)
        closer = self._closer(key, sender)
        if self.node.store is None:
            return {"status": ["rejected:no_store"] * len(raws), "nodes": closer}

        async def work() -> dict[str, Any]:
            status = await self.node.packets.accept(key, raws, "store")
            return {"status": status, "nodes": closer}

        return Deferred(work, busy={"status": [BUSY] * len(raws), "nodes": closer})

    def notify(self, addr: Address, args: list[Any]) -> Any:
        nodeid, key, raws = self._packet_args("notify", args)
        self._sender(addr, nodeid)
        self._packet_peer(addr)
        if key not in self.node.subscriptions:
            return ["rejected:not_subscribed"] * len(raws)
        return Deferred(
            partial(self.node.packets.accept_notify, key, raws), busy=[BUSY] * len(raws)
        )

    def find_packets(self, addr: Address, args: list[Any]) -> Any:
        rpc = "find_packets"
        check_arity(rpc, args, ("nodeid", "key", "query_sketch", "limit", "offset"))
        nodeid = id20(rpc, "nodeid", args[0])
        key = id20(rpc, "key", args[1])
        sketch = sketch_arg(rpc, args[2])
        limit = integer(rpc, "limit", args[3], 1, MAX_BATCH)
        offset = integer(rpc, "offset", args[4], 0, MAX_OFFSET)
        nodes = self._neighbors(key, self._sender(addr, nodeid))
        self._packet_peer(addr)
        if not self.node.packets.may_hold(key):
            return {"nodes": nodes, "packets": [], "sims": [], "more": False}
        return Deferred(
            partial(self.node.packets.serve_find, key, sketch, limit, offset, nodes),
            busy={"nodes": nodes, "packets": [], "sims": [], "more": True, "busy": True},
        )

    def listen(self, addr: Address, args: list[Any]) -> int:
        check_arity("listen", args, ("nodeid", "key", "ttl"))
        nodeid = id20("listen", "nodeid", args[0])
        key = id20("listen", "key", args[1])
        ttl = integer("listen", "ttl", args[2], 1, MAX_LISTEN_TTL)
        sender = self._sender(addr, nodeid)
        self._packet_peer(addr)
        return self.node.listeners.register(key, sender, ttl, trio.current_time())
