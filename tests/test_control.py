"""The control socket: protocol parsing, the trio server, the blocking and trio clients.

Everything runs over real Unix sockets in short temporary directories under /tmp
(AF_UNIX paths are limited to 107 bytes). The daemon side is a fake ControlAPI that
records its calls; the server runs either in the test's own trio loop (async tests,
with the blocking client in a worker thread) or in a background thread with its own
trio loop (sync tests, see :func:`serving`). Synchronisation is by replies, events
and ``wait_all_tasks_blocked``, never by sleeping.
"""

from __future__ import annotations

import inspect
import json
import os
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from qisd.control import calls, protocol
from qisd.control.api import ControlAPI
from qisd.control.async_client import AsyncClient
from qisd.control.calls import resolve_socket_path
from qisd.control.client import Client
from qisd.control.errors import (
    ControlError,
    ControlSocketError,
    ControlSocketInUse,
    DaemonNotRunning,
)
from qisd.control.framing import LineSplitter, Overflow
from qisd.control.peer import PeerCredentials, peer_allowed, read_peer_groups
from qisd.control.protocol import Rejection, Request, parse_request
from qisd.control.server import serve_control
from qisd.control.stats import ControlStats

TIMEOUT = 10.0


# -- a fake daemon --------------------------------------------------------------------


