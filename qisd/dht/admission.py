"""Who may enter the routing table and be answered: closed-swarm admission (trio).

In an **open** swarm every peer is admitted at once (stock ``kademlia`` nodes take
part and are never asked anything new). In a **closed** swarm (manifest
``membership = "closed"``, signed by its creator) a peer is admitted only after it
has answered a ``hello`` challenge (:mod:`qisd.dht.hello`) proving that it holds the
private key of a member whose SHA-1 is the node id it claims, from the address it
speaks from. Until then:

- it does not enter the routing table (:meth:`Admission.admitted` gates
  ``DHTNode.welcome``), so no lookup ever names it to anyone;
- its requests are not answered (:meth:`Admission.gate` wraps RPC dispatch): up to
  :data:`MAX_WAITING_PER_PEER` requests of a new (id, address) wait for its proof,
  then run or are dropped (counted by reason, packets they carried counted as
  ``not_member``).

What a failed proof refuses depends on what it says. The answer to a ``hello`` comes
from the address it was sent to (its message id cannot be guessed), while the
request that caused it may be forged from any source, naming any id. So:

- the address answered with a proof that admits nobody (``not_member``,
  ``bad_proof``, or ``id_mismatch`` with no valid proof of any member id): the
  address is refused for :data:`REFUSED_TTL` seconds, whatever id it claims;
- it answered with a valid proof of another member's id (``id_mismatch``: a forged
  request, or a member that changed keys): only the claimed id is refused there,
  and the member it proved is admitted at that address;
- it did not answer (``no_answer``: a lost datagram says nothing against it): that
  id at that address is not asked again for ``failure_backoff`` seconds, and
  nothing is removed from the routing table.

A node answers ``hello`` itself without any check: the proof binds the asker's id
and nonce, so it is worth nothing to anyone else. A proof admits a peer for
:data:`PROVEN_TTL` seconds; traffic from it in the last :data:`REPROVE_BEFORE`
seconds of that proves it again in the background, so an active peer is never
dropped by the clock. What stays bounded against a flood of unknown (or forged)
senders: proofs in flight (:data:`MAX_VERIFYING`, and :data:`MAX_VERIFYING_PER_GROUP`
per IPv4 /24 or IPv6 /48, see :func:`proof_group`), requests waiting on them
(:data:`MAX_WAITING_PER_PEER` each, :data:`MAX_WAITING` in all), refusals
(:data:`MAX_REFUSED`) and proven peers (:data:`MAX_PROVEN`, LRU).
"""

from __future__ import annotations

import ipaddress
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NoReturn

import trio
from kademlia.node import Node

from qisd.dht.deferred import Deferred
from qisd.dht.hello import (
    ID_MISMATCH,
    NO_ANSWER,
    NONCE_BYTES,
    HelloError,
    check_proof,
    node_id_of,
    proof_shaped,
    prove,
)
from qisd.dht.wire import ID_BYTES, Address, WireError, bad, check_arity, id20
from qisd.identity import node_id_for
from qisd.logs import get_logger
from qisd.manifest import Manifest

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

log = get_logger(__name__)

#: Seconds a proof admits a peer at one address before it is asked again.
PROVEN_TTL = 3600.0
#: Traffic from a proven peer this close to its expiry proves it again (background).
REPROVE_BEFORE = 600.0
MAX_PROVEN = 8192
#: Seconds an address whose answer admitted nobody is ignored without a new hello.
REFUSED_TTL = 300.0
MAX_REFUSED = 8192
#: Hellos in flight at once; beyond it requests from unknown peers are dropped.
MAX_VERIFYING = 32
#: Hellos in flight to one network (see :func:`proof_group`), so spoofed sources of
#: one network cannot fill the queue.
MAX_VERIFYING_PER_GROUP = 8
#: Requests of one unproven (id, address) that may wait on its proof, and in all
#: (each holds a handler slot while it waits: at most half of the default 64).
MAX_WAITING_PER_PEER = 4
MAX_WAITING = 32
#: Concurrent proofs of contacts restored from the state file.
RESTORE_CONCURRENCY = 4
#: RPCs that carry packets: refused there, each packet counts as ``not_member``.
PACKET_RPCS = frozenset({"store_packets", "notify"})

Method = Callable[[Address, list[Any]], Any]
#: (claimed id, address) or (None, address): that id there, or anyone there.
RefusalKey = tuple[bytes | None, Address]


def check_closed_manifest(manifest: Manifest) -> None:
    """A closed swarm's member list must come signed by the manifest's creator."""
    if manifest.membership == "closed" and not manifest.verify_signature():
        raise ValueError(
            "manifest: a closed swarm's manifest must carry a creator signature that "
            "verifies (sign it with `Manifest.signed(creator_key)`)"
        )


def proof_group(addr: Address, *, exempt_private: bool = True) -> Hashable:
    """Whose share of the proof queue a hello to ``addr`` takes.

    The IPv4 /24 or IPv6 /48 (as the routing table's subnet limit), so sources
    forged within one network hold at most :data:`MAX_VERIFYING_PER_GROUP` slots.
    On loopback the address and port (local swarms run many nodes on one IP); in
    private and link-local ranges the IP when ``exempt_private`` (the routing
    table's default: a LAN swarm is many hosts of one /24).
    """
    key = _group_of(addr[0], exempt_private)
    return addr if key is None else key


