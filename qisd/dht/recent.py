"""When another holder of a key last stored each (key, packet) entry here (paper 2.5).

A node that receives a store for an entry from another holder of the key (a node
among the key's ``replicas`` closest that it knows: that holder's republish, or its
hand-off) takes it that the sender's republish reached the key's replica set, and
does not republish that entry itself within the republish interval. So in steady
state a key's holders republish about once per interval between them, not once
each. Stores from anyone else never count: an origin's put (it may have reached
fewer than ``replicas`` nodes under load, so the holders' first republish after it
must run), a placement passing through, or a replay of public packets (no peer
outside the key's neighbourhood can switch a holder's republish off). An entry no
holder has stored lately (a copy a republish missed, a holder that left) is
republished as before. Pure: the caller passes the time.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Entries remembered (about 160-250 bytes each: up to ~60 MB at the cap); past it
#: the oldest half is forgotten. A forgotten entry is republished as if no peer had stored it:
#: that costs RPCs but loses nothing.
MAX_ENTRIES = 250_000


class RecentStores:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._at: dict[tuple[bytes, bytes], float] = {}

    def __len__(self) -> int:
        return len(self._at)

    def note(self, key: bytes, ids: Iterable[bytes], now: float) -> None:
        """Another holder of ``key`` stored these packets under it here at ``now``."""
        at = self._at
        for pid in ids:
            at.pop((key, pid), None)  # re-insert: dict order stays oldest first
            at[(key, pid)] = now
        if len(at) > self.max_entries:
            for entry in list(at)[: len(at) - self.max_entries // 2]:
                del at[entry]

    def fresh(self, key: bytes, pid: bytes, now: float, within: float) -> bool:
        """Whether a peer stored this entry here less than ``within`` seconds ago."""
        when = self._at.get((key, pid))
        return when is not None and now - when < within

    def forget_older(self, now: float, age: float) -> None:
        """Drop entries stored ``age`` or more seconds ago (they no longer count)."""
        at = self._at
        stale = []
        for entry, when in at.items():
            if now - when < age:
                break  # oldest first: the rest are newer
            stale.append(entry)
        for entry in stale:
            del at[entry]
