"""The trio drivers of iterative lookups (paper 2.3).

Both keep up to ``alpha`` requests in flight: as soon as one answers, the next
closest unqueried node is asked, so one slow peer holds up one slot, not a whole
round. Both stop when the lookup state is done, or as soon as ``on_reply`` returns
True (FIND_VALUE stops at the first value).

- :func:`iterate` takes an injected ``find(node)`` coroutine that may do anything
  (several RPCs, retries, a thread hop) and returns a :class:`Reply` (closer nodes
  plus whatever else the answer carried) or None when the node failed; each runs
  as its own task in a nursery.
- :func:`iterate_calls` is for lookups whose every step is one RPC (FIND_NODE,
  FIND_VALUE, a store that names closer nodes): ``request(node)`` says what to send
  and ``parse`` reads the answer, and all requests go through one
  :class:`~qisd.dht.calls.PeerCalls` from the lookup's own task, with no task or
  timer per request.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

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
#: What to ask a node: (rpc name, args, evict the node if it stays silent), or None
#: to count it as failed without asking.
RequestFn = Callable[[Node], tuple[str, list[Any], bool] | None]
#: A node's answer to the named rpc as a Reply, or None if it is not a valid one.
ParseFn = Callable[[Node, str, Any], Reply | None]


class Calls(Protocol):
    """Requests to contacts, answers taken one at a time (:class:`~qisd.dht.calls.PeerCalls`)."""

    async def send(self, peer: Node, name: str, args: list[Any], *, evict: bool = True) -> None: ...

    async def next(self) -> tuple[Node, str, bool, Any] | None: ...

    def close(self) -> None: ...


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


async def iterate_calls(
    state: LookupState,
    calls: Calls,
    request: RequestFn,
    parse: ParseFn,
    *,
    alpha: int,
    on_reply: ReplyFn | None = None,
    widen: bool = False,
) -> LookupStats:
    """Run ``state`` to completion with one RPC per step, sent through ``calls``.

    With ``widen``, once a node answers that it knows no node the lookup has not
    heard of, the rest of the ``width`` closest are asked all at once.

    Requests still in flight when the lookup ends are forgotten (their answers,
    if they come, are dropped and counted by the transport).
    """
    started = trio.current_time()
    try:
        while True:
            for node in state.next_batch(alpha - state.in_flight):
                what = request(node)
                if what is None:
                    state.failed(node)
                else:
                    name, args, evict = what
                    await calls.send(node, name, args, evict=evict)
            if state.done or state.in_flight == 0:
                break
            outcome = await calls.next()
            if outcome is None:  # defensive: the state and the calls disagree
                break
            node, name, ok, result = outcome
            reply = parse(node, name, result) if ok else None
            if reply is None:
                state.failed(node)
                continue
            state.answered(node, reply.nodes)
            if widen and not reply.nodes:
                alpha = state.width
            if on_reply is not None and on_reply(node, reply):
                break
    finally:
        calls.close()
    return LookupStats(
        hops=state.max_hop,
        rpcs=state.rpcs,
        failures=state.failures,
        seconds=trio.current_time() - started,
    )
