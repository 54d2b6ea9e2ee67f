"""Eclipse attempts at the routing-table level (pure, no traffic).

Policy (``qisd.dht.routing.SubnetPolicy``, config ``dht.max_peers_per_subnet``): at
most ``per_bucket`` (2) contacts of one IPv4 /24 or IPv6 /48 in any k-bucket, the
replacement cache included when a slot frees up. Loopback is exempt (local test
swarms) and so are private and link-local ranges by default (a LAN swarm of
10.0.0.0/8 hosts shares one operator anyway); ``exempt_private=False`` applies the
limit there too. The addresses below are public ones (documentation ranges such as
203.0.113.0/24 count as private in Python's ``ipaddress`` and would be exempt).
"""

from __future__ import annotations

import random
from collections import Counter

from kademlia.node import Node

from qisd.dht.routing import ADDED, PING_HEAD, REJECTED, RoutingTable, SubnetPolicy

RNG_SEED = 7


def near(me: bytes, rng: random.Random, shared_bits: int) -> bytes:
    """An id sharing exactly ``shared_bits`` leading bits with ``me``."""
    mine = int.from_bytes(me, "big")
    flip = 1 << (159 - shared_bits)
    low = rng.getrandbits(159 - shared_bits) if shared_bits < 159 else 0
    value = ((mine ^ flip) >> (159 - shared_bits) << (159 - shared_bits)) | low
    return value.to_bytes(20, "big")


def subnet_counts(table: RoutingTable, policy: SubnetPolicy) -> list[Counter[str]]:
    out = []
    for bucket in table.buckets:
        out.append(Counter(k for n in bucket.nodes.values() if (k := policy.key(n.ip))))
    return out


def test_one_subnet_holds_at_most_two_slots_per_bucket() -> None:
    rng = random.Random(RNG_SEED)
    policy = SubnetPolicy(per_bucket=2)
    me = Node(rng.randbytes(20), "127.0.0.1", 1)
    table = RoutingTable(me, 20, clock=lambda: 0.0, subnets=policy)
    # The attacker owns one /24 and picks ids close to ours, for every bucket depth.
    attackers = [
        Node(near(me.id, rng, rng.randint(0, 40)), f"45.33.44.{1 + i % 250}", 4000 + i)
        for i in range(600)
    ]
    outcomes = Counter(table.add_contact(a).reason for a in attackers)
    assert outcomes["subnet"] > 500
    held = [n for n in table.contacts() if n.ip.startswith("45.33.44.")]
    assert len(held) <= 2 * len(table.buckets)
    # Honest peers, each in its own /24, arriving after the attacker: none is refused
    # for its subnet, and every bucket still has room for them.
    honest = [
        Node(near(me.id, rng, rng.randint(0, 40)), f"{11 + i // 250}.{i % 250}.7.1", 4000)
        for i in range(400)
    ]
    for n in honest:
        assert table.add_contact(n).reason != "subnet"
    for counts in subnet_counts(table, policy):
        assert all(c <= 2 for c in counts.values())
    # Whatever the attacker's share, it is bounded per bucket, not by its ids.
    attacker_share = sum(1 for n in table.contacts() if n.ip.startswith("45.33.44."))
    assert attacker_share <= 2 * len(table.buckets)


def test_ipv6_limit_is_per_48() -> None:
    rng = random.Random(RNG_SEED + 1)
    policy = SubnetPolicy(per_bucket=2)
    me = Node(rng.randbytes(20), "::1", 1)
    table = RoutingTable(me, 20, clock=lambda: 0.0, subnets=policy)
    far = [Node(near(me.id, rng, 0), f"2a00:1450:4001:{i:x}::{i + 1:x}", 4000) for i in range(8)]
    actions = [table.add_contact(n).action for n in far]
    assert actions[:2] == [ADDED, ADDED]
    assert set(actions[2:]) == {REJECTED}
    # Another /48 is another operator.
    other = Node(near(me.id, rng, 0), "2a00:1450:4002::1", 4000)
    assert table.add_contact(other).action == ADDED


def test_replacements_respect_the_limit() -> None:
    rng = random.Random(RNG_SEED + 2)
    policy = SubnetPolicy(per_bucket=2)
    me = Node(rng.randbytes(20), "127.0.0.1", 1)
    table = RoutingTable(me, 4, clock=lambda: 0.0, subnets=policy)
    # Ids in the far half sharing exactly 5 leading bits, so their bucket never
    # splits (paper 4.2: depth % 5 == 0) and every one of them lands in it.
    top5 = near(me.id, rng, 0)[0] >> 3

    def far_id(i: int) -> bytes:
        low = rng.getrandbits(154)
        return ((top5 << 155) | ((i % 2) << 154) | low).to_bytes(20, "big")

    attacker = [Node(far_id(i), f"45.33.44.{i + 1}", 4000) for i in range(2)]
    honest = [Node(far_id(i), f"{60 + i}.1.1.1", 4000) for i in range(2)]
    for n in attacker + honest:
        assert table.add_contact(n).action == ADDED
    # The bucket is full: more attacker contacts wait as replacements...
    spare = [Node(far_id(i), f"45.33.44.{10 + i}", 4000) for i in range(3)]
    assert {table.add_contact(n).action for n in spare} == {PING_HEAD}
    bucket = table.buckets[table.get_bucket_for(honest[0])]
    assert len(bucket.replacement_nodes) == 3
    # ...but when an honest contact leaves, none of them may take its slot.
    table.remove_contact(honest[0])
    assert len(bucket.nodes) == 3
    assert sum(1 for n in bucket.nodes.values() if n.ip.startswith("45.33.44.")) == 2
    # An honest replacement from another /24 may.
    table.add_contact(Node(far_id(0), "61.9.9.9", 4000))
    assert len(bucket.nodes) == 4
    # Nor can a held contact move its address into the attacker's full /24.
    moved = Node(honest[1].id, "45.33.44.99", 4000)
    assert table.add_contact(moved).reason == "subnet"
    kept = table.get(honest[1].id)
    assert kept is not None and kept.ip == "61.1.1.1"


def test_exemptions() -> None:
    rng = random.Random(RNG_SEED + 3)
    default = SubnetPolicy()
    strict = SubnetPolicy(exempt_private=False)
    off = SubnetPolicy(per_bucket=None)
    for policy, ip, limited in (
        (default, "127.0.0.1", False),  # loopback: local swarms keep working
        (default, "10.1.2.3", False),  # private ranges exempt by default
        (default, "192.168.7.1", False),
        (strict, "10.1.2.3", True),
        (strict, "127.0.0.1", False),
        (default, "45.33.44.1", True),
        (off, "45.33.44.1", False),
    ):
        me = Node(rng.randbytes(20), "127.0.0.1", 1)
        table = RoutingTable(me, 20, clock=lambda: 0.0, subnets=policy)
        results = [
            table.add_contact(Node(near(me.id, rng, 0), ip, 4000 + i)).action for i in range(6)
        ]
        refused = results.count(REJECTED)
        assert (refused == 4) if limited else (refused == 0), (policy, ip, results)
