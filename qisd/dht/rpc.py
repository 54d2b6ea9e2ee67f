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
- ``find_packet_ids(nodeid, key, [dim, bits, sketch], limit, offset, contacts) ->
  {"nodes", "ids", "sims", "more"}``: as ``find_packets`` with packet ids in place of
  the packets (a query's first step: ranking costs the holders' CPU, not bytes), and
  only the ``contacts`` closest nodes (a lookup of width w needs ~2w, not k).
- ``get_packets(nodeid, [id...]) -> {"packets", "more"}``: the packets of those ids
  held here (not expired), in the order asked, as many as fit; ``more`` when some
  did not (ask again for the rest); a query's second step, for its best ids only.
- ``listen(nodeid, key, ttl) -> granted_ttl``: push new packets under ``key`` to the
  caller until the ttl lapses (0: refused, a cap is reached).
- ``notify(nodeid, key, [packet...]) -> [status...]``: new packets for a key this
  node listens to.
- ``hello(nodeid, nonce) -> [public_key, signature]``: proof that this node holds
  the key of its id (:mod:`qisd.dht.hello`); asked only in closed swarms, where
  every other RPC of a sender that has not proven membership is dropped
  (:mod:`qisd.dht.admission`).

Each packet of ``store_packets``/``notify`` is judged on its own: one over the
swarm's size cap is ``rejected:too_large`` while the others are stored, and every
status is counted (``DHTStatistics.packets_accepted``/``packets_rejected``).

Arguments are checked before the sender enters the routing table, so a malformed
request leaves no trace but a counter.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from kademlia.node import Node

from qisd.dht import stock
from qisd.dht.busy import BUSY
from qisd.dht.deferred import Deferred
from qisd.dht.fairness import FairShare
from qisd.dht.nearest import nearest
from qisd.dht.paging import MAX_BATCH
from qisd.dht.ratelimit import source_key
from qisd.dht.values import AddressMemory
from qisd.dht.wire import (
    MAX_PAYLOAD,
    MAX_REPLY_NODES,
    Address,
    WireError,
    bad,
    bytes_list,
    check_arity,
    id20,
    integer,
    stock_value,
)
from qisd.packet import PACKET_ID_BYTES
from qisd.sketch import FingerprintError, Sketch

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

