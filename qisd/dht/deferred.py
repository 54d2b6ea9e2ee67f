"""What an RPC handler may return besides an answer (pure).

A handler answers at once (its return value is the reply), returns :data:`NO_REPLY`
to send nothing, or returns :class:`Deferred` work that must await (storage, a
closed-swarm proof) and that the transport runs in its bounded handler nursery
(:mod:`qisd.dht.transport`). Kept apart from the transport so the pure modules that
wrap handler work (:mod:`qisd.dht.fairness`) need no trio.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["NO_REPLY", "Deferred"]

#: Returned by a handler (or deferred work) that must not answer at all.
NO_REPLY: Any = object()


@dataclass(frozen=True, slots=True)
class Deferred:
    """Handler work that must await (storage); run in the bounded handler nursery.

    ``busy`` is the answer sent at once when the nursery is full (qisd RPCs say
    "busy" so the caller can tell an overloaded peer from a stock node that ignores
    them); the default drops the request.
    """

    work: Callable[[], Awaitable[Any]]
    busy: Any = NO_REPLY
