"""The default synthesizer: cohorts of similar cases, one synthesis packet per cohort.

Per topic (and sketch dimension), packets are grouped by leader clustering: a packet
joins the cohort whose centroid is most similar to its sketch if that cosine reaches
``similarity``, and otherwise starts a cohort of its own. A centroid is the running
mean of its members' unit vectors, re-normalised, so it drifts with its members; the
cohort's ``series`` is fixed by its first member, so every new synthesis of it
supersedes the previous one in the stores that hold it.

A cohort is synthesised when it describes at least ``min_cohort`` cases (the privacy
floor: smaller cohorts are never published) and enough new evidence arrived since its
last draft (``min_new`` packets, or any new packet once ``interval`` has passed since
``ready`` first saw it). Packets of generation >= ``max_generation`` are never consumed,
and syntheses are not consumed at all unless the ``include_syntheses`` option is set
(it only matters when the cap allows generation 2), so the loop cannot feed on itself
and a case is never counted once raw and again inside a synthesis.

Memory is bounded: at most ``max_members`` ids per cohort (a full cohort takes no new
members, so similar packets start a fresh cohort beside it), at most
``max_cohorts_per_topic`` cohorts per topic and ``max_cohorts`` in all (the least
recently updated cohort is evicted, its published synthesis simply ages out), and a
cohort is forgotten once all its members expired. Packet ids are deduplicated for as
long as their cohort lives; an evicted cohort's packets could be counted again if
re-delivered.

After a restart, :meth:`CohortSynthesizer.resume` takes the node's cohorts back from
its own live syntheses, so the next synthesis of a cohort keeps superseding the last.

Options (``SynthesizerSettings.options``): ``max_members`` (1024),
``max_cohorts_per_topic`` (256), ``max_cohorts`` (4096), ``include_syntheses``
(false), ``ranges`` (``{field: [lo, hi]}``, see :mod:`qisd.synthesis.noise`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from qisd.packet import KIND_SYNTHESIS, MAX_N, OutcomePacket
from qisd.sketch import FloatArray
from qisd.synthesis.base import (
    SynthesisDraft,
    SynthesizerError,
    SynthesizerSettings,
    bounded_parents,
    series_id,
)
from qisd.synthesis.encoding import EncodingError, decode_outcome, encode_aggregate
from qisd.synthesis.noise import noisy_aggregate, noisy_count
from qisd.synthesis.stats import OutcomeAggregate

_OPTION_DEFAULTS: dict[str, Any] = {
    "max_members": 1024,
    "max_cohorts_per_topic": 256,
    "max_cohorts": 4096,
    "include_syntheses": False,
    "ranges": {},
}


@dataclass(eq=False)
class Cohort:
    """One group of similar packets and what is known about them."""

    seq: int
    topic: str
    series: bytes
    vector_sum: FloatArray
    centroid: FloatArray
    members: list[bytes] = field(default_factory=list)
    origins: set[bytes] = field(default_factory=set)
    cases: int = 0
    aggregate: OutcomeAggregate = field(default_factory=OutcomeAggregate)
    #: Packets added since the last draft.
    new: int = 0
    #: When ``ready`` first saw the pending new packets (ms), for the interval rule.
    waiting_since_ms: int | None = None
    drafts: int = 0
    generation: int = 0
    expires_ms: int = 0
    touched: int = 0
    #: While resuming (see :meth:`CohortSynthesizer.resume`): the old synthesis's
    #: members as it named them, and that its centroid stays put while they come
    #: back (what is new is decided once they have).
    previous: _Previous | None = None
    pinned: bool = False


@dataclass(frozen=True)
class _Previous:
    """What a resumed synthesis said of its members: how many, and its parents
    (listed ids, or one digest of them all)."""

    packets: int
    parents: tuple[bytes, ...]
    listed: bool


@dataclass(eq=False)
class _Group:
    """The cohorts of one (topic, dim), with their centroids as matrix rows."""

    dim: int
    cohorts: list[Cohort] = field(default_factory=list)
    matrix: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))
    #: Rows of cohorts that reached ``max_members`` (they take no new members).
    full: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def __post_init__(self) -> None:
        self.matrix = np.zeros((0, self.dim))


class CohortSynthesizer:
    """Leader clustering by sketch cosine; see the module docstring for the rules."""

    def __init__(
        self, settings: SynthesizerSettings | None = None, *, rng: random.Random | None = None
    ) -> None:
        self.settings = settings or SynthesizerSettings()
        opts = _options(self.settings.options)
        self.max_members: int = opts["max_members"]
        self.max_cohorts_per_topic: int = opts["max_cohorts_per_topic"]
        self.max_cohorts: int = opts["max_cohorts"]
        self.include_syntheses: bool = opts["include_syntheses"]
        self.ranges: dict[str, tuple[float, float]] = opts["ranges"]
        # Noise must not be predictable: OS entropy unless a test injects a seed.
        self._rng = rng or random.SystemRandom()
        self._groups: dict[tuple[str, int], _Group] = {}
        self._cohorts: dict[int, Cohort] = {}
        self._index: dict[bytes, Cohort] = {}
        self._series: dict[bytes, Cohort] = {}
        #: While resuming: listed parents of the resumed syntheses (the cohort each
        #: goes back to) and the ids of those syntheses (not consumed again).
        self._expected: dict[bytes, Cohort] = {}
        self._previous: set[bytes] = set()
        self._seq = 0
        self._tick = 0
        self._counts: dict[str, int] = dict.fromkeys(
            ("consumed", "duplicates", "skipped_generation", "skipped_synthesis",
             "skipped_undecodable", "skipped_empty", "evicted", "expired", "drafts",
             "fields_dropped", "resumed"), 0)

    # -- after a restart ---------------------------------------------------------

    def resume(self, previous: Iterable[OutcomePacket]) -> int:
        """Take back the cohorts of this node's own live syntheses from before a
        restart (the worker then re-reads the store): each comes back empty, under
        its old ``series`` and centroid, so the packets it held rejoin it and its
        next synthesis supersedes the old one instead of standing beside it with
        the same cases. Listed parents go straight back to their cohort; the
        others rejoin by similarity to the old centroid, which stays put until the
        next :meth:`ready` (the worker re-reads the store before it). There the
        resume ends: a cohort's members are compared with what its old synthesis
        named, and only members it did not name are new (a cohort whose members
        all came back and no other is not synthesised again; members that did not
        come back, expired meanwhile, are not waited for, as an expired member is
        not without a restart). A cohort no member rejoined is forgotten at the
        next :meth:`forget`. At most ``max_cohorts`` (and ``max_cohorts_per_topic``
        per topic) of the newest syntheses are taken. Returns the cohorts resumed.
        """
        count = 0
        for packet in self._resumable(previous):
            try:
                decoded = decode_outcome(packet.outcome, packet.n)
                unit = packet.sketch.to_array()
            except (EncodingError, ValueError):
                self._counts["skipped_undecodable"] += 1
                continue
            if not np.any(unit):
                continue
            cohort = self._start(packet.topic, unit, packet.series)
            cohort.vector_sum = np.zeros_like(unit)  # the members' sum, once they rejoin
            listed = len(packet.parents) == decoded.packets
            cohort.previous = _Previous(decoded.packets, packet.parents, listed)
            cohort.pinned = True
            self._tick += 1
            cohort.touched = self._tick  # not the first evicted while they come back
            self._previous.add(packet.id)
            if listed:
                for pid in packet.parents:
                    self._expected[pid] = cohort
            count += 1
        self._counts["resumed"] += count
        return count

    def _resumable(self, previous: Iterable[OutcomePacket]) -> list[OutcomePacket]:
        """The syntheses :meth:`resume` takes: one per series (the newest), newest
        first, within the cohort caps (more would only evict one another)."""
        newest: dict[bytes, OutcomePacket] = {}
        for packet in previous:
            if packet.kind != KIND_SYNTHESIS or not packet.series:
                continue  # (an empty series names no cohort)
            held = newest.get(packet.series)
            if held is None or packet.created_ms > held.created_ms:
                newest[packet.series] = packet
        taken: list[OutcomePacket] = []
        per_group: dict[tuple[str, int], int] = {}
        for packet in sorted(newest.values(), key=lambda p: (-p.created_ms, p.id)):
            if packet.series in self._series:
                continue
            group = (packet.topic, packet.sketch.dim)
            if per_group.get(group, 0) >= self.max_cohorts_per_topic:
                continue
            if len(taken) + len(self._cohorts) >= self.max_cohorts:
                break
            per_group[group] = per_group.get(group, 0) + 1
            taken.append(packet)
        return taken

    def _end_resume(self) -> None:
        """The worker re-read the store before this pass: members that did not come
        back by now are not waited for, centroids follow their members again, and
        what is new in each resumed cohort is what its old synthesis did not name."""
        self._expected.clear()
        self._previous.clear()
        for group in self._groups.values():
            for i, cohort in enumerate(group.cohorts):
                if cohort.pinned:
                    cohort.pinned = False
                    cohort.new = self._new_since(cohort)
                    cohort.previous = None
                    norm = float(np.linalg.norm(cohort.vector_sum))
                    if norm > 0:
                        cohort.centroid = cohort.vector_sum / norm
                        group.matrix[i] = cohort.centroid

    def _new_since(self, cohort: Cohort) -> int:
        """Members of a resumed cohort that its old synthesis did not count."""
        prev = cohort.previous
        if prev is None:
            return cohort.new
        if prev.listed:
            return len(set(cohort.members) - set(prev.parents))
        # Digested: only "the same members or not" can be told.
        # (With max_parents 0 both sides are empty: the count alone tells. A draft
        # too large for the packet cap was published with its parents digested
        # even when fewer: qisd.daemon.synth.publish_draft.)
        same = (len(cohort.members) == prev.packets and prev.parents in (
            bounded_parents(cohort.members, self.settings.max_parents)[0],
            bounded_parents(cohort.members, 1)[0]))
        return 0 if same else max(1, len(cohort.members) - prev.packets)

    # -- consuming ---------------------------------------------------------------

    def consume(self, packet: OutcomePacket) -> None:
        if packet.generation >= self.settings.max_generation:
            self._counts["skipped_generation"] += 1
            return
        if packet.kind == KIND_SYNTHESIS and not self.include_syntheses:
            self._counts["skipped_synthesis"] += 1
            return
        pid = packet.id
        if pid in self._index or pid in self._previous:
            self._counts["duplicates"] += 1
            return
        if packet.kind == KIND_SYNTHESIS:
            try:
                addition = decode_outcome(packet.outcome, packet.n).aggregate
            except EncodingError:
                self._counts["skipped_undecodable"] += 1
                return
        else:
            addition = None
        unit = packet.sketch.to_array()
        if not np.any(unit):
            self._counts["skipped_empty"] += 1
            return
        cohort = self._rejoin(pid, unit) or self._place(packet.topic, unit, pid)
        self._tick += 1
        cohort.touched = self._tick
        cohort.members.append(pid)
        self._index[pid] = cohort
        cohort.origins.add(packet.origin)
        cohort.cases += packet.n
        if addition is None:
            cohort.aggregate.add_outcome(packet.outcome, packet.n)
        else:
            cohort.aggregate.merge(addition)
        cohort.generation = max(cohort.generation, packet.generation)
        cohort.expires_ms = max(cohort.expires_ms, packet.expires_ms)
        if not cohort.pinned:  # (a resumed cohort's new members are told at its end)
            cohort.new += 1
        self._counts["consumed"] += 1

    def _rejoin(self, pid: bytes, unit: FloatArray) -> Cohort | None:
        """The resumed cohort ``pid`` was a listed parent of, if it is still here."""
        cohort = self._expected.pop(pid, None)
        if (cohort is None or self._cohorts.get(cohort.seq) is not cohort
                or unit.size != cohort.centroid.size):
            return None
        group = self._groups[(cohort.topic, unit.size)]
        i = group.cohorts.index(cohort)
        if group.full[i]:
            return None  # full (max_members): it takes no more, listed or not
        self._grow(group, i, unit)
        return cohort

    def _grow(self, group: _Group, i: int, unit: FloatArray) -> None:
        """Add ``unit`` to cohort ``i`` of ``group``: its centroid follows (unless
        pinned while resuming)."""
        cohort = group.cohorts[i]
        cohort.vector_sum += unit
        if not cohort.pinned:
            cohort.centroid = cohort.vector_sum / np.linalg.norm(cohort.vector_sum)
            group.matrix[i] = cohort.centroid
        # consume() appends the member right after this returns.
        group.full[i] = len(cohort.members) + 1 >= self.max_members

    def _place(self, topic: str, unit: FloatArray, pid: bytes) -> Cohort:
        """The cohort ``unit`` joins (its centroid updated), or a new one it leads."""
        group = self._groups.get((topic, unit.size))
        if group is None:
            group = self._groups[(topic, unit.size)] = _Group(unit.size)
        if group.cohorts:
            sims = np.where(group.full, -math.inf, group.matrix @ unit)
            best = int(np.argmax(sims))
            if sims[best] >= self.settings.similarity:
                self._grow(group, best, unit)
                return group.cohorts[best]
        return self._start(topic, unit, self._fresh_series(topic, pid))

    def _fresh_series(self, topic: str, pid: bytes) -> bytes:
        """The series of a cohort ``pid`` starts: named by it, unless a live cohort
        already has that name (one resumed after a restart whose first member went
        elsewhere): then a variant, so no two cohorts supersede each other."""
        series = series_id(self.settings.salt, topic, pid)
        n = 0
        while series in self._series:
            n += 1
            series = series_id(self.settings.salt, topic, pid + n.to_bytes(4, "big"))
        return series

    def _start(self, topic: str, unit: FloatArray, series: bytes) -> Cohort:
        """A new cohort led by ``unit`` (evicting the least recently updated if full)."""
        group = self._groups.get((topic, unit.size))
        if group is None:
            group = self._groups[(topic, unit.size)] = _Group(unit.size)
        # The least recently updated goes; cohorts whose members are still coming
        # back after a restart go last.
        if len(group.cohorts) >= self.max_cohorts_per_topic:
            self._evict(min(group.cohorts, key=_eviction_order))
        if len(self._cohorts) >= self.max_cohorts:
            self._evict(min(self._cohorts.values(), key=_eviction_order))
        # An eviction may have emptied (and unlisted) this very group.
        group = self._groups.setdefault((topic, unit.size), group)
        self._seq += 1
        cohort = Cohort(
            seq=self._seq, topic=topic, series=series,
            vector_sum=unit.copy(), centroid=unit.copy(),
        )
        self._cohorts[cohort.seq] = cohort
        self._series[series] = cohort
        group.cohorts.append(cohort)
        group.matrix = np.vstack([group.matrix, unit[np.newaxis, :]])
        group.full = np.append(group.full, self.max_members <= 1)
        return cohort

    def _evict(self, cohort: Cohort, *, counter: str = "evicted") -> None:
        key = (cohort.topic, cohort.centroid.size)
        group = self._groups[key]
        i = group.cohorts.index(cohort)
        del group.cohorts[i]
        group.matrix = np.delete(group.matrix, i, axis=0)
        group.full = np.delete(group.full, i)
        if not group.cohorts:
            del self._groups[key]
        del self._cohorts[cohort.seq]
        del self._series[cohort.series]
        for pid in cohort.members:
            self._index.pop(pid, None)
        self._counts[counter] += 1

    # -- emitting ----------------------------------------------------------------

    def ready(self, now_ms: int) -> list[SynthesisDraft]:
        if self._previous:
            self._end_resume()
        interval_ms = self.settings.interval * 1000
        drafts = []
        for cohort in list(self._cohorts.values()):
            if cohort.new == 0 or cohort.cases < self.settings.min_cohort:
                continue
            if cohort.waiting_since_ms is None:
                cohort.waiting_since_ms = now_ms
            due = (cohort.new >= self.settings.min_new
                   or now_ms - cohort.waiting_since_ms >= interval_ms)
            if not due:
                continue
            drafts.append(self._draft(cohort))
            cohort.new = 0
            cohort.waiting_since_ms = None
            cohort.drafts += 1
        self._counts["drafts"] += len(drafts)
        return drafts

    def _draft(self, cohort: Cohort) -> SynthesisDraft:
        eps = self.settings.epsilon
        aggregate = noisy_aggregate(cohort.aggregate, epsilon=eps, rng=self._rng,
                                    ranges=self.ranges)
        # A packet's n is capped (MAX_N); a cohort's cases can add up past it (one
        # member claiming the cap is enough), and the synthesis must still be a packet.
        n = min(noisy_count(cohort.cases, eps, self._rng, minimum=1), MAX_N)
        origins = noisy_count(len(cohort.origins), eps, self._rng, minimum=1)
        encoded = encode_aggregate(aggregate, n=n, packets=len(cohort.members), origins=origins)
        self._counts["fields_dropped"] += len(encoded.dropped)
        parents, digest = bounded_parents(cohort.members, self.settings.max_parents)
        return SynthesisDraft(
            topic=cohort.topic,
            centroid=tuple(float(x) for x in cohort.centroid),
            outcome=encoded.outcome,
            n=n,
            parents=parents,
            parents_digest=digest,
            series=cohort.series,
            generation=cohort.generation + 1,
            expires_ms=cohort.expires_ms,
        )

    # -- upkeep ------------------------------------------------------------------

    def forget(self, now_ms: int) -> int:
        """Drop cohorts all of whose members expired; returns how many."""
        gone = [c for c in self._cohorts.values() if c.expires_ms <= now_ms]
        for cohort in gone:
            self._evict(cohort, counter="expired")
        return len(gone)

    def cohorts(self) -> list[Cohort]:
        """The live cohorts, oldest first (for inspection and tests)."""
        return list(self._cohorts.values())

    def statistics(self) -> dict[str, int]:
        return {**self._counts, "cohorts": len(self._cohorts), "members": len(self._index)}


def _eviction_order(cohort: Cohort) -> tuple[bool, int]:
    return cohort.pinned, cohort.touched


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS))
    if unknown:
        raise SynthesizerError(
            f"cohort synthesizer option {unknown[0]!r} is unknown; "
            f"known: {', '.join(sorted(_OPTION_DEFAULTS))}"
        )
    opts = {**_OPTION_DEFAULTS, **options}
    for name in ("max_members", "max_cohorts_per_topic", "max_cohorts"):
        value = opts[name]
        if type(value) is not int or value < 1:
            raise SynthesizerError(f"cohort synthesizer option {name}: must be an int >= 1")
    if not isinstance(opts["include_syntheses"], bool):
        raise SynthesizerError("cohort synthesizer option include_syntheses: must be a bool")
    ranges: dict[str, tuple[float, float]] = {}
    raw = opts["ranges"]
    if not isinstance(raw, Mapping):
        raise SynthesizerError("cohort synthesizer option ranges: must map field -> [lo, hi]")
    for name, pair in raw.items():
        ok = (isinstance(pair, list | tuple) and len(pair) == 2
              and all(isinstance(x, int | float) and not isinstance(x, bool)
                      and math.isfinite(x) for x in pair)
              and pair[0] <= pair[1] and math.isfinite(pair[1] - pair[0]))
        if not ok:
            raise SynthesizerError(
                f"cohort synthesizer option ranges.{name}: must be [lo, hi] with lo <= hi"
                " (finite, and hi - lo too)"
            )
        ranges[str(name)] = (float(pair[0]), float(pair[1]))
    opts["ranges"] = ranges
    return opts
