"""Fuzzing the datagram handler in-process: hostile datagrams into two real nodes.

Two nodes (an open swarm and a closed one) run on :mod:`qisd.dht.memnet` in a
background thread with their own ``trio.run``, so the receive loop, rate-limit
bypassed (0 disables it), RPC dispatch, closed-swarm gate, handlers, packet
verification and the SQLite store all run for real, without sockets and fast.
Hypothesis feeds batches of datagrams; after each batch the test waits until both
nodes have taken every datagram in.

A crash is: the nodes' ``trio.run`` ending, a handler failing with anything but a
protocol error (``handler_error``), a reply that cannot be encoded
(``oversized_reply``), or a node no longer answering a ping. Memory must stay
bounded: in-node tables within their caps and process RSS growth under a bound.

The normal suite runs :data:`QUICK_EXAMPLES` batches; ``QISD_LONG_FUZZ=1`` runs the
long mode (>= 100,000 datagrams), which prints its counts.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from sec_helpers import closed_manifest, packet, tamper_signature

from qisd.dht import DHTConfig, DHTNode, open_node
from qisd.dht.memnet import MemoryNetwork
from qisd.dht.ratelimit import RateLimits
from qisd.dht.wire import MAX_DATAGRAM
from qisd.identity import Identity
from qisd.manifest import DEFAULT_MANIFEST
from qisd.packet import KIND_SYNTHESIS, packet_id
from qisd.store import PacketStore

LONG = os.environ.get("QISD_LONG_FUZZ") == "1"
QUICK_EXAMPLES = 150
LONG_INPUTS = 100_000
LONG_EXAMPLES = 5_000  # batches of 20..40 datagrams: >= 100,000 in all
LONG_CHUNK = 250  # examples per hypothesis run in the long mode
#: Allowed RSS growth after warm-up (the store lives on disk, in-node tables are capped).
RSS_BOUND = 96 * 1024 * 1024

CONFIG = DHTConfig(
    rpc_timeout=0.2,
    failure_backoff=0.5,
    limits=RateLimits(per_source_rate=0, total_rate=0),
    max_values=500,
    max_value_bytes=1 << 20,
    max_listens=256,
    notify_queue=64,
)
FRIEND = Identity.generate()
FRIEND_ADDR = ("10.9.9.9", 4000)
SOURCES = [("10.9.0.1", 4000), ("10.9.0.2", 4001), FRIEND_ADDR, ("10.9.0.3", 1)]
KEYS = [bytes([i]) * 20 for i in range(4)]


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@dataclass
class Target:
    nodes: list[DHTNode]
    network: MemoryNetwork
    token: trio.lowlevel.TrioToken
    probe: Any
    sent: list[int] = field(default_factory=lambda: [0, 0])
    total: int = 0

    def run(self, fn: Any, *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self.token)


async def pump(target: Target, batch: list[tuple[int, bytes, tuple[str, int]]]) -> None:
    """Deliver ``batch`` and wait until each node has received all of it."""
    network = target.network
    for which, data, src in batch:
        node = target.nodes[which]
        lost = network.lost
        network.deliver(data, src, node.address)
        # memnet drops what no UDP socket could carry (> MAX_DATAGRAM); the real
        # socket's one-byte-more read is tested over UDP in tests/dht/test_hostile.py.
        if network.lost == lost:
            target.sent[which] += 1
            target.total += 1
    with trio.fail_after(30):
        for which, node in enumerate(target.nodes):
            # Polling a counter the node's receive loop owns (no event to wait on).
            while node.counters.datagrams_in < target.sent[which]:
                await trio.lowlevel.checkpoint()


async def ping(target: Target, node: DHTNode) -> bool:
    msgid = os.urandom(20)
    # From the friend: the closed node answers only proven members.
    body = msgpack.packb(["ping", [FRIEND.node_id]], use_bin_type=True)
    await target.probe.sendto(b"\x00" + msgid + body, node.address)
    with trio.move_on_after(5):
        while True:
            data, _ = await target.probe.recvfrom()
            if data[1:21] == msgid:
                return msgpack.unpackb(data[21:]) == node.me.id
    return False


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    tmp = Path(tempfile.mkdtemp(prefix="qisd-fuzz-"))
    ready, box = threading.Event(), {}
    async def main() -> None:
        network = MemoryNetwork(queue_size=4096)
        stores = [PacketStore.open(tmp / f"s{i}.sqlite") for i in range(2)]
        try:
            async with (
                open_node(
                    OPEN_ID, DEFAULT_MANIFEST, stores[0], config=CONFIG,
                    endpoint=network.endpoint(("10.0.0.1", 4000)),
                ) as open_one,
                open_node(
                    CLOSED_ID, CLOSED, stores[1], config=CONFIG,
                    endpoint=network.endpoint(("10.0.0.2", 4000)),
                ) as closed_one,
            ):
                # The friend proved its key already: its requests pass the gate, so
                # the closed node's handlers are fuzzed too, not only its gate.
                from kademlia.node import Node

                closed_one.admission._admit(Node(FRIEND.node_id, *FRIEND_ADDR))
                probe = network.endpoint(FRIEND_ADDR)
                stop = trio.Event()
                box["target"] = Target(
                    [open_one, closed_one], network, trio.lowlevel.current_trio_token(), probe
                )
                box["stop"] = stop
                ready.set()
                await stop.wait()
        finally:
            for s in stores:
                s.close()

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # a crash of the nodes: the tests report it
            box["crash"] = exc
            ready.set()

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    assert ready.wait(20)
    assert "crash" not in box, box.get("crash")
    t: Target = box["target"]
    yield t
    t.run(_set, box["stop"])
    thread.join(20)
    assert "crash" not in box, box.get("crash")


async def _set(event: trio.Event) -> None:
    event.set()


OPEN_ID = Identity.generate()
CLOSED_ID = Identity.generate()
CLOSED = closed_manifest([FRIEND, CLOSED_ID])


# -- strategies ---------------------------------------------------------------------

ANY = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=10,
)


def _packet_pool() -> tuple[list[bytes], list[list[Any]]]:
    rng = random.Random(11)
    pool, sketches = [], []
    for manifest in (DEFAULT_MANIFEST, CLOSED):
        for _ in range(6):
            p = packet(FRIEND, manifest, rng)
            pool.append(p.encoded)
            sketches.append([p.sketch.dim, p.sketch.bits, p.sketch.data])
        pool.append(packet(FRIEND, manifest, rng, kind=KIND_SYNTHESIS, generation=1).encoded)
        pool.append(tamper_signature(packet(FRIEND, manifest, rng).encoded))
        pool.append(packet(Identity.generate(), manifest, rng).encoded)
    return pool, sketches


PACKETS, SKETCHES = _packet_pool()


@st.composite
def mutated_packet(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(PACKETS))
    how = draw(st.sampled_from(["as_is", "as_is", "flip", "cut", "append"]))
    if how == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    elif how == "cut":
        data = data[: draw(st.integers(1, len(data)))]
    elif how == "append":
        data = data + draw(st.binary(min_size=1, max_size=20))
    return data


NodeIds = st.SearchStrategy[bytes]
#: What msgpack can carry (a larger int cannot be sent at all).
INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
ANY_ID = st.sampled_from([FRIEND.node_id, bytes(20)]) | st.binary(min_size=20, max_size=20)
KEY = st.sampled_from(KEYS) | st.binary(min_size=20, max_size=20)
SKETCH = st.sampled_from(SKETCHES) | st.builds(
    lambda dim, bits, data: [dim, bits, data],
    st.sampled_from([16, 4, 0, 1024]),
    st.sampled_from([8, 4, 3]),
    st.binary(max_size=24),
)
PACKET_LIST = st.lists(mutated_packet(), min_size=1, max_size=5)
#: Ids of stored packets, and any 16 (or other) bytes.
PACKET_IDS = st.lists(
    st.sampled_from([packet_id(p) for p in PACKETS]) | st.binary(min_size=15, max_size=17),
    min_size=1,
    max_size=70,
)


def valid_args(name: str, ids: NodeIds) -> st.SearchStrategy[list[Any]]:
    return {
        "ping": st.tuples(ids),
        "stun": st.tuples(),
        "store": st.tuples(ids, KEY, st.binary(max_size=64) | INT64 | st.text()),
        "find_node": st.tuples(ids, KEY),
        "find_value": st.tuples(ids, KEY),
        "store_packets": st.tuples(ids, KEY, PACKET_LIST),
        "notify": st.tuples(ids, KEY, PACKET_LIST),
        "find_packets": st.tuples(ids, KEY, SKETCH, st.integers(1, 64), st.integers(0, 50)),
        "find_packet_ids": st.tuples(
            ids, KEY, SKETCH, st.integers(1, 64), st.integers(0, 50), st.integers(0, 70)
        ),
        "get_packets": st.tuples(ids, PACKET_IDS),
        "listen": st.tuples(ids, KEY, st.integers(1, 100_000)),
        "hello": st.tuples(ids, st.binary(min_size=32, max_size=32)),
        "store_value": st.tuples(
            ids, KEY, st.binary(max_size=64) | INT64 | st.text(), st.binary(max_size=48)
        ),
    }[name].map(list)


RPCS = ["ping", "stun", "store", "find_node", "find_value", "store_packets", "notify",
        "find_packets", "find_packet_ids", "get_packets", "listen", "hello", "store_value"]


def frame(name: Any, args: Any) -> bytes:
    return b"\x00" + os.urandom(20) + msgpack.packb([name, args], use_bin_type=True)


@st.composite
def well_formed(draw: st.DrawFn, ids: NodeIds) -> bytes:
    name = draw(st.sampled_from(RPCS))
    return frame(name, draw(valid_args(name, ids)))


@st.composite
def one_wrong(draw: st.DrawFn, ids: NodeIds) -> bytes:
    name = draw(st.sampled_from(RPCS))
    args = draw(valid_args(name, ids))
    if args and draw(st.booleans()):
        args[draw(st.integers(0, len(args) - 1))] = draw(ANY)
    else:
        args = draw(st.lists(ANY, max_size=6))
    return frame(draw(st.sampled_from([*RPCS, "nope", ""])), args)


@st.composite
def truncated(draw: st.DrawFn, ids: NodeIds) -> bytes:
    whole = draw(well_formed(ids))
    return whole[: draw(st.integers(0, len(whole) - 1))]


@st.composite
def bombs(draw: st.DrawFn) -> bytes:
    size = draw(st.integers(100, 4000))
    body = draw(st.sampled_from([
        b"\x92\xa4ping" + b"\x91" * size + b"\xc0",  # deep nesting
        b"\x92\xa4ping\xdd\xff\xff\xff\xff",  # claims 4 billion entries
        b"\x92\xa5store\x93" + b"\xc4\x14" + bytes(20) + b"\xc4\x14" + bytes(20)
        + b"\xc6\xff\xff\xff\xff",  # bin claiming 4 GiB
        b"\x92\xa4ping\x91\xc7\x05\x01abcde",  # an ext type
        b"\x92\xa4ping\x91\x81\x01\x02",  # an int map key
    ]))
    return b"\x00" + os.urandom(20) + body


def datagram(ids: NodeIds) -> st.SearchStrategy[bytes]:
    return st.one_of(
        well_formed(ids),
        well_formed(ids),
        one_wrong(ids),
        truncated(ids),
        bombs(),
        st.binary(max_size=200),
        st.binary(max_size=200).map(lambda b: b"\x00" + os.urandom(20) + b),
        st.binary(min_size=1, max_size=100).map(lambda b: b"\x01" + os.urandom(20) + b),
        st.just(b"\x00" * MAX_DATAGRAM),
    )


FRIENDLY = datagram(st.just(FRIEND.node_id))
HOSTILE = datagram(ANY_ID)


@st.composite
def item(draw: st.DrawFn) -> tuple[int, bytes, tuple[str, int]]:
    """(node index, datagram, source); from the friend's address mostly with its id,
    so the closed node's handlers run and not only its gate."""
    src = draw(st.sampled_from([*SOURCES, FRIEND_ADDR]))
    friendly = src == FRIEND_ADDR and draw(st.integers(0, 4)) > 0
    return draw(st.integers(0, 1)), draw(FRIENDLY if friendly else HOSTILE), src


