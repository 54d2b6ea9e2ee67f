"""``watch`` on the control socket: the connection becomes a stream of events.

The ack and the events are written by one task (the watch stream lives entirely in
it, so its own cancel scopes nest properly); another reads the client's side until
it closes (which ends the watch) and answers any further request with an error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from qisd.control.api import ControlAPI, JSONDict, WatchStream
from qisd.control.connection import Connection
from qisd.control.drain import Drain, Slot
from qisd.control.errors import ControlError
from qisd.control.framing import LineSplitter, Overflow
from qisd.control.protocol import (
    BAD_REQUEST,
    INTERNAL,
    UNAVAILABLE,
    Request,
    encode_error,
    encode_event,
    encode_result,
    parse_request,
)
from qisd.control.stats import ControlStats
from qisd.logs import get_logger

log = get_logger(__name__)


@asynccontextmanager
async def _entered(stream: WatchStream) -> AsyncIterator[AsyncIterator[JSONDict]]:
    """Use either shape of watch stream; always close what was opened."""
    if isinstance(stream, AbstractAsyncContextManager):
        async with stream as events:
            yield events
        return
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


class Watches:
    """Runs watches for a server: its API, its request statistics, and its reply
    to an over-long line."""

    def __init__(self, api: ControlAPI, stats: ControlStats, too_large: Callable[[], bytes],
                 drain: Drain) -> None:
        self.api = api
        self.stats = stats
        self.too_large = too_large
        self.drain = drain

    async def run(self, conn: Connection, slot: Slot, req: Request,
                  splitter: LineSplitter) -> bool:
        """Run a watch on this connection; False if it was refused before its ack
        (the connection then takes requests again), True once it ran and ended."""
        began = trio.Event()
        ran: list[bool] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._input, conn, splitter, nursery.cancel_scope, began)
            with self.drain.streaming(slot) as stream:
                await self._output(conn, req, stream, began, ran)
            nursery.cancel_scope.cancel()
        return bool(ran)

    async def _output(
        self, conn: Connection, req: Request, stream: trio.CancelScope, began: trio.Event,
        ran: list[bool],
    ) -> None:
        """Ack, then one line per event, until the stream ends, fails, the client
        stops reading, or the daemon stops (``stream`` cancelled by its drain). The
        watch stream lives entirely in this task, so its own cancel scopes (an async
        generator's nursery) nest properly."""
        acked = False
        failure: ControlError | None = None
        # A line that may be cut off part-way (its write stopped by the drain, or
        # past the write deadline): no last line may follow it.
        cut = False

        async def send(line: bytes) -> bool:
            nonlocal cut
            cut = True
            sent = await conn.send(line)
            cut = not sent
            return sent

        with stream:
            try:
                async with _entered(self.api.watch(**req.params)) as events:
                    acked = await send(encode_result(req.id, {"watching": req.params["topic"]}))
                    ran.append(True)  # acked, or the client is gone: either way it is over
                    began.set()
                    if acked:
                        self.stats.record(req.method, "ok")
                        async for event in events:
                            if not await send(encode_event(req.id, event)):
                                break
                        else:  # the stream ended: say so, or the client takes it for a cut
                            await send(encode_result(req.id, {"ended": True}))
            except ControlError as exc:
                failure = exc
            except Exception as exc:
                log.exception("control watch failed", topic=req.params["topic"])
                failure = ControlError(INTERNAL, f"watch failed: {type(exc).__name__}: {exc}")
        if cut:
            return  # the client sees the connection cut, as it was
        if stream.cancelled_caught:
            failure = ControlError(UNAVAILABLE, "the daemon is stopping; the watch ends here"
                                   if acked else "the daemon is stopping; the watch was not run")
        if failure is not None:
            if not acked:
                self.stats.record(req.method, failure.code)
            if not await conn.send(encode_error(req.id, failure.code, failure.message)):
                ran.append(True)  # the client is gone

    async def _input(
        self, conn: Connection, splitter: LineSplitter, done: trio.CancelScope,
        began: trio.Event,
    ) -> None:
        """Once the watch is acknowledged (replies stay in request order), read until
        the client closes (that ends the watch); answer any further request with an
        error instead of dropping it."""
        await began.wait()
        while (item := await conn.next_line(splitter)) is not None:
            if item is Overflow.TOO_LONG:
                reply = self.too_large()
            else:
                decision = parse_request(item)
                rid = decision.id
                self.stats.record(decision.method, BAD_REQUEST)
                reply = encode_error(
                    rid, BAD_REQUEST,
                    "this connection is watching; send other requests on another connection",
                )
            if not await conn.send(reply):
                break
        done.cancel()
