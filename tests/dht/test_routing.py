"""The routing table decides (ping head, reject) and never touches asyncio."""

from __future__ import annotations

import random

import pytest
from kademlia.node import Node
from kademlia.routing import KBucket

from qisd.dht.routing import (
    ADDED,
    PING_HEAD,
    REJECTED,
    UPDATED,
    RoutingTable,
    SubnetPolicy,
    contacts_from_state,
)

NO_LIMIT = SubnetPolicy(per_bucket=None)


def nid(n: int) -> bytes:
    return n.to_bytes(20, "big")


def far_node(i: int, ip: str | None = None) -> Node:
    # Top bit set: all in the half of the id space that does not hold id 0; even
    # and odd i differ at the sixth bit, so such a bucket has depth 5 and (paper
    # 4.2, 5 | depth) does not split.
    return Node(nid((1 << 159) | ((i % 2) << 154) | (i << 40)), ip or f"198.51.{i}.1", 4000)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def table(k: int = 4, subnets: SubnetPolicy = NO_LIMIT) -> tuple[RoutingTable, Clock]:
    clock = Clock()
    return RoutingTable(Node(nid(0), "127.0.0.1", 1), k, clock=clock, subnets=subnets), clock


def test_full_far_bucket_asks_to_ping_head_then_keeps_or_replaces() -> None:
    t, _ = table(k=4)
    nodes = [far_node(i) for i in range(1, 7)]
    for n in nodes[:4]:
        assert t.add_contact(n).action == ADDED
    result = t.add_contact(nodes[4])
    assert result.action == PING_HEAD and result.head is nodes[0]
    # The head answered: it moves to the tail, the newcomer stays a replacement.
    t.touch(nodes[0])
    assert t.add_contact(nodes[5]).head is nodes[1]
    # The new head failed: the most recently seen replacement takes its slot.
    t.remove_contact(nodes[1])
    ids = {n.id for n in t.contacts()}
    assert nodes[1].id not in ids and nodes[5].id in ids and nodes[4].id not in ids
    assert len(t) == 4


def test_last_seen_follows_what_was_heard() -> None:
    t, clock = table(k=4)
    nodes = [far_node(i) for i in range(1, 6)]
    clock.now = 10.0
    t.add_contact(nodes[0], heard=False)  # read from a saved table: not heard yet
    assert nodes[0].id in {n.id for n in t.contacts()} and t.last_seen(nodes[0].id) is None
    for n in nodes[1:4]:
        t.add_contact(n)
    assert t.last_seen(nodes[1].id) == 10.0
    clock.now = 20.0
    t.add_contact(nodes[1])  # it sent something again
    t.touch(nodes[0])  # the saved contact answered a ping
    assert t.last_seen(nodes[1].id) == 20.0 and t.last_seen(nodes[0].id) == 20.0
    assert t.last_seen(nodes[2].id) == 10.0
    clock.now = 30.0
    t.add_contact(nodes[4])  # bucket full: a replacement, heard at 30
    t.remove_contact(nodes[2])  # it takes the freed slot with its own time
    assert t.last_seen(nodes[4].id) == 30.0 and t.last_seen(nodes[2].id) is None
    assert t.failures(nodes[3].id) == 0
    t.contact_failed(nodes[3])  # a failure does not move last_seen
    assert t.failures(nodes[3].id) == 1 and t.last_seen(nodes[3].id) == 10.0


def test_last_seen_survives_a_split() -> None:
    t, clock = table(k=2)
    for i in range(1, 40):
        clock.now = float(i)
        t.add_contact(Node(nid(i), "127.0.0.1", 1000 + i))
    assert len(t.buckets) > 3
    for contact in t.contacts():
        assert t.last_seen(contact.id) == float(int.from_bytes(contact.id, "big"))
    # Nothing remembered for what the table no longer holds (bounded by the table).
    held = {n.id for b in t.buckets for n in [*b.nodes.values(), *b.replacement_nodes.values()]}
    assert all(set(b.seen) <= held for b in t.buckets)


def test_bucket_with_own_id_splits() -> None:
    t, _ = table(k=2)
    for i in range(1, 40):
        t.add_contact(Node(nid(i), "127.0.0.1", 1000 + i))
    # Close contacts force splits down to our own id: many buckets, all kept.
    assert len(t.buckets) > 3
    assert t.find_neighbors(Node(nid(0)), k=2)[0].id == nid(1)


def test_updated_and_rejected() -> None:
    t, _ = table()
    n = far_node(1)
    assert t.add_contact(n).action == ADDED
    assert t.add_contact(Node(n.id, "198.51.1.1", 5000)).action == UPDATED
    assert t.get(n.id) is not None and t.get(n.id).port == 5000  # type: ignore[union-attr]
    assert t.add_contact(Node(nid(0), "1.2.3.4", 1)).reason == "self"


