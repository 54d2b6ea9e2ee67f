"""Stock ``set``/``get`` between qisd nodes: one ``store_value`` per copy, peer kinds.

Real nodes over the in-memory network with a mock clock. Interop with real stock
nodes (asyncio, a subprocess) is ``test_interop.py``; here a minimal stock-like peer
(answers the four stock RPCs, ignores the rest) stands in where a test needs one to
misbehave in a precise way.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing
from kademlia.node import Node
from kademlia.utils import digest

from qisd.dht.memnet import MemoryNetwork
from qisd.dht.nearest import id_tag
from qisd.dht.node import DHTNode, open_node
from qisd.dht.simulate import sim_config
from qisd.dht.stats import Counters
from qisd.dht.stock import STORE_VALUE
from qisd.dht.transport import Transport
from qisd.dht.wire import Address, WireError
from qisd.identity import Identity

K = 5


class StockLike:
    """Answers ping/find_node/store/find_value as a stock node; ignores the rest."""

    def __init__(self, net: MemoryNetwork, node_id: bytes) -> None:
        self.me = node_id
        self.endpoint = net.endpoint()
        self.values: dict[bytes, Any] = {}
        self.seen: Counter[str] = Counter()
        self.transport = Transport(self.endpoint, self.handle, Counters())

    @property
    def address(self) -> Address:
        return self.endpoint.local_address

    def handle(self, name: str, args: list[Any], addr: Address) -> Any:
        self.seen[name] += 1
        if name == "ping":
            return self.me
        if name == "find_node":
            return []
        if name == "store":
            self.values[args[1]] = args[2]
            return True
        if name == "find_value":
            return {"value": self.values[args[1]]} if args[1] in self.values else []
        raise WireError("unknown_rpc", f"no {name}")


@asynccontextmanager
async def swarm(n: int, net: MemoryNetwork, seed: int = 1) -> AsyncIterator[list[DHTNode]]:
    """``n`` nodes joined through the first, each in its own task (so a failing
    assertion surfaces through one nursery, not ``n`` nested ones)."""
    rng = random.Random(seed)
    stop = trio.Event()

    async def run(
        identity: Identity, node_rng: random.Random, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with open_node(
            identity, endpoint=net.endpoint(), config=sim_config(ksize=K), rng=node_rng
        ) as node:
            task_status.started(node)
            await stop.wait()

    async with trio.open_nursery() as nursery:
        nodes: list[DHTNode] = []
        for _ in range(n):
            identity = Identity.from_seed(rng.randbytes(32))
            node = await nursery.start(run, identity, random.Random(rng.random()))
            if nodes:
                await node.bootstrap([nodes[0].address])
            nodes.append(node)
        await trio.sleep(30)  # background hello probes settle
        try:
            yield nodes
        finally:
            stop.set()


def rpcs_out(nodes: list[DHTNode]) -> Counter[str]:
    total: Counter[str] = Counter()
    for node in nodes:
        for (name, direction, _), count in node.counters.rpcs.items():
            if direction == "out":
                total[name] += count
    return total


def closest(nodes: list[DHTNode], dkey: bytes, k: int) -> list[DHTNode]:
    target = Node(dkey)
    return sorted(nodes, key=lambda n: n.me.distance_to(target))[:k]


async def test_set_is_one_store_value_per_copy(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(seed=2, queue_size=4096)
    async with swarm(30, net) as nodes:
        rng = random.Random(5)
        # Every node learnt that its contacts speak qisd (hello, both ways).
        assert all(n.kinds.is_qisd(m) for n in nodes for m in n.table.contacts())
        for i in range(6):
            key, value = f"key-{i}", f"value-{i}"
            setter, getter = rng.sample(nodes, 2)
            # The first set may hear of nodes its table lacks: those get stock
            # RPCs (find_node, then store) while a hello finds out what they are.
            assert await setter.set(key, "first")
            await trio.sleep(5)
            before = rpcs_out(nodes)
            assert await setter.set(key, value)
            spent = rpcs_out(nodes) - before
            # Now one request per copy (the setter may be one of the k closest and
            # keep one itself), a few spare ones for nodes passed on the way, and
            # no FIND_NODE lookup at all.
            assert spent["find_node"] == 0 and spent["hello"] == 0, spent
            assert spent["store"] <= 1 and K - 1 <= spent[STORE_VALUE] <= K + 3, spent
            dkey = digest(key)
            for holder in closest(nodes, dkey, K):
                assert holder.values.get(dkey, trio.current_time()) == value
            assert await getter.get(key) == value
            await trio.sleep(5)  # the get's cache-store lands


async def test_store_value_arguments_and_answers(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(seed=3, queue_size=4096)
    async with swarm(12, net) as nodes:
        asker, server = nodes[0], nodes[-1]
        dkey = digest("some key")
        target = Node(dkey)
        mine = server.me.distance_to(target)
        contacts = server.table.contacts()
        closer = sorted(
            (c for c in contacts if c.distance_to(target) < mine),
            key=lambda c: c.distance_to(target),
        )
        call = asker.transport.call
        ok, answer = await call(server.address, STORE_VALUE, [asker.me.id, dkey, "v", b""])
        assert (
            ok
            and answer["nodes"] == [[c.id, c.ip, c.port] for c in closer if c.id != asker.me.id][:K]
        )
        assert answer["stored"] is (len(closer) < K)
        assert (server.values.get(dkey, trio.current_time()) == "v") is answer["stored"]
        # Contacts the asker says it has heard of are not named again.
        everyone = b"".join(id_tag(c.id) for c in server.table.contacts())
        ok, answer = await call(server.address, STORE_VALUE, [asker.me.id, dkey, "v", everyone])
        assert ok and answer["nodes"] == []
        # Bad arguments: no answer, a counter (per copy: the asker resends an
        # unanswered request), and the server goes on answering.
        resent = asker.counters.resent
        for bad in (
            [asker.me.id, dkey, "v", b"abc"],  # not whole tags
            [asker.me.id, dkey, "v", b"x" * 4000],  # too many tags
            [asker.me.id, dkey, ["not", "a", "value"], b""],
            [asker.me.id, b"short", "v", b""],
            [asker.me.id, dkey, "v"],
        ):
            ok, _ = await call(server.address, STORE_VALUE, bad, wait=0.5)
            assert not ok
        copies = asker.counters.resent - resent
        assert copies <= 5 and server.counters.dropped["bad_args"] == 5 + copies
        assert (await call(server.address, "ping", [asker.me.id]))[0]


async def test_stock_like_peer_gets_stock_rpcs(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(seed=4, queue_size=4096)
    async with swarm(8, net) as nodes:
        # A stock-like node whose id is the key's closest: it must hold every copy.
        dkey = digest("shared")
        fake = StockLike(net, (int.from_bytes(dkey, "big") ^ 1).to_bytes(20, "big"))
        async with trio.open_nursery() as nursery:
            await nursery.start(fake.transport.serve)
            setter = nodes[3]
            setter.welcome(Node(fake.me, *fake.address))
            await trio.sleep(30)  # hello unanswered, ping answered
            peer = Node(fake.me, *fake.address)
            assert not setter.kinds.is_qisd(peer)
            assert setter.kinds.silent.has(fake.address, trio.current_time())
            assert fake.seen["hello"] >= 1
            assert await setter.set("shared", "one")
            assert fake.values[dkey] == "one" and fake.seen[STORE_VALUE] == 0

            # Taken for qisd by mistake (say a forged packet RPC named its address):
            # the store_value it ignores costs one timeout (and its resends), the set
            # still succeeds, and the peer is doubted, so the next set reaches it the
            # stock way.
            setter.kinds.saw_qisd(fake.address)
            setter.failed_peers.discard(fake.address)
            assert await setter.set("shared", "two")
            assert fake.seen[STORE_VALUE] == 1 + setter.config.rpc_retries
            assert not setter.kinds.is_qisd(peer)
            await trio.sleep(60)  # past the failure backoff
            assert await setter.set("shared", "three")
            assert fake.values[dkey] == "three"
            nursery.cancel_scope.cancel()
