"""How a draft becomes a packet: one too large for the swarm's cap is made smaller
(its listed parents as a digest, then a 4-bit sketch) instead of never published."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from synth_helpers import KEYS, direction, obs

from qisd.daemon.synth import of_swarm, publish_draft
from qisd.manifest import DEFAULT_MANIFEST, Manifest
from qisd.packet import OutcomePacket, PacketError, create_packet, decode_packet
from qisd.synthesis import SynthesisDraft
from qisd.synthesis.base import bounded_parents


@dataclass
class _Ident:
    signing_key: Any = KEYS[5]


@dataclass
class _Node:
    put: list[OutcomePacket] = field(default_factory=list)

    async def put_packet(self, packet: OutcomePacket) -> None:
        self.put.append(packet)


@dataclass
class _Service:
    """What publish_draft uses of the daemon's service."""

    manifest: Any = DEFAULT_MANIFEST
    ident: _Ident = field(default_factory=_Ident)
    node: _Node = field(default_factory=_Node)
    synthesised: int = 0


def draft(dim: int, members: int, outcome: dict[str, Any]) -> SynthesisDraft:
    ids = [bytes([i]) * 16 for i in range(members)]
    parents, digest = bounded_parents(ids, 16)
    return SynthesisDraft(
        topic="t", centroid=tuple(direction(dim, dim)), outcome=outcome, n=members,
        parents=parents, parents_digest=digest, series=b"\x07" * 16,
    )


OUTCOME = {"_packets": 14, "_origins": 2, "ok?true": 7, "ok?false": 7,
           "los.mean": 6.5, "los.sd": 4.0}


async def test_a_small_draft_is_published_as_it_is() -> None:
    service = _Service()
    d = draft(16, 14, OUTCOME)
    await publish_draft(service, d)  # type: ignore[arg-type]
    (packet,) = service.node.put
    assert packet.parents == d.parents and packet.sketch.bits == 8
    assert service.synthesised == 1


async def test_a_draft_over_the_cap_gives_up_listing_its_parents_first() -> None:
    service = _Service()
    d = draft(512, 14, OUTCOME)  # 512 bytes of sketch and 14 listed ids: over 1 KiB
    await publish_draft(service, d)  # type: ignore[arg-type]
    (packet,) = service.node.put
    assert packet.parents == bounded_parents(d.parents, 1)[0]  # one digest
    assert packet.sketch.bits == 8 and packet.series == d.series
    assert len(packet.encoded) <= DEFAULT_MANIFEST.packet_max_bytes
    assert decode_packet(packet.encoded) == packet


async def test_then_its_sketch_takes_four_bits() -> None:
    service = _Service()
    outcome = {**OUTCOME, **{f"category_{i:02d}=" + "x" * 20: 1 for i in range(10)}}
    d = draft(600, 3, outcome)
    await publish_draft(service, d)  # type: ignore[arg-type]
    (packet,) = service.node.put
    assert packet.sketch.bits == 4 and len(packet.parents) == 1
    unit = np.asarray(d.centroid)
    assert float(np.dot(packet.sketch.to_array(), unit)) > 0.99  # still its direction


async def test_a_draft_too_large_even_so_is_refused_by_name() -> None:
    service = _Service(manifest=Manifest(packet_max_bytes=512))
    with pytest.raises(PacketError, match="cap is 512"):
        await publish_draft(service, draft(1000, 20, OUTCOME))  # type: ignore[arg-type]
    assert service.node.put == [] and service.synthesised == 0


def test_the_stores_packets_of_another_swarm_are_not_synthesised() -> None:
    """A state dir used under an old manifest keeps that swarm's packets until they
    expire: the worker's re-read and resume skip them."""
    ours = obs(direction(1), {"a": 1})
    theirs = in_other_swarm(obs(direction(1), {"a": 2}))
    assert list(of_swarm(DEFAULT_MANIFEST.swarm_id, [theirs, ours, theirs])) == [ours]


def in_other_swarm(packet: OutcomePacket) -> OutcomePacket:
    return create_packet(KEYS[1], swarm=b"\x09" * 32, topic=packet.topic, sketch=packet.sketch,
                         outcome=packet.outcome, n=packet.n, ttl_s=packet.ttl_s)
