"""What the control server asks of the daemon: the :class:`ControlAPI` protocol.

The server parses and type-checks each request against
:data:`qisd.control.protocol.METHODS`, then calls the method of the same name with
the params as keyword arguments (defaults filled in, vectors as lists of float). A
method returns a plain JSON-ready dict, or raises
:class:`~qisd.control.errors.ControlError` with a protocol code (``invalid``,
``unavailable``...) and a message naming what is wrong; any other exception is a bug
and becomes an ``internal`` reply while the connection stays up.

``emit_many`` only receives items that passed the same checks as ``emit``'s params;
the server answers the others itself and merges the results back in order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

__all__ = ["ControlAPI", "JSONDict", "WatchStream"]

JSONDict = dict[str, Any]

#: What ``watch`` returns: an async iterator of event dicts (e.g. an async
#: generator), or an async context manager yielding one. Prefer the context manager
#: when subscribing takes effect on entry: the server enters it *before* it sends the
#: ack, so a client that sees the ack is sure to see every later packet. A plain
#: async generator only starts when the first event is asked for, after the ack.
WatchStream = AsyncIterator[JSONDict] | AbstractAsyncContextManager[AsyncIterator[JSONDict]]


class ControlAPI(Protocol):
    """The daemon's side of the control socket (implemented by the node service)."""

    async def status(self) -> JSONDict:
        """``{"node_id", "listen", "peers", "packets", "metrics", "version", ...}``"""
        ...

    async def peers(self) -> JSONDict:
        """``{"peers": [{"node_id", "address", ...}, ...]}``"""
        ...

    async def identity(self) -> JSONDict:
        """``{"node_id": hex, "public_key": hex}``"""
        ...

    async def emit(
        self,
        *,
        topic: str,
        vector: list[float],
        outcome: dict[str, Any],
        n: int = 1,
        ttl: int | None = None,
    ) -> JSONDict:
        """Sign and store one packet: ``{"id": hex, ...}``."""
        ...

    async def emit_many(self, *, items: list[dict[str, Any]]) -> JSONDict:
        """``{"results": [{"id": hex, ...} | {"error": {"code", "message"}}, ...]}``,
        exactly one per item, in order."""
        ...

    async def query(self, *, topic: str, vector: list[float], k: int = 10) -> JSONDict:
        """``{"matches": [{"id", "similarity", "outcome", "n", "origin", "kind"}, ...],
        "answer": {...}}``"""
        ...

    def watch(self, *, topic: str, vector: list[float] | None = None) -> WatchStream:
        """Packet summaries of ``topic`` as they arrive (see :data:`WatchStream`).
        May raise ControlError at once for a bad topic or vector."""
        ...

    async def packets(self, *, topic: str | None = None, limit: int = 100) -> JSONDict:
        """``{"packets": [summary, ...]}``, stored packets, newest first."""
        ...

    async def bootstrap(self, *, addresses: list[str]) -> JSONDict:
        """``{"contacted": int, "peers": int}``"""
        ...
