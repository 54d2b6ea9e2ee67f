"""Who may enter the routing table and be answered: closed-swarm admission (trio).

In an **open** swarm every peer is admitted at once (stock ``kademlia`` nodes take
part and are never asked anything new). In a **closed** swarm (manifest
``membership = "closed"``, signed by its creator) a peer is admitted only after it
has answered a ``hello`` challenge (:mod:`qisd.dht.hello`) proving that it holds the
private key of a member whose SHA-1 is the node id it claims, from the address it
speaks from. Until then:

- it does not enter the routing table (:meth:`Admission.admitted` gates
  ``DHTNode.welcome``), so no lookup ever names it to anyone;
- its requests are not answered (:meth:`Admission.gate` wraps RPC dispatch): the
  first request from a new (id, address) waits for the proof, then runs or is
  dropped (counted by reason, packets it carried counted as ``not_member``).

A node answers ``hello`` itself without any check: the proof binds the asker's id
and nonce, so it is worth nothing to anyone else. What stays bounded against a
flood of unknown senders: proofs in flight (:data:`MAX_VERIFYING`; a sender whose
proof is already pending is ignored), refused addresses remembered for
:data:`REFUSED_TTL` seconds (no new hello to them), proven peers kept for
:data:`PROVEN_TTL` seconds in an LRU of :data:`MAX_PROVEN`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import trio
from kademlia.node import Node

from qisd.dht.hello import NO_ANSWER, NONCE_BYTES, HelloError, check_proof, prove
from qisd.dht.transport import Deferred
from qisd.dht.wire import ID_BYTES, Address, WireError, bad, check_arity, id20
from qisd.logs import get_logger
from qisd.manifest import Manifest

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

log = get_logger(__name__)

#: Seconds a proof admits a peer at one address before it is asked again.
PROVEN_TTL = 3600.0
MAX_PROVEN = 8192
#: Seconds an address whose proof failed is ignored without a new hello.
REFUSED_TTL = 300.0
MAX_REFUSED = 8192
#: Hellos in flight at once; beyond it requests from unknown peers are ignored.
MAX_VERIFYING = 32
#: RPCs that carry packets: refused there, each packet counts as ``not_member``.
PACKET_RPCS = frozenset({"store_packets", "notify"})

Method = Callable[[Address, list[Any]], Any]


def check_closed_manifest(manifest: Manifest) -> None:
    """A closed swarm's member list must come signed by the manifest's creator."""
    if manifest.membership == "closed" and not manifest.verify_signature():
        raise ValueError(
            "manifest: a closed swarm's manifest must carry a creator signature that "
            "verifies (sign it with `Manifest.signed(creator_key)`)"
        )


class Admission:
    def __init__(self, node: DHTNode) -> None:
        check_closed_manifest(node.manifest)
        self.node = node
        self.required = node.manifest.membership == "closed"
        #: node id -> (address, expiry): peers that proved their key there.
        self._proven: OrderedDict[bytes, tuple[Address, float]] = OrderedDict()
        #: address -> (reason, expiry): peers whose proof failed.
        self._refused: OrderedDict[Address, tuple[str, float]] = OrderedDict()
        #: (node id, address) -> set when its proof is settled.
        self._pending: dict[tuple[bytes, Address], trio.Event] = {}

    # -- decisions ----------------------------------------------------------------

    def admitted(self, contact: Node) -> bool:
        """May ``contact`` (id at ip:port) enter the table and be answered?"""
        if not self.required:
            return True
        entry = self._proven.get(contact.id)
        if entry is None:
            return False
        addr, expiry = entry
        return addr == (contact.ip, contact.port) and expiry > trio.current_time()

    def refused(self, addr: Address) -> str | None:
        """Why ``addr`` was refused lately, or None."""
        entry = self._refused.get(addr)
        if entry is None:
            return None
        if entry[1] <= trio.current_time():
            del self._refused[addr]
            return None
        return entry[0]

    def address_proven(self, addr: Address) -> bool:
        now = trio.current_time()
        return any(a == addr and exp > now for a, exp in self._proven.values())

    # -- the prover's side ------------------------------------------------------------

    def answer(self, args: list[Any]) -> list[bytes]:
        """``hello(verifier_id, nonce)``: this node's proof (see :mod:`qisd.dht.hello`)."""
        check_arity("hello", args, ("nodeid", "nonce"))
        verifier = id20("hello", "nodeid", args[0])
        nonce = args[1]
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise bad("hello", "nonce", f"must be {NONCE_BYTES} bytes")
        key = getattr(self.node.identity, "signing_key", None)
        if key is None:
            raise WireError("unsupported", "hello: this node holds no signing key")
        return prove(key, self.node.manifest.swarm_id, verifier, nonce).to_wire()

    # -- the verifier's side ------------------------------------------------------------

    def request(self, contact: Node) -> None:
        """Start proving ``contact`` in the background (a no-op when it cannot start)."""
        addr = (contact.ip, contact.port)
        if (
            (contact.id, addr) in self._pending
            or len(self._pending) >= MAX_VERIFYING
            or self.refused(addr) is not None
        ):
            return
        if self.node.spawn(self._verify, contact):
            self._start(contact)

    async def ensure(self, contact: Node) -> bool:
        """Wait until ``contact`` is proven or refused; True if admitted."""
        if self.admitted(contact):
            return True
        addr = (contact.ip, contact.port)
        if self.refused(addr) is not None:
            return False
        pending = self._pending.get((contact.id, addr))
        if pending is not None:
            await pending.wait()
        elif len(self._pending) >= MAX_VERIFYING:
            return False
        else:
            self._start(contact)
            await self._verify(contact)
        return self.admitted(contact)

    def _start(self, contact: Node) -> None:
        self._pending[(contact.id, (contact.ip, contact.port))] = trio.Event()

    async def _verify(self, contact: Node) -> None:
        node = self.node
        addr = (contact.ip, contact.port)
        try:
            nonce = os.urandom(NONCE_BYTES)
            ok, answer = await node.transport.call(addr, "hello", [node.me.id, nonce])
            try:
                if not ok:
                    raise HelloError(NO_ANSWER, "no answer to hello")
                check_proof(
                    answer,
                    manifest=node.manifest,
                    verifier_id=node.me.id,
                    nonce=nonce,
                    prover_id=contact.id,
                )
            except HelloError as exc:
                self._refuse(contact, exc.reason)
                log.info("peer refused", peer=addr, reason=exc.reason, error=str(exc))
            else:
                self._admit(contact)
        finally:
            event = self._pending.pop((contact.id, addr), None)
            if event is not None:
                event.set()

    def _admit(self, contact: Node) -> None:
        addr = (contact.ip, contact.port)
        self._refused.pop(addr, None)
        self._proven[contact.id] = (addr, trio.current_time() + PROVEN_TTL)
        self._proven.move_to_end(contact.id)
        while len(self._proven) > MAX_PROVEN:
            self._proven.popitem(last=False)
        self.node.welcome(contact)

    def _refuse(self, contact: Node, reason: str) -> None:
        addr = (contact.ip, contact.port)
        self.node.counters.peers_refused[reason] += 1
        self._refused[addr] = (reason, trio.current_time() + REFUSED_TTL)
        self._refused.move_to_end(addr)
        while len(self._refused) > MAX_REFUSED:
            self._refused.popitem(last=False)
        entry = self._proven.get(contact.id)
        if entry is not None and entry[0] == addr:
            del self._proven[contact.id]
        # A contact restored from the state file, or one that stopped proving itself.
        self.node.table.remove_contact(contact)

    # -- inbound requests in a closed swarm ------------------------------------------------

    def gate(self, name: str, args: list[Any], addr: Address, method: Method) -> Any:
        """Run ``method`` for an admitted sender; prove a new one first; refuse the rest.

        Raising :class:`WireError` makes the transport drop the request (no reply)
        and count it by reason.
        """
        if name == "stun":  # carries no node id: answered for proven addresses only
            if self.address_proven(addr):
                return method(addr, args)
            raise WireError("not_member", "stun from an address no member proved")
        if not args or not isinstance(args[0], bytes) or len(args[0]) != ID_BYTES:
            raise bad(name, "nodeid", f"must be {ID_BYTES} bytes")
        contact = Node(args[0], addr[0], addr[1])
        if self.admitted(contact):
            return method(addr, args)
        reason = self.refused(addr)
        if reason is not None:
            self._refuse_request(name, args, reason)
        if (contact.id, addr) in self._pending or len(self._pending) >= MAX_VERIFYING:
            # Its proof is on the way (or too many are): one waiting request per peer.
            self._refuse_request(name, args, "unproven")

        async def work() -> Any:
            if not await self.ensure(contact):
                self._refuse_request(name, args, self.refused(addr) or "unproven")
            result = method(addr, args)
            if isinstance(result, Deferred):
                result = await result.work()
            return result

        return Deferred(work)

    def _refuse_request(self, name: str, args: list[Any], reason: str) -> NoReturn:
        counters = self.node.counters
        if name in PACKET_RPCS and len(args) == 3 and isinstance(args[2], list):
            counters.packets_rejected["not_member"] += len(args[2])
        raise WireError(reason, f"{name}: the sender is not an admitted member ({reason})")
