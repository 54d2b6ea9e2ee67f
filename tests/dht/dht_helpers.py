"""Shared helpers of the DHT tests: packets, stores, swarms on 127.0.0.1."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from qisd.dht import DHTConfig, DHTNode, open_node
from qisd.identity import Identity
from qisd.manifest import DEFAULT_MANIFEST, Manifest
from qisd.packet import OutcomePacket, create_packet
from qisd.sketch import Sketch, make_sketch

DIM = 16


def vector(rng: random.Random, dim: int = DIM) -> list[float]:
    return [rng.gauss(0, 1) for _ in range(dim)]


def make_packet(
    identity: Identity,
    rng: random.Random,
    *,
    manifest: Manifest = DEFAULT_MANIFEST,
    topic: str = "t",
    vec: Sequence[float] | None = None,
    ttl_s: int = 3600,
    outcome: dict[str, Any] | None = None,
) -> OutcomePacket:
    return create_packet(
        identity.signing_key,
        swarm=manifest.swarm_id,
        topic=topic,
        sketch=make_sketch(np.asarray(vec if vec is not None else vector(rng))),
        outcome=outcome or {"ok": rng.random() < 0.5, "score": rng.random()},
        ttl_s=ttl_s,
    )


@dataclass
class Member:
    identity: Identity
    node: DHTNode
    store: Any
    stack: AsyncExitStack


def open_store(path: Path) -> Any:
    from qisd.store import PacketStore

    path.parent.mkdir(parents=True, exist_ok=True)
    return PacketStore.open(path)


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait (at most 10 s) until ``predicate()`` holds: state owned by other tasks,
    with no event to wait on."""
    with trio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 - polling another component's state
            await trio.sleep(0.05)


@asynccontextmanager
async def member(
    identity: Identity,
    tmp: Path | None,
    *,
    manifest: Manifest = DEFAULT_MANIFEST,
    port: int = 0,
    config: DHTConfig | None = None,
    with_store: bool = True,
    host: str = "127.0.0.1",
) -> AsyncIterator[Member]:
    """One node (on 127.0.0.1 unless ``host``) with its own SQLite store and state dir
    under ``tmp``."""
    async with AsyncExitStack() as stack:
        store = None
        if with_store and tmp is not None:
            store = open_store(tmp / "packets.sqlite")
            stack.callback(store.close)
        node = await stack.enter_async_context(
            open_node(
                identity,
                manifest,
                store,
                host=host,
                port=port,
                config=config,
                state_dir=tmp,
            )
        )
        yield Member(identity, node, store, stack)


def sketch_of(packet: OutcomePacket) -> Sketch:
    return packet.sketch


class Swarm:
    """Nodes that each run in their own task, so any one can stop or restart."""

    def __init__(self, nursery: Any, tmp: Path, **options: Any) -> None:
        self.nursery = nursery
        self.tmp = tmp
        self.options = options
        self.members: dict[int, Member] = {}
        self.identities: dict[int, Identity] = {}
        self.ports: dict[int, int] = {}
        self._stops: dict[int, tuple[Any, Any]] = {}

    async def start(self, i: int, *, port: int = 0) -> Member:
        identity = self.identities.setdefault(i, Identity.generate())
        stop, done = trio.Event(), trio.Event()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            try:
                async with member(identity, self.tmp / f"n{i}", port=port, **self.options) as m:
                    task_status.started(m)
                    await stop.wait()
            finally:
                done.set()

        m = await self.nursery.start(run)
        self.members[i] = m
        self.ports[i] = m.node.address[1]
        self._stops[i] = (stop, done)
        return m

    async def start_joined(self, count: int) -> Member:
        """Start members 0..count-1, each bootstrapped through member 0 (twice, so
        early joiners learn of late ones); member 0."""
        first = await self.start(0)
        for i in range(1, count):
            await (await self.start(i)).node.bootstrap([first.node.address])
        for m in self.members.values():
            await m.node.bootstrap([first.node.address])
        return first

    async def stop(self, i: int) -> None:
        stop, done = self._stops.pop(i)
        del self.members[i]
        stop.set()
        await done.wait()

    async def stop_all(self) -> None:
        for i in list(self._stops):
            await self.stop(i)


@asynccontextmanager
async def running_swarm(tmp: Path, manifest: Manifest, size: int) -> AsyncIterator[Swarm]:
    """``size`` members that know each other (:meth:`Swarm.start_joined`), stopped
    when the block ends."""
    async with trio.open_nursery() as nursery:
        swarm = Swarm(nursery, tmp, manifest=manifest)
        await swarm.start_joined(size)
        yield swarm
        nursery.cancel_scope.cancel()
