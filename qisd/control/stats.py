"""Counters of the control server, read by the metrics collector as a snapshot."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["ControlStatistics", "ControlStats"]


@dataclass(frozen=True)
class ControlStatistics:
    """An immutable snapshot of :class:`ControlStats`.

    ``requests`` maps ``(method, result)`` to a count, where ``result`` is ``"ok"`` or
    an error code and ``method`` is ``"-"`` for a line refused before its method was
    known (bad JSON, too large) and ``"unknown"`` for an unknown method name, so the
    label set stays bounded whatever clients send.
    """

    requests: Mapping[tuple[str, str], int]
    connections_total: int
    connections_open: int
    #: Connections turned away at the cap on concurrent connections.
    connections_refused: int
    #: Connections closed because the peer's credentials were not allowed.
    connections_forbidden: int
    #: Connections closed by an unexpected error in their handling (a bug; logged).
    connections_failed: int
    #: Connections closed after ``idle_timeout`` seconds without a request.
    connections_idle: int = 0


@dataclass
class ControlStats:
    """Mutable counters updated by the server (single trio thread, so no lock)."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    connections_total: int = 0
    connections_open: int = 0
    connections_refused: int = 0
    connections_forbidden: int = 0
    connections_failed: int = 0
    connections_idle: int = 0

    def record(self, method: str, result: str) -> None:
        self.requests[(method, result)] += 1

    def statistics(self) -> ControlStatistics:
        return ControlStatistics(
            requests=MappingProxyType(dict(self.requests)),
            connections_total=self.connections_total,
            connections_open=self.connections_open,
            connections_refused=self.connections_refused,
            connections_forbidden=self.connections_forbidden,
            connections_failed=self.connections_failed,
            connections_idle=self.connections_idle,
        )
