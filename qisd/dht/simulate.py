"""Swarm simulation: many real :class:`~qisd.dht.node.DHTNode` over :mod:`memnet`.

Used by the lookup-cost test and ``scripts/sim_dht.py``. Nodes join one at a time
through a random earlier node (each join is a ping and a lookup of its own id, as
``bootstrap`` does), then random lookups from random nodes record hops ("rounds":
sequential round trips) and RPCs, and whether the nodes found are the true k
closest. Run it under ``trio.testing.MockClock(autojump_threshold=0)`` so timeouts
cost no real time.
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from dataclasses import dataclass

from kademlia.node import Node

from qisd.dht.config import DHTConfig
from qisd.dht.memnet import MemoryNetwork
from qisd.dht.node import DHTNode, open_node
from qisd.dht.routing import SubnetPolicy


@dataclass(frozen=True, slots=True)
class SimIdentity:
    node_id: bytes
    public_key: bytes = b""


@dataclass(frozen=True, slots=True)
class SimResult:
    nodes: int
    lookups: int
    rounds: tuple[int, ...]
    messages: tuple[int, ...]
    #: Lookups whose closest node was the true closest of the whole swarm.
    exact_closest: int
    #: Mean share of the true k closest among the k returned.
    overlap: float

    @staticmethod
    def _mean(xs: tuple[int, ...]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    @staticmethod
    def _p99(xs: tuple[int, ...]) -> int:
        ordered = sorted(xs)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0

    @property
    def mean_rounds(self) -> float:
        return self._mean(self.rounds)

    @property
    def p99_rounds(self) -> int:
        return self._p99(self.rounds)

    @property
    def mean_messages(self) -> float:
        return self._mean(self.messages)

    @property
    def p99_messages(self) -> int:
        return self._p99(self.messages)


def sim_config(ksize: int = 20, alpha: int = 3) -> DHTConfig:
    # No upkeep timers during a run: only joins and measured lookups make traffic.
    day = 86400.0 * 365
    return DHTConfig(
        ksize=ksize,
        alpha=alpha,
        subnets=SubnetPolicy(per_bucket=None),
        refresh_interval=day,
        republish_interval=day,
        origin_republish_interval=day,
        save_interval=day,
        expire_interval=day,
    )


async def simulate(
    n: int, *, lookups: int = 200, seed: int = 0, ksize: int = 20, alpha: int = 3
) -> SimResult:
    rng = random.Random(seed)
    net = MemoryNetwork(seed=seed, queue_size=4096)
    config = sim_config(ksize, alpha)
    async with AsyncExitStack() as stack:
        nodes: list[DHTNode] = []
        for _ in range(n):
            node = await stack.enter_async_context(
                open_node(
                    SimIdentity(rng.randbytes(20)),
                    endpoint=net.endpoint(),
                    config=config,
                    rng=random.Random(rng.random()),
                )
            )
            if nodes:
                await node.bootstrap([rng.choice(nodes).address])
            nodes.append(node)
        everyone = [n.me for n in nodes]
        rounds, messages = [], []
        exact, overlap = 0, 0.0
        for _ in range(lookups):
            asker = rng.choice(nodes)
            key = rng.randbytes(20)
            found, stats = await asker.lookup_nodes(key)
            rounds.append(stats.hops)
            messages.append(stats.rpcs)
            target = Node(key)
            others = [x for x in everyone if x.id != asker.me.id]
            truth = sorted(others, key=lambda x: x.distance_to(target))[:ksize]
            exact += bool(found) and found[0].id == truth[0].id
            overlap += len({x.id for x in found} & {x.id for x in truth}) / len(truth)
        return SimResult(
            nodes=n,
            lookups=lookups,
            rounds=tuple(rounds),
            messages=tuple(messages),
            exact_closest=exact,
            overlap=overlap / max(1, lookups),
        )