class FakeAPI:
    """A ControlAPI that keeps packets in a list and records every call."""

    def __init__(self, *, dim: int = 3) -> None:
        self.dim = dim
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.stored: list[dict[str, Any]] = []
        self.watchers: list[tuple[str, trio.MemorySendChannel[dict[str, Any]]]] = []
        self.unwatched = threading.Event()

    def _packet(self, topic: str, vector: list[float], outcome: dict[str, Any], n: int,
                ttl: int | None) -> dict[str, Any]:
        if topic == "boom":
            raise RuntimeError("kaboom")
        if topic == "refuse":
            raise ControlError("unavailable", "store is read-only")
        if len(vector) != self.dim:
            raise ControlError(
                "invalid", f"vector: expected {self.dim} dimensions, got {len(vector)}"
            )
        summary = {
            "id": f"{len(self.stored) + 1:032x}", "topic": topic, "kind": "observation",
            "origin": "ef" * 32, "n": n, "outcome": outcome, "generation": 0,
            "created_ms": 1_700_000_000_000, "ttl_s": ttl or 86_400,
        }
        self.stored.append(summary)
        for watched, send in self.watchers:
            if watched == topic:
                send.send_nowait(summary)
        return summary

    async def status(self) -> dict[str, Any]:
        self.calls.append(("status", {}))
        return {"node_id": "ab" * 20, "listen": "127.0.0.1:4470", "peers": 2,
                "packets": len(self.stored), "metrics": None, "version": "0.1.0",
                "swarm": "12" * 32, "uptime_s": 1.25}

    async def peers(self) -> dict[str, Any]:
        self.calls.append(("peers", {}))
        return {"peers": [{"node_id": "cd" * 20, "address": "10.0.0.2:4470",
                           "last_seen_s": 75.2, "failures": 0},
                          {"node_id": "ef" * 20, "address": "10.0.0.3:4470",
                           "last_seen_s": None, "failures": 2}]}

    async def identity(self) -> dict[str, Any]:
        self.calls.append(("identity", {}))
        return {"node_id": "ab" * 20, "public_key": "ef" * 32}

    async def emit(self, *, topic: str, vector: list[float], outcome: dict[str, Any],
                   n: int = 1, ttl: int | None = None) -> dict[str, Any]:
        self.calls.append(("emit", {"topic": topic, "vector": vector, "outcome": outcome,
                                    "n": n, "ttl": ttl}))
        packet = self._packet(topic, vector, outcome, n, ttl)
        return {"id": packet["id"], "keys": 8, "stored": 1}

    async def emit_many(self, *, items: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls.append(("emit_many", {"items": items}))
        results: list[dict[str, Any]] = []
        for item in items:
            try:
                results.append({"id": self._packet(**item)["id"]})
            except ControlError as exc:
                results.append({"error": {"code": exc.code, "message": exc.message}})
        return {"results": results}

    async def query(self, *, topic: str, vector: list[float], k: int = 10) -> dict[str, Any]:
        self.calls.append(("query", {"topic": topic, "vector": vector, "k": k}))
        found = [p for p in self.stored if p["topic"] == topic][:k]
        matches = [
            {"id": p["id"], "similarity": round(1.0 - i / 10, 3), "outcome": p["outcome"],
             "n": p["n"], "origin": p["origin"], "kind": p["kind"]}
            for i, p in enumerate(found)
        ]
        answer = {"support": sum(p["n"] for p in found),
                  "outcomes": {"admitted": {"estimate": 0.5, "support": len(found)}}}
        return {"matches": matches, "answer": answer}

    @asynccontextmanager
    async def watch(self, *, topic: str, vector: list[float] | None = None
                    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        self.calls.append(("watch", {"topic": topic, "vector": vector}))
        if topic == "refuse":
            raise ControlError("invalid", "topic: not in this swarm")
        send, receive = trio.open_memory_channel[dict[str, Any]](100)
        entry = (topic, send)
        self.watchers.append(entry)
        try:
            async with receive:
                yield receive
        finally:
            self.watchers.remove(entry)
            self.unwatched.set()

    async def packets(self, *, topic: str | None = None, limit: int = 100
                      ) -> dict[str, Any]:
        self.calls.append(("packets", {"topic": topic, "limit": limit}))
        if topic == "big":  # a reply far bigger than a socket buffer
            return {"packets": [{"id": f"{i:032x}", "pad": "x" * 200} for i in range(limit)]}
        chosen = [p for p in self.stored if topic is None or p["topic"] == topic]
        return {"packets": list(reversed(chosen))[:limit]}

    async def bootstrap(self, *, addresses: list[str]) -> dict[str, Any]:
        self.calls.append(("bootstrap", {"addresses": addresses}))
        return {"contacted": len(addresses), "peers": 3}


class GeneratorWatchAPI(FakeAPI):
    """``watch`` as a plain method returning an async generator (the other shape the
    server accepts), refusing a bad topic before any iteration."""

    def watch(self, *, topic: str, vector: list[float] | None = None  # type: ignore[override]
              ) -> AsyncIterator[dict[str, Any]]:
        if topic == "refuse":
            raise ControlError("invalid", "topic: not in this swarm")

        async def events() -> AsyncIterator[dict[str, Any]]:
            for i in range(3):
                yield {"id": f"{i:032x}", "topic": topic}
            # then the stream ends, as when the daemon shuts down

        return events()


class FloodWatchAPI(FakeAPI):
    """``watch`` streams far more than a socket buffer holds, as fast as it can."""

    def watch(self, *, topic: str, vector: list[float] | None = None  # type: ignore[override]
              ) -> AsyncIterator[dict[str, Any]]:
        async def events() -> AsyncIterator[dict[str, Any]]:
            for i in range(2000):
                yield {"id": f"{i:032x}", "topic": topic, "outcome": {"pad": "x" * 2000}}

        return events()


# -- harness ------------------------------------------------------------------------------


@contextmanager
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qc", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def serving(api: Any, **kwargs: Any) -> Iterator[tuple[Path, ControlStats]]:
    """Run serve_control in a background thread with its own trio loop."""
    stats = ControlStats()
    with short_dir() as tmp:
        path = tmp / "c.sock"
        ready = threading.Event()
        box: dict[str, Any] = {}

        async def main() -> None:
            with trio.CancelScope() as scope:
                box["cancel"] = scope.cancel
                box["token"] = trio.lowlevel.current_trio_token()
                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(serve_control, path, api, stats=stats,
                                                **kwargs))
                    ready.set()

        def run() -> None:
            try:
                trio.run(main)
            except BaseException as exc:  # reported to the test thread
                box["error"] = exc
            finally:
                ready.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert ready.wait(TIMEOUT)
        if "error" in box:
            raise box["error"]
        try:
            yield path, stats
        finally:
            trio.from_thread.run_sync(box["cancel"], trio_token=box["token"])
            thread.join(TIMEOUT)
            assert not thread.is_alive()
        assert "error" not in box, box.get("error")


def raw_connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(os.fspath(path))
    return sock


def read_lines(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return [json.loads(line) for line in data.splitlines()[:count]]


def ask(path: Path, *lines: bytes) -> list[dict[str, Any]]:
    with raw_connect(path) as sock:
        sock.sendall(b"".join(lines))
        return read_lines(sock, len(lines))


def status_of(path: Path) -> dict[str, Any]:
    with Client(path, timeout=TIMEOUT) as client:
        return client.status()


def req(rid: Any, method: str, **params: Any) -> bytes:
    msg: dict[str, Any] = {"v": 1, "id": rid, "method": method}
    if params:
        msg["params"] = params
    return json.dumps(msg).encode() + b"\n"


# -- protocol (pure) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code", "rid", "named"),
    [
        (b"{not json", "bad_request", None, "not valid JSON"),
        (b"[1, 2]", "bad_request", None, "must be an object"),
        (b'{"v": 1, "method": "status"}', "bad_request", None, "'id'"),
        (b'{"v": 1, "id": true, "method": "status"}', "bad_request", None, "'id'"),
        (b'{"id": 4, "method": "status"}', "bad_request", 4, "'v'"),
        (b'{"v": 2, "id": 5, "method": "status"}', "unsupported_version", 5, "2"),
        (b'{"v": 1, "id": "a", "method": "fly"}', "unknown_method", "a", "'fly'"),
        (b'{"v": 1, "id": 6, "method": "status", "x": 1}', "bad_request", 6, "'x'"),
        (b'{"v": 1, "id": 7, "method": "emit", "params": {"topic": "t", "vector": [1]}}',
         "bad_request", 7, "'outcome'"),
        (b'{"v": 1, "id": 8, "method": "query", "params": {"topic": "t", "vector": "no"}}',
         "bad_request", 8, "'vector'"),
        (b'{"v": 1, "id": 9, "method": "query", "params": {"topic": "t", "vector": [NaN]}}',
         "bad_request", None, "NaN"),
        (b'{"v": 1, "id": 9, "method": "query", "params": {"topic": "t", "vector": [1e400]}}',
         "bad_request", None, "out of range"),
        (b'{"v": 1, "id": 10, "method": "query", "params": {"topic": "t", "vector": [1],'
         b' "k": 2.5}}', "bad_request", 10, "'k' must be an integer"),
        (b'{"v": 1, "id": 11, "method": "status", "params": {"verbose": true}}',
         "bad_request", 11, "'verbose'"),
        (b'{"v": 1, "id": 12, "method": "bootstrap", "params": {"addresses": [1]}}',
         "bad_request", 12, "'addresses'"),
        (b'{"v": 1, "id": 13, "method": "status", "params": []}', "bad_request", 13,
         "'params'"),
        (b"\xff\xfe", "bad_request", None, "not UTF-8 text: byte 0xff at offset 0"),
        (b'{"v": 1, "id": "\xe9"}', "bad_request", None, "byte 0xe9 at offset 16"),
        # Lone surrogate escapes are JSON but not text: refused, the place named, and
        # the id kept when it is itself good.
        (b'{"v": 1, "id": "\\ud800", "method": "identity"}', "bad_request", None,
         "id: a lone surrogate"),
        (b'{"v": 1, "id": 14, "method": "emit", "params": {"topic": "a\\udc00"}}',
         "bad_request", 14, "params.topic: a lone surrogate"),
        (b'{"v": 1, "id": 15, "method": "emit_many", "params": {"items": [{}, {"outcome":'
         b' {"k": "\\uD83D"}}]}}', "bad_request", 15, "params.items[1].outcome.k"),
        (b'{"v": 1, "id": 16, "method": "status", "params": {"\\udfff": 1}}',
         "bad_request", 16, "params.'\\udfff'"),
    ],
)
def test_parse_request_rejections(line: bytes, code: str, rid: Any, named: str) -> None:
    decision = parse_request(line)
    assert isinstance(decision, Rejection)
    assert decision.error.code == code
    assert decision.id == rid
    assert named in decision.error.message


def test_parse_request_fills_defaults_and_floats() -> None:
    decision = parse_request(b'{"v": 1, "id": 1, "method": "query",'
                             b' "params": {"topic": "t", "vector": [1, 0.5]}}')
    assert decision == Request(1, "query", {"topic": "t", "vector": [1.0, 0.5], "k": 10})
    assert all(type(x) is float for x in decision.params["vector"])
    bare = parse_request(b'{"v": 1, "id": "s", "method": "packets"}')
    assert bare == Request("s", "packets", {"topic": None, "limit": 100})


def test_methods_match_the_control_api_signatures() -> None:
    """The param table the server checks against is the daemon's interface."""
    api_methods = {
        name for name, _ in inspect.getmembers(ControlAPI, inspect.isfunction)
        if not name.startswith("_")
    }
    assert api_methods == set(protocol.METHODS)
    for name, spec in protocol.METHODS.items():
        params = list(inspect.signature(getattr(ControlAPI, name)).parameters.values())[1:]
        assert [p.name for p in params] == [p.name for p in spec], name
        for sig, param in zip(params, spec, strict=True):
            assert sig.kind is inspect.Parameter.KEYWORD_ONLY
            required = sig.default is inspect.Parameter.empty
            assert required == param.required, (name, param.name)
            if not required:
                assert sig.default == param.default, (name, param.name)


def test_line_splitter_frames_and_bounds() -> None:
    s = LineSplitter(10)
    s.feed(b'{"a"')
    assert s.next() is None
    s.feed(b":1}\r\n\n{}\nabc")
    assert s.next() == b'{"a":1}'
    assert s.next() == b""
    assert s.next() == b"{}"
    assert s.next() is None
    s.feed(b"defghijkl")  # "abcdefghijkl" is 12 bytes, no newline yet
    assert s.next() is Overflow.TOO_LONG
    assert s.pending == 0  # the long line is not kept
    s.feed(b"more of the same")
    assert s.next() is None
    s.feed(b"end\nok\n")
    assert s.next() == b"ok"  # skipping stopped at the long line's newline
    s.feed(b"0123456789abc\nafter\n")  # a complete line over the limit
    assert s.next() is Overflow.TOO_LONG
    assert s.next() == b"after"
    assert s.next() is None


def test_peer_policy() -> None:
    def allowed(uid: int, gid: int, groups: tuple[int, ...] = ()) -> bool:
        return peer_allowed(PeerCredentials(1, uid, gid), daemon_uid=500, daemon_gid=600,
                            peer_groups=groups)

    assert allowed(0, 0)
    assert allowed(500, 1)
    assert allowed(700, 600)
    assert allowed(700, 1, (1, 600))
    assert not allowed(700, 1, (1, 2))


def test_resolve_socket_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_socket_path("/x/y.sock", env={}) == Path("/x/y.sock")
    assert resolve_socket_path(None, env={"QISD_SOCKET": "/e.sock"}) == Path("/e.sock")
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    assert resolve_socket_path(None, env=env) == tmp_path / "qisd" / "qisd.sock"
    # Where `qisd run` in the same environment binds: its state dir or config decide.
    state = {"HOME": str(tmp_path), "QISD_STATE_DIR": str(tmp_path / "st")}
    assert resolve_socket_path(None, env=state) == tmp_path / "st" / "qisd.sock"
    config = tmp_path / "q.toml"
    config.write_text('[node]\nsocket = "rel.sock"\n')
    named = {"HOME": str(tmp_path), "QISD_CONFIG": str(config)}
    assert resolve_socket_path(None, env=named) == tmp_path / "rel.sock"
    # Variables that do not place the socket leave the default (and its fallback to
    # the system service's socket) alone.
    service = tmp_path / "run" / "qisd.sock"
    service.parent.mkdir()
    service.touch()
    monkeypatch.setattr(calls, "SERVICE_SOCKET", service)
    unrelated = {"HOME": str(tmp_path), "QISD_LOG_LEVEL": "debug"}
    assert resolve_socket_path(None, env=unrelated) == service
    assert resolve_socket_path(None, env=state) == tmp_path / "st" / "qisd.sock"
    monkeypatch.undo()
    # A config a daemon could not start on either: the default, not an error.
    broken = {"HOME": str(tmp_path), "QISD_LOG_LEVEL": "loud"}
    assert resolve_socket_path(None, env=broken) == (
        tmp_path / ".local" / "state" / "qisd" / "qisd.sock")


# -- round trips --------------------------------------------------------------------------


def test_every_method_round_trips_with_the_blocking_client() -> None:
    api = FakeAPI()
    with serving(api) as (path, _), Client(path, timeout=TIMEOUT) as client:
        status = client.status()
        assert status["node_id"] == "ab" * 20 and status["metrics"] is None
        assert client.peers()[0] == {"node_id": "cd" * 20, "address": "10.0.0.2:4470",
                                     "last_seen_s": 75.2, "failures": 0}
        assert client.identity() == {"node_id": "ab" * 20, "public_key": "ef" * 32}

        pid = client.emit(topic="t", vector=np.array([1, 2, 3], dtype=np.float32),
                          outcome={"admitted": True}, n=4, ttl=60)
        assert pid == f"{1:032x}"
        assert api.calls[-1] == ("emit", {"topic": "t", "vector": [1.0, 2.0, 3.0],
                                          "outcome": {"admitted": True}, "n": 4, "ttl": 60})

        results = client.emit_many([
            {"topic": "t", "vector": (0.1, 0.2, 0.3), "outcome": {"a": 1}},
            {"topic": "t", "vector": [0.1], "outcome": {"a": 1}},  # the daemon refuses
            {"topic": "t", "outcome": {"a": 1}},  # the server refuses
            {"topic": "t", "vector": [1, 1, 1], "outcome": {"a": 2}, "n": 3},
        ])
        assert results[0] == {"id": f"{2:032x}"}
        assert results[1]["error"]["code"] == "invalid"
        assert results[2]["error"] == {"code": "bad_request",
                                       "message": "items[2]: missing field 'vector' for emit"}
        assert results[3] == {"id": f"{3:032x}"}
        # The daemon saw only the items that passed the checks, with defaults filled.
        assert [len(i["vector"]) for i in api.calls[-1][1]["items"]] == [3, 1, 3]
        assert api.calls[-1][1]["items"][0]["n"] == 1

        found = client.query(topic="t", vector=[1, 2, 3], k=2)
        assert set(found) == {"matches", "answer"}
        assert [m["id"] for m in found["matches"]] == [f"{1:032x}", f"{2:032x}"]
        assert set(found["matches"][0]) == {"id", "similarity", "outcome", "n", "origin",
                                            "kind"}

        assert [p["id"] for p in client.packets(topic="t", limit=2)] == [
            f"{3:032x}", f"{2:032x}"]
        assert client.packets() and api.calls[-1] == ("packets", {"topic": None,
                                                                  "limit": 100})
        assert client.bootstrap("10.0.0.9:4470") == {"contacted": 1, "peers": 3}
        assert client.bootstrap(["a:1", "b:2"])["contacted"] == 2


def test_client_rejects_bad_vectors_before_sending() -> None:
    client = Client("/nonexistent/qisd.sock")
    with pytest.raises(ValueError, match=r"vector\[1\] must be finite"):
        client.emit(topic="t", vector=[1.0, float("nan")], outcome={"a": 1})
    with pytest.raises(ValueError, match="vector must be a sequence"):
        client.query(topic="t", vector="0.1,0.2")


async def test_every_method_round_trips_with_the_trio_client() -> None:
    api = FakeAPI()
    with short_dir() as tmp, trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            path = await nursery.start(serve_control, tmp / "c.sock", api)
            async with AsyncClient(path, timeout=TIMEOUT) as client:
                assert (await client.status())["listen"] == "127.0.0.1:4470"
                assert len(await client.peers()) == 2
                assert (await client.identity())["public_key"] == "ef" * 32
                pid = await client.emit(topic="t", vector=[1, 2, 3], outcome={"a": 1})
                results = await client.emit_many(
                    [{"topic": "t", "vector": np.ones(3), "outcome": {"a": 2}}])
                found = await client.query(topic="t", vector=[1, 2, 3])
                assert [m["id"] for m in found["matches"]] == [pid, results[0]["id"]]
                assert len(await client.packets(topic="t")) == 2
                assert (await client.bootstrap(["h:1"]))["peers"] == 3
                with pytest.raises(ControlError) as err:
                    await client.emit(topic="t", vector=[1], outcome={"a": 1})
                assert err.value.code == "invalid"
                # Several tasks may share one client: replies still match requests.
                async with trio.open_nursery() as calls:
                    for _ in range(5):
                        calls.start_soon(client.status)
                        calls.start_soon(client.identity)

                async with client.watch(topic="w") as events:
                    assert events.ack == {"watching": "w"}
                    await client.emit(topic="w", vector=[0, 0, 1], outcome={"b": True})
                    event = await events.__anext__()
                    assert event["topic"] == "w" and event["outcome"] == {"b": True}
            nursery.cancel_scope.cancel()


# -- errors ---------------------------------------------------------------------------------


def test_error_replies_name_the_problem_and_keep_the_connection() -> None:
    api = FakeAPI()
    with serving(api, max_request_bytes=4096) as (path, stats), raw_connect(path) as sock:
        sock.sendall(b"{oops\n")
        sock.sendall(req(1, "launch"))
        sock.sendall(b'{"v": 9, "id": 2, "method": "status"}\n')
        sock.sendall(req(3, "emit", topic="t", outcome={}))
        sock.sendall(b'{"v":1,"id":4,"method":"status","params":{"x":"' + b"a" * 5000
                     + b'"}}\n')
        sock.sendall(req(5, "emit", topic="refuse", vector=[1, 2, 3], outcome={}))
        sock.sendall(req(6, "emit", topic="boom", vector=[1, 2, 3], outcome={}))
        sock.sendall(req(7, "status"))
        replies = read_lines(sock, 8)
    codes = [(r["id"], r.get("error", {}).get("code")) for r in replies]
    assert codes == [(None, "bad_request"), (1, "unknown_method"),
                     (2, "unsupported_version"), (3, "bad_request"), (None, "too_large"),
                     (5, "unavailable"), (6, "internal"), (7, None)]
    messages = [r.get("error", {}).get("message", "") for r in replies]
    assert "missing param 'vector'" in messages[3]
    assert "4096" in messages[4]
    assert messages[5] == "store is read-only"
    assert "RuntimeError: kaboom" in messages[6]
    assert replies[7]["ok"] is True and replies[7]["result"]["peers"] == 2
    snapshot = stats.statistics()
    assert snapshot.requests[("status", "ok")] == 1
    assert snapshot.requests[("emit", "internal")] == 1
    assert snapshot.requests[("unknown", "unknown_method")] == 1
    assert snapshot.requests[("-", "too_large")] == 1
    with pytest.raises(TypeError):
        snapshot.requests[("status", "ok")] = 0  # type: ignore[index]


def test_a_surrogate_or_a_handler_bug_ends_one_request_or_connection_not_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lone-surrogate id (it cannot be echoed as UTF-8) is answered with id null; a
    bug met while serving one connection closes that connection, and the server
    goes on serving the others."""
    import qisd.control.server as server_module

    real_parse = server_module.parse_request

    def parse_or_fail(line: bytes) -> Any:
        if b"explode" in line:
            raise RuntimeError("a bug")
        return real_parse(line)

    monkeypatch.setattr(server_module, "parse_request", parse_or_fail)
    with serving(FakeAPI()) as (path, stats):
        with raw_connect(path) as sock:
            sock.sendall(b'{"v":1,"id":"\\ud800","method":"identity"}\n')
            sock.sendall(b'{"v":1,"id":3,"method":"emit","params":{"topic":"\\ud800x",'
                         b'"vector":[1],"outcome":{}}}\n')
            sock.sendall(req(4, "status"))
            replies = read_lines(sock, 3)
        assert [(r["id"], r.get("error", {}).get("code")) for r in replies] == [
            (None, "bad_request"), (3, "bad_request"), (4, None)]
        assert "id: a lone surrogate" in replies[0]["error"]["message"]
        with raw_connect(path) as sock:
            sock.sendall(b'{"explode": 1}\n')
            sock.settimeout(TIMEOUT)
            assert sock.recv(100) == b""  # closed, no reply
        assert status_of(path)["peers"] == 2
        assert stats.statistics().connections_failed == 1


def test_client_raises_control_error_with_code() -> None:
    with serving(FakeAPI()) as (path, _), Client(path, timeout=TIMEOUT) as client:
        with pytest.raises(ControlError) as err:
            client.emit(topic="boom", vector=[1, 2, 3], outcome={})
        assert err.value.code == "internal"
        with pytest.raises(ControlError) as err:
            client.call("status", {"nope": 1})
        assert err.value.code == "bad_request" and "'nope'" in err.value.message
        assert client.status()["peers"] == 2  # same client, still usable


def test_pipelined_requests_are_answered_in_order() -> None:
    with serving(FakeAPI()) as (path, _):
        replies = ask(path, req(1, "status"), req("two", "identity"),
                      req(3, "emit", topic="t", vector=[1, 2, 3], outcome={"a": 1}),
                      req(4, "packets", topic="t"))
    assert [r["id"] for r in replies] == [1, "two", 3, 4]
    assert replies[3]["result"]["packets"][0]["id"] == replies[2]["result"]["id"]


def test_daemon_not_running() -> None:
    with short_dir() as tmp:
        missing = tmp / "none.sock"
        with pytest.raises(DaemonNotRunning) as err:
            status_of(missing)
        assert str(missing) in str(err.value) and "qisd run" in str(err.value)
        # A socket file nobody listens on (left by a crash) is not running either.
        stale = tmp / "stale.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(os.fspath(stale))
        with pytest.raises(DaemonNotRunning, match="nothing is listening"):
            status_of(stale)


# -- idle connections ------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b'{"v": 1, "id": 1, "method": "sta'],
                         ids=["nothing", "half a line"])
def test_an_idle_connection_is_told_and_closed(sent: bytes) -> None:
    """A client that holds a connection without asking anything cannot keep its slot
    (all of them, at the connection cap) for good."""
    with serving(FakeAPI(), idle_timeout=0.3) as (path, stats), raw_connect(path) as sock:
        sock.sendall(sent)
        (notice,) = read_lines(sock, 1)
        assert notice["id"] is None and notice["error"]["code"] == "idle"
        assert sock.recv(1) == b""  # closed
        assert stats.connections_idle == 1


def test_requests_and_watches_keep_a_connection_alive() -> None:
    api = FakeAPI()
    with serving(api, idle_timeout=0.4) as (path, stats), raw_connect(path) as sock:
        for i in range(4):  # 0.2 s apart: never 0.4 s idle
            sock.sendall(req(i, "status"))
            assert read_lines(sock, 1)[0]["id"] == i
            trio.run(trio.sleep, 0.2)
        assert stats.connections_idle == 0
        with raw_connect(path) as watcher:
            watcher.sendall(req(1, "watch", topic="w"))
            assert read_lines(watcher, 1)[0]["result"] == {"watching": "w"}
            trio.run(trio.sleep, 1.0)  # a watch waits for events, not requests
            with Client(path, timeout=TIMEOUT) as client:
                pid = client.emit(topic="w", vector=[1, 2, 3], outcome={"i": 1})
            assert read_lines(watcher, 1)[0]["event"]["id"] == pid
        assert stats.connections_idle == 1  # the first one, idle while the watch went on


def test_the_clients_reconnect_after_the_daemon_closed_an_idle_connection() -> None:
    with serving(FakeAPI(), idle_timeout=0.2) as (path, stats):
        with Client(path, timeout=TIMEOUT) as client:
            first = client.status()
            trio.run(trio.sleep, 0.6)  # closed meanwhile
            assert client.status() == first

        async def use_async() -> None:
            async with AsyncClient(path, timeout=TIMEOUT) as aclient:
                before = await aclient.status()
                await trio.sleep(0.6)
                assert await aclient.status() == before

        trio.run(use_async)
        assert stats.connections_idle == 2


def test_a_request_sent_as_the_idle_close_came_goes_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race the staleness check cannot see: the daemon closes just as the request
    goes. It was not run (the daemon said why and read nothing after), so the client
    sends it once more on a new connection."""
    from qisd.control import async_client as async_module
    from qisd.control import client as client_module

    api = FakeAPI()
    with serving(api, idle_timeout=0.2) as (path, _), Client(path, timeout=TIMEOUT) as client:
        client.status()
        trio.run(trio.sleep, 0.6)
        monkeypatch.setattr(client_module._Line, "stale", lambda self: False)
        assert client.emit(topic="t", vector=[1, 2, 3], outcome={"i": 1})

        async def use_async() -> None:
            async with AsyncClient(path, timeout=TIMEOUT) as aclient:
                await aclient.status()
                await trio.sleep(0.6)
                monkeypatch.setattr(async_module._AsyncLine, "stale", lambda self: False)
                assert await aclient.emit(topic="t", vector=[1, 2, 3], outcome={"i": 2})

        trio.run(use_async)
        assert [c[1]["outcome"] for c in api.calls if c[0] == "emit"] == [{"i": 1}, {"i": 2}]


@contextmanager
def closing_as_the_request_comes() -> Iterator[tuple[Path, list[int]]]:
    """A stand-in daemon whose first connection answers one request, then meets the
    next with its idle notice and closes (the race: the request was sent just as the
    daemon gave up on the connection); later connections answer everything. Yields
    the socket path and the ids of the requests it ran."""
    ran: list[int] = []
    with short_dir() as tmp:
        path = tmp / "race.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(os.fspath(path))
        listener.listen()

        def answer(conn: socket.socket, lines: int | None) -> None:
            with conn, conn.makefile("rb") as reader:
                for served, line in enumerate(reader):
                    rid = json.loads(line)["id"]
                    if lines is not None and served == lines:
                        conn.sendall(b'{"v": 1, "id": null, "ok": false, "error": '
                                     b'{"code": "idle", "message": "idle"}}\n')
                        return
                    ran.append(rid)
                    conn.sendall(json.dumps({"v": 1, "id": rid, "ok": True,
                                             "result": {"ran": rid}}).encode() + b"\n")

        def serve() -> None:
            first = True
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=answer, args=(conn, 1 if first else None),
                                 daemon=True).start()
                first = False

        threading.Thread(target=serve, daemon=True).start()
        try:
            yield path, ran
        finally:
            listener.close()


