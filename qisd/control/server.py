"""The control socket server (trio): one task per connection, replies in order.

Framing, parsing and param checks live in :mod:`qisd.control.protocol`; this module
only moves lines between the socket and the :class:`~qisd.control.api.ControlAPI`.
What keeps one client from hurting the others:

* every connection is its own task, reading at most ``max_request_bytes`` of a
  pending line (a longer line gets ``too_large`` and is skipped, not buffered);
* every write has a deadline (``write_timeout``): a client that stops reading its
  replies or its watch events is disconnected instead of stalling the daemon;
* at most ``max_connections`` at once; the next one gets ``unavailable`` and is closed;
* a connection with no request for ``idle_timeout`` seconds gets ``idle`` and is
  closed (a watch is not idle), so idle clients cannot hold the slots for good;
* the peer's uid/gid (``SO_PEERCRED``) must be root, ours, or in our group.

On shutdown a :class:`~qisd.control.drain.Drain` stops it taking work while the
requests in flight finish and are answered.

The socket path is claimed by :mod:`qisd.control.bind` (a live socket is refused, a
dead one replaced).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import trio

from qisd.control import peer
from qisd.control.api import ControlAPI, JSONDict
from qisd.control.bind import MAX_SOCKET_PATH_BYTES, bind_unix_socket, remove_if_ours
from qisd.control.connection import Connection
from qisd.control.drain import Drain, Slot
from qisd.control.errors import ControlError, ControlSocketError, ControlSocketInUse
from qisd.control.framing import LineSplitter, Overflow
from qisd.control.protocol import (
    DEFAULT_MAX_REQUEST_BYTES,
    FORBIDDEN,
    IDLE,
    INTERNAL,
    STREAMING_METHODS,
    TOO_LARGE,
    UNAVAILABLE,
    Rejection,
    Request,
    check_params,
    encode_error,
    encode_result,
    parse_request,
)
from qisd.control.stats import ControlStats
from qisd.control.watching import Watches
from qisd.logs import get_logger

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_WRITE_TIMEOUT",
    "MAX_SOCKET_PATH_BYTES",
    "ControlSocketError",
    "ControlSocketInUse",
    "Drain",
    "serve_control",
]

log = get_logger(__name__)

DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_WRITE_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 60.0
#: Refused connections read out before closing (so the client gets its reply) at once.
_MAX_LINGERING = 16
# Resource exhaustion on accept: wait a little and retry rather than die.
_ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def serve_control(
    path: Path,
    api: ControlAPI,
    *,
    mode: int = 0o660,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    stats: ControlStats | None = None,
    drain: Drain | None = None,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``api`` on a Unix socket at ``path`` until cancelled.

    Calls ``task_status.started(path)`` once the socket is listening with ``mode``;
    removes the socket file on exit (if it is still ours). Raises
    :class:`ControlSocketInUse` if a live daemon owns ``path`` and
    :class:`ControlSocketError` if the path cannot be used. Returns once ``drain``
    has begun and every connection has closed.
    """
    path = Path(path)
    sock = await bind_unix_socket(path, mode)
    st = os.stat(path)
    server = _Server(
        api, stats if stats is not None else ControlStats(),
        max_request_bytes=max_request_bytes, max_connections=max_connections,
        write_timeout=write_timeout, idle_timeout=idle_timeout, drain=drain or Drain(),
    )
    async with trio.open_nursery() as nursery:
        try:
            async with trio.SocketListener(sock) as listener:
                task_status.started(path)
                with server.drain.accepting:
                    await server.accept_forever(listener, nursery)
        finally:
            # Closed and gone as soon as a drain begins: a new client is told the
            # daemon is not running rather than left waiting.
            remove_if_ours(path, st)