ITEM = item()


def check_alive(t: Target) -> None:
    for node in t.nodes:
        stats = t.run(_stats, node)
        assert stats.dropped.get("handler_error", 0) == 0, dict(stats.dropped)
        assert stats.dropped.get("oversized_reply", 0) == 0, dict(stats.dropped)
        assert t.run(ping, t, node), "the node stopped answering"
        assert stats.values <= CONFIG.max_values
        assert stats.listeners <= CONFIG.max_listens
        assert len(node.table) <= 20 * 161


async def _stats(node: DHTNode) -> Any:
    return node.statistics()


def run_fuzz(t: Target, examples: int, sizes: tuple[int, int], run_seed: int | None = None
             ) -> None:
    """One hypothesis run; ``run_seed`` seeds it (the long mode's runs each get their
    own, so ``--hypothesis-seed`` cannot make them repeat one another)."""
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=st.lists(ITEM, min_size=sizes[0], max_size=sizes[1]))
    def fuzz(batch: list[tuple[int, bytes, tuple[str, int]]]) -> None:
        t.run(pump, t, batch)  # raises if the nodes' trio.run has ended
        for node in t.nodes:
            dropped = t.run(_stats, node).dropped
            # Anything but a counted protocol error is a crash of that handler.
            assert dropped.get("handler_error", 0) == 0, dict(dropped)
            assert dropped.get("oversized_reply", 0) == 0, dict(dropped)

    (fuzz if run_seed is None else seed(run_seed)(fuzz))()


