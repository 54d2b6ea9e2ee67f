"""The blocking client: talk to a running daemon from any Python program.

::

    from qisd import Client

    with Client() as qis:                     # $QISD_SOCKET, else the daemon's default
        pid = qis.emit(topic="triage", vector=[0.1, 0.7, 0.2], outcome={"admitted": True})
        found = qis.query(topic="triage", vector=[0.1, 0.6, 0.3], k=10)
        for match in found["matches"]:
            print(match["similarity"], match["outcome"])

One connection is opened on the first call and reused (calls from several threads
take turns); each :meth:`Client.watch` gets a connection of its own. Errors: a
:class:`ControlError` (with ``.code``) for an error reply, :class:`DaemonNotRunning`
when nothing answers on the socket, :class:`ControlSocketError` when
the path cannot be a control socket (too long, a file, a directory),
``TimeoutError`` when the daemon does not reply within ``timeout`` seconds, and
``ValueError`` naming the argument (``outcome.age``, ``vector[2]``) for arguments
JSON cannot carry, before anything is sent. Numpy arrays and scalars are taken as
the Python values they hold. :class:`AsyncClient` is the same API for trio.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from qisd.control.async_client import AsyncClient, AsyncWatch
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
from qisd.control.errors import ControlError, DaemonNotRunning
from qisd.control.framing import LineSplitter, Overflow
from qisd.control.protocol import (
    BAD_REPLY,
    Reply,
    RequestId,
    decode_reply,
    encode_request,
)

__all__ = ["AsyncClient", "AsyncWatch", "Client", "ControlError", "DaemonNotRunning", "Watch"]

_RECV = 64 * 1024


class _Line:
    """A connected socket read line by line."""

    def __init__(self, path: Path, timeout: float | None) -> None:
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
        except OSError as exc:
            sock.close()
            raise connect_error(path, exc) from None
        self.sock = sock
        self._splitter = LineSplitter(MAX_REPLY_BYTES)

    def close(self) -> None:
        self.sock.close()

    def stale(self) -> bool:
        """True once the daemon closed this connection or sent something unasked
        (its ``idle`` notice) since the last reply: it must not carry a request."""
        return self._splitter.pending > 0 or readable_now(self.sock)

    def read_reply(self) -> Reply | None:
        """The next reply line, or None when the daemon closed the connection."""
        while True:
            line = self._splitter.next()
            if line is Overflow.TOO_LONG:
                raise ControlError(BAD_REPLY, f"reply longer than {MAX_REPLY_BYTES} bytes")
            if line is not None:
                if line.strip():
                    return decode_reply(line)
                continue
            data = self.sock.recv(_RECV)
            if not data:
                return None
            self._splitter.feed(data)


def _closed(path: Path) -> ConnectionError:
    return ConnectionError(f"the daemon closed the control connection ({path})")


class Client:
    """A blocking connection to the daemon's control socket (see the module doc)."""

    def __init__(
        self, socket_path: str | os.PathLike[str] | None = None, *, timeout: float = 30.0
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = check_timeout(timeout)
        self._conn: _Line | None = None
        self._ids = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send one request and return its ``result`` map as the daemon sent it."""
        with self._lock:
            if self._conn is not None and self._conn.stale():
                self._drop()  # closed while idle (or the daemon restarted): a new one
            fresh = self._conn is None
            if self._conn is None:
                self._conn = _Line(self.socket_path, self.timeout)
            rid = self._next_id()
            data = encode_request(rid, method, params or {})
            try:
                reply = self._exchange(data, fresh)
                if reply is None:
                    raise _closed(self.socket_path)
                if reply.id is None:  # a connection-level error: the daemon closes
                    self._drop()
                return check_reply(reply, rid)
            except TimeoutError:
                self._drop()  # a late reply would answer the next request
                raise TimeoutError(
                    f"no reply to {method} within {self.timeout}s from {self.socket_path}"
                    " (a request that changes something may still be done: check first)"
                ) from None
            except ControlError as exc:
                if exc.code == BAD_REPLY:
                    self._drop()
                raise
            except (BrokenPipeError, ConnectionResetError):  # "[Errno 32] Broken pipe"
                self._drop()
                raise _closed(self.socket_path) from None
            except OSError:
                self._drop()
                raise

    def _exchange(self, data: bytes, fresh: bool) -> Reply | None:
        """Send one request and read its reply. On a connection that was idle
        (``fresh`` False), a daemon that closed it just as the request went (the send
        fails, or its ``idle`` notice comes back) did not run it: it goes once more
        on a new connection."""
        assert self._conn is not None
        try:
            self._conn.sock.sendall(data)
            reply = self._conn.read_reply()
        except (BrokenPipeError, ConnectionResetError):
            if fresh:
                raise
            reply = None
        else:
            if fresh or not idle_notice(reply):
                return reply
        self._drop()
        self._conn = _Line(self.socket_path, self.timeout)
        self._conn.sock.sendall(data)
        return self._conn.read_reply()

    # -- the methods -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``{"node_id", "listen", "peers", "packets", "metrics", "version", ...}``"""
        return self.call("status")

    def peers(self) -> list[dict[str, Any]]:
        """The peers in the routing table: ``[{"node_id", "address", ...}, ...]``."""
        return result_list(self.call("peers"), "peers")

    def identity(self) -> dict[str, Any]:
        """``{"node_id": hex, "public_key": hex}``"""
        return self.call("identity")

    def emit(
        self,
        *,
        topic: str,
        vector: Any,
        outcome: Mapping[str, Any],
        n: int = 1,
        ttl: int | None = None,
    ) -> str:
        """Sign and store one outcome packet; returns its id (hex). ``vector`` is a
        list, tuple or numpy array of numbers; ``ttl`` in seconds (None: the swarm's
        default)."""
        return result_str(self.call("emit", emit_params(topic, vector, outcome, n, ttl)), "id")

    def emit_many(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Emit several packets in one request; one result per item, in order:
        ``{"id": hex, ...}`` or ``{"error": {"code", "message"}}``. An item that
        cannot be sent (say a NaN in its outcome) gets its own ``bad_request``
        result naming ``items[i]``; the others are still sent."""
        send, slots = split_items(items)
        if not send:
            return merge_results(slots, [])
        result = self.call("emit_many", {"items": send})
        return merge_results(slots, result_list(result, "results"))

    def query(self, *, topic: str, vector: Any, k: int = 10) -> dict[str, Any]:
        """``{"matches": [{"id", "similarity", "outcome", "n", "origin", "kind"}, ...],
        "answer": {...}}``: the ``k`` most similar packets and the answer they give."""
        return self.call("query", {"topic": topic_text(topic),
                                   "vector": as_vector(vector), "k": json_value(k, "k")})

    def packets(self, *, topic: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Packets held by this node (summaries), newest first."""
        params: dict[str, Any] = {"limit": json_value(limit, "limit")}
        if topic is not None:
            params["topic"] = topic_text(topic)
        return result_list(self.call("packets", params), "packets")

    def bootstrap(self, addresses: str | Sequence[str]) -> dict[str, Any]:
        """Join the swarm through ``"host:port"`` peers: ``{"contacted", "peers"}``,
        and ``"failed": [{"address", "reason"}, ...]`` from daemons that say why.
        ``contacted`` 0 means no peer answered: the node is still alone."""
        return self.call("bootstrap", {"addresses": addresses_list(addresses)})

    def watch(self, *, topic: str, vector: Any = None) -> Watch:
        """Packets of ``topic`` as they arrive, on a connection of their own. Returns
        once the daemon has acknowledged, so later packets will be seen::

            with client.watch(topic="triage") as events:
                for event in events:
                    print(event["id"], event["outcome"])
        """
        params: dict[str, Any] = {"topic": topic_text(topic)}
        if vector is not None:
            params["vector"] = as_vector(vector)
        return Watch(self.socket_path, params, timeout=self.timeout)


class Watch:
    """A running watch: iterate for event dicts. Iteration stops when the daemon
    ends the stream (``{"ended": true}``), raises ControlError if it ends it with an
    error, and ConnectionError if the connection is cut without either (packets
    after the last event were then not delivered)."""

    _RID: RequestId = 1

    def __init__(self, path: Path, params: Mapping[str, Any], *, timeout: float) -> None:
        self._conn: _Line | None = _Line(path, timeout)
        self.path = path
        try:
            self._conn.sock.sendall(encode_request(self._RID, "watch", params))
            reply = self._conn.read_reply()
            if reply is None:
                raise _closed(path)
            self.ack = check_reply(reply, self._RID)
            # Events may be minutes apart: from here on, wait as long as it takes.
            self._conn.sock.settimeout(None)
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._conn is None:
            raise StopIteration
        try:
            reply = self._conn.read_reply()
            if reply is None:
                path = self._conn.path
                self.close()
                raise watch_cut(path)
            if watch_ended(reply):
                self.close()
                raise StopIteration
            if reply.event is None:
                check_reply(reply, self._RID)  # an error reply ends the stream
                raise ControlError(BAD_REPLY, "daemon sent a reply inside a watch")
        except (ControlError, OSError):
            self.close()
            raise
        return reply.event

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
