"""The trio driver of iterative lookups (paper 2.3) over an injected ``find`` coroutine.

``find(node)`` sends one FIND_NODE / FIND_VALUE / FIND_PACKETS request and returns a
:class:`Reply` (closer nodes plus whatever else the answer carried) or None when the
node failed. The driver keeps up to ``alpha`` requests in flight in a nursery: as
soon as one answers, the next closest unqueried node is asked, so one slow peer holds
up one slot, not a whole round. It stops when the lookup state is done, or as soon as
``on_reply`` returns True (FIND_VALUE stops at the first value).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from kademlia.node import Node

from qisd.dht.traverse import LookupState


@dataclass(frozen=True, slots=True)
class Reply:
    """One node's answer: the closer nodes it named and any payload (value, packets)."""

    nodes: list[Node] = field(default_factory=list)
    payload: Any = None


@dataclass(frozen=True, slots=True)
class LookupStats:
    hops: int
    rpcs: int
    failures: int
    seconds: float


FindFn = Callable[[Node], Awaitable[Reply | None]]
ReplyFn = Callable[[Node, Reply], bool]


async def iterate(
    state: LookupState,
    find: FindFn,
    *,
    alpha: int,
    on_reply: ReplyFn | None = None,
) -> LookupStats:
    """Run ``state`` to completion; ``on_reply`` may stop it early by returning True."""
    started = trio.current_time()
    send, recv = trio.open_memory_channel[tuple[Node, Reply | None]](math.inf)

    async def ask(node: Node) -> None:
        reply = await find(node)
        send.send_nowait((node, reply))

    async with trio.open_nursery() as nursery:
        while True:
            for node in state.next_batch(alpha - state.in_flight):
                nursery.start_soon(ask, node)
            if state.done or state.in_flight == 0:
                break
            node, reply = await recv.receive()
            if reply is None:
                state.failed(node)
                continue
            state.answered(node, reply.nodes)
            if on_reply is not None and on_reply(node, reply):
                break
        # Whatever is still in flight can no longer change the result.
        nursery.cancel_scope.cancel()
    return LookupStats(
        hops=state.max_hop,
        rpcs=state.rpcs,
        failures=state.failures,
        seconds=trio.current_time() - started,
    )
