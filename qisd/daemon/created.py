"""``created_ms`` for the packets a node emits, so that no two emits are one packet (pure).

A packet's id is the hash of its signed encoding and Ed25519 signatures are
deterministic, so two emits of the same case (same topic, vector, outcome, n, ttl)
within one millisecond would be byte for byte the same packet: the second would be
stored as a duplicate of the first and one case would silently vanish (a batch of
identical lines does exactly that). :class:`CreationClock` gives each emit the wall
clock's millisecond, except that content already emitted at that millisecond (or
later, after earlier bumps) gets the millisecond after its last one. Only identical
content is moved, by one millisecond per copy, so distinct packets keep the real
time and the clock never runs ahead for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Entries kept before those that can no longer collide (last use in the past) go.
PRUNE_AT = 4096


def wall_ms() -> int:
    return int(time.time() * 1000)


class CreationClock:
    def __init__(self, clock: Callable[[], int] = wall_ms) -> None:
        self._clock = clock
        #: Content key -> the last created_ms given to that content.
        self._last: dict[bytes, int] = {}

    def created_ms(self, content: bytes) -> int:
        """The ``created_ms`` for a packet whose content (all but its time) is
        ``content``: now, or one past the last one given to the same content."""
        now = self._clock()
        if len(self._last) >= PRUNE_AT:
            # Content last given a time before now gets now or later: no collision.
            self._last = {k: ms for k, ms in self._last.items() if ms >= now}
        last = self._last.get(content)
        created = now if last is None or last < now else last + 1
        self._last[content] = created
        return created

    def __len__(self) -> int:
        return len(self._last)
