"""The synthesis worker as a daemon service: who synthesises what, and how a draft
becomes a signed packet in the swarm.

Primary rule: a node synthesises a packet only if it is the closest node it knows to
the packet's table-0 key. Every packet has exactly one table-0 key, so (as far as the
nodes' views agree) exactly one node in the swarm synthesises each packet, and the
replicas holding copies do not repeat the work. Deliveries come in through a bounded
channel; when it is full the pump counts the miss and the worker re-reads the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import trio
from kademlia.node import Node

from qisd.config import Config
from qisd.dht.api import Delivery
from qisd.fingerprint import keys_for
from qisd.packet import KIND_SYNTHESIS, OutcomePacket, PacketError, create_packet, wall_ms
from qisd.sketch import quantize
from qisd.synthesis.base import (
    SynthesisDraft,
    SynthesizerSettings,
    bounded_parents,
    load_synthesizer,
)
from qisd.synthesis.worker import WorkerState, run_worker

if TYPE_CHECKING:
    from qisd.daemon.service import NodeService


def is_primary(service: NodeService, packet: OutcomePacket) -> bool:
    key = keys_for(service.manifest, packet.topic, packet.sketch.to_array())[0]
    node = service.node
    closest = node.table.find_neighbors(Node(key), k=1)
    if not closest:
        return True
    target = int.from_bytes(key, "big")
    return bool(node.me.long_id ^ target < closest[0].long_id ^ target)


def of_swarm(swarm: bytes, packets: Iterable[OutcomePacket]) -> Iterator[OutcomePacket]:
    """The packets of ``swarm`` only: a state dir used in another swarm before (a
    re-keyed manifest, a member removed) still holds that swarm's packets until they
    expire, and they must not flow into this swarm's syntheses."""
    return (p for p in packets if p.swarm == swarm)


async def publish_draft(service: NodeService, draft: SynthesisDraft) -> None:
    """Sign ``draft`` and put it in the swarm. A draft too large for the swarm's
    packet cap (a high-dimensional centroid and listed parents, say) is made smaller
    step by step rather than dropped: its listed parents become their digest, then
    its sketch takes 4 bits a dimension. Raises PacketError if even that is too
    large."""
    manifest = service.manifest
    ttl_s = manifest.ttl_default_s
    if draft.expires_ms is not None:
        ttl_s = max(1, min(ttl_s, (draft.expires_ms - wall_ms()) // 1000))
    centroid = np.asarray(draft.centroid, dtype=np.float64)
    shapes: list[tuple[tuple[bytes, ...], int | None]] = [(draft.parents, None)]
    if not draft.parents_digest and len(draft.parents) > 1:
        digest, _ = bounded_parents(draft.parents, 1)
        shapes.append((digest, None))
    shapes.append((shapes[-1][0], 4))
    for i, (parents, bits) in enumerate(shapes):
        try:
            packet = create_packet(
                service.ident.signing_key,
                swarm=manifest.swarm_id,
                topic=draft.topic,
                sketch=quantize(centroid, bits),
                outcome=draft.outcome,
                n=draft.n,
                ttl_s=ttl_s,
                kind=KIND_SYNTHESIS,
                generation=draft.generation,
                parents=parents,
                series=draft.series,
                max_bytes=manifest.packet_max_bytes,
            )
        except PacketError as exc:
            if exc.reason != "too_large" or i == len(shapes) - 1:
                raise
            continue
        break
    await service.node.put_packet(packet)
    service.synthesised += 1


async def run_synthesis(
    config: Config,
    service: NodeService,
    *,
    task_status: trio.TaskStatus[trio.MemorySendChannel[Delivery]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start the worker; ``started`` with the channel deliveries are sent into."""
    send, receive = trio.open_memory_channel[Delivery](config.synthesis.channel_size)
    if not config.synthesis.enabled:
        task_status.started(send)
        async for _ in receive:  # disabled: drain so the pump never counts misses
            pass
        return
    settings = SynthesizerSettings.from_config(
        config.synthesis, service.manifest, salt=service.ident.public_key
    )
    synthesizer = load_synthesizer(config.synthesis.synthesizer, settings)
    state = WorkerState()
    service.worker_state = state

    swarm = service.manifest.swarm_id

    def catch_up() -> Any:
        return of_swarm(swarm, service.store.iter_packets(now_ms=wall_ms()))

    def resume() -> list[OutcomePacket]:
        own = service.store.own_packets(wall_ms())
        return [p for p, _ in own if p.kind == KIND_SYNTHESIS and p.swarm == swarm]

    async def settle() -> None:
        # Saved contacts checked again, and the first join through bootstrap peers.
        await service.node.rejoined.wait()
        await service.joined.wait()

    async def publish(draft: SynthesisDraft) -> None:
        await publish_draft(service, draft)

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_worker(
                receive,
                synthesizer,
                is_primary=lambda p: is_primary(service, p),
                publish=publish,
                catch_up=catch_up,
                resume=resume,
                settle=settle,
                interval=max(0.05, config.synthesis.interval),
                state=state,
                task_status=task_status,
            )
        )
        task_status.started(send)
