"""Shared helpers of the security tests: closed manifests, nodes on 127.0.0.1, crafted
packets, and a raw UDP peer that speaks the wire by hand (so client-side checks are
bypassed) and can answer ``hello`` honestly or not."""

from __future__ import annotations

import os
import random
import socket as stdsocket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import trio

from qisd.dht import DHTConfig, DHTNode, open_node
from qisd.dht.hello import prove
from qisd.identity import Identity
from qisd.manifest import Manifest
from qisd.packet import KIND_OBSERVATION, OutcomePacket, create_packet
from qisd.sketch import make_sketch
from qisd.store import PacketStore

DIM = 16
KEY = bytes(range(20))


def closed_manifest(members: list[Identity], **fields: Any) -> Manifest:
    """A closed swarm of ``members``, signed by a creator key of its own."""
    creator = Identity.generate()
    fields.setdefault("name", "sec-closed")
    unsigned = Manifest(
        membership="closed", members=tuple(m.public_key for m in members), **fields
    )
    return unsigned.signed(creator.signing_key)


def vector(rng: random.Random, dim: int = DIM) -> list[float]:
    return [rng.gauss(0, 1) for _ in range(dim)]


def packet(
    identity: Identity,
    manifest: Manifest,
    rng: random.Random,
    *,
    swarm: bytes | None = None,
    created_ms: int | None = None,
    ttl_s: int = 3600,
    kind: str = KIND_OBSERVATION,
    generation: int | None = None,
    outcome: dict[str, Any] | None = None,
    vec: list[float] | None = None,
) -> OutcomePacket:
    return create_packet(
        identity.signing_key,
        swarm=manifest.swarm_id if swarm is None else swarm,
        topic="t",
        sketch=make_sketch(np.asarray(vec if vec is not None else vector(rng))),
        outcome=outcome or {"ok": rng.random() < 0.5, "score": rng.random()},
        ttl_s=ttl_s,
        kind=kind,
        generation=generation,
        created_ms=created_ms,
        max_bytes=4096,
    )


def now_ms() -> int:
    return int(time.time() * 1000)


def tamper_signature(encoded: bytes) -> bytes:
    """The same packet with one bit of its signature (the last 64 bytes) flipped."""
    return encoded[:-1] + bytes([encoded[-1] ^ 0x01])


async def eventually(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - polling state other tasks own
            await trio.sleep(0.02)


@asynccontextmanager
async def running_node(
    identity: Identity,
    manifest: Manifest,
    tmp: Path | None,
    *,
    config: DHTConfig | None = None,
    store_options: dict[str, Any] | None = None,
) -> AsyncIterator[DHTNode]:
    """A node on 127.0.0.1 (port 0) with a SQLite store under ``tmp`` (None: storeless)."""
    async with AsyncExitStack() as stack:
        store = None
        if tmp is not None:
            await trio.Path(tmp).mkdir(parents=True, exist_ok=True)
            store = PacketStore.open(tmp / "packets.sqlite", **(store_options or {}))
            stack.callback(store.close)
        node = await stack.enter_async_context(
            open_node(identity, manifest, store, host="127.0.0.1", config=config, state_dir=tmp)
        )
        yield node


Prover = Callable[[bytes, bytes], Any]


class RawPeer:
    """A hand-driven UDP peer: sends requests, matches replies, answers ``hello`` with
    ``prover(verifier_id, nonce)`` (None: stays silent) after ``hello_delay`` seconds
    (the peer reads nothing meanwhile), records other requests."""

    def __init__(self, sock: trio.socket.SocketType, node_id: bytes, prover: Prover | None):
        self.sock = sock
        self.id = node_id
        self.prover = prover
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self.requests: list[tuple[str, list[Any]]] = []
        #: Every request heard, ``hello`` included.
        self.heard = 0
        #: Canned results for other methods (by name).
        self.replies: dict[str, Any] = {}
        self.hello_delay = 0.0
        self._pending: dict[bytes, tuple[trio.Event, list[Any]]] = {}

    async def serve(self) -> None:
        while True:
            data, addr = await self.sock.recvfrom(65536)
            kind, msgid, body = data[0], data[1:21], data[21:]
            obj = msgpack.unpackb(body, raw=False)
            if kind == 1:
                waiting = self._pending.get(msgid)
                if waiting is not None:
                    waiting[1].append(obj)
                    waiting[0].set()
                continue
            name, args = obj
            self.heard += 1
            if name == "hello":
                if self.prover is not None:
                    answer = self.prover(args[0], args[1])
                    if self.hello_delay:
                        await trio.sleep(self.hello_delay)
                    await self._reply(msgid, answer, addr)
                continue
            self.requests.append((name, args))
            if name == "notify":
                await self._reply(msgid, ["accepted"] * len(args[2]), addr)
            elif name == "ping":
                await self._reply(msgid, self.id, addr)
            elif name in self.replies:
                await self._reply(msgid, self.replies[name], addr)

    async def _reply(self, msgid: bytes, result: Any, addr: Any) -> None:
        await self.sock.sendto(b"\x01" + msgid + msgpack.packb(result, use_bin_type=True), addr)

    async def send(self, data: bytes, addr: tuple[str, int]) -> None:
        await self.sock.sendto(data, addr)

    async def call(
        self, addr: tuple[str, int], name: str, args: list[Any], *, wait: float = 3.0
    ) -> tuple[bool, Any]:
        msgid = os.urandom(20)
        event, box = trio.Event(), []
        self._pending[msgid] = (event, box)
        try:
            await self.send(request(name, args, msgid), addr)
            with trio.move_on_after(wait):
                await event.wait()
        finally:
            del self._pending[msgid]
        return (True, box[0]) if box else (False, None)


def request(name: str, args: list[Any], msgid: bytes | None = None) -> bytes:
    body = msgpack.packb([name, args], use_bin_type=True)
    return b"\x00" + (msgid or os.urandom(20)) + body


def honest_prover(identity: Identity, manifest: Manifest) -> Prover:
    def answer(verifier: bytes, nonce: bytes) -> Any:
        return prove(identity.signing_key, manifest.swarm_id, verifier, nonce).to_wire()

    return answer


@asynccontextmanager
async def raw_peer(
    node_id: bytes | None = None, prover: Prover | None = None
) -> AsyncIterator[RawPeer]:
    sock = trio.socket.socket(stdsocket.AF_INET, stdsocket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        peer = RawPeer(sock, node_id or os.urandom(20), prover)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.serve)
            yield peer
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def member_peer(identity: Identity, manifest: Manifest) -> AsyncIterator[RawPeer]:
    """A raw peer that holds a member key and proves it when asked."""
    async with raw_peer(identity.node_id, honest_prover(identity, manifest)) as peer:
        yield peer


def table_ids(node: DHTNode) -> set[bytes]:
    return {c.id for c in node.table.contacts()}