def test_subnet_limit_per_bucket() -> None:
    t, _ = table(k=8, subnets=SubnetPolicy(per_bucket=2))
    same = [far_node(i, ip=f"45.33.44.{i}") for i in range(1, 4)]
    assert t.add_contact(same[0]).action == ADDED
    assert t.add_contact(same[1]).action == ADDED
    third = t.add_contact(same[2])
    assert third.action == REJECTED and third.reason == "subnet"
    assert t.add_contact(far_node(9, ip="23.1.2.1")).action == ADDED  # another /24
    # Loopback and private ranges are exempt by default.
    for i in range(4):
        assert t.add_contact(far_node(20 + i, ip="127.0.0.1")).action == ADDED
    ipv6 = SubnetPolicy(per_bucket=1)
    assert ipv6.key("2a00:1450:1:2::1") == ipv6.key("2a00:1450:1:ffff::9") == "2a00:1450:1::/48"
    assert ipv6.key("10.1.2.3") is None
    assert SubnetPolicy(per_bucket=1, exempt_private=False).key("10.1.2.3") == "10.1.2.0/24"


def test_removed_contact_frees_subnet_slot() -> None:
    t, _ = table(k=8, subnets=SubnetPolicy(per_bucket=1))
    a, b = far_node(1, ip="45.33.44.1"), far_node(2, ip="45.33.44.2")
    t.add_contact(a)
    assert t.add_contact(b).action == REJECTED
    t.remove_contact(a)
    assert t.add_contact(b).action == ADDED


def test_remove_only_at_same_address() -> None:
    t, _ = table()
    n = far_node(1)
    t.add_contact(n)
    t.remove_contact(Node(n.id, "198.51.1.1", 1))  # a different port: someone else
    assert t.get(n.id) is not None


def test_find_neighbors_is_exact() -> None:
    rng = random.Random(5)
    t, _ = table(k=20)
    nodes = [Node(rng.randbytes(20), "127.0.0.1", 1000 + i) for i in range(300)]
    for n in nodes:
        t.add_contact(n)
    target = Node(rng.randbytes(20))
    got = t.find_neighbors(target, k=10)
    held = list(t.contacts())
    expected = sorted(held, key=lambda n: n.distance_to(target))[:10]
    assert [n.id for n in got] == [n.id for n in expected]
    excluded = t.find_neighbors(target, k=10, exclude=expected[0])
    assert expected[0].id not in {n.id for n in excluded}


def test_lonely_buckets_follow_injected_clock() -> None:
    t, clock = table(k=2)
    for i in range(1, 20):
        t.add_contact(Node(nid(i << 100), "127.0.0.1", 1000 + i))
    assert t.lonely_buckets(3600) == []
    clock.now = 4000.0
    assert len(t.lonely_buckets(3600)) == len(t.buckets)
    t.touch_range(nid(1 << 100))
    assert len(t.lonely_buckets(3600)) == len(t.buckets) - 1
    ids = t.refresh_ids(random.Random(1), 3600)
    assert len(ids) == len(t.buckets) - 1
    for rid, bucket in zip(ids, t.lonely_buckets(3600), strict=True):
        assert bucket.range[0] <= int.from_bytes(rid, "big") <= bucket.range[1]


def test_state_round_trip_and_errors() -> None:
    t, _ = table(k=20)
    for i in range(10):
        t.add_contact(far_node(i))
    restored = contacts_from_state(t.to_state())
    assert sorted((n.id, n.ip, n.port) for n in restored) == sorted(
        (n.id, n.ip, n.port) for n in t.contacts()
    )
    with pytest.raises(ValueError, match="version 1"):
        contacts_from_state({"contacts": []})
    with pytest.raises(ValueError, match=r"contacts\[0\].ip"):
        contacts_from_state({"version": 1, "contacts": [[nid(1), "nowhere", 1]]})
    with pytest.raises(ValueError, match=r"contacts\[0\].port"):
        contacts_from_state({"version": 1, "contacts": [[nid(1), "1.2.3.4", 70000]]})


def test_depth_matches_stock_definition() -> None:
    t, _ = table(k=20)
    bucket = t.buckets[0]
    for i in (0b1010 << 150, 0b1011 << 150):
        bucket.add_node(Node(nid(i), "127.0.0.1", 1))
    stock = KBucket(0, 2**160, 20)
    for n in bucket.nodes.values():
        stock.add_node(n)
    assert bucket.depth() == stock.depth() == 9


def test_any_closer() -> None:
    t, _ = table(k=20)
    nodes = [Node(nid(i << 100), "127.0.0.1", 1000 + i) for i in range(1, 6)]
    for n in nodes:
        t.add_contact(n)
    target = Node(nid(3 << 100))
    assert t.any_closer(target, nodes[2].distance_to(target) + 1)  # node 3 itself
    assert not t.any_closer(target, nodes[2].distance_to(target))
    assert t.any_closer(target, 1 << 101)
    assert t.any_closer(target, 1 << 101, exclude={nodes[2].id})  # node 2 remains
    assert not t.any_closer(target, 1 << 101, exclude={nodes[1].id, nodes[2].id})
