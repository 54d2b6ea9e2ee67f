"""Many requests in flight for one task, with no task or timer per request (trio).

A lookup asks up to alpha nodes at once and a ``set`` stores at k; starting a task
with its own cancel scope and event for every request costs more CPU than the
request itself (the receive loop, the encoder and the socket together cost less).
A :class:`CallGroup` instead sends from the task that will wait: the transport's
receive loop queues each answer on the group (:meth:`CallGroup.on_reply`) and wakes
that one task, which takes the answers one at a time with :meth:`CallGroup.next`.
Requests of a group share one timeout, so their deadlines come in sending order and
the earliest one is always at the head of a queue. Unanswered requests are sent
again by the same task (:mod:`qisd.dht.resend`): their resend times wait in a heap,
and the task wakes for the earliest only if no answer woke it first.

:class:`PeerCalls` addresses a group by contact and keeps the node's books the
way :meth:`qisd.dht.node.DHTNode.call` does: a peer that failed lately fails again
at once (not asked, so not counted against it again), an answer welcomes the peer
into the routing table (paper 2.2), silence puts it in backoff and, unless the
request said otherwise, counts against it in the table (paper 4.1).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import trio
from kademlia.node import Node

from qisd.dht.transport import Outgoing, Transport
from qisd.dht.wire import Address

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

T = TypeVar("T")


class CallGroup(Generic[T]):
    """Requests tagged with a ``T``; answers come back as ``(tag, ok, result)``."""

    def __init__(self, transport: Transport, *, timeout: float | None = None) -> None:
        self.transport = transport
        self.timeout = transport.timeout if timeout is None else timeout
        #: (deadline, call) in sending order, which is deadline order.
        self._sent: deque[tuple[float, Outgoing]] = deque()
        self._ready: deque[tuple[T, bool, Any]] = deque()
        #: (resend time, order, call) of requests that may be sent again.
        self._again: list[tuple[float, int, Outgoing]] = []
        self._order = itertools.count()
        self._open = 0
        self._task: trio.lowlevel.Task | None = None

    @property
    def in_flight(self) -> int:
        """Requests whose outcome :meth:`next` has not returned yet."""
        return self._open

    async def send(self, addr: Address, name: str, args: list[Any], tag: T) -> None:
        """Send a request; its outcome comes out of :meth:`next` (a failed send at once)."""
        self._open += 1
        call = await self.transport.open_call(addr, name, args, self, tag, wait=self.timeout)
        if call is None:
            self._ready.append((tag, False, None))
        else:
            self._sent.append((call.started + self.timeout, call))
            if call.again is not None:
                heapq.heappush(self._again, (call.again, next(self._order), call))

    def settle(self, tag: T, ok: bool, result: Any = None) -> None:
        """An outcome known without asking (e.g. a peer in failure backoff)."""
        self._open += 1
        self._ready.append((tag, ok, result))

    def on_reply(self, call: Outgoing) -> None:
        """The transport's receive loop: ``call`` got its answer."""
        self._ready.append((call.tag, call.ok, call.result))
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def next(self) -> tuple[T, bool, Any] | None:
        """The next outcome ``(tag, ok, result)``; None once nothing is in flight.

        A request unanswered after the group's timeout comes out as ``(tag, False,
        None)`` (counted by the transport as a timeout).
        """
        while True:
            if self._ready:
                self._open -= 1
                return self._ready.popleft()
            sent = self._sent
            while sent and sent[0][1].done:
                sent.popleft()
            if not sent:
                return None
            deadline, call = sent[0]
            now = trio.current_time()
            if now >= deadline:
                sent.popleft()
                self.transport.expire(call)
                self._open -= 1
                return call.tag, False, None
            wake = deadline
            again = self._again
            while again and again[0][2].done:
                heapq.heappop(again)
            if again:
                if again[0][0] <= now:
                    await self._resend_due(now)
                    continue
                wake = min(wake, again[0][0])
            with trio.move_on_at(wake):
                self._task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort)

    async def _resend_due(self, now: float) -> None:
        again = self._again
        while again and again[0][0] <= now:
            _, _, call = heapq.heappop(again)
            if call.done:
                continue
            await self.transport.resend(call)
            if call.again is not None and not call.done:
                heapq.heappush(again, (call.again, next(self._order), call))

    def _abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def close(self) -> None:
        """Forget every request still unanswered (late answers are dropped, counted)."""
        for _, call in self._sent:
            self.transport.abandon(call)
        self._sent.clear()
        self._again.clear()
        self._ready.clear()
        self._open = 0


class PeerCalls:
    """A :class:`CallGroup` to contacts, keeping the node's books on each outcome.

    :meth:`next` returns ``(peer, name, ok, result)``. Use as a context manager so
    requests still in flight are forgotten however the caller leaves.
    """

    def __init__(self, node: DHTNode, *, timeout: float | None = None) -> None:
        self.node = node
        self.group: CallGroup[tuple[Node, str, bool, bool]] = CallGroup(
            node.transport, timeout=timeout
        )

    def __enter__(self) -> PeerCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.group.close()

    @property
    def in_flight(self) -> int:
        return self.group.in_flight

    async def send(self, peer: Node, name: str, args: list[Any], *, evict: bool = True) -> None:
        """Ask ``peer``; silence counts against it in the routing table if ``evict``."""
        addr = (peer.ip, peer.port)
        if self.node.failed_peers.has(addr, trio.current_time()):
            self.group.settle((peer, name, evict, False), False)
        else:
            await self.group.send(addr, name, args, (peer, name, evict, True))

    async def next(self) -> tuple[Node, str, bool, Any] | None:
        item = await self.group.next()
        if item is None:
            return None
        (peer, name, evict, sent), ok, result = item
        node = self.node
        if ok:
            node.welcome(peer)
        else:
            # A request skipped for backoff was never sent: it says nothing new.
            if sent:
                node.failed_peers.add((peer.ip, peer.port), trio.current_time())
                if evict:
                    node.table.contact_failed(peer)
        return peer, name, ok, result

    def close(self) -> None:
        self.group.close()
