"""One control-socket client connection: whole-line writes with a deadline, line reads
that end quietly when the peer goes, and a gentle close."""

from __future__ import annotations

import trio

from qisd.control.framing import LineSplitter, Overflow

READ_CHUNK = 64 * 1024


async def end_gently(
    stream: trio.SocketStream, linger: float = 1.0, max_bytes: int | None = None
) -> None:
    """End our side, then read (and drop) what the peer still sends, for at most
    ``linger`` seconds (and ``max_bytes``): closing with its request unread would
    reset the connection, and the peer might never read the reply it was sent."""
    left = max_bytes
    with trio.move_on_after(linger):
        try:
            await stream.send_eof()
            while left is None or left > 0:
                chunk = await stream.receive_some(READ_CHUNK if left is None
                                                  else min(left, READ_CHUNK))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


class Connection:
    """One client: the stream plus a lock so watch events and error replies written
    by two tasks never interleave within a line."""

    def __init__(self, stream: trio.SocketStream, write_timeout: float) -> None:
        self.stream = stream
        self._lock = trio.Lock()
        self._write_timeout = write_timeout

    async def send(self, data: bytes) -> bool:
        """Write one line; False if the peer is gone or did not read in time (the
        caller then closes the connection)."""
        with trio.move_on_after(self._write_timeout):
            try:
                async with self._lock:
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            return True
        return False

    async def close_gently(self, linger: float = 1.0) -> None:
        """See :func:`end_gently`."""
        await end_gently(self.stream, linger)

    async def receive(self) -> bytes:
        """Some bytes, or b"" at end of stream (or if the peer reset it)."""
        try:
            return await self.stream.receive_some(READ_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def next_line(self, splitter: LineSplitter) -> bytes | Overflow | None:
        """The next non-blank line read through ``splitter`` (or TOO_LONG for one over
        its bound); None once the peer has closed. Blank lines (a person pressing
        enter) carry no request and are skipped."""
        while True:
            item = splitter.next()
            if item is None:
                data = await self.receive()
                if not data:
                    return None
                splitter.feed(data)
            elif item is Overflow.TOO_LONG or item.strip():
                return item
