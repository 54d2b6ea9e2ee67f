"""The DHT node: contacts, outgoing RPCs, lookups, stock get/set, and its lifetime.

A :class:`DHTNode` ties the pure parts (routing table, lookup state, value tables)
to one :class:`~qisd.dht.transport.Transport`. Inbound requests are answered by
:mod:`qisd.dht.rpc`, packet placement and search live in :mod:`qisd.dht.packets`,
periodic upkeep in :mod:`qisd.dht.maintenance`. Use :func:`open_node`::

    async with open_node(identity, manifest, store, host="0.0.0.0", port=4000) as node:
        await node.bootstrap([("192.0.2.7", 4000)])
        report = await node.put_packet(packet)
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio
from kademlia.node import Node

from qisd.dht import maintenance, state, stock
from qisd.dht.admission import Admission
from qisd.dht.api import Delivery, Identity, PacketStore, PutReport
from qisd.dht.config import DHTConfig
from qisd.dht.diagnose import swarm_problem
from qisd.dht.lookup import LookupStats, Reply, iterate
from qisd.dht.packets import PacketOps
from qisd.dht.peerkind import PeerKinds
from qisd.dht.routing import ADDED, PING_HEAD, RoutingTable
from qisd.dht.rpc import RpcServer
from qisd.dht.stats import Counters, DHTStatistics
from qisd.dht.transport import DatagramEndpoint, Transport, open_udp_endpoint
from qisd.dht.traverse import LookupState
from qisd.dht.values import AddressMemory, Listeners, StockValue, ValueStore
from qisd.dht.wire import MAX_REPLY_NODES, Address, WireError, contact_list, normalize_ip
from qisd.logs import get_logger
from qisd.manifest import DEFAULT_MANIFEST, Manifest
from qisd.packet import OutcomePacket, wall_ms
from qisd.sketch import Sketch

log = get_logger(__name__)
T = TypeVar("T")
#: Head pings (paper 2.2 eviction checks) in flight at once.
MAX_HEAD_PINGS = 16


class DHTNode:
    def __init__(
        self,
        identity: Identity,
        manifest: Manifest,
        store: PacketStore | None,
        endpoint: DatagramEndpoint,
        *,
        config: DHTConfig,
        state_dir: Path | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.manifest = manifest
        self.store = store
        self.config = config
        self.replicas = config.replicas or manifest.replicas
        host, port = endpoint.local_address
        self.me = Node(identity.node_id, host, port)
        self.rng = rng or random.Random()
        self.counters = Counters()
        self.table = RoutingTable(
            self.me, config.ksize, clock=trio.current_time, subnets=config.subnets
        )
        self.values = ValueStore(
            ttl=config.value_ttl, max_items=config.max_values, max_bytes=config.max_value_bytes
        )
        self.listeners = Listeners(
            ttl_max=config.listen_ttl_max,
            per_peer=config.max_listens_per_peer,
            max_total=config.max_listens,
        )
        #: Keys this node listens to (key -> monotonic expiry).
        self.subscriptions: dict[bytes, float] = {}
        #: Peers seen speaking the packet RPCs, and peers that ignored them.
        self.packet_peers = AddressMemory(ttl=3600.0)
        self.stock_peers = AddressMemory(ttl=600.0)
        #: Bootstrap peers found to run another swarm: kept out of the routing table.
        self.other_swarm = AddressMemory(max_items=256, ttl=600.0)
        #: Peers that recently failed to answer (see ``DHTConfig.failure_backoff``).
        self.failed_peers = AddressMemory(ttl=config.failure_backoff)
        #: Closed swarms: who has proven membership (see qisd.dht.admission).
        self.admission = Admission(self)
        #: Which peers speak the qisd-only RPCs (see qisd.dht.peerkind).
        self.kinds = PeerKinds(self)
        self.rpc = RpcServer(self)
        self.packets = PacketOps(self)
        self.transport = Transport(
            endpoint,
            self.rpc.dispatch,
            self.counters,
            timeout=config.rpc_timeout,
            retries=config.rpc_retries,
            max_outstanding=config.max_outstanding,
            max_handlers=config.max_handlers,
            limits=config.limits,
        )
        self._deliver_send, self.deliveries = trio.open_memory_channel[Delivery](
            config.delivery_buffer
        )
        self.handoff_send, self.handoff_recv = trio.open_memory_channel[Node](config.handoff_queue)
        self.thread_limiter = trio.CapacityLimiter(config.store_threads)
        self.state_file = state_dir / state.FILE_NAME if state_dir is not None else None
        #: One save of the state file at a time (they share its temporary file).
        self.state_lock = trio.Lock()
        self._v6 = ":" in host
        #: One socket for IPv4 and IPv6 peers (bound to ``::``; see qisd.dht.udp).
        self.dual_stack = endpoint.dual_stack
        self._pinging: set[bytes] = set()
        self._nursery: trio.Nursery | None = None
        #: Set once the contacts saved by the last run were checked again (at once
        #: when there were none): until then the routing table may not be the swarm's.
        self.rejoined = trio.Event()

    # -- lifetime ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``started`` once the socket is answering."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.transport.serve)
            await self.packets.reload_held()
            await self.packets.own.load()
            restored = await state.load(self)
            if not self.admission.required:
                for contact in restored:
                    self.table.add_contact(contact, heard=False)
            await nursery.start(maintenance.run, self)
            if restored:
                nursery.start_soon(self._rejoin, restored)
            else:
                self.rejoined.set()
            task_status.started()

    async def _rejoin(self, restored: list[Node]) -> None:
        try:
            if self.admission.required:
                # A saved table proves nothing: in a closed swarm each contact enters
                # only once it has proven its key again (qisd.dht.admission).
                await self.admission.restore(restored)
            # Contacts from the state file may be stale: a lookup of our own id pings
            # them, evicts the dead ones and tells the live ones we are back.
            await self.lookup_nodes(self.me.id)
        finally:
            self.rejoined.set()

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Start ``fn(*args)`` in the node's nursery; False if the node is not running.

        A background task that fails is logged and counted, never allowed to take
        the node (and the daemon around it) down."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(self._guarded, fn, *args)
        return True

    async def _guarded(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            await fn(*args)
        except Exception:
            self.counters.task_errors += 1
            log.exception("dht background task failed", task=getattr(fn, "__qualname__", fn))

    async def in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run store/verification work off the trio thread, a few at a time."""
        return await trio.to_thread.run_sync(
            partial(fn, *args, **kwargs), limiter=self.thread_limiter
        )

    @property
    def address(self) -> Address:
        return self.transport.local_address

    wall_ms = staticmethod(wall_ms)

    # -- contacts ---------------------------------------------------------------

    def reachable(self, ip: str | None) -> bool:
        """Only contacts of our socket's address family (or both, dual-stack) can be reached."""
        return ip is not None and (self.dual_stack or (":" in ip) == self._v6)

    def welcome(self, contact: Node) -> None:
        """``contact`` sent or answered something: record it (paper 2.2, 2.5)."""
        if contact.id == self.me.id or not self.reachable(contact.ip):
            return
        if self.other_swarm.has((contact.ip, contact.port), trio.current_time()):
            return
        if not self.admission.admitted(contact):
            self.admission.request(contact)  # welcomed again once it proves its key
            return
        self.admission.seen(contact)
        self.failed_peers.discard((contact.ip, contact.port))
        result = self.table.add_contact(contact)
        if result.action == ADDED:
            self.kinds.check(contact)  # does it speak qisd's own RPCs?
            if self.store is not None or len(self.values):
                try:
                    self.handoff_send.send_nowait(contact)
                except trio.WouldBlock:
                    self.counters.dropped["handoff_overflow"] += 1
        elif result.action == PING_HEAD and result.head is not None:
            head = result.head
            if head.id not in self._pinging and len(self._pinging) < MAX_HEAD_PINGS:
                self._pinging.add(head.id)
                self.spawn(self._ping_head, head)

    async def _ping_head(self, head: Node) -> None:
        # Paper 2.2: a full bucket's head is evicted only if it fails to answer a
        # ping, so the ping is sent even while the head is in failure backoff (a
        # backoff skip would evict it unasked). Answered with its id: it moves to the
        # bucket's tail and the newcomer waits in the replacement cache. Silence (or
        # another node at its address): it goes, and the newest replacement (the
        # newcomer) takes its place.
        addr = (head.ip, head.port)
        try:
            ok, result = await self.transport.call(addr, "ping", [self.me.id])
            if ok and result == head.id:
                self.welcome(head)
            else:
                self.failed_peers.add(addr, trio.current_time())
                self.table.remove_contact(head)
        finally:
            self._pinging.discard(head.id)

    def deliver(self, delivery: Delivery) -> None:
        """Hand a packet to the daemon; never waits (a full channel counts a drop)."""
        try:
            self._deliver_send.send_nowait(delivery)
        except trio.WouldBlock:
            self.counters.deliveries_dropped += 1
        else:
            self.counters.deliveries += 1

    # -- outgoing RPCs ----------------------------------------------------------

    async def call(
        self, peer: Node, name: str, args: list[Any], *, evict: bool = True
    ) -> tuple[bool, Any]:
        """One RPC to ``peer``; an answer welcomes it, silence counts against it
        (if ``evict``: see ``RoutingTable.contact_failed``, paper 4.1).

        A peer that failed within ``failure_backoff`` seconds fails again at once,
        without a request; that counts against it no further (it was not asked).
        """
        addr = (peer.ip, peer.port)
        if self.failed_peers.has(addr, trio.current_time()):
            return False, None
        ok, result = await self.transport.call(addr, name, args)
        if ok:
            self.welcome(peer)
        else:
            self.failed_peers.add(addr, trio.current_time())
            if evict:
                self.table.contact_failed(peer)
        return ok, result

    def parse_nodes(
        self, rpc: str, value: Any, make: Callable[[bytes, str, int], Node] = Node
    ) -> list[Node] | None:
        """The contacts of a node list in a reply, made with ``make``: not us, of our
        address family, and (in a closed swarm) members only (the others counted as
        ``not_member_contact``); None (counted as ``bad_reply``) if it is not one."""
        try:
            triples = contact_list(rpc, value, MAX_REPLY_NODES)
        except WireError:
            self.counters.dropped["bad_reply"] += 1
            return None
        me, may_name, reachable = self.me.id, self.admission.may_name, self.reachable
        usable = [(i, ip, port) for i, ip, port in triples if i != me and reachable(ip)]
        named = [make(i, ip, port) for i, ip, port in usable if may_name(i)]
        if len(named) < len(usable):
            self.counters.dropped["not_member_contact"] += len(usable) - len(named)
        return named

    async def ping(self, addr: Address) -> Node | None:
        """Ping an address; the node there, or None if it did not answer properly."""
        ok, result = await self.transport.call(addr, "ping", [self.me.id])
        if not ok or not isinstance(result, bytes) or len(result) != 20:
            return None
        contact = Node(result, addr[0], addr[1])
        if not await self.admission.ensure(contact):
            return None
        self.welcome(contact)
        return contact

    async def find_node_reply(self, key: bytes, peer: Node) -> Reply | None:
        ok, result = await self.call(peer, "find_node", [self.me.id, key])
        if not ok:
            return None
        nodes = self.parse_nodes("find_node", result)
        return None if nodes is None else Reply(nodes)

    # -- lookups ----------------------------------------------------------------

    def seeds(self, key: bytes) -> list[Node]:
        self.table.touch_range(key)
        return self.table.find_neighbors(Node(key), k=self.config.ksize)

    async def run_lookup(
        self,
        state_: LookupState,
        find: Callable[[Node], Awaitable[Reply | None]],
        on_reply: Callable[[Node, Reply], bool] | None = None,
    ) -> LookupStats:
        stats = await iterate(state_, find, alpha=self.config.alpha, on_reply=on_reply)
        self.counters.lookup_done(stats.hops, stats.rpcs, stats.seconds)
        return stats

    async def lookup_nodes(
        self, key: bytes, *, width: int | None = None
    ) -> tuple[list[Node], LookupStats]:
        """Iterative FIND_NODE: the ``width`` (default k) closest live nodes to ``key``."""
        st = LookupState(
            key, self.seeds(key), width=width or self.config.ksize, exclude=[self.me.id]
        )
        stats = await self.run_lookup(st, partial(self.find_node_reply, key))
        return st.closest(), stats

    async def bootstrap(self, addrs: Iterable[tuple[str, int]]) -> list[Node]:
        """Join through known addresses (IPs or host names); the nodes closest to us."""
        nodes, _ = await self.join(addrs)
        return nodes

    async def join(
        self, addrs: Iterable[tuple[str, int]]
    ) -> tuple[list[Node], dict[tuple[str, int], str]]:
        """:meth:`bootstrap`, also saying why each address that failed did: not
        resolvable, no answer, or of no use (another swarm; see
        :mod:`qisd.dht.diagnose`)."""
        failed: dict[tuple[str, int], str] = {}

        async def contact(host: str, port: int) -> None:
            addr = await self._resolve(host, port)
            if isinstance(addr, str):
                failed[host, port] = addr
                return
            peer, problem = await swarm_problem(self, addr)
            if problem is not None:
                if peer is not None:  # of no use as a route: out of the table, and kept out
                    self.other_swarm.add(addr, trio.current_time())
                    self.table.remove_contact(peer)
                failed[host, port] = problem
            elif peer is None:
                failed[host, port] = "no answer"
            else:
                self.other_swarm.discard(addr)  # it was fixed (same swarm now): let it in
                self.welcome(peer)

        async with trio.open_nursery() as nursery:
            for host, port in addrs:
                nursery.start_soon(contact, host, port)
        nodes, _ = await self.lookup_nodes(self.me.id)
        if nodes:  # saved now, not only every save_interval: a crash soon after
            await state.save(self)  # a join would otherwise restart alone
        return nodes, failed

    async def _resolve(self, host: str, port: int) -> Address | str:
        """The address to send to, or why there is none."""
        mine = "IPv4 or IPv6" if self.dual_stack else "IPv6" if self._v6 else "IPv4"
        try:
            ip = normalize_ip(host)
        except ValueError:
            pass
        else:
            if not self.reachable(ip):
                return f"not an {mine} address (this node listens on {mine})"
            return _no_peer_there(ip) or (ip, port)
        family = (
            trio.socket.AF_UNSPEC
            if self.dual_stack
            else trio.socket.AF_INET6 if self._v6 else trio.socket.AF_INET
        )
        try:
            infos = await trio.socket.getaddrinfo(host, port, family=family)
        except OSError as exc:
            log.warning("bootstrap address does not resolve", host=host, port=port, error=str(exc))
            return f"does not resolve to an {mine} address ({exc.strerror or exc})"
        sockaddr = infos[0][4]
        ip = normalize_ip(str(sockaddr[0]))
        return _no_peer_there(ip) or (ip, int(sockaddr[1]))

    # -- stock values (see qisd.dht.stock) ---------------------------------------

    async def set(self, key: Any, value: StockValue) -> bool:
        """Store ``value`` under SHA-1(``key``) at the k closest nodes, as stock ``set``."""
        return await stock.set_value(self, key, value)

    async def set_digest(self, dkey: bytes, value: StockValue) -> bool:
        return await stock.set_digest(self, dkey, value)

    async def get(self, key: Any) -> StockValue | None:
        """The value under SHA-1(``key``), here or in the network, as stock ``get``."""
        return await stock.get_value(self, key)

    # -- packets (see qisd.dht.packets) -------------------------------------------

    async def put_packet(
        self, packet: OutcomePacket, *, keys: list[bytes] | None = None
    ) -> PutReport:
        """Store ``packet`` at the ``replicas`` closest nodes of each of its keys."""
        return await self.packets.put_packet(packet, keys=keys)

    async def put_packets(self, packets: Sequence[OutcomePacket]) -> list[PutReport]:
        """:meth:`put_packet` for many, placed together per key (one report each)."""
        return await self.packets.put_packets(packets)

    async def find_packets(
        self, keys: Iterable[bytes], query_sketch: Sketch, m: int
    ) -> list[tuple[float, OutcomePacket]]:
        """The best ``m`` packets under ``keys`` by similarity to ``query_sketch``."""
        return await self.packets.find_packets(list(keys), query_sketch, m)

    async def listen(self, key: bytes, ttl_s: float) -> int:
        """Ask the nodes responsible for ``key`` to push its new packets here."""
        return await self.packets.listen(key, ttl_s)

    def unlisten(self, key: bytes) -> None:
        self.subscriptions.pop(key, None)

    # -- statistics ---------------------------------------------------------------

    def statistics(self) -> DHTStatistics:
        return self.counters.snapshot(
            node_id=self.me.id,
            address=self.address,
            peers=len(self.table),
            buckets=self.table.non_empty_buckets(),
            values=len(self.values),
            listeners=len(self.listeners),
            subscriptions=len(self.subscriptions),
        )


