from __future__ import annotations

from kademlia.node import Node

from qisd.dht.values import AddressMemory, Listeners, ValueStore


def test_values_expire_and_are_capped() -> None:
    vs = ValueStore(ttl=10, max_items=3, max_bytes=100)
    vs.put(b"a", b"x" * 10, 0.0)
    assert vs.get(b"a", 5.0) == b"x" * 10
    assert vs.get(b"a", 10.0) is None  # lapsed, even before expire() runs
    for i, key in enumerate([b"b", b"c", b"d", b"e"]):
        vs.put(key, i, 1.0)
    assert len(vs) == 3 and b"a" not in vs and b"b" not in vs
    vs.put(b"big", "y" * 99, 2.0)
    assert vs.bytes <= 100 and vs.get(b"big", 2.0) == "y" * 99
    held = len(vs)
    assert vs.expire(100.0) == held
    assert len(vs) == 0 and vs.bytes == 0


def test_values_older_than() -> None:
    vs = ValueStore(ttl=1000, max_items=10, max_bytes=1000)
    vs.put(b"old", 1, 0.0)
    vs.put(b"new", 2, 50.0)
    assert vs.older_than(40, 60.0) == [(b"old", 1)]
    assert sorted(vs.items(60.0)) == [(b"new", 2), (b"old", 1)]


def test_listeners_caps_renewal_and_expiry() -> None:
    ls = Listeners(ttl_max=100, per_peer=2, max_total=3)
    a, b = Node(b"a" * 20, "10.0.0.1", 1), Node(b"b" * 20, "10.0.0.2", 1)
    assert ls.register(b"k1", a, 500, 0.0) == 100  # capped to ttl_max
    assert ls.register(b"k2", a, 10, 0.0) == 10
    assert ls.register(b"k3", a, 10, 0.0) == 0  # per-peer cap
    assert ls.register(b"k1", a, 50, 0.0) == 50  # renewal is always allowed
    assert ls.register(b"k1", b, 10, 0.0) == 10
    assert ls.register(b"k4", b, 10, 0.0) == 0  # total cap
    assert ls.for_key(b"k1", 5.0) == [a, b]
    assert ls.for_key(b"k2", 11.0) == []
    assert ls.expire(20.0) == 2 and len(ls) == 1
    assert ls.register(b"k4", b, 10, 20.0) == 10


def test_one_host_cannot_take_the_listen_cap_from_many_ports() -> None:
    """The per-peer cap counts a source as the rate limits do: one IPv4 address or
    IPv6 /64 whatever its ports (loopback: address and port, for local swarms)."""
    ls = Listeners(ttl_max=100, per_peer=2, max_total=100)
    ports = [Node(bytes([i]) * 20, "10.0.0.1", 1000 + i) for i in range(5)]
    granted = [ls.register(b"k%d" % i, peer, 10, 0.0) for i, peer in enumerate(ports)]
    assert granted == [10, 10, 0, 0, 0]
    v6 = [Node(bytes([i]) * 20, f"2001:db8::{i}", 1) for i in range(1, 4)]  # one /64
    assert [ls.register(b"v%d" % i, p, 10, 0.0) for i, p in enumerate(v6)] == [10, 10, 0]
    local = [Node(bytes([i]) * 20, "127.0.0.1", 2000 + i) for i in range(4)]
    assert all(ls.register(b"l%d" % i, p, 10, 0.0) == 10 for i, p in enumerate(local))
    assert ls.expire(20.0) == 8
    assert ls.register(b"k9", ports[4], 10, 20.0) == 10  # released with the expiry


def test_address_memory_lapses_and_is_bounded() -> None:
    mem = AddressMemory(max_items=2, ttl=10)
    mem.add(("a", 1), 0.0)
    assert mem.has(("a", 1), 5.0) and not mem.has(("a", 1), 11.0)
    for i in range(5):
        mem.add(("b", i), 0.0)
    assert len(mem) == 2
