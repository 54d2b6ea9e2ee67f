"""Bounded peer-facing tables: stock values, listen registrations, peer memory (pure).

:class:`ValueStore` plays the part of the stock ``ForgetfulStorage``: one value per
key, expiring after ``ttl`` seconds, but also capped in count and total bytes (oldest
first out), since any peer may send ``store``.

:class:`Listeners` holds the peers that asked to be told of new packets under a key
(the ``listen`` RPC). A registration lasts at most ``ttl_max`` unless renewed; one
peer address holds at most ``per_peer`` keys and all peers ``max_total``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

from kademlia.node import Node

from qisd.dht.ratelimit import source_key

StockValue = str | bytes | int | float


def value_size(value: StockValue) -> int:
    return len(value) if isinstance(value, str | bytes) else 8


class ValueStore:
    def __init__(self, *, ttl: float, max_items: int, max_bytes: int) -> None:
        self.ttl = ttl
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.bytes = 0
        # key -> (stored_at, value); insertion order is store order (oldest first).
        self._data: OrderedDict[bytes, tuple[float, StockValue]] = OrderedDict()

    def put(self, key: bytes, value: StockValue, now: float) -> None:
        self._drop(key)
        self._data[key] = (now, value)
        self.bytes += value_size(value)
        while len(self._data) > self.max_items or self.bytes > self.max_bytes:
            self._drop(next(iter(self._data)))

    def get(self, key: bytes, now: float) -> StockValue | None:
        entry = self._data.get(key)
        if entry is None or entry[0] + self.ttl <= now:
            return None
        return entry[1]

    def expire(self, now: float) -> int:
        dropped = 0
        while self._data:
            key, (stamp, _) = next(iter(self._data.items()))
            if stamp + self.ttl > now:
                break
            self._drop(key)
            dropped += 1
        return dropped

    def items(self, now: float) -> Iterator[tuple[bytes, StockValue]]:
        for key, (stamp, value) in list(self._data.items()):
            if stamp + self.ttl > now:
                yield key, value

    def older_than(self, age: float, now: float) -> list[tuple[bytes, StockValue]]:
        return [(k, v) for k, (stamp, v) in self._data.items() if now - stamp >= age]

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def _drop(self, key: bytes) -> None:
        entry = self._data.pop(key, None)
        if entry is not None:
            self.bytes -= value_size(entry[1])


class Listeners:
    def __init__(self, *, ttl_max: int, per_peer: int, max_total: int) -> None:
        self.ttl_max = ttl_max
        self.per_peer = per_peer
        self.max_total = max_total
        self._by_key: dict[bytes, dict[tuple[str, int], tuple[Node, float]]] = {}
        #: Registrations per source (qisd.dht.ratelimit.source_key: one IPv4 address,
        #: one IPv6 /64, or address and port on loopback), so one host cannot take
        #: the node-wide cap from many ports.
        self._per_source: dict[Hashable, int] = {}
        self._total = 0

    def register(self, key: bytes, peer: Node, ttl: int, now: float) -> int:
        """Register or renew; returns the ttl granted, 0 if a cap refuses it."""
        addr = (peer.ip, peer.port)
        granted = min(ttl, self.ttl_max)
        entries = self._by_key.get(key)
        if entries is not None and addr in entries:
            entries[addr] = (peer, now + granted)
            return granted
        source = source_key(addr)
        if self._per_source.get(source, 0) >= self.per_peer or self._total >= self.max_total:
            self.expire(now)
            if (self._per_source.get(source, 0) >= self.per_peer
                    or self._total >= self.max_total):
                return 0
        self._by_key.setdefault(key, {})[addr] = (peer, now + granted)
        self._per_source[source] = self._per_source.get(source, 0) + 1
        self._total += 1
        return granted

    def for_key(self, key: bytes, now: float) -> list[Node]:
        entries = self._by_key.get(key)
        if not entries:
            return []
        return [peer for peer, expiry in entries.values() if expiry > now]

    def expire(self, now: float) -> int:
        dropped = 0
        for key in list(self._by_key):
            entries = self._by_key[key]
            for addr in [a for a, (_, expiry) in entries.items() if expiry <= now]:
                del entries[addr]
                self._release(addr)
                dropped += 1
            if not entries:
                del self._by_key[key]
        return dropped

    def _release(self, addr: tuple[str, int]) -> None:
        self._total -= 1
        source = source_key(addr)
        left = self._per_source[source] - 1
        if left:
            self._per_source[source] = left
        else:
            del self._per_source[source]

    def __len__(self) -> int:
        return self._total


class AddressMemory:
    """A bounded LRU set of peer addresses whose entries lapse after ``ttl`` seconds.

    The node remembers which peers speak the packet RPCs and which (stock nodes)
    ignored them, so it neither evicts a stock node for ignoring ``find_packets``
    nor keeps waiting on it for every lookup.
    """

    def __init__(self, *, max_items: int = 4096, ttl: float = 600.0) -> None:
        self.max_items = max_items
        self.ttl = ttl
        self._seen: OrderedDict[tuple[str, int], float] = OrderedDict()

    def add(self, addr: tuple[str, int], now: float) -> None:
        self._seen[addr] = now
        self._seen.move_to_end(addr)
        while len(self._seen) > self.max_items:
            self._seen.popitem(last=False)

    def discard(self, addr: tuple[str, int]) -> None:
        self._seen.pop(addr, None)

    def has(self, addr: tuple[str, int], now: float) -> bool:
        stamp = self._seen.get(addr)
        if stamp is None:
            return False
        if now - stamp > self.ttl:
            del self._seen[addr]
            return False
        return True

    def __len__(self) -> int:
        return len(self._seen)