def test_a_request_met_by_the_idle_notice_goes_again_once() -> None:
    with closing_as_the_request_comes() as (path, ran):
        with Client(path, timeout=TIMEOUT) as client:
            assert client.call("status") == {"ran": 1}
            assert client.call("status") == {"ran": 2}  # sent again, on a new connection
            assert client.call("status") == {"ran": 3}
        assert ran == [1, 2, 3]

    async def use_async() -> None:
        with closing_as_the_request_comes() as (apath, aran):
            async with AsyncClient(apath, timeout=TIMEOUT) as aclient:
                assert await aclient.call("status") == {"ran": 1}
                assert await aclient.call("status") == {"ran": 2}
            assert aran == [1, 2]

    trio.run(use_async)


# -- watch -------------------------------------------------------------------------------


def test_watch_streams_events_until_the_client_closes() -> None:
    api = FakeAPI()
    with serving(api) as (path, _), Client(path, timeout=TIMEOUT) as client:
        with client.watch(topic="w", vector=[1, 0, 0]) as events:
            assert events.ack == {"watching": "w"}
            assert api.calls[-1] == ("watch", {"topic": "w", "vector": [1.0, 0.0, 0.0]})
            ids = [client.emit(topic="w", vector=[1, 2, 3], outcome={"i": i})
                   for i in range(3)]
            client.emit(topic="other", vector=[1, 2, 3], outcome={"i": 9})
            got = [next(events) for _ in range(3)]
            assert [e["id"] for e in got] == ids
        assert api.unwatched.wait(TIMEOUT)  # the server noticed and unsubscribed
        assert api.watchers == []
        with pytest.raises(ControlError) as err:
            client.watch(topic="refuse")
        assert err.value.code == "invalid"


