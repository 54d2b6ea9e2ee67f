"""Stopping the control server gracefully (SIGTERM): take no new connections or
requests, let the requests in flight finish and be answered, close the rest.

A connection waiting for its next request line is closed at once; one whose request
is being handled (an ``emit`` placing its packet) is left to write its reply and is
closed after it; a ``watch`` stream is stopped and left to write a last line saying
why, then closed. :meth:`Drain.wait` returns when no request
is in flight; the daemon bounds that wait by its grace period and then cancels
whatever is left.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class Slot:
    """One connection's part in a drain: its cancel scope and whether it is busy."""

    __slots__ = ("busy", "scope", "stream")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.busy = False
        #: The scope a stream (a watch) runs in while one runs on this connection.
        self.stream: trio.CancelScope | None = None


class Drain:
    def __init__(self) -> None:
        #: True once the drain began: no new request is taken.
        self.started = False
        #: Cancelled when the drain begins: the accept loop runs inside it.
        self.accepting = trio.CancelScope()
        self._slots: set[Slot] = set()
        self._idle = trio.Event()

    @contextmanager
    def connection(self) -> Iterator[Slot]:
        """Register a connection for the time it is open; run its handling inside
        ``slot.scope``."""
        slot = Slot()
        if self.started:
            slot.scope.cancel()
        self._slots.add(slot)
        try:
            yield slot
        finally:
            self._slots.discard(slot)
            self._check()

    @contextmanager
    def request(self, slot: Slot) -> Iterator[None]:
        """A request being handled and answered on ``slot``'s connection."""
        slot.busy = True
        try:
            yield
        finally:
            slot.busy = False
            self._check()

    @contextmanager
    def streaming(self, slot: Slot) -> Iterator[trio.CancelScope]:
        """Run a stream (a watch) on ``slot``'s connection inside the scope yielded.
        A drain cancels that scope instead of the connection's, and counts the
        connection busy until this block is left, so the stream can end with a last
        line saying why; then the connection is closed."""
        slot.stream = trio.CancelScope()
        if self.started:
            slot.stream.cancel()
        try:
            yield slot.stream
        finally:
            slot.stream = None
            slot.busy = False
            if self.started:
                slot.scope.cancel()
            self._check()

    def begun(self) -> bool:
        """Whether the drain began (a method: it changes across awaits)."""
        return self.started

    def begin(self) -> None:
        self.started = True
        self.accepting.cancel()
        for slot in self._slots:
            if slot.stream is not None:
                slot.busy = True  # until it has said why it ends (see streaming)
                slot.stream.cancel()
            elif not slot.busy:
                slot.scope.cancel()
        self._check()

    async def wait(self) -> None:
        """Until no request is in flight (after :meth:`begin`)."""
        await self._idle.wait()

    def _check(self) -> None:
        if self.started and not any(slot.busy for slot in self._slots):
            self._idle.set()
