"""Measurements of the fault experiments over a swarm of nodes with SQLite stores.

- Over the stores, read through separate SQLite connections (WAL lets them read
  while the nodes write): which (key, packet) entries each node holds
  (:func:`held_entries`), how many copies each entry has and whether the
  ``replicas`` closest nodes of each key hold it (:func:`replication`), and where
  the copies of the entries short of ``replicas`` sit (:func:`short_entries`).
- "Found" checks that ask the swarm with ``find_packets`` (:func:`is_found`,
  :func:`count_found`), and :func:`wait_until`.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio
from faultlib import packet_keys
from kademlia.node import Node

from qisd.dht import DHTNode
from qisd.fingerprint import probe_keys
from qisd.manifest import Manifest
from qisd.packet import OutcomePacket
from qisd.sketch import normalize

Entry = tuple[bytes, bytes]  # (key, packet id)


def read_entries(path: Path) -> set[Entry]:
    conn = sqlite3.connect(str(path), timeout=30.0)
    try:
        now = int(time.time() * 1000)
        rows = conn.execute(
            "SELECT e.key, e.id FROM entries e JOIN packets p ON p.id = e.id"
            " WHERE p.expires_ms > ?",
            (now,),
        ).fetchall()
    finally:
        conn.close()
    return {(bytes(k), bytes(i)) for k, i in rows}


class HasStores(Protocol):
    """A swarm whose node ``i`` keeps its store at ``store_path(i)`` (a
    :class:`faultlib.LocalSwarm`, or the process swarm of ``fault_churn_procs.py``)."""

    def store_path(self, i: int) -> Path: ...


async def held_entries(swarm: HasStores, nodes: Iterable[int]) -> dict[int, set[Entry]]:
    """The (key, packet id) entries each node's store holds (read in worker threads)."""
    out: dict[int, set[Entry]] = {}
    for i in nodes:
        out[i] = await trio.to_thread.run_sync(read_entries, swarm.store_path(i))
    return out


@dataclass(frozen=True)
class Replication:
    entries: int
    #: Entries with at least ``replicas`` copies on the nodes considered.
    full: int
    #: Entries held by every one of the ``replicas`` closest of those nodes.
    closest_hold: int
    #: Entries with no copy at all on those nodes.
    lost: int
    min_copies: int
    mean_copies: float

    @property
    def full_share(self) -> float:
        return self.full / self.entries if self.entries else 1.0

    @property
    def closest_share(self) -> float:
        return self.closest_hold / self.entries if self.entries else 1.0


def replication(
    expected: Iterable[Entry],
    held: dict[int, set[Entry]],
    node_ids: dict[int, bytes],
    replicas: int,
) -> Replication:
    """Copies of each expected entry over the nodes in ``held`` (pure)."""
    copies: Counter[Entry] = Counter()
    for entries in held.values():
        copies.update(entries)
    closest_cache: dict[bytes, list[int]] = {}
    expected = list(expected)
    full = closest = lost = 0
    least = None
    total = 0
    for key, pid in expected:
        n = copies[(key, pid)]
        total += n
        least = n if least is None else min(least, n)
        full += n >= replicas
        lost += n == 0
        near = closest_cache.get(key)
        if near is None:
            target = Node(key)
            order = sorted(held, key=lambda i: Node(node_ids[i]).distance_to(target))
            near = closest_cache[key] = order[:replicas]
        closest += all((key, pid) in held[i] for i in near)
    return Replication(
        entries=len(expected),
        full=full,
        closest_hold=closest,
        lost=lost,
        min_copies=least or 0,
        mean_copies=total / len(expected) if expected else 0.0,
    )


def short_entries(
    expected: Iterable[Entry],
    held: dict[int, set[Entry]],
    node_ids: dict[int, bytes],
    replicas: int,
    origin: dict[bytes, int],
    limit: int = 5,
) -> list[str]:
    """Where the copies of the entries short of ``replicas`` copies sit: each holder's
    rank by distance to the key among the nodes in ``held`` (0 = closest), and
    whether the packet's origin is among them (a diagnosis for a failed run)."""
    out = []
    for key, pid in expected:
        holders = [i for i, entries in held.items() if (key, pid) in entries]
        if len(holders) >= replicas:
            continue
        target = Node(key)
        order = sorted(held, key=lambda i: Node(node_ids[i]).distance_to(target))
        ranks = sorted(order.index(i) for i in holders)
        o = origin.get(pid)
        near = [node_ids[i].hex()[:6] + ("*" if i in holders else "") for i in order[:8]]
        out.append(f"key {key.hex()[:8]} packet {pid.hex()[:8]}: {len(holders)} copies at "
                   f"ranks {ranks}; origin node {o} {'running' if o in held else 'down'}; "
                   f"nearest (* holds it) {near}")
        if len(out) >= limit:
            break
    return out


async def is_found(
    node: DHTNode, manifest: Manifest, packet: OutcomePacket, *, probe: bool = False, m: int = 5
) -> bool:
    """Does ``node`` find ``packet`` in the swarm?

    ``probe=False``: by the packet's exact keys, one key after another until one
    answer contains it. ``probe=True``: as ``NodeService.query`` does, all multi-probe
    keys of its own vector at once, top ``m`` by similarity.
    """
    if probe:
        unit = normalize(packet.sketch.to_array())
        keys = probe_keys(manifest, packet.topic, unit)
        hits = await node.find_packets(keys, packet.sketch, m)
        return any(p.id == packet.id for _, p in hits)
    for key in packet_keys(manifest, packet):
        hits = await node.find_packets([key], packet.sketch, m)
        if any(p.id == packet.id for _, p in hits):
            return True
    return False


async def count_found(
    packets: Sequence[OutcomePacket],
    asker: Callable[[int], DHTNode],
    manifest: Manifest,
    *,
    probe: bool = False,
    concurrency: int = 8,
) -> list[int]:
    """Indexes of the packets not found; ``asker(i)`` picks the node asking for packet i."""
    missing: list[int] = []
    limiter = trio.CapacityLimiter(concurrency)

    async def one(i: int, packet: OutcomePacket) -> None:
        async with limiter:
            if not await is_found(asker(i), manifest, packet, probe=probe):
                missing.append(i)

    async with trio.open_nursery() as nursery:
        for i, packet in enumerate(packets):
            nursery.start_soon(one, i, packet)
    return sorted(missing)


async def wait_until(
    check: Callable[[], Any], *, limit: float, every: float = 1.0
) -> float | None:
    """Seconds until ``await check()`` is true, or None once ``limit`` seconds passed."""
    started = trio.current_time()
    while True:
        if await check():
            return trio.current_time() - started
        if trio.current_time() - started > limit:
            return None
        await trio.sleep(every)