def test_a_watch_that_ends_ends_and_one_cut_off_says_so() -> None:
    """A stream that ends says so (the iterator stops); a reader so slow that the
    daemon's write waits past its deadline is cut off, and the client raises saying
    packets after the last event did not reach it, rather than just stopping."""
    with (serving(GeneratorWatchAPI()) as (path, _), Client(path, timeout=TIMEOUT) as client,
          client.watch(topic="g") as events):
        assert len(list(events)) == 3  # then {"ended": true}: a clean stop
    with (serving(FloodWatchAPI(), write_timeout=0.3) as (path, _),
          Client(path, timeout=TIMEOUT).watch(topic="f") as events):
        first = next(events)
        trio.run(trio.sleep, 1.5)  # not reading: the daemon's write gives up
        got = 1
        with pytest.raises(ConnectionError, match="cut off"):
            for _ in events:
                got += 1
        assert first["id"] == f"{0:032x}" and got < 2000


def test_a_watching_connection_refuses_other_requests() -> None:
    with serving(FakeAPI()) as (path, _), raw_connect(path) as sock:
        sock.sendall(req(1, "watch", topic="w"))
        assert read_lines(sock, 1)[0]["result"] == {"watching": "w"}
        sock.sendall(req(2, "status"))
        reply = read_lines(sock, 1)[0]
        assert reply["id"] == 2 and reply["error"]["code"] == "bad_request"
        assert "watching" in reply["error"]["message"]


