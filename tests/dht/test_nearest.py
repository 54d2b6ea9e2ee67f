"""Bucket-pruned nearest-contact search: the same answers as scoring every contact."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.node import Node

from qisd.dht.nearest import (
    NodeCache,
    bucket_bound,
    closer_than,
    id_tag,
    nearest,
)
from qisd.dht.routing import RoutingTable


def table_of(seed: int, size: int, ksize: int = 20) -> RoutingTable:
    rng = random.Random(seed)
    me = Node(rng.randbytes(20), "10.0.0.1", 4000)
    table = RoutingTable(me, ksize, clock=lambda: 0.0)
    for i in range(size):
        table.add_contact(Node(rng.randbytes(20), "10.0.1.1", 1000 + i))
    return table


def by_distance(nodes: list[Node], target: int) -> list[Node]:
    return sorted(nodes, key=lambda n: n.long_id ^ target)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    size=st.sampled_from([0, 1, 7, 40, 150, 400]),
    count=st.integers(1, 25),
    target=st.binary(min_size=20, max_size=20),
    exclude_one=st.booleans(),
)
def test_nearest_is_find_neighbors(
    seed: int, size: int, count: int, target: bytes, exclude_one: bool
) -> None:
    table = table_of(seed, size)
    contacts = list(table.contacts())
    exclude = contacts[seed % len(contacts)] if exclude_one and contacts else None
    expected = table.find_neighbors(Node(target), k=count, exclude=exclude)
    got = nearest(table.buckets, int.from_bytes(target, "big"), count, exclude=exclude)
    assert [n.id for n in got] == [n.id for n in expected]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    size=st.sampled_from([0, 3, 40, 150, 400]),
    target=st.binary(min_size=20, max_size=20),
    cut=st.integers(0, 160),
    known_share=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_closer_than_matches_a_full_scan(
    seed: int, size: int, target: bytes, cut: int, known_share: float
) -> None:
    table = table_of(seed, size)
    t = int.from_bytes(target, "big")
    distance = 1 << cut
    contacts = list(table.contacts())
    closer = by_distance([n for n in contacts if n.long_id ^ t < distance], t)
    rng = random.Random(seed)
    known = {id_tag(n.id) for n in closer if rng.random() < known_share}
    fresh, total = closer_than(table.buckets, t, distance, 20, known=known)
    assert total == len(closer)
    assert [n.id for n in fresh] == [n.id for n in closer if id_tag(n.id) not in known][:20]
    # ``below`` of nearest() is the same cut without the tags.
    below = nearest(table.buckets, t, 20, below=distance)
    assert [n.id for n in below] == [n.id for n in closer][:20]


def test_closer_than_leaves_out_the_asker_but_counts_it() -> None:
    table = table_of(3, 100)
    asker = next(iter(table.contacts()))
    t = asker.long_id ^ 1  # the asker is the closest contact of all
    fresh, total = closer_than(table.buckets, t, 1 << 160, 5, exclude=asker)
    assert asker.id not in {n.id for n in fresh}
    assert total == len(table) and len(fresh) == 5
    # Left out by address too (a contact that changed its id keeps its socket).
    moved = Node(b"\x01" * 20, asker.ip, asker.port)
    fresh, _ = closer_than(table.buckets, t, 1 << 160, 5, exclude=moved)
    assert asker.id not in {n.id for n in fresh}


@settings(max_examples=200, deadline=None)
@given(
    depth=st.integers(0, 12),
    path=st.integers(0, 2**12 - 1),
    target=st.integers(0, 2**160 - 1),
    probe=st.integers(0, 2**160 - 1),
)
def test_bucket_bound_is_a_lower_bound(depth: int, path: int, target: int, probe: int) -> None:
    # A range made by ``depth`` midpoint splits, as tables make them.
    lower, upper = 0, 2**160
    for bit in range(depth):
        mid = (lower + upper) // 2
        lower, upper = (lower, mid) if not (path >> bit) & 1 else (mid + 1, upper)
    inside = lower + probe % (upper - lower + 1)
    bound = bucket_bound(lower, upper, target)
    assert bound <= inside ^ target
    assert bound <= lower ^ target and bound <= upper ^ target


def test_node_cache_interns_and_stays_bounded() -> None:
    cache = NodeCache(max_items=4)
    a = cache.get(b"a" * 20, "10.0.0.1", 1)
    assert cache.get(b"a" * 20, "10.0.0.1", 1) is a
    assert cache.get(b"a" * 20, "10.0.0.2", 1) is not a  # another address: another contact
    for i in range(10):
        cache.get(bytes([i]) * 20, "10.0.0.1", 1)
        assert len(cache) <= 4
    assert a.long_id == int.from_bytes(b"a" * 20, "big")
