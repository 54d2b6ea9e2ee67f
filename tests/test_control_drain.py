"""Stopping the control server (SIGTERM): requests in flight finish and are answered,
idle connections and watches close, no new connection or request is taken.

Real Unix sockets, the real server, a fake daemon whose emit waits for the test."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_control import TIMEOUT, FakeAPI, req, short_dir

from qisd.control.connection import Connection
from qisd.control.server import Drain, serve_control


class SlowEmit(FakeAPI):
    """An emit that is still placing its packet until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = trio.Event()
        self.release = trio.Event()

    async def emit(self, **params: object) -> dict[str, object]:
        self.entered.set()
        await self.release.wait()
        return await super().emit(**params)  # type: ignore[no-any-return, misc]


async def read_line(stream: trio.SocketStream) -> bytes:
    """One line, or what came before the server closed (a close with a request
    still unread is a reset)."""
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = await stream.receive_some(4096)
        except trio.BrokenResourceError:
            return data
        if not chunk:
            return data
        data += chunk
    return data


async def test_a_drain_answers_requests_in_flight_and_closes_the_rest() -> None:
    api = SlowEmit()
    drain = Drain()
    with short_dir() as tmp, trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            path: Path = await nursery.start(
                partial(serve_control, tmp / "c.sock", api, drain=drain)
            )
            busy = await trio.open_unix_socket(os.fspath(path))
            idle = await trio.open_unix_socket(os.fspath(path))
            watching = await trio.open_unix_socket(os.fspath(path))
            await watching.send_all(req("w", "watch", topic="t"))
            assert json.loads(await read_line(watching))["ok"] is True
            await busy.send_all(req(1, "emit", topic="t", vector=[1.0, 0.0, 0.0],
                                    outcome={"y": 1}))
            await api.entered.wait()

            drain.begin()
            await trio.testing.wait_all_tasks_blocked()
            # Idle connections are closed; a watch ends saying why, then is closed;
            # the socket takes no one new.
            assert await idle.receive_some(4096) == b""
            last = json.loads(await read_line(watching))
            assert (last["id"], last["ok"], last["error"]["code"]) == ("w", False, "unavailable")
            assert last["error"]["message"] == "the daemon is stopping; the watch ends here"
            assert await read_line(watching) == b""
            assert not await trio.Path(path).exists()
            waited = trio.Event()

            async def wait_drain() -> None:
                await drain.wait()
                waited.set()

            nursery.start_soon(wait_drain)
            await trio.testing.wait_all_tasks_blocked()
            assert not waited.is_set()  # the emit is still in flight
            # A request sent behind the one in flight is not taken.
            await busy.send_all(req(2, "status"))
            api.release.set()
            reply = json.loads(await read_line(busy))
            assert reply["id"] == 1 and reply["ok"] is True and reply["result"]["id"]
            assert await read_line(busy) == b""  # then closed, request 2 unanswered
            await waited.wait()
            assert [name for name, _ in api.calls].count("status") == 0
            for stream in (busy, idle, watching):
                await stream.aclose()


async def test_a_request_read_as_the_drain_begins_is_refused_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM lands after a request's bytes were read but before it was parsed: it
    is not run, and the client is told so (it is not run and left unanswered)."""
    api = FakeAPI()
    drain = Drain()
    receive = Connection.receive

    async def receive_then_stop(self: Any) -> bytes:
        data = await receive(self)
        if data:
            drain.begin()
        return data

    monkeypatch.setattr(Connection, "receive", receive_then_stop)
    with short_dir() as tmp, trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            path: Path = await nursery.start(
                partial(serve_control, tmp / "c.sock", api, drain=drain)
            )
            stream = await trio.open_unix_socket(os.fspath(path))
            await stream.send_all(req(1, "emit", topic="t", vector=[1.0, 0.0, 0.0],
                                      outcome={"y": 1}))
            reply = json.loads(await read_line(stream))
            assert reply["id"] == 1 and reply["error"]["code"] == "unavailable"
            assert "stopping" in reply["error"]["message"]
            assert api.calls == []
            await stream.aclose()


class BigEventAPI(FakeAPI):
    """A watch whose one event is too big for a slow reader to take in time, and
    whose cleanup takes a moment (the daemon's has checkpoints too)."""

    @asynccontextmanager
    async def watch(self, *, topic: str, vector: Any = None) -> AsyncIterator[Any]:
        async def events() -> AsyncIterator[dict[str, Any]]:
            yield {"id": "0" * 32, "topic": topic, "pad": "x" * (4 << 20)}
            await trio.sleep_forever()

        stream = events()
        try:
            yield stream
        finally:
            await stream.aclose()
            await trio.sleep(0.5)


async def test_a_line_cut_part_way_is_never_followed_by_the_drains_last_line() -> None:
    drain = Drain()
    with short_dir() as tmp, trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            path: Path = await nursery.start(partial(
                serve_control, tmp / "c.sock", BigEventAPI(), drain=drain, write_timeout=0.2))
            reader = await trio.open_unix_socket(os.fspath(path))
            await reader.send_all(req("w", "watch", topic="t"))
            await trio.sleep(0.5)  # read nothing: the event's write stops part-way
            drain.begin()  # while the watch cleans up
            data = b""
            with trio.move_on_after(3):
                while chunk := await reader.receive_some(1 << 20):
                    data += chunk
            ack, _, rest = data.partition(b"\n")
            assert json.loads(ack)["result"] == {"watching": "t"}
            assert rest.startswith(b'{"v":1,"id":"w","event":')
            assert b"\n" not in rest and b"unavailable" not in rest  # cut, nothing after
            await reader.aclose()
            nursery.cancel_scope.cancel()