def test_watch_from_an_async_generator_ends_with_the_stream() -> None:
    with serving(GeneratorWatchAPI()) as (path, _), Client(path, timeout=TIMEOUT) as client:
        with client.watch(topic="g") as events:
            assert [e["id"] for e in events] == [f"{i:032x}" for i in range(3)]
        with pytest.raises(ControlError, match="not in this swarm"):
            client.watch(topic="refuse")


# -- one client cannot hold up the others ------------------------------------------------


def test_stuck_clients_do_not_block_others() -> None:
    with serving(FakeAPI()) as (path, _):
        silent = raw_connect(path)
        half = raw_connect(path)
        half.sendall(b'{"v": 1, "id": 1, "meth')
        try:
            with Client(path, timeout=TIMEOUT) as client:
                assert client.status()["peers"] == 2
            half.sendall(b'od": "identity"}\n')  # finishing the line later still works
            assert read_lines(half, 1)[0]["result"]["node_id"] == "ab" * 20
        finally:
            silent.close()
            half.close()


def test_a_client_that_stops_reading_is_disconnected() -> None:
    with serving(FakeAPI(), write_timeout=0.2) as (path, stats):
        stuck = raw_connect(path)
        try:
            # ~2 MB of reply, far more than the socket buffer, and we do not read.
            stuck.sendall(req(1, "packets", topic="big", limit=10_000))
            with Client(path, timeout=TIMEOUT) as client:
                assert client.status()["peers"] == 2  # served while the other blocks
            # Wait (without reading) for the server to hang up on us.
            poller = select.poll()
            poller.register(stuck, select.POLLRDHUP)
            assert poller.poll(TIMEOUT * 1000), "the server kept the stuck client"
            received = 0
            with _eof_or_reset():
                while chunk := stuck.recv(1 << 20):
                    received += len(chunk)
            assert received < 2_000_000  # cut off, not completed
        finally:
            stuck.close()
        with Client(path, timeout=TIMEOUT) as client:
            assert client.status()
        assert stats.statistics().requests[("packets", "ok")] == 1


