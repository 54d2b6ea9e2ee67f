"""Types the DHT exchanges with the daemon: reports, deliveries, and what it needs of
the packet store and the identity (structural protocols, so tests and simulations can
pass small stand-ins). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from qisd.packet import OutcomePacket
from qisd.sketch import Sketch

#: Where a delivery came from: a peer stored it here as a responsible node
#: (``"store"``, hand-offs and republishes included), this node's own put made it
#: responsible (``"local"``), or a listen subscription pushed it (``"notify"``).
DELIVERY_SOURCES = ("store", "local", "notify")


@dataclass(frozen=True, slots=True)
class Delivery:
    key: bytes
    packet: OutcomePacket
    source: str


@dataclass(frozen=True, slots=True)
class KeyPlacement:
    """Where one key's copies of a packet went."""

    key: bytes
    #: Nodes that confirmed storing it (this node included when ``local``).
    stored: int
    local: bool
    #: Nodes asked that failed or refused.
    failed: int
    #: Refusal reasons reported by peers (e.g. ``"rejected:quota"``).
    refusals: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PutReport:
    packet_id: bytes
    placements: tuple[KeyPlacement, ...]

    @property
    def ok(self) -> bool:
        """Every key has at least one copy somewhere."""
        return all(p.stored > 0 for p in self.placements)

    @property
    def copies(self) -> int:
        return sum(p.stored for p in self.placements)


class Identity(Protocol):
    @property
    def node_id(self) -> bytes: ...

    @property
    def public_key(self) -> bytes: ...


class PutResult(Protocol):
    @property
    def status(self) -> str: ...

    @property
    def reason(self) -> str | None: ...


class PacketStore(Protocol):
    """The part of :class:`qisd.store.PacketStore` the DHT uses (synchronous, thread-safe)."""

    def put_many(
        self, items: Sequence[tuple[bytes, OutcomePacket]], *, now_ms: int
    ) -> Sequence[PutResult]: ...

    def top(
        self, key: bytes, query: Sketch, m: int, *, now_ms: int, offset: int = 0
    ) -> Sequence[tuple[float, OutcomePacket]]: ...

    def top_ids(
        self, key: bytes, query: Sketch, m: int, *, now_ms: int, offset: int = 0
    ) -> Sequence[tuple[float, bytes]]: ...

    def encoded(self, ids: Sequence[bytes], *, now_ms: int) -> Mapping[bytes, bytes]: ...

    def keys(self, now_ms: int) -> Sequence[bytes]: ...

    def key_items(self, key: bytes, now_ms: int) -> Sequence[OutcomePacket]: ...

    def expire(self, now_ms: int) -> int: ...

    def remember_own(
        self, packet: OutcomePacket, keys: Sequence[bytes], *, limit: int
    ) -> Sequence[bytes]: ...

    def remember_own_many(
        self, items: Sequence[tuple[OutcomePacket, Sequence[bytes]]], *, limit: int
    ) -> Sequence[bytes]: ...

    def own_packets(self, now_ms: int) -> Sequence[tuple[OutcomePacket, tuple[bytes, ...]]]: ...