def seed_corpus() -> list[tuple[int, bytes, tuple[str, int]]]:
    """Well-formed requests of every RPC from the friend, to both nodes: the deep paths
    run in every run, whatever the random examples draw."""
    me = FRIEND.node_id
    calls: list[tuple[str, list[Any]]] = [
        ("ping", [me]),
        ("stun", []),
        ("store", [me, KEYS[0], b"value"]),
        ("find_node", [me, KEYS[0]]),
        ("find_value", [me, KEYS[0]]),
        ("listen", [me, KEYS[0], 60]),
        ("store_packets", [me, KEYS[0], PACKETS[:6]]),
        ("store_packets", [me, KEYS[1], PACKETS[6:]]),
        ("notify", [me, KEYS[0], PACKETS[:2]]),
        ("hello", [me, bytes(32)]),
        ("store_value", [me, KEYS[2], b"value", b""]),
    ]
    calls += [("find_packets", [me, KEYS[0], sk, 10, 0]) for sk in SKETCHES[:2]]
    calls += [("find_packet_ids", [me, KEYS[0], sk, 10, 0, 12]) for sk in SKETCHES[:2]]
    calls += [("get_packets", [me, [packet_id(p) for p in PACKETS[:8]]])]
    return [(which, frame(name, args), FRIEND_ADDR) for which in (0, 1) for name, args in calls]