@asynccontextmanager
async def open_node(
    identity: Identity,
    manifest: Manifest = DEFAULT_MANIFEST,
    store: PacketStore | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    config: DHTConfig | None = None,
    state_dir: Path | None = None,
    endpoint: DatagramEndpoint | None = None,
    rng: random.Random | None = None,
) -> AsyncIterator[DHTNode]:
    """A running node bound to ``host``:``port`` (or to ``endpoint``, e.g. memnet).

    On exit the routing table is saved to ``state_dir`` and the socket closed.
    """
    ep = endpoint if endpoint is not None else await open_udp_endpoint(host, port)
    try:
        node = DHTNode(
            identity,
            manifest,
            store,
            ep,
            config=config or DHTConfig(),
            state_dir=state_dir,
            rng=rng,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            try:
                yield node
            finally:
                with trio.CancelScope(shield=True):
                    await state.save(node)
                nursery.cancel_scope.cancel()
    finally:
        ep.close()


def _no_peer_there(ip: str) -> str | None:
    """Why ``ip`` cannot be a peer's address (not one host's), or None."""
    addr = ipaddress.ip_address(ip)
    if addr.is_unspecified:
        return f"{ip} is the unspecified address, not a host's: give the peer's own address"
    if addr.is_multicast or ip == "255.255.255.255":
        return f"{ip} is a broadcast or multicast address, not one peer's"
    return None