MAX_OFFSET = 100_000
MAX_LISTEN_TTL = 2**31 - 1
#: One source may run at most 1/HANDLER_SHARE of the handlers that wait on storage.
HANDLER_SHARE = 8


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
        self.fair = FairShare(max(1, node.config.max_handlers // HANDLER_SHARE))
        self._rechecking = AddressMemory(ttl=node.config.failure_backoff)
        self._methods: dict[str, Callable[[Address, list[Any]], Any]] = {
            "ping": self.ping,
            "stun": self.stun,
            "store": self.store,
            "find_node": self.find_node,
            "find_value": self.find_value,
            "store_packets": self.store_packets,
            "find_packets": self.find_packets,
            "find_packet_ids": self.find_packet_ids,
            "get_packets": self.get_packets,
            "listen": self.listen,
            "notify": self.notify,
            "hello": self.hello,
            "store_value": self.store_value,
        }

    def dispatch(self, name: str, args: list[Any], addr: Address) -> Any:
        method = self._methods.get(name)
        if method is None:
            raise WireError("unknown_rpc", f"no RPC named {name!r}")
        admission = self.node.admission
        if admission.required and name != "hello":
            result = admission.gate(name, args, addr, method)
        else:
            result = method(addr, args)
        if isinstance(result, Deferred):
            # One source may not hold every handler slot (see qisd.dht.fairness).
            return self.fair.wrap(source_key(addr), result)
        return result

    def _sender(self, addr: Address, nodeid: bytes) -> Node:
        contact = Node(nodeid, addr[0], addr[1])
        node = self.node
        now = trio.current_time()
        if not node.failed_peers.has(addr, now):
            node.welcome(contact)
        elif not self._rechecking.has(addr, now):
            # It did not answer us lately: it comes back by answering a ping, so a
            # peer that only sends (a flooder, a one-way or forged socket) is not put
            # back in front of every lookup after each timeout it caused.
            self._rechecking.add(addr, now)
            node.spawn(node.ping, addr)
        return contact

    def _neighbors(self, key: bytes, sender: Node, count: int | None = None) -> list[list[Any]]:
        # Exactly our find_neighbors(Node(key), exclude=sender), reading only the
        # buckets that can hold the answer (qisd.dht.nearest); k of them unless fewer
        # are asked for.
        table = self.node.table
        k = table.ksize if count is None else min(count, table.ksize)
        return self._nearest(int.from_bytes(key, "big"), k, sender)

    def _nearest(
        self, target: int, k: int, sender: Node, *, below: int | None = None
    ) -> list[list[Any]]:
        """The ``k`` contacts nearest ``target`` (nearer than ``below``), as a reply's
        node list. A dual-stack node's table holds both families; the sender can
        only use contacts of the family it reached us over, so only those are named."""
        buckets = self.node.table.buckets
        if not self.node.dual_stack:
            found = nearest(buckets, target, k, below=below, exclude=sender)
        else:
            v6 = ":" in sender.ip
            found = []
            for width in (2 * k, len(self.node.table)):  # all only if the first is short
                both = nearest(buckets, target, width, below=below, exclude=sender)
                found = [n for n in both if (":" in n.ip) == v6][:k]
                if len(found) == k or len(both) < width:
                    break
        return [[n.id, n.ip, n.port] for n in found]

    # -- base RPCs ----------------------------------------------------------------

    def ping(self, addr: Address, args: list[Any]) -> bytes:
        check_arity("ping", args, ("nodeid",))
        self._sender(addr, id20("ping", "nodeid", args[0]))
        own: bytes = self.node.me.id
        return own

    def hello(self, addr: Address, args: list[Any]) -> list[bytes]:
        # Answered to anyone and without welcoming the asker: the proof binds its id
        # and nonce, and a peer enters the table only through its own proof. Only
        # qisd nodes ask it, so the asker's address speaks the qisd-only RPCs.
        proof = self.node.admission.answer(args)
        self.node.kinds.saw_qisd(addr)
        return proof

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

    def store_value(self, addr: Address, args: list[Any]) -> dict[str, Any]:
        # qisd's merged lookup-and-store for stock values (see qisd.dht.stock).
        return stock.serve_store_value(self.node, addr, args, self._sender)

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
            # Any size a datagram can carry: a packet over the swarm's cap is refused
            # (and counted) on its own as ``too_large``, not the whole request.
            max_bytes=MAX_PAYLOAD,
        )
        return nodeid, key, raws

    def _packet_peer(self, addr: Address) -> None:
        now = trio.current_time()
        self.node.packet_peers.add(addr, now)
        self.node.stock_peers.discard(addr)

    def _closer(self, key: bytes, sender: Node) -> list[list[Any]]:
        """The contacts closer to ``key`` than this node (what a put-lookup needs)."""
        target = int.from_bytes(key, "big")
        mine = self.node.me.long_id ^ target
        return self._nearest(target, self.node.table.ksize, sender, below=mine)

    def _key_holder(self, key: bytes, sender: Node) -> bool:
        """Whether ``sender`` is one of the ``replicas`` nodes closest to ``key`` that
        this node knows (itself included): a key holder, whose store counts as the
        key's republish here (paper 2.5). A store from anyone else (an origin's put,
        a node passing through, a replay) does not."""
        node = self.node
        table = node.table
        target = int.from_bytes(key, "big")
        theirs: int = sender.long_id ^ target
        closer = nearest(table.buckets, target, node.replicas, below=theirs, exclude=sender)
        mine: int = node.me.long_id ^ target
        return len(closer) + (mine < theirs) < node.replicas

    def store_packets(self, addr: Address, args: list[Any]) -> Any:
        nodeid, key, raws = self._packet_args("store_packets", args)
        sender = self._sender(addr, nodeid)
        self._packet_peer(addr)
        closer = self._closer(key, sender)
        if self.node.store is None:
            status = ["rejected:no_store"] * len(raws)
            self.node.counters.packet_statuses(status)
            return {"status": status, "nodes": closer}
        holder = self._key_holder(key, sender)

        async def work() -> dict[str, Any]:
            status = await self.node.packets.accept(key, raws, "store", holder=holder)
            return {"status": status, "nodes": closer}

        return Deferred(work, busy={"status": [BUSY] * len(raws), "nodes": closer})

    def notify(self, addr: Address, args: list[Any]) -> Any:
        nodeid, key, raws = self._packet_args("notify", args)
        self._sender(addr, nodeid)
        self._packet_peer(addr)
        if key not in self.node.subscriptions:
            status = ["rejected:not_subscribed"] * len(raws)
            self.node.counters.packet_statuses(status)
            return status
        return Deferred(
            partial(self.node.packets.accept_notify, key, raws), busy=[BUSY] * len(raws)
        )

    def find_packets(self, addr: Address, args: list[Any]) -> Any:
        rpc = "find_packets"
        check_arity(rpc, args, ("nodeid", "key", "query_sketch", "limit", "offset"))
        return self._find(rpc, addr, args, None)

    def find_packet_ids(self, addr: Address, args: list[Any]) -> Any:
        rpc = "find_packet_ids"
        check_arity(rpc, args, ("nodeid", "key", "query_sketch", "limit", "offset", "contacts"))
        contacts = integer(rpc, "contacts", args[5], 1, MAX_REPLY_NODES)
        return self._find(rpc, addr, args, contacts)

    def _find(self, rpc: str, addr: Address, args: list[Any], contacts: int | None) -> Any:
        nodeid = id20(rpc, "nodeid", args[0])
        key = id20(rpc, "key", args[1])
        sketch = sketch_arg(rpc, args[2])
        limit = integer(rpc, "limit", args[3], 1, MAX_BATCH)
        offset = integer(rpc, "offset", args[4], 0, MAX_OFFSET)
        nodes = self._neighbors(key, self._sender(addr, nodeid), contacts)
        self._packet_peer(addr)
        ids = contacts is not None
        field = "ids" if ids else "packets"
        if not self.node.packets.may_hold(key):
            return {"nodes": nodes, field: [], "sims": [], "more": False}
        return Deferred(
            partial(self.node.packets.serve_find, key, sketch, limit, offset, nodes, ids=ids),
            busy={"nodes": nodes, field: [], "sims": [], "more": True, "busy": True},
        )

    def get_packets(self, addr: Address, args: list[Any]) -> Any:
        rpc = "get_packets"
        check_arity(rpc, args, ("nodeid", "ids"))
        self._sender(addr, id20(rpc, "nodeid", args[0]))
        ids = bytes_list(rpc, "ids", args[1], max_items=MAX_BATCH, max_bytes=PACKET_ID_BYTES)
        if any(len(pid) != PACKET_ID_BYTES for pid in ids):
            raise bad(rpc, "ids", f"must each be {PACKET_ID_BYTES} bytes")
        self._packet_peer(addr)
        if self.node.store is None:
            return {"packets": [], "more": False}
        return Deferred(
            partial(self.node.packets.serve_get, ids),
            busy={"packets": [], "more": True, "busy": True},
        )

    def listen(self, addr: Address, args: list[Any]) -> int:
        check_arity("listen", args, ("nodeid", "key", "ttl"))
        nodeid = id20("listen", "nodeid", args[0])
        key = id20("listen", "key", args[1])
        ttl = integer("listen", "ttl", args[2], 1, MAX_LISTEN_TTL)
        sender = self._sender(addr, nodeid)
        self._packet_peer(addr)
        return self.node.listeners.register(key, sender, ttl, trio.current_time())
