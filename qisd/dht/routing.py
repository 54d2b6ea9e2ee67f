"""The routing table: stock ``kademlia`` k-buckets that decide but never do I/O (pure).

``kademlia.routing.RoutingTable.add_contact`` pings the head of a full bucket with
``asyncio.ensure_future``. Here :meth:`RoutingTable.add_contact` returns an
:class:`AddResult` instead; when it says ``PING_HEAD`` the node loop pings that
contact and reports back with :meth:`touch` (it answered: keep it, the newcomer stays
in the replacement cache) or :meth:`remove_contact` (it did not: the most recently
seen replacement takes its place). That is the eviction rule of the paper (2.2, 4.1).

A contact that fails to answer an RPC is reported with :meth:`contact_failed`, which
follows paper 4.1: it is replaced at once if its bucket has a replacement waiting,
and otherwise only flagged (its failures counted), not removed. So lost datagrams,
or a network cut, cannot empty the table: under 5% loss, evicting on every silence
drained tables from ~12 to ~4 contacts in 60 puts, and a partition would leave each
side with no contact on the other to heal through (scripts/fault_network.py). A
flagged contact that answers again is cleared; after :data:`STALE_AFTER` failures in
a row its return counts as a new contact (``ADDED``), so it gets hand-offs.

Also beyond the stock table: a per-bucket limit on contacts from one /24 (IPv4) or
/48 (IPv6) so one operator cannot fill a bucket (loopback and private ranges exempt
by default), an injected clock for bucket refresh (paper 2.3), exact XOR-closest
neighbour search, and ``to_state``/``contacts_from_state`` for persistence.
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kademlia.node import Node
from kademlia.routing import KBucket
from kademlia.routing import RoutingTable as StockRoutingTable

ID_BITS = 160
ID_SPACE = 2**ID_BITS
#: Paper 4.2: buckets not containing our own id still split while depth % B != 0.
SPLIT_DEPTH_MODULUS = 5

#: Paper 4.1: failures in a row after which a contact counts as stale.
STALE_AFTER = 5

ADDED = "added"
UPDATED = "updated"
PING_HEAD = "ping_head"
REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class AddResult:
    """What :meth:`RoutingTable.add_contact` decided; ``head`` is set for ``PING_HEAD``."""

    action: str
    head: Node | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SubnetPolicy:
    """At most ``per_bucket`` contacts of one /24 or /48 per bucket (None: no limit)."""

    per_bucket: int | None = 2
    exempt_loopback: bool = True
    exempt_private: bool = True

    def key(self, ip: str | None) -> str | None:
        if self.per_bucket is None or ip is None:
            return None
        return _subnet_key(ip, self.exempt_loopback, self.exempt_private)


@lru_cache(maxsize=16384)
def _subnet_key(ip: str, exempt_loopback: bool, exempt_private: bool) -> str | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if exempt_loopback and addr.is_loopback:
        return None
    if exempt_private and (addr.is_private or addr.is_link_local) and not addr.is_loopback:
        return None
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class KBucketNoIO(KBucket):  # type: ignore[misc]
    """A stock k-bucket with an injected clock and per-subnet accounting."""

    def __init__(
        self, lower: int, upper: int, ksize: int, *, now: float, policy: SubnetPolicy
    ) -> None:
        self.policy = policy
        self.subnets: Counter[str] = Counter()
        #: Failures in a row of flagged contacts (paper 4.1), by id.
        self.failures: dict[bytes, int] = {}
        #: When each contact or replacement was last heard from (the table's clock).
        self.seen: dict[bytes, float] = {}
        super().__init__(lower, upper, ksize)
        self.last_updated = now

    def touch_last_updated(self, now: float | None = None) -> None:
        # The stock constructor calls this without a time; the table sets it after.
        if now is not None:
            self.last_updated = now

    def offer(self, node: Node) -> str:
        """ADDED, UPDATED, ``"full"`` (kept as a replacement) or ``"subnet"`` (refused)."""
        old = self.nodes.get(node.id)
        if old is not None:
            if (old.ip, old.port) != (node.ip, node.port):
                if not self._subnet_ok(node, replacing=old):
                    return "subnet"
                self._count(old, -1)
                self._count(node, +1)
            del self.nodes[node.id]
            self.nodes[node.id] = node
            # A stale contact back from the dead may have missed stores: say ADDED
            # so it gets its hand-offs, as a newcomer would.
            return ADDED if self.failures.pop(node.id, 0) >= STALE_AFTER else UPDATED
        if len(self.nodes) < self.ksize:
            if not self._subnet_ok(node):
                return "subnet"
            self.replacement_nodes.pop(node.id, None)
            self.nodes[node.id] = node
            self._count(node, +1)
            return ADDED
        self.replacement_nodes.pop(node.id, None)
        self.replacement_nodes[node.id] = node
        while len(self.replacement_nodes) > self.max_replacement_nodes:
            oldest, _ = self.replacement_nodes.popitem(last=False)
            self.seen.pop(oldest, None)
        return "full"

    def add_node(self, node: Node) -> bool:
        """Stock semantics: True when the node is in the bucket afterwards."""
        return self.offer(node) in (ADDED, UPDATED)

    def remove_node(self, node: Node) -> None:
        self.replacement_nodes.pop(node.id, None)
        self.failures.pop(node.id, None)
        self.seen.pop(node.id, None)
        if self.nodes.pop(node.id, None) is None:
            return
        self._count(node, -1)
        # Paper 4.1: the most recently seen replacement takes the free slot.
        while self.replacement_nodes:
            _, candidate = self.replacement_nodes.popitem(last=True)
            if self._subnet_ok(candidate):
                self.nodes[candidate.id] = candidate
                self._count(candidate, +1)
                break

    def split(self) -> tuple[KBucketNoIO, KBucketNoIO]:
        lower, upper = self.range
        mid = (lower + upper) // 2
        one = KBucketNoIO(lower, mid, self.ksize, now=self.last_updated, policy=self.policy)
        two = KBucketNoIO(mid + 1, upper, self.ksize, now=self.last_updated, policy=self.policy)
        for node in [*self.nodes.values(), *self.replacement_nodes.values()]:
            half = one if node.long_id <= mid else two
            half.offer(node)
            if node.id in self.failures and node.id in half.nodes:
                half.failures[node.id] = self.failures[node.id]
            if node.id in self.seen:
                half.seen[node.id] = self.seen[node.id]
        return one, two

    def has_replacement(self) -> bool:
        """Is some cached replacement allowed in (subnet limit) if a slot frees up?"""
        return any(self._subnet_ok(c) for c in self.replacement_nodes.values())

    def depth(self) -> int:
        """Length of the id prefix all contacts share (the stock version uses strings)."""
        ids = [n.long_id for n in self.nodes.values()]
        if not ids:
            return 0
        diff = 0
        for i in ids:
            diff |= i ^ ids[0]
        return ID_BITS - diff.bit_length()

    def _subnet_ok(self, node: Node, replacing: Node | None = None) -> bool:
        key = self.policy.key(node.ip)
        if key is None or self.policy.per_bucket is None:
            return True
        count = self.subnets[key]
        if replacing is not None and self.policy.key(replacing.ip) == key:
            count -= 1
        return count < self.policy.per_bucket

    def _count(self, node: Node, delta: int) -> None:
        key = self.policy.key(node.ip)
        if key is not None:
            self.subnets[key] += delta
            if self.subnets[key] <= 0:
                del self.subnets[key]


class RoutingTable(StockRoutingTable):  # type: ignore[misc]
    """k-buckets around ``node`` that return decisions instead of scheduling pings."""

    def __init__(
        self,
        node: Node,
        ksize: int = 20,
        *,
        clock: Callable[[], float] = time.monotonic,
        subnets: SubnetPolicy | None = None,
    ) -> None:
        self.clock = clock
        self.policy = subnets or SubnetPolicy()
        self.buckets: list[KBucketNoIO] = []
        self._uppers: list[int] = []
        super().__init__(None, ksize, node)

    def flush(self) -> None:
        self.buckets = [KBucketNoIO(0, ID_SPACE, self.ksize, now=self.clock(), policy=self.policy)]
        self._uppers = [ID_SPACE]

    def split_bucket(self, index: int) -> None:
        one, two = self.buckets[index].split()
        self.buckets[index : index + 1] = [one, two]
        self._uppers[index : index + 1] = [one.range[1], two.range[1]]

    def get_bucket_for(self, node: Node) -> int:
        # Bisect on the upper bounds (inclusive); the stock linear scan used "<".
        return bisect.bisect_left(self._uppers, node.long_id)

    def add_contact(self, node: Node, *, heard: bool = True) -> AddResult:
        """Offer ``node``; ``heard`` is False for one read from a saved table (not yet
        heard from, so :meth:`last_seen` stays None)."""
        if node.id == self.node.id:
            return AddResult(REJECTED, reason="self")
        while True:
            index = self.get_bucket_for(node)
            bucket = self.buckets[index]
            outcome = bucket.offer(node)
            if outcome == "subnet":
                return AddResult(REJECTED, reason="subnet")
            if heard:  # it is in the bucket or its replacements
                bucket.seen[node.id] = self.clock()
            if outcome in (ADDED, UPDATED):
                return AddResult(outcome)
            lower, upper = bucket.range
            splittable = upper > lower and (
                bucket.has_in_range(self.node) or bucket.depth() % SPLIT_DEPTH_MODULUS != 0
            )
            if not splittable:
                return AddResult(PING_HEAD, head=bucket.head())
            bucket.replacement_nodes.pop(node.id, None)
            self.split_bucket(index)

    def touch(self, node: Node) -> None:
        """``node`` answered (e.g. a head ping): move it to the tail of its bucket."""
        bucket = self.buckets[self.get_bucket_for(node)]
        current = bucket.nodes.get(node.id)
        if current is not None and current.same_home_as(node):
            bucket.nodes.move_to_end(node.id)
            bucket.failures.pop(node.id, None)
            bucket.seen[node.id] = self.clock()

    def remove_contact(self, node: Node) -> None:
        """Forget ``node`` if the table holds it at that address (a failed head ping,
        a refused peer); its bucket's newest replacement takes the slot."""
        bucket = self.buckets[self.get_bucket_for(node)]
        current = bucket.nodes.get(node.id) or bucket.replacement_nodes.get(node.id)
        if current is not None and current.same_home_as(node):
            bucket.remove_node(current)

    def contact_failed(self, node: Node) -> None:
        """``node`` did not answer an RPC (paper 4.1): replace it if its bucket has a
        replacement waiting, else keep it, flagged, until it answers or one arrives."""
        bucket = self.buckets[self.get_bucket_for(node)]
        current = bucket.nodes.get(node.id)
        if current is None or not current.same_home_as(node):
            self.remove_contact(node)  # at most a cached replacement: drop it
        elif bucket.has_replacement():
            bucket.remove_node(current)
        else:
            bucket.failures[node.id] = bucket.failures.get(node.id, 0) + 1

    def failures(self, node_id: bytes) -> int:
        """Failures in a row of a flagged contact (0: none, or not in the table)."""
        return self.buckets[self.get_bucket_for(Node(node_id))].failures.get(node_id, 0)

    def last_seen(self, node_id: bytes) -> float | None:
        """When (the table's clock) a contact last sent or answered something; None
        if not since this table was made (a contact restored from the state file)."""
        return self.buckets[self.get_bucket_for(Node(node_id))].seen.get(node_id)

    def get(self, node_id: bytes) -> Node | None:
        probe = Node(node_id)
        node: Node | None = self.buckets[self.get_bucket_for(probe)].nodes.get(node_id)
        return node

    def contacts(self) -> Iterator[Node]:
        for bucket in self.buckets:
            yield from bucket.nodes.values()

    def __len__(self) -> int:
        return sum(len(b.nodes) for b in self.buckets)

    def non_empty_buckets(self) -> int:
        return sum(1 for b in self.buckets if b.nodes)

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Node]:
        """The ``k`` contacts XOR-closest to ``node`` (exact; stock walks buckets)."""
        target = node.long_id
        count = k or self.ksize
        want = count if exclude is None else count + 1
        # Ids are unique in the table, so tuples never compare their Node halves.
        pairs = [(n.long_id ^ target, n) for b in self.buckets for n in b.nodes.values()]
        if len(pairs) > 4 * want:
            best = heapq.nsmallest(want, pairs)
        else:
            pairs.sort()
            best = pairs[:want]
        if exclude is None:
            return [n for _, n in best]
        # The asker is left out of its own answer (by id or by address).
        kept = [n for _, n in best if not (n.id == exclude.id or n.same_home_as(exclude))]
        if len(kept) < count and len(best) == want:
            pairs.sort()
            kept = [n for _, n in pairs if not (n.id == exclude.id or n.same_home_as(exclude))]
        return kept[:count]

    def any_closer(self, node: Node, distance: int, exclude: Collection[bytes] = ()) -> bool:
        """Is some contact (not in ``exclude``, a set of ids) closer than ``distance``?

        The bucket covering ``node`` holds the contacts sharing the longest prefix
        with it, so it settles most questions before the other buckets are read.
        """
        target = node.long_id
        first = self.buckets[self.get_bucket_for(node)]
        for bucket in (first, *self.buckets):
            for n in bucket.nodes.values():
                if n.long_id ^ target < distance and n.id not in exclude:
                    return True
        return False

    def touch_range(self, key: bytes) -> None:
        """A lookup for ``key`` happened: its bucket needs no refresh (paper 2.3)."""
        self.buckets[self.get_bucket_for(Node(key))].touch_last_updated(self.clock())

    def lonely_buckets(self, interval: float = 3600.0) -> list[KBucketNoIO]:
        cutoff = self.clock() - interval
        return [b for b in self.buckets if b.last_updated < cutoff]

    def refresh_ids(self, rng: random.Random, interval: float = 3600.0) -> list[bytes]:
        """A random id in each bucket with no lookup for ``interval`` seconds."""
        return [
            rng.randint(b.range[0], min(b.range[1], ID_SPACE - 1)).to_bytes(20, "big")
            for b in self.lonely_buckets(interval)
        ]

    def to_state(self) -> dict[str, Any]:
        """Plain data (bytes, str, int) for a msgpack state file."""
        return {
            "version": 1,
            "node_id": self.node.id,
            "contacts": [[n.id, n.ip, n.port] for n in self.contacts()],
        }


def contacts_from_state(data: Any, *, max_contacts: int = 10_000) -> list[Node]:
    """Contacts of a :meth:`RoutingTable.to_state` map; ValueError naming the problem."""
    if not isinstance(data, dict) or data.get("version") != 1:
        raise ValueError("routing state: expected a map with version 1")
    contacts = data.get("contacts")
    if not isinstance(contacts, list) or len(contacts) > max_contacts:
        raise ValueError(f"routing state: contacts must be a list of <= {max_contacts}")
    nodes = []
    for i, entry in enumerate(contacts):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ValueError(f"routing state: contacts[{i}] must be [id, ip, port]")
        node_id, ip, port = entry
        if not isinstance(node_id, bytes) or len(node_id) != 20:
            raise ValueError(f"routing state: contacts[{i}].id must be 20 bytes")
        try:
            ip = str(ipaddress.ip_address(ip))
        except (TypeError, ValueError):
            raise ValueError(f"routing state: contacts[{i}].ip is not an IP address") from None
        if type(port) is not int or not 1 <= port <= 65535:
            raise ValueError(f"routing state: contacts[{i}].port must be 1..65535")
        nodes.append(Node(node_id, ip, port))
    return nodes