@contextmanager
def _eof_or_reset() -> Iterator[None]:
    try:
        yield
    except ConnectionResetError:
        pass


async def test_connection_cap_refuses_with_unavailable() -> None:
    with short_dir() as tmp, trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            stats = ControlStats()
            path = await nursery.start(
                partial(serve_control, tmp / "c.sock", FakeAPI(), max_connections=2,
                        stats=stats))
            first = await trio.open_unix_socket(os.fspath(path))
            second = await trio.open_unix_socket(os.fspath(path))
            await trio.testing.wait_all_tasks_blocked()
            assert stats.statistics().connections_open == 2
            third = await trio.open_unix_socket(os.fspath(path))
            line = await third.receive_some(4096)
            reply = json.loads(line)
            assert reply["id"] is None and reply["error"]["code"] == "unavailable"
            assert await third.receive_some(4096) == b""  # and closed
            await third.aclose()
            await first.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert stats.statistics().connections_open == 1
            fourth = await trio.open_unix_socket(os.fspath(path))
            await fourth.send_all(req(1, "status"))
            assert json.loads(await fourth.receive_some(4096))["ok"] is True
            for stream in (second, fourth):
                await stream.aclose()
            assert stats.statistics().connections_refused == 1
            nursery.cancel_scope.cancel()


