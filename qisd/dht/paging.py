"""Packet batches and replies that fit one datagram, and packet checks (pure).

A ``store_packets``/``notify`` request carries as many encoded packets as fit under
:data:`~qisd.dht.wire.MAX_PAYLOAD` next to the RPC name and ids; a ``find_packets``
reply carries the closer nodes plus as many of the best packets as fit, and says
``more`` when the caller should ask for the next page (``offset``). A
``find_packet_ids`` reply carries ids and similarities instead (always fits), and a
``get_packets`` reply as many of the asked packets as fit, ``more`` when some were
left for the next call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qisd.dht.wire import MAX_PAYLOAD, pack
from qisd.manifest import Manifest
from qisd.packet import OutcomePacket, PacketError, check_admissible, decode_packet

#: Bytes kept free for the RPC name, ids, headers and a reply's other fields.
ENVELOPE = 160
#: Most packets one request or reply may carry (also the wire cap on ``limit``).
MAX_BATCH = 64


def _item_bytes(data: bytes) -> int:
    # msgpack bin8/bin16 header (2-3 bytes) + payload.
    return len(data) + 3


def batches(items: Sequence[bytes], *, budget: int = MAX_PAYLOAD - ENVELOPE) -> list[list[bytes]]:
    """Split encoded packets into lists that each fit ``budget`` bytes."""
    out: list[list[bytes]] = []
    current: list[bytes] = []
    used = 0
    for data in items:
        size = _item_bytes(data)
        if current and (used + size > budget or len(current) == MAX_BATCH):
            out.append(current)
            current, used = [], 0
        current.append(data)
        used += size
    if current:
        out.append(current)
    return out


def find_reply(
    nodes: list[list[Any]], top: Sequence[tuple[float, OutcomePacket]], limit: int
) -> dict[str, Any]:
    """A ``find_packets`` reply: ``nodes``, the best packets that fit, their sims, ``more``.

    ``top`` may hold one entry beyond ``limit``: its presence means there is more.
    """
    budget = MAX_PAYLOAD - ENVELOPE - len(pack(nodes))
    packets: list[bytes] = []
    sims: list[float] = []
    for sim, packet in top[:limit]:
        size = _item_bytes(packet.encoded) + 9  # + a float64 similarity
        if size > budget:
            break
        budget -= size
        packets.append(packet.encoded)
        sims.append(float(sim))
    more = len(top) > len(packets)
    return {"nodes": nodes, "packets": packets, "sims": sims, "more": more}


def find_ids_reply(
    nodes: list[list[Any]], top: Sequence[tuple[float, bytes]], limit: int
) -> dict[str, Any]:
    """A ``find_packet_ids`` reply: ``nodes``, the best ``limit`` packet ids and their
    sims, ``more``. ``top`` may hold one entry beyond ``limit``: there is more.
    (64 ids and sims are ~1.7 KB: with 20 nodes it always fits one datagram.)"""
    chosen = top[:limit]
    return {
        "nodes": nodes,
        "ids": [pid for _, pid in chosen],
        "sims": [float(sim) for sim, _ in chosen],
        "more": len(top) > limit,
    }


def get_reply(raws: Sequence[bytes]) -> dict[str, Any]:
    """A ``get_packets`` reply: the packets in the order asked, as many as fit;
    ``more`` when the rest did not (the caller asks again for those)."""
    budget = MAX_PAYLOAD - ENVELOPE
    packets: list[bytes] = []
    for data in raws:
        size = _item_bytes(data)
        if size > budget:
            break
        budget -= size
        packets.append(data)
    return {"packets": packets, "more": len(packets) < len(raws)}


def verify_all(
    raws: Sequence[bytes], manifest: Manifest, *, now_ms: int
) -> list[OutcomePacket | PacketError]:
    """Decode, verify and admit each packet; failures come back as the error."""
    out: list[OutcomePacket | PacketError] = []
    for raw in raws:
        try:
            packet = decode_packet(raw, max_bytes=manifest.packet_max_bytes)
            check_admissible(packet, manifest, now_ms=now_ms)
        except PacketError as exc:
            out.append(exc)
        else:
            out.append(packet)
    return out
