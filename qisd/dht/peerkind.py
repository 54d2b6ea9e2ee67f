"""Which contacts speak qisd's own RPCs, so only those are sent them (trio).

A stock ``kademlia`` node ignores an RPC it does not know: asking it one costs a
whole reply timeout. So a qisd-only request (``store_value``, the packet RPCs) goes
only to a peer known to answer it, and everyone else gets the stock RPCs. What
makes a peer known (remembered in ``DHTNode.packet_peers`` for an hour):

- it answered, or sent us, a qisd-only RPC;
- it answered ``hello`` (:mod:`qisd.dht.hello`), which :meth:`PeerKinds.check`
  asks in the background when the contact enters the routing table (or the first
  time an operation would have used it); in a closed swarm every admitted peer has
  already answered one. The peer asked learns the same of the asker.

A peer that answers ``ping`` but not ``hello`` is not asked again for ten minutes
(the packet RPCs keep their own way of telling stock nodes apart,
:meth:`qisd.dht.packets.PacketOps.packet_call`); one that answers neither counts
as a failed contact (``RoutingTable.contact_failed``). A qisd-only
request that goes unanswered makes the peer unknown again (:meth:`PeerKinds.doubt`).
Probes run a few at a time from a bounded queue and an operation never waits on
them: until a peer's kind is known, it is sent stock RPCs.
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING

import trio
from kademlia.node import Node

from qisd.dht.hello import NONCE_BYTES, proof_shaped
from qisd.dht.values import AddressMemory
from qisd.dht.wire import Address

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

#: Background probes in flight per node, and peers waiting for one.
MAX_PROBES = 8
MAX_QUEUED = 1024
#: Seconds a peer that did not answer ``hello`` is not asked again.
SILENT_TTL = 600.0


class PeerKinds:
    def __init__(
        self, node: DHTNode, *, max_probes: int = MAX_PROBES, max_queued: int = MAX_QUEUED
    ) -> None:
        self.node = node
        self.max_probes = max_probes
        self.max_queued = max_queued
        #: Addresses queued or being probed, and the queue itself.
        self._pending: set[Address] = set()
        self._queue: deque[Node] = deque()
        self._workers = 0
        #: Peers that answered ``ping`` but not ``hello`` (stock, for all we know).
        self.silent = AddressMemory(ttl=SILENT_TTL)
        self.probes = 0

    def is_qisd(self, peer: Node) -> bool:
        node = self.node
        if node.packet_peers.has((peer.ip, peer.port), trio.current_time()):
            return True
        admission = node.admission
        return bool(admission.required and admission.admitted(peer))

    def saw_qisd(self, addr: Address) -> None:
        """``addr`` answered or sent a qisd-only RPC."""
        self.node.packet_peers.add(addr, trio.current_time())
        self.node.stock_peers.discard(addr)
        self.silent.discard(addr)

    def doubt(self, peer: Node) -> None:
        """A qisd-only request to ``peer`` went unanswered: ask again before the next."""
        self.node.packet_peers.discard((peer.ip, peer.port))

    def check(self, peer: Node) -> None:
        """If ``peer``'s kind is unknown, find it out in the background."""
        node = self.node
        addr = (peer.ip, peer.port)
        now = trio.current_time()
        if (
            addr in self._pending
            or len(self._pending) >= self.max_queued
            or node.packet_peers.has(addr, now)
            or node.stock_peers.has(addr, now)
            or self.silent.has(addr, now)
            or node.failed_peers.has(addr, now)
            or (node.admission.required and node.admission.admitted(peer))
        ):
            return
        if self._workers < self.max_probes:
            if not node.spawn(self._work):
                return
            self._workers += 1
        self._pending.add(addr)
        self._queue.append(peer)

    async def _work(self) -> None:
        try:
            while self._queue:
                peer = self._queue.popleft()
                try:
                    await self._probe(peer)
                finally:
                    self._pending.discard((peer.ip, peer.port))
        finally:
            self._workers -= 1

    async def _probe(self, peer: Node) -> None:
        node = self.node
        addr = (peer.ip, peer.port)
        if node.packet_peers.has(addr, trio.current_time()):
            return  # learnt while queued (it asked us something of ours)
        self.probes += 1
        nonce = os.urandom(NONCE_BYTES)
        ok, answer = await node.transport.call(addr, "hello", [node.me.id, nonce])
        if ok and proof_shaped(answer):
            # Its kind, not its membership: closed swarms check proofs on their own.
            self.saw_qisd(addr)
            return
        ok, _ = await node.transport.call(addr, "ping", [node.me.id])
        if ok:
            self.silent.add(addr, trio.current_time())
        else:
            node.failed_peers.add(addr, trio.current_time())
            node.table.contact_failed(peer)

