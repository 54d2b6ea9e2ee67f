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
republished as before. An entry whose packet expired leaves at the next expiry sweep
(:meth:`RecentStores.forget_expired`), so what is held here follows the live
packets, not the republish interval. Pure: the caller passes the times.
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
        #: When each noted packet expires (wall ms), one per packet, not per key.
        self._expires: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._at)

    def note(self, key: bytes, packets: Iterable[tuple[bytes, int]], now: float) -> None:
        """Another holder of ``key`` stored these packets (``(id, expires_ms)``) under
        it here at ``now``."""
        at, expires = self._at, self._expires
        for pid, expires_ms in packets:
            at.pop((key, pid), None)  # re-insert: dict order stays oldest first
            at[(key, pid)] = now
            expires[pid] = expires_ms
        if len(at) > self.max_entries:
            for entry in list(at)[: len(at) - self.max_entries // 2]:
                del at[entry]
            self._keep_expiries_of_entries()

    def forget_expired(self, now_ms: int) -> int:
        """Drop the entries of packets expired by ``now_ms``; returns how many."""
        gone = {pid for pid, expires_ms in self._expires.items() if expires_ms <= now_ms}
        if not gone:
            return 0
        before = len(self._at)
        self._at = {entry: when for entry, when in self._at.items() if entry[1] not in gone}
        self._keep_expiries_of_entries()
        return before - len(self._at)

    def _keep_expiries_of_entries(self) -> None:
        held = {pid for _, pid in self._at}
        self._expires = {pid: e for pid, e in self._expires.items() if pid in held}

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
        if stale:
            self._keep_expiries_of_entries()