# -- claiming the socket path ----------------------------------------------------------------


def test_socket_mode_directory_and_cleanup() -> None:
    with short_dir() as tmp:
        path = tmp / "run" / "qisd.sock"

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_control, path, FakeAPI())
                assert stat.S_ISSOCK(os.lstat(path).st_mode)
                assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
                assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o750
                nursery.cancel_scope.cancel()

        trio.run(main)
        assert not path.exists()


async def test_live_socket_is_refused_and_stale_one_replaced() -> None:
    with short_dir() as tmp, trio.fail_after(TIMEOUT):
        path = tmp / "c.sock"
        # A stale socket file: bound, never listened on, never removed.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(os.fspath(path))
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, FakeAPI())
            with pytest.raises(ControlSocketInUse) as err:
                await serve_control(path, FakeAPI())
            assert f"another qisd is running on {path}" in str(err.value)
            # The refused attempt left the live socket alone.
            status = await trio.to_thread.run_sync(status_of, path)
            assert status["peers"] == 2
            nursery.cancel_scope.cancel()


async def test_unusable_socket_paths_are_named() -> None:
    with short_dir() as tmp:
        regular = tmp / "file"
        regular.write_text("not a socket")
        with pytest.raises(ControlSocketError, match=f"{regular} exists and is not a socket"):
            await serve_control(regular, FakeAPI())
        long_path = tmp / ("x" * 120)
        with pytest.raises(ControlSocketError, match="too long"):
            await serve_control(long_path, FakeAPI())