class _Server:
    def __init__(
        self,
        api: ControlAPI,
        stats: ControlStats,
        *,
        max_request_bytes: int,
        max_connections: int,
        write_timeout: float,
        idle_timeout: float,
        drain: Drain,
    ) -> None:
        self.api = api
        self.drain = drain
        self.stats = stats
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        self.write_timeout = write_timeout
        self.idle_timeout = idle_timeout
        self._lingering = 0
        self.watches = Watches(api, stats, self._too_large, drain)
        self.uid = os.geteuid()
        self.gid = os.getegid()

    async def accept_forever(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                log.warning("control socket cannot accept", error=str(exc))
                await trio.sleep(0.1)
                continue
            if self.stats.connections_open >= self.max_connections:
                self.stats.connections_refused += 1
                nursery.start_soon(self._refuse, stream)
                continue
            self.stats.connections_open += 1
            self.stats.connections_total += 1
            nursery.start_soon(self._handle, stream)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        conn = Connection(stream, min(self.write_timeout, 1.0))
        async with stream:
            await conn.send(encode_error(
                None, UNAVAILABLE,
                f"too many control connections (at most {self.max_connections}); retry later",
            ))
            if self._lingering < _MAX_LINGERING:  # a flood is closed at once
                self._lingering += 1
                try:
                    await conn.close_gently(0.2)
                finally:
                    self._lingering -= 1

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = Connection(stream, self.write_timeout)
        try:
            async with stream:
                with self.drain.connection() as slot, slot.scope:
                    if await self._authorize(conn):
                        await self._serve(conn, slot)
        except Exception:
            # A bug met by one client's input ends that connection, never the daemon.
            log.exception("control connection failed; closed")
            self.stats.connections_failed += 1
        finally:
            self.stats.connections_open -= 1

    async def _authorize(self, conn: Connection) -> bool:
        try:
            cred = peer.read_peer_credentials(conn.stream.socket)  # type: ignore[arg-type]
        except OSError as exc:
            log.warning("control peer credentials unreadable", error=str(exc))
            return await self._forbid(conn, "the peer's credentials cannot be read")
        groups: list[int] = []
        if peer.needs_group_lookup(cred, daemon_uid=self.uid, daemon_gid=self.gid):
            groups = peer.read_peer_groups(conn.stream.socket)  # type: ignore[arg-type]
            if self.gid not in groups:  # not in the kernel's record (or none): the database
                groups = await trio.to_thread.run_sync(peer.groups_of_uid, cred.uid)
        if peer.peer_allowed(cred, daemon_uid=self.uid, daemon_gid=self.gid,
                             peer_groups=groups):
            return True
        return await self._forbid(conn, f"uid {cred.uid} (gid {cred.gid}) may not use it")

    async def _forbid(self, conn: Connection, why: str) -> bool:
        self.stats.connections_forbidden += 1
        allowed = await trio.to_thread.run_sync(peer.describe_policy, self.uid, self.gid)
        await conn.send(encode_error(
            None, FORBIDDEN, f"this control socket is for {allowed}; {why}"
        ))
        await conn.close_gently()
        return False

    async def _serve(self, conn: Connection, slot: Slot) -> None:
        splitter = LineSplitter(self.max_request_bytes)
        while True:
            with trio.move_on_after(self.idle_timeout) as idle:
                item = await conn.next_line(splitter)
            if idle.cancelled_caught:
                self.stats.connections_idle += 1
                await conn.send(encode_error(
                    None, IDLE, f"no request for {self.idle_timeout:g} s; connection closed"
                ))
                return
            if item is None:
                return
            if item is Overflow.TOO_LONG:
                reply = self._too_large()
            else:
                decision = parse_request(item)
                if isinstance(decision, Rejection):
                    reply = self._rejected(decision)
                elif self.drain.begun():
                    # Read just as the drain began: not started, so say so.
                    await self._stopping(conn, decision)
                    return
                elif decision.method in STREAMING_METHODS:
                    if await self.watches.run(conn, slot, decision, splitter):
                        return
                    continue  # refused before it began: the connection goes on
                else:
                    # In flight until answered: a drain lets it finish, then closes.
                    with self.drain.request(slot):
                        sent = await conn.send(await self._dispatch(decision))
                    if sent and self.drain.begun():
                        await conn.close_gently(0.5)
                    if not sent or self.drain.begun():
                        return
                    continue
            if not await conn.send(reply):
                return

    async def _stopping(self, conn: Connection, req: Request) -> None:
        self.stats.record(req.method, UNAVAILABLE)
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await conn.send(encode_error(
                req.id, UNAVAILABLE, "the daemon is stopping; the request was not run"
            ))

    def _too_large(self) -> bytes:
        self.stats.record("-", TOO_LARGE)
        return encode_error(
            None, TOO_LARGE,
            f"request line is longer than {self.max_request_bytes} bytes; it was skipped",
        )

    def _rejected(self, rejection: Rejection) -> bytes:
        self.stats.record(rejection.method, rejection.error.code)
        return encode_error(rejection.id, rejection.error.code, rejection.error.message)

    async def _dispatch(self, req: Request) -> bytes:
        try:
            if req.method == "emit_many":
                result = await self._emit_many(req.params["items"])
            else:
                result = await getattr(self.api, req.method)(**req.params)
            if not isinstance(result, dict):
                raise TypeError(f"returned {type(result).__name__}, not a dict")
            reply = encode_result(req.id, result)
        except ControlError as exc:
            self.stats.record(req.method, exc.code)
            return encode_error(req.id, exc.code, exc.message)
        except Exception as exc:
            log.exception("control request failed", method=req.method)
            self.stats.record(req.method, INTERNAL)
            return encode_error(
                req.id, INTERNAL, f"{req.method} failed: {type(exc).__name__}: {exc}"
            )
        self.stats.record(req.method, "ok")
        return reply

    async def _emit_many(self, items: list[dict[str, Any]]) -> JSONDict:
        """Check each item like emit's params; the daemon sees only the good ones and
        the results are merged back in item order."""
        results: list[Any] = []
        good: list[dict[str, Any]] = []
        slots: list[int] = []
        for i, item in enumerate(items):
            try:
                good.append(check_params("emit", item, label="field"))
            except ControlError as exc:
                results.append(
                    {"error": {"code": exc.code, "message": f"items[{i}]: {exc.message}"}}
                )
                continue
            slots.append(i)
            results.append(None)
        reply: JSONDict = {}
        if good:
            reply = await self.api.emit_many(items=good)
            got = reply.get("results") if isinstance(reply, dict) else None
            if not isinstance(got, list) or len(got) != len(good):
                count = len(got) if isinstance(got, list) else "no"
                raise TypeError(f"emit_many returned {count} results for {len(good)} items")
            for slot, result in zip(slots, got, strict=True):
                error = result.get("error") if isinstance(result, dict) else None
                if isinstance(error, dict) and isinstance(error.get("message"), str):
                    # Named by its place in the request, like the items refused above.
                    error = {**error, "message": f"items[{slot}]: {error['message']}"}
                    result = {**result, "error": error}
                results[slot] = result
        return {**reply, "results": results}
