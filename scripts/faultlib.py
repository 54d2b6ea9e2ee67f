"""Shared machinery of the fault experiments (``scripts/fault_*.py``, ``tests/faults``).

- :class:`LocalSwarm`: real :class:`qisd.dht.DHTNode` nodes on 127.0.0.1 (real UDP,
  port 0), each with its own SQLite :class:`qisd.store.PacketStore` in its own state
  directory, each running in its own task so any one can be stopped (its socket
  closed, its store closed, its routing table saved) and started again on the same
  port with the same identity, store and routing state, as a restarted daemon would.
- :class:`Impairment` and :class:`ImpairedEndpoint`: a network emulator in the
  datagram path. Every datagram a node *sends* through the real UDP socket is first
  subject to: a partition (dropped if sender and receiver are on different sides),
  independent random loss (``loss``), and a fixed one-way delay (``delay`` seconds,
  order preserved) before it is handed to the kernel. A round trip crosses it twice,
  as with ``tc netem`` on every node's interface (which this kernel lacks).
- The scripts' common shell: :func:`log` (progress on stderr), :func:`parse_params`
  (command-line flags from a parameters dataclass), :func:`print_result`, :func:`table`,
  :func:`pct` and :func:`secs`.

Measurements over the swarm (copies, "found" checks) are in :mod:`faultmeasure`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import trio

from qisd.dht import DHTConfig, DHTNode, open_node
from qisd.dht.transport import DatagramEndpoint, open_udp_endpoint
from qisd.dht.wire import Address
from qisd.fingerprint import keys_for
from qisd.identity import Identity
from qisd.manifest import Manifest
from qisd.packet import OutcomePacket, create_packet
from qisd.sketch import make_sketch
from qisd.store import PacketStore

STORE_FILE = "packets.db"
P = TypeVar("P")


# -- the network emulator -------------------------------------------------------------


@dataclass
class Impairment:
    """Loss, delay and partition applied to every datagram sent by impaired endpoints."""

    loss: float = 0.0
    delay: float = 0.0
    seed: int = 0
    #: Address -> side; datagrams between different sides are dropped.
    sides: dict[Address, int] = field(default_factory=dict)
    sent: int = 0
    lost: int = 0
    cut: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss < 1.0:
            raise ValueError("impairment: loss must be in [0, 1)")
        if self.delay < 0:
            raise ValueError("impairment: delay must be >= 0")
        self.rng = random.Random(self.seed)

    def partition(self, groups: Sequence[Iterable[Address]]) -> None:
        self.sides = {addr: side for side, group in enumerate(groups) for addr in group}

    def heal(self) -> None:
        self.sides = {}

    def verdict(self, src: Address, dst: Address) -> bool:
        """True if the datagram goes through (counted either way)."""
        self.sent += 1
        if self.sides and self.sides.get(src, -1) != self.sides.get(dst, -1):
            self.cut += 1
            return False
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return False
        return True


class ImpairedEndpoint:
    """A real UDP endpoint whose outgoing datagrams pass through an :class:`Impairment`.

    Delayed datagrams wait in a queue drained by one task (:meth:`pump`, run by the
    owner), which sends each at its due time; the delay is the same for all, so
    the queue is in due order and datagrams keep their order, as on a link.
    """

    def __init__(self, inner: DatagramEndpoint, impairment: Impairment) -> None:
        self.inner = inner
        self.impairment = impairment
        self._send, self._recv = trio.open_memory_channel[tuple[float, bytes, Address]](
            math.inf
        )

    @property
    def local_address(self) -> Address:
        return self.inner.local_address

    @property
    def dual_stack(self) -> bool:
        return self.inner.dual_stack

    async def sendto(self, data: bytes, addr: Address) -> None:
        imp = self.impairment
        if not imp.verdict(self.inner.local_address, addr):
            await trio.lowlevel.checkpoint()
            return
        if imp.delay <= 0:
            await self.inner.sendto(data, addr)
            return
        await trio.lowlevel.checkpoint()
        try:
            self._send.send_nowait((trio.current_time() + imp.delay, bytes(data), addr))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise trio.ClosedResourceError("the endpoint is closed") from None

    async def pump(self) -> None:
        async for due, data, addr in self._recv:
            await trio.sleep_until(due)
            try:
                await self.inner.sendto(data, addr)
            except (OSError, trio.ClosedResourceError):
                return

    async def recvfrom(self) -> tuple[bytes, Address]:
        return await self.inner.recvfrom()

    def close(self) -> None:
        self._send.close()
        self.inner.close()


# -- packets ----------------------------------------------------------------------------


def random_packet(
    identity: Identity,
    rng: random.Random,
    manifest: Manifest,
    *,
    topic: str,
    dim: int = 16,
    ttl_s: int = 86400,
) -> OutcomePacket:
    vector = np.array([rng.gauss(0, 1) for _ in range(dim)])
    return create_packet(
        identity.signing_key,
        swarm=manifest.swarm_id,
        topic=topic,
        sketch=make_sketch(vector),
        outcome={"ok": rng.random() < 0.5, "score": round(rng.random(), 4)},
        ttl_s=ttl_s,
    )


def make_packets(
    swarm: LocalSwarm, rng: random.Random, origins: Sequence[int], count: int,
    topics: Sequence[str],
) -> list[tuple[int, OutcomePacket]]:
    """``count`` packets, each from a random one of ``origins`` on a random topic."""
    out = []
    for _ in range(count):
        origin = rng.choice(origins)
        packet = random_packet(swarm.identities[origin], rng, swarm.manifest,
                               topic=rng.choice(topics))
        out.append((origin, packet))
    return out


async def put_all(
    swarm: LocalSwarm, packets: Sequence[tuple[int, OutcomePacket]], concurrency: int
) -> int:
    """Put each packet from its origin node, ``concurrency`` at a time; how many went
    to at least one node for every key."""
    ok = 0
    limiter = trio.CapacityLimiter(concurrency)

    async def one(origin: int, packet: OutcomePacket) -> None:
        nonlocal ok
        async with limiter:
            report = await swarm.sites[origin].node.put_packet(packet)
        ok += report.ok

    async with trio.open_nursery() as nursery:
        for origin, packet in packets:
            nursery.start_soon(one, origin, packet)
    return ok


def dht_config(
    *,
    rpc_timeout: float,
    republish: float,
    refresh: float,
    failure_backoff: float,
    origin_republish: float | None = None,
    rpc_retries: int = DHTConfig.rpc_retries,
) -> DHTConfig:
    """The DHT settings the experiments vary (everything else at its default). The
    origin republishes every ``origin_republish`` (default: ``republish``, as the
    defaults have it)."""
    return DHTConfig(
        rpc_timeout=rpc_timeout,
        republish_interval=republish,
        origin_republish_interval=origin_republish or republish,
        refresh_interval=refresh,
        failure_backoff=failure_backoff,
        rpc_retries=rpc_retries,
    )


def packet_keys(manifest: Manifest, packet: OutcomePacket) -> list[bytes]:
    """The keys a packet is stored under (recomputed from its sketch, as nodes do)."""
    return keys_for(manifest, packet.topic, packet.sketch.to_array())


# -- the swarm ----------------------------------------------------------------------------


@dataclass
class Site:
    index: int
    identity: Identity
    node: DHTNode
    store: PacketStore
    path: Path


class LocalSwarm:
    """Nodes that each run in their own task, so any one can stop or restart."""

    def __init__(
        self,
        nursery: trio.Nursery,
        root: Path,
        *,
        config: DHTConfig,
        manifest: Manifest,
        impairment: Impairment | None = None,
        seed: int = 0,
    ) -> None:
        self.nursery = nursery
        self.root = root
        self.config = config
        self.manifest = manifest
        self.impairment = impairment
        self.rng = random.Random(seed)
        self.sites: dict[int, Site] = {}
        self.identities: dict[int, Identity] = {}
        self.ports: dict[int, int] = {}
        self._stops: dict[int, tuple[trio.Event, trio.Event]] = {}

    def store_path(self, i: int) -> Path:
        return self.root / f"n{i}" / STORE_FILE

    @property
    def running(self) -> list[int]:
        return sorted(self.sites)

    def resent(self) -> int:
        """Requests the running nodes have sent again while unanswered (dht.rpc_retries)."""
        return sum(site.node.statistics().resent for site in self.sites.values())

    def address(self, i: int) -> Address:
        return ("127.0.0.1", self.ports[i])

    async def start(self, i: int, *, port: int = 0) -> Site:
        identity = self.identities.setdefault(
            i, Identity.from_seed(self.rng.randbytes(32))
        )
        stop, done = trio.Event(), trio.Event()
        state_dir = self.root / f"n{i}"
        state_dir.mkdir(parents=True, exist_ok=True)

        async def run(task_status: trio.TaskStatus[Site] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                async with AsyncExitStack() as stack:
                    store = PacketStore.open(state_dir / STORE_FILE)
                    stack.callback(store.close)
                    endpoint: DatagramEndpoint = await open_udp_endpoint("127.0.0.1", port)
                    inner = trio.open_nursery()
                    pumps = await stack.enter_async_context(inner)
                    stack.callback(pumps.cancel_scope.cancel)
                    if self.impairment is not None:
                        impaired = ImpairedEndpoint(endpoint, self.impairment)
                        pumps.start_soon(impaired.pump)
                        endpoint = impaired
                    node = await stack.enter_async_context(
                        open_node(
                            identity,
                            self.manifest,
                            store,
                            config=self.config,
                            state_dir=state_dir,
                            endpoint=endpoint,
                            rng=random.Random(self.rng.random()),
                        )
                    )
                    task_status.started(Site(i, identity, node, store, state_dir / STORE_FILE))
                    await stop.wait()
            finally:
                done.set()

        site: Site = await self.nursery.start(run)
        self.sites[i] = site
        self.ports[i] = site.node.address[1]
        self._stops[i] = (stop, done)
        return site

    async def stop(self, i: int) -> None:
        stop, done = self._stops.pop(i)
        del self.sites[i]
        stop.set()
        await done.wait()

    async def stop_all(self) -> None:
        for i in list(self._stops):
            await self.stop(i)

    async def form(self, n: int, *, joins_at_once: int = 8, attempts: int = 10) -> None:
        """Start nodes 0..n-1; each joins through node 0 (as ``scripts/swarm`` does),
        trying again while its table is empty, as ``qisd run`` does (a lost ping)."""
        await self.start(0)
        for i in range(1, n):
            await self.start(i)

        async def join(i: int) -> None:
            node = self.sites[i].node
            for _ in range(attempts):
                await node.bootstrap([self.address(0)])
                if len(node.table):
                    return
                await trio.sleep(0.2)

        limiter = trio.CapacityLimiter(joins_at_once)

        async def limited(i: int) -> None:
            async with limiter:
                await join(i)

        async with trio.open_nursery() as nursery:
            for i in range(1, n):
                nursery.start_soon(limited, i)
        # Joins that ran at once may have missed each other: one more lookup of their
        # own id each (what a node's first bucket refresh does).
        async with trio.open_nursery() as nursery:
            for i in range(n):
                node = self.sites[i].node
                nursery.start_soon(node.lookup_nodes, node.me.id)


# -- tables -----------------------------------------------------------------------------


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.2f}%" if b else "-"


def secs(x: float | None) -> str:
    return "not within the timeout" if x is None else f"{x:.0f} s"


# -- the scripts' shell -----------------------------------------------------------------


def log(message: str) -> None:
    """A progress line on stderr (stdout carries the result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_params(cls: type[P], doc: str | None, argv: Sequence[str] | None = None
                 ) -> tuple[P, bool]:
    """The parameters dataclass ``cls`` from the command line (one ``--flag`` per
    int, float or str field, its default shown) and whether ``--json`` was given."""
    # The description is the docstring's first paragraph.
    summary = " ".join((doc or "").strip().split("\n\n")[0].split())
    parser = argparse.ArgumentParser(description=summary or None)
    fields = [f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if f.default is not dataclasses.MISSING]
    for f in fields:
        kind = type(f.default)
        if kind not in (int, float, str):
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default,
                            help=f"default {f.default}")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = vars(parser.parse_args(argv))
    as_json = bool(args.pop("json"))
    return cls(**args), as_json


def print_result(result: Any, render: Callable[[Any], str], as_json: bool) -> None:
    print(json.dumps(dataclasses.asdict(result), indent=2) if as_json else render(result))