@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
                    reason="needs root to connect as another user")
def test_other_users_are_forbidden() -> None:
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
             "s.sendall(b'{\"v\":1,\"id\":1,\"method\":\"status\"}\\n');"
             "print(s.makefile().readline())")
    with serving(FakeAPI()) as (path, stats):
        os.chmod(path.parent, 0o755)
        os.chmod(path, 0o666)  # an operator's mistake: the credential check still holds
        out = subprocess.run(
            ["/usr/bin/python3", "-I", "-S", "-c", probe, os.fspath(path)],
            user=65534, group=65534, extra_groups=[], cwd="/", capture_output=True,
            timeout=TIMEOUT, check=True,
        )
        reply = json.loads(out.stdout)
        assert reply["error"]["code"] == "forbidden"
        assert "uid 65534" in reply["error"]["message"]
        assert stats.statistics().connections_forbidden == 1


def test_a_member_by_the_kernels_record_is_let_in() -> None:
    """The daemon's group among the peer's groups as the kernel recorded them at
    connect (SO_PEERGROUPS), though the user database does not list uid 65534 in it:
    what a daemon under systemd's PrivateUsers=yes sees of a member of its group."""
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
             "s.sendall(b'{\"v\":1,\"id\":1,\"method\":\"status\"}\\n');"
             "print(s.makefile().readline())")
    with serving(FakeAPI()) as (path, stats):
        os.chmod(path.parent, 0o755)
        os.chmod(path, 0o666)
        out = subprocess.run(
            ["/usr/bin/python3", "-I", "-S", "-c", probe, os.fspath(path)],
            user=65534, group=65534, extra_groups=[os.getegid()], cwd="/",
            capture_output=True, timeout=TIMEOUT, check=True,
        )
        assert json.loads(out.stdout)["ok"] is True
        assert stats.statistics().connections_forbidden == 0


def test_the_kernels_record_of_many_groups_is_read_whole() -> None:
    """More than 256 groups (Python's own getsockopt stops at 1024 bytes): a user of
    a directory service in many groups is still seen as a member."""
    many = [*range(50_000, 50_300), os.getegid()]
    with short_dir() as tmp:
        path = tmp / "g.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(os.fspath(path))
        os.chmod(path, 0o666)
        os.chmod(tmp, 0o755)
        listener.listen(1)
        probe = ("import socket,sys,time; s=socket.socket(socket.AF_UNIX);"
                 " s.connect(sys.argv[1]); time.sleep(5)")
        proc = subprocess.Popen(["/usr/bin/python3", "-I", "-S", "-c", probe, os.fspath(path)],
                                user=65534, group=65534, extra_groups=many, cwd="/")
        try:
            listener.settimeout(TIMEOUT)
            conn, _ = listener.accept()
            with conn:
                assert sorted(read_peer_groups(conn)) == sorted(many)
        finally:
            proc.kill()
            proc.wait()
            listener.close()


def test_documented_one_liner_works() -> None:
    """The python3 example in the protocol docstring, run as a user would type it."""
    doc = protocol.__doc__ or ""
    block = textwrap.dedent(doc[doc.index("    SOCK="):])
    lines = [ln for ln in block.splitlines() if not ln.startswith(("SOCK=", "echo "))]
    script = "\n".join(lines).replace("python3", shutil.which("python3") or "python3", 1)
    with serving(FakeAPI()) as (path, _):
        out = subprocess.run(["bash", "-c", script], env={**os.environ, "SOCK": str(path)},
                             capture_output=True, timeout=TIMEOUT, check=True, text=True)
    reply = json.loads(out.stdout)
    assert reply["ok"] is True and reply["result"]["node_id"] == "ab" * 20
