"""Why a bootstrap peer is of no use, in words an operator can act on (trio).

Joining through a peer that runs another swarm fails quietly otherwise: an open
swarm's node answers pings and enters the routing table, and then refuses every
packet as ``wrong_swarm``; a closed swarm's node answers nothing but ``hello`` to a
node it has not admitted, which looks like a dead address. ``hello`` (which any qisd
node answers, in any swarm) tells them apart: the answer is a signature over a
message that includes the prover's swarm id (:mod:`qisd.dht.hello`), so it verifies
against this node's swarm id only if both run the same manifest. A stock
``kademlia`` node does not answer ``hello``; nothing is said about it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import trio
from kademlia.node import Node

from qisd.dht.hello import NONCE_BYTES, node_id_of, proof_shaped, signed_for
from qisd.dht.wire import Address

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

OTHER_SWARM = (
    "a qisd node of another swarm: its manifest differs from this node's "
    "(compare `qisd status --json` field swarm on both hosts)"
)
NOT_ADMITTED = (
    "it answers only hello: it has not admitted this node (a closed swarm "
    "still checking this node's key, or one that refused it)"
)
SILENT_TO_PING = "it answers hello but not ping (overloaded, or rate limiting this address)"
ID_MISMATCH = "its hello proof is for a key whose SHA-1 is not the node id it claims"


async def swarm_problem(node: DHTNode, addr: Address) -> tuple[Node | None, str | None]:
    """Ping ``addr`` and, at the same time, ask it ``hello``: the node there (None if
    it did not answer the ping), and what is wrong with joining through it (None
    if nothing is known to be). Both at once, so a stock node (which never answers
    ``hello``) or a dead address costs one timeout, not two."""
    nonce = os.urandom(NONCE_BYTES)
    peer: Node | None = None
    answer: Any = None

    async def ping() -> None:
        nonlocal peer
        peer = await node.ping(addr)

    async def hello() -> None:
        nonlocal answer
        ok, result = await node.transport.call(addr, "hello", [node.me.id, nonce])
        answer = result if ok else None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ping)
        nursery.start_soon(hello)
    return peer, judge(node, answer, nonce, peer.id if peer is not None else None)


def judge(node: DHTNode, answer: Any, nonce: bytes, peer_id: bytes | None) -> str | None:
    """What a ``hello`` answer says about joining (see :func:`swarm_problem`)."""
    if not proof_shaped(answer):
        return None  # a stock node, or down: the ping says which
    public_key, signature = answer
    prover = node_id_of(public_key)
    if peer_id is not None and prover != peer_id:
        return ID_MISMATCH
    if not signed_for(public_key, signature, node.manifest.swarm_id, node.me.id, nonce, prover):
        return OTHER_SWARM
    if peer_id is not None:
        return None
    return NOT_ADMITTED if node.manifest.membership != "open" else SILENT_TO_PING