@lru_cache(maxsize=8192)
def _group_of(ip: str, exempt_private: bool) -> str | None:
    try:
        parsed = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    if parsed.is_loopback:
        return None
    if exempt_private and (parsed.is_private or parsed.is_link_local):
        return str(parsed)
    prefix = 24 if parsed.version == 4 else 48
    return str(ipaddress.ip_network((parsed, prefix), strict=False))


class Admission:
    def __init__(self, node: DHTNode) -> None:
        check_closed_manifest(node.manifest)
        self.node = node
        self.required = node.manifest.membership == "closed"
        #: Closed swarms: the node ids of the members (SHA-1 of their keys).
        self._member_ids = frozenset(node_id_for(k) for k in node.manifest.members)
        self.proven_ttl = PROVEN_TTL
        self.reprove_before = REPROVE_BEFORE
        self.retry_after = node.config.failure_backoff
        self._exempt_private = node.config.subnets.exempt_private
        #: node id -> (address, expiry): peers that proved their key there.
        self._proven: OrderedDict[bytes, tuple[Address, float]] = OrderedDict()
        #: (id or None, address) -> (reason, expiry): see the module docstring.
        self._refused: OrderedDict[RefusalKey, tuple[str, float]] = OrderedDict()
        #: (node id, address) -> set when its proof is settled.
        self._pending: dict[tuple[bytes, Address], trio.Event] = {}
        #: Proofs in flight per network (:func:`proof_group`).
        self._groups: Counter[Hashable] = Counter()
        #: Requests waiting on a pending proof, per (node id, address).
        self._waiting: Counter[tuple[bytes, Address]] = Counter()

    # -- decisions ----------------------------------------------------------------

    def may_name(self, node_id: bytes) -> bool:
        """May a contact with ``node_id``, named in a peer's reply, be asked at all?
        In a closed swarm only members' ids: a lookup never wanders off to nodes
        that could not prove their way in (and whose answers could steer it)."""
        return not self.required or node_id in self._member_ids

    def admitted(self, contact: Node) -> bool:
        """May ``contact`` (id at ip:port) enter the table and be answered?"""
        if not self.required:
            return True
        entry = self._proven.get(contact.id)
        if entry is None:
            return False
        addr, expiry = entry
        return addr == (contact.ip, contact.port) and expiry > trio.current_time()

    def refused(self, node_id: bytes, addr: Address) -> str | None:
        """Why ``node_id`` at ``addr`` (or anyone there) was refused lately, or None."""
        return self._refusal((None, addr)) or self._refusal((node_id, addr))

    def _refusal(self, key: RefusalKey) -> str | None:
        entry = self._refused.get(key)
        if entry is None:
            return None
        if entry[1] <= trio.current_time():
            del self._refused[key]
            return None
        return entry[0]

    def address_proven(self, addr: Address) -> bool:
        now = trio.current_time()
        return any(a == addr and exp > now for a, exp in self._proven.values())

    def seen(self, contact: Node) -> None:
        """An admitted ``contact`` sent or answered something: if its proof is about
        to lapse, prove it again in the background (it stays admitted meanwhile)."""
        if not self.required:
            return
        entry = self._proven.get(contact.id)
        if entry is not None and entry[1] - trio.current_time() < self.reprove_before:
            self._begin(contact)

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
        self._begin(contact)

    async def ensure(self, contact: Node) -> bool:
        """Wait until ``contact`` is proven or refused; True if admitted."""
        if self.admitted(contact):
            return True
        event = self._begin(contact)
        if event is None:
            return False
        await event.wait()
        return self.admitted(contact)

    async def restore(self, contacts: Iterable[Node]) -> None:
        """Prove contacts read from the state file, a few at a time; the proven ones
        enter the routing table (a saved table is no proof of membership)."""
        todo = iter(contacts)

        async def worker() -> None:
            for contact in todo:
                await self.ensure(contact)

        async with trio.open_nursery() as nursery:
            for _ in range(RESTORE_CONCURRENCY):
                nursery.start_soon(worker)

    def _begin(self, contact: Node) -> trio.Event | None:
        """The event of ``contact``'s proof, started now if need be; None if it cannot
        start (refused lately, too many in flight, the node is not running)."""
        addr = (contact.ip, contact.port)
        pending = self._pending.get((contact.id, addr))
        if pending is not None:
            return pending
        if self.refused(contact.id, addr) is not None or len(self._pending) >= MAX_VERIFYING:
            return None
        group = proof_group(addr, exempt_private=self._exempt_private)
        if self._groups[group] >= MAX_VERIFYING_PER_GROUP:
            self.node.counters.dropped["verifying_group"] += 1
            return None
        if not self.node.spawn(self._verify, contact, group):
            return None
        event = self._pending[(contact.id, addr)] = trio.Event()
        self._groups[group] += 1
        return event

    async def _verify(self, contact: Node, group: Hashable) -> None:
        node = self.node
        addr = (contact.ip, contact.port)
        try:
            nonce = os.urandom(NONCE_BYTES)
            ok, answer = await node.transport.call(addr, "hello", [node.me.id, nonce])
            if not ok:
                self._no_answer(contact)
                return
            try:
                check_proof(
                    answer,
                    manifest=node.manifest,
                    verifier_id=node.me.id,
                    nonce=nonce,
                    prover_id=contact.id,
                )
            except HelloError as exc:
                real = self._proven_instead(answer, nonce) if exc.reason == ID_MISMATCH else None
                self._refuse(contact, exc.reason, whole_address=real is None)
                log.info("peer refused", peer=addr, reason=exc.reason, error=str(exc))
                if real is not None:
                    # The address holds another member (a request naming a wrong id
                    # was forged from it): refuse only the claimed id, admit the member.
                    self._admit(Node(real, contact.ip, contact.port))
            else:
                self._admit(contact)
        finally:
            event = self._pending.pop((contact.id, addr), None)
            self._groups[group] -= 1
            if self._groups[group] <= 0:
                del self._groups[group]
            if event is not None:
                event.set()

    def _proven_instead(self, answer: Any, nonce: bytes) -> bytes | None:
        """The member id ``answer`` validly proves, if any (it did not prove the
        claimed one)."""
        if not proof_shaped(answer):
            return None
        real = node_id_of(answer[0])
        try:
            check_proof(
                answer,
                manifest=self.node.manifest,
                verifier_id=self.node.me.id,
                nonce=nonce,
                prover_id=real,
            )
        except HelloError:
            return None
        return real

    def _admit(self, contact: Node) -> None:
        addr = (contact.ip, contact.port)
        self._refused.pop((None, addr), None)
        self._refused.pop((contact.id, addr), None)
        self._proven[contact.id] = (addr, trio.current_time() + self.proven_ttl)
        self._proven.move_to_end(contact.id)
        while len(self._proven) > MAX_PROVEN:
            self._proven.popitem(last=False)
        self.node.welcome(contact)

    def _no_answer(self, contact: Node) -> None:
        # A lost datagram says nothing against the peer: ask again after a short
        # backoff; a proven peer stays proven until its proof lapses, and the
        # routing table is left to its usual failure rules (paper 4.1).
        addr = (contact.ip, contact.port)
        self.node.counters.peers_refused[NO_ANSWER] += 1
        self._remember((contact.id, addr), NO_ANSWER, self.retry_after)
        log.info("peer did not answer hello", peer=addr)

    def _refuse(self, contact: Node, reason: str, *, whole_address: bool) -> None:
        addr = (contact.ip, contact.port)
        self.node.counters.peers_refused[reason] += 1
        self._remember((None, addr) if whole_address else (contact.id, addr), reason, REFUSED_TTL)
        if whole_address:
            # Nobody at that address holds a member key any more.
            for node_id in [i for i, (a, _) in self._proven.items() if a == addr]:
                del self._proven[node_id]
                self.node.table.remove_contact(Node(node_id, addr[0], addr[1]))
        else:
            entry = self._proven.get(contact.id)
            if entry is not None and entry[0] == addr:
                del self._proven[contact.id]
        # A contact restored from the state file, or one that stopped proving itself.
        self.node.table.remove_contact(contact)

    def _remember(self, key: RefusalKey, reason: str, ttl: float) -> None:
        self._refused[key] = (reason, trio.current_time() + ttl)
        self._refused.move_to_end(key)
        while len(self._refused) > MAX_REFUSED:
            self._refused.popitem(last=False)

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
            self.seen(contact)
            return method(addr, args)
        reason = self.refused(contact.id, addr)
        if reason is not None:
            self._refuse_request(name, args, reason)
        key = (contact.id, addr)
        self._check_waiting(name, args, key)

        async def work() -> Any:
            # Counted while it runs (not at dispatch): work the transport never
            # starts (no free handler) must not hold a place.
            self._check_waiting(name, args, key)
            self._waiting[key] += 1
            try:
                ok = await self.ensure(contact)
            finally:
                self._waiting[key] -= 1
                if self._waiting[key] <= 0:
                    del self._waiting[key]
            if not ok:
                self._refuse_request(name, args, self.refused(contact.id, addr) or "unproven")
            result = method(addr, args)
            if isinstance(result, Deferred):
                result = await result.work()
            return result

        return Deferred(work)

    def _check_waiting(self, name: str, args: list[Any], key: tuple[bytes, Address]) -> None:
        if self._waiting[key] >= MAX_WAITING_PER_PEER or self._waiting.total() >= MAX_WAITING:
            self._refuse_request(name, args, "unproven")
        if key not in self._pending and len(self._pending) >= MAX_VERIFYING:
            self._refuse_request(name, args, "unproven")

    def _refuse_request(self, name: str, args: list[Any], reason: str) -> NoReturn:
        counters = self.node.counters
        if name in PACKET_RPCS and len(args) == 3 and isinstance(args[2], list):
            counters.packets_rejected["not_member"] += len(args[2])
        raise WireError(reason, f"{name}: the sender is not an admitted member ({reason})")