def test_datagram_handler_fuzz(target: Target) -> None:
    target.run(pump, target, seed_corpus())
    run_fuzz(target, QUICK_EXAMPLES, (1, 8))
    check_alive(target)
    assert target.total >= QUICK_EXAMPLES
    for node in target.nodes:
        stats = target.run(_stats, node)
        assert stats.packets_accepted > 0
        for rpc in ("store_packets", "find_packets", "find_packet_ids", "get_packets",
                    "find_node", "listen", "store_value"):
            assert stats.rpcs.get((rpc, "in", "ok"), 0) > 0, (rpc, dict(stats.rpcs))


@pytest.mark.fuzz
@pytest.mark.skipif(not LONG, reason="long fuzz: set QISD_LONG_FUZZ=1")
def test_datagram_handler_long_fuzz(target: Target) -> None:
    target.run(pump, target, seed_corpus())
    run_fuzz(target, LONG_CHUNK, (20, 40))  # warm-up: caches, SQLite pages, hypothesis
    start_total, start_rss = target.total, rss_bytes()
    # One hypothesis run keeps state for every example it generated: 5,000 examples
    # in one run grew RSS by 730 MiB and took 16 minutes (the nodes' share: none;
    # in runs of LONG_CHUNK, 141k datagrams grew it by 7-13 MiB in 3 minutes).
    # Runs of LONG_CHUNK examples free it between runs, so the bound measures the nodes.
    base = random.SystemRandom().getrandbits(32)
    print(f"\nlong fuzz: hypothesis runs seeded {base}..{base + LONG_EXAMPLES // LONG_CHUNK - 1}")
    for i in range(LONG_EXAMPLES // LONG_CHUNK):
        run_fuzz(target, LONG_CHUNK, (20, 40), run_seed=base + i)
    check_alive(target)
    grown = rss_bytes() - start_rss
    count = target.total - start_total
    stats = [target.run(_stats, n) for n in target.nodes]
    print(
        f"\nlong datagram fuzz: {count} datagrams, 0 crashes, RSS growth "
        f"{grown / 2**20:.1f} MiB; accepted {sum(s.packets_accepted for s in stats)} "
        f"packets, rejected {sum(sum(s.packets_rejected.values()) for s in stats)}, "
        f"dropped {sum(sum(s.dropped.values()) for s in stats)} datagrams"
    )
    assert count >= LONG_INPUTS
    assert grown < RSS_BOUND, f"RSS grew {grown / 2**20:.1f} MiB"
