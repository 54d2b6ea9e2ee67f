"""Local watch subscriptions: fan packets of a topic out to the control clients
watching it.

The daemon feeds :meth:`WatchHub.publish` with every packet it emits, stores as a
responsible node, or receives through a DHT listen registration; each subscriber gets
each packet once (deduplicated by id, bounded). A slow watcher's buffer fills and it
misses packets rather than slowing the node down; what it missed is counted, in
total and per watcher, and the watcher is told with its next event
(:meth:`Subscription.take_missed`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from qisd.packet import OutcomePacket

_SEEN_CAP = 4096


@dataclass(eq=False)
class _Subscriber:
    topic: str
    send: trio.MemorySendChannel[OutcomePacket]
    seen: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    dropped: int = 0
    #: Of ``dropped``, how many the watcher has been told of.
    reported: int = 0


@dataclass(eq=False)
class Subscription:
    """One watcher's packets, and how many it missed since it was last told."""

    receive: trio.MemoryReceiveChannel[OutcomePacket]
    _sub: _Subscriber

    def take_missed(self) -> int:
        missed = self._sub.dropped - self._sub.reported
        self._sub.reported = self._sub.dropped
        return missed


class WatchHub:
    def __init__(self, *, buffer: int = 256) -> None:
        self._subs: set[_Subscriber] = set()
        self._buffer = buffer
        self.published = 0
        self.dropped = 0

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def topics(self) -> set[str]:
        return {s.topic for s in self._subs}

    def publish(self, packet: OutcomePacket) -> None:
        self.published += 1
        for sub in list(self._subs):
            if sub.topic != packet.topic or packet.id in sub.seen:
                continue
            sub.seen[packet.id] = None
            if len(sub.seen) > _SEEN_CAP:
                sub.seen.popitem(last=False)
            try:
                sub.send.send_nowait(packet)
            except trio.WouldBlock:
                sub.dropped += 1
                self.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subs.discard(sub)

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Subscription]:
        send, receive = trio.open_memory_channel[OutcomePacket](self._buffer)
        sub = _Subscriber(topic, send)
        self._subs.add(sub)
        try:
            async with receive:
                yield Subscription(receive, sub)
        finally:
            self._subs.discard(sub)
            send.close()
