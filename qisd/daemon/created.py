"""``created_ms`` for the packets a node emits, so that no two emits are one packet (pure).

A packet's id is the hash of its signed encoding and Ed25519 signatures are
deterministic, so two emits of the same case (same topic, vector, outcome, n, ttl)
within one millisecond would be byte for byte the same packet: the second would be
stored as a duplicate of the first and one case would silently vanish (a batch of
identical lines does exactly that). :class:`CreationClock` gives each emit the wall
clock's millisecond, and content already given this millisecond the next one, which
the emit waits for (:meth:`CreationClock.wait_s`): a packet is never stamped later
than it was made, so identical cases go at most one per millisecond, a stamp never
runs ahead of the clock (peers refuse packets from the future, and a synthesis
counts the cases created before it), and after a restart the clock is already past
every stamp given before it.
"""

from __future__ import annotations

from collections.abc import Callable

from qisd.packet import wall_ms

#: Entries kept before those that can no longer collide (given before now) go.
PRUNE_AT = 1024
#: A stamp this far ahead of the clock means the clock stepped back: forgotten,
#: not waited for.
STEPPED_BACK_MS = 1000


class CreationClock:
    def __init__(self, clock: Callable[[], int] = wall_ms) -> None:
        self._clock = clock
        #: Content key -> the last created_ms given to that content.
        self._last: dict[bytes, int] = {}

    def created_ms(self, content: bytes) -> int:
        """The ``created_ms`` for a packet whose content (all but its time) is
        ``content``: now, or the millisecond after the last one given to the same
        content (wait for it with :meth:`wait_s` before signing)."""
        now = self._clock()
        if len(self._last) >= PRUNE_AT:
            self._last = {k: ms for k, ms in self._last.items()
                          if now <= ms <= now + STEPPED_BACK_MS}
        last = self._last.get(content)
        stale = last is None or not now <= last <= now + STEPPED_BACK_MS
        created = now if stale or last is None else last + 1
        self._last[content] = created
        return created

    def wait_s(self, created_ms: int) -> float:
        """Seconds until the clock reaches ``created_ms`` (0 once it has)."""
        return max(0.0, (created_ms - self._clock()) / 1000)

    def __len__(self) -> int:
        return len(self._last)
