"""The trio client: the same calls as :class:`qisd.Client`, awaitable.

::

    async with AsyncClient() as qis:
        pid = await qis.emit(topic="triage", vector=vec, outcome={"admitted": True})
        async with qis.watch(topic="triage") as events:
            async for event in events:
                ...

Calls from several tasks share one connection and take turns; each watch has a
connection of its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from qisd.control.calls import (
    MAX_REPLY_BYTES,
    addresses_list,
    as_vector,
    check_reply,
    check_timeout,
    connect_error,
    emit_params,
    idle_notice,
    json_value,
    merge_results,
    readable_now,
    resolve_socket_path,
    result_list,
    result_str,
    split_items,
    topic_text,
    watch_cut,
    watch_ended,
)
from qisd.control.errors import ControlError
from qisd.control.framing import LineSplitter, Overflow
from qisd.control.protocol import (
    BAD_REPLY,
    Reply,
    RequestId,
    decode_reply,
    encode_request,
)

__all__ = ["AsyncClient", "AsyncWatch"]

_RECV = 64 * 1024


class _AsyncLine:
    def __init__(self, path: Path, stream: trio.SocketStream) -> None:
        self.path = path
        self.stream = stream
        self._splitter = LineSplitter(MAX_REPLY_BYTES)

    @classmethod
    async def connect(cls, path: Path) -> _AsyncLine:
        try:
            stream = await trio.open_unix_socket(os.fspath(path))
        except OSError as exc:
            raise connect_error(path, exc) from None
        return cls(path, stream)

    async def aclose(self) -> None:
        await self.stream.aclose()

    def stale(self) -> bool:
        """True once the daemon closed this connection or sent something unasked
        (its ``idle`` notice) since the last reply: it must not carry a request."""
        return self._splitter.pending > 0 or readable_now(self.stream.socket)

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError:
            raise _closed(self.path) from None

    async def read_reply(self) -> Reply | None:
        while True:
            line = self._splitter.next()
            if line is Overflow.TOO_LONG:
                raise ControlError(BAD_REPLY, f"reply longer than {MAX_REPLY_BYTES} bytes")
            if line is not None:
                if line.strip():
                    return decode_reply(line)
                continue
            try:
                data = await self.stream.receive_some(_RECV)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self._splitter.feed(data)


def _closed(path: Path) -> ConnectionError:
    return ConnectionError(f"the daemon closed the control connection ({path})")


class AsyncClient:
    """A trio connection to the daemon's control socket; see :class:`qisd.Client`."""

    def __init__(
        self, socket_path: str | os.PathLike[str] | None = None, *, timeout: float = 30.0
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = check_timeout(timeout)
        self._conn: _AsyncLine | None = None
        self._ids = 0
        self._lock = trio.Lock()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def _exchange(self, data: bytes, fresh: bool) -> Reply | None:
        """Send one request and read its reply; as :meth:`qisd.Client._exchange`, a
        request the daemon did not run because it closed an idle connection just as
        it went goes once more on a new connection."""
        assert self._conn is not None
        try:
            await self._conn.send(data)
            reply = await self._conn.read_reply()
        except ConnectionError:  # (the send found the connection closed)
            if fresh:
                raise
        else:
            if fresh or not idle_notice(reply):
                return reply
        await self._drop()
        self._conn = await _AsyncLine.connect(self.socket_path)
        await self._conn.send(data)
        return await self._conn.read_reply()

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send one request and return its ``result`` map as the daemon sent it."""
        async with self._lock:
            self._ids += 1
            rid = self._ids
            try:
                with trio.fail_after(self.timeout):
                    if self._conn is not None and self._conn.stale():
                        await self._drop()  # closed while idle: a new one
                    fresh = self._conn is None
                    if self._conn is None:
                        self._conn = await _AsyncLine.connect(self.socket_path)
                    reply = await self._exchange(encode_request(rid, method, params or {}),
                                                 fresh)
                if reply is None:
                    raise _closed(self.socket_path)
                if reply.id is None:
                    await self._drop()
                return check_reply(reply, rid)
            except trio.TooSlowError:
                await self._drop()
                raise TimeoutError(
                    f"no reply to {method} within {self.timeout}s from {self.socket_path}"
                    " (a request that changes something may still be done: check first)"
                ) from None
            except ControlError as exc:
                if exc.code == BAD_REPLY:
                    await self._drop()
                raise
            except (OSError, trio.Cancelled):
                # Cancelled mid-request: the reply would answer the next one.
                await self._drop()
                raise

    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def peers(self) -> list[dict[str, Any]]:
        return result_list(await self.call("peers"), "peers")

    async def identity(self) -> dict[str, Any]:
        return await self.call("identity")

    async def emit(
        self,
        *,
        topic: str,
        vector: Any,
        outcome: Mapping[str, Any],
        n: int = 1,
        ttl: int | None = None,
    ) -> str:
        params = emit_params(topic, vector, outcome, n, ttl)
        return result_str(await self.call("emit", params), "id")

    async def emit_many(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        send, slots = split_items(items)
        if not send:
            return merge_results(slots, [])
        result = await self.call("emit_many", {"items": send})
        return merge_results(slots, result_list(result, "results"))

    async def query(self, *, topic: str, vector: Any, k: int = 10) -> dict[str, Any]:
        return await self.call("query", {"topic": topic_text(topic),
                                         "vector": as_vector(vector), "k": json_value(k, "k")})

    async def packets(
        self, *, topic: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": json_value(limit, "limit")}
        if topic is not None:
            params["topic"] = topic_text(topic)
        return result_list(await self.call("packets", params), "packets")

    async def bootstrap(self, addresses: str | Sequence[str]) -> dict[str, Any]:
        return await self.call("bootstrap", {"addresses": addresses_list(addresses)})

    def watch(self, *, topic: str, vector: Any = None) -> AsyncWatch:
        """``async with client.watch(topic=...) as events: async for event in events``;
        entering returns once the daemon has acknowledged the watch."""
        params: dict[str, Any] = {"topic": topic_text(topic)}
        if vector is not None:
            params["vector"] = as_vector(vector)
        return AsyncWatch(self.socket_path, params, timeout=self.timeout)


class AsyncWatch:
    """A watch on its own connection: an async context manager and, once entered,
    an async iterator of event dicts."""

    _RID: RequestId = 1

    def __init__(self, path: Path, params: Mapping[str, Any], *, timeout: float) -> None:
        self.path = path
        self._params = dict(params)
        self._timeout = timeout
        self._conn: _AsyncLine | None = None
        self.ack: dict[str, Any] | None = None

    async def __aenter__(self) -> AsyncWatch:
        try:
            with trio.fail_after(self._timeout):
                self._conn = await _AsyncLine.connect(self.path)
                await self._conn.send(encode_request(self._RID, "watch", self._params))
                reply = await self._conn.read_reply()
            if reply is None:
                raise _closed(self.path)
            self.ack = check_reply(reply, self._RID)
        except trio.TooSlowError:
            await self.aclose()
            raise TimeoutError(f"no reply to watch within {self._timeout}s") from None
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.ack is None:
            raise RuntimeError(
                "enter the watch first: async with client.watch(...) as events:"
                " async for event in events"
            )
        if self._conn is None:
            raise StopAsyncIteration
        try:
            reply = await self._conn.read_reply()
            if reply is None:
                path = self._conn.path
                await self.aclose()
                raise watch_cut(path)
            if watch_ended(reply):
                await self.aclose()
                raise StopAsyncIteration
            if reply.event is None:
                check_reply(reply, self._RID)
                raise ControlError(BAD_REPLY, "daemon sent a reply inside a watch")
        except (ControlError, OSError):
            await self.aclose()
            raise
        return reply.event
