"""Weighted running statistics of outcome fields (pure; no I/O).

A packet distils ``n`` cases into one outcome map, so every value counts ``n`` times:
weights here are case counts (frequency weights), and a query answer multiplies them
by similarity. Numbers keep a weighted mean and variance updated one value at a time
(West 1979, the weighted form of Welford's update) and merged pairwise (Chan, Golub and
LeVeque's parallel formula), so a cohort's statistics never depend on the order its
packets arrived in, and two aggregates combine exactly as if their inputs had been
pooled. Variance is the population form, ``sum w (x - mean)^2 / sum w``: a cohort
describes its cases, it does not estimate anything beyond them.

Categories (str and bool values; a bool stays a bool, so ``True`` and ``"True"`` are
different categories) keep a weighted count each, up to a cap; categories past the cap
are pooled into ``other`` so memory stays bounded while totals stay right.

A field seen with mixed types is numeric while every value is a number, and categorical
(numbers as ``str(value)``) once any str or bool arrives. To make that switch possible
every field also keeps the bounded categorical view of its numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

#: Categories tracked per field before new ones are pooled into ``other``.
MAX_CATEGORIES = 64
#: Fields tracked per aggregate; values of further fields are counted in ``dropped``.
MAX_FIELDS = 64

Category = str | bool
OutcomeValue = int | float | str | bool

NUMERIC = "numeric"
CATEGORICAL = "categorical"


@dataclass(slots=True)
class NumericStat:
    """Weighted mean, variance, minimum and maximum of a stream of numbers."""

    weight: float = 0.0
    mean: float = 0.0
    #: Sum of ``w * (x - mean)^2``; variance is ``m2 / weight``.
    m2: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def add(self, value: float, weight: float = 1.0) -> None:
        """Add ``value`` seen ``weight`` times (weight <= 0 is ignored)."""
        if weight <= 0:
            return
        value = float(value)
        total = self.weight + weight
        delta = value - self.mean
        # West's update: the mean moves by the new weight's share of the deviation,
        # and m2 grows by the deviation measured before and after that move.
        self.mean += delta * (weight / total)
        self.m2 += weight * delta * (value - self.mean)
        self.weight = total
        self.low = min(self.low, value)
        self.high = max(self.high, value)

    def add_summary(self, mean: float, variance: float, weight: float) -> None:
        """Add a group of ``weight`` cases known only by its mean and variance."""
        if weight <= 0:
            return
        other = NumericStat(weight, float(mean), max(0.0, float(variance)) * weight,
                            float(mean), float(mean))
        self.merge(other)

    def merge(self, other: NumericStat) -> None:
        """Pool ``other`` into this one (exact: equal to adding its inputs here)."""
        if other.weight <= 0:
            return
        if self.weight <= 0:
            self.weight, self.mean, self.m2 = other.weight, other.mean, other.m2
            self.low, self.high = other.low, other.high
            return
        total = self.weight + other.weight
        delta = other.mean - self.mean
        self.mean += delta * (other.weight / total)
        self.m2 += other.m2 + delta * delta * self.weight * other.weight / total
        self.weight = total
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)

    @property
    def variance(self) -> float:
        """Population variance (0.0 when empty); never negative despite rounding."""
        return max(0.0, self.m2 / self.weight) if self.weight > 0 else 0.0

    @property
    def sd(self) -> float:
        return math.sqrt(self.variance)

    def copy(self) -> NumericStat:
        return NumericStat(self.weight, self.mean, self.m2, self.low, self.high)

    def scaled(self, factor: float) -> NumericStat:
        """The same values, each counted ``factor`` times as often."""
        return NumericStat(self.weight * factor, self.mean, self.m2 * factor,
                           self.low, self.high)


@dataclass(slots=True)
class CategoricalStat:
    """Weighted count per category; beyond ``cap`` categories, weight goes to ``other``."""

    counts: dict[Category, float] = field(default_factory=dict)
    #: Weight of values whose category is not kept (cap reached, or not representable).
    other: float = 0.0
    cap: int = MAX_CATEGORIES

    def add(self, value: Category, weight: float = 1.0) -> None:
        if weight <= 0:
            return
        if not isinstance(value, str | bool):
            raise TypeError(f"category must be str or bool, not {type(value).__name__}")
        if value in self.counts or len(self.counts) < self.cap:
            self.counts[value] = self.counts.get(value, 0.0) + weight
        else:
            self.other += weight

    def merge(self, other: CategoricalStat) -> None:
        # Larger categories first, so a merge that hits the cap keeps the heavy ones.
        for value, weight in sorted(other.counts.items(), key=_heaviest_first):
            self.add(value, weight)
        self.other += other.other

    @property
    def total(self) -> float:
        return sum(self.counts.values()) + self.other

    def ranked(self) -> list[tuple[Category, float]]:
        """Categories by weight, heaviest first; ties by type then text (deterministic)."""
        return sorted(self.counts.items(), key=_heaviest_first)

    def copy(self) -> CategoricalStat:
        return CategoricalStat(dict(self.counts), self.other, self.cap)

    def scaled(self, factor: float) -> CategoricalStat:
        return CategoricalStat({k: v * factor for k, v in self.counts.items()},
                               self.other * factor, self.cap)


def _heaviest_first(item: tuple[Category, float]) -> tuple[float, bool, str]:
    value, weight = item
    # bool before str at equal weight, then by text: a total order on mixed keys.
    return (-weight, not isinstance(value, bool), str(value))


@dataclass(slots=True)
class FieldStat:
    """Everything kept about one outcome field."""

    numbers: NumericStat = field(default_factory=NumericStat)
    #: str and bool values.
    labels: CategoricalStat = field(default_factory=CategoricalStat)
    #: The numbers again as ``str(value)``, used only if the field turns categorical.
    number_labels: CategoricalStat = field(default_factory=CategoricalStat)

    @property
    def kind(self) -> str:
        return CATEGORICAL if self.labels.total > 0 else NUMERIC

    @property
    def cases(self) -> float:
        return self.numbers.weight + self.labels.total

    def add(self, value: OutcomeValue, weight: float) -> None:
        if isinstance(value, bool | str):
            self.labels.add(value, weight)
        elif isinstance(value, int | float):
            if not math.isfinite(value):
                raise ValueError(f"value {value!r} is not finite")
            self.numbers.add(float(value), weight)
            self.number_labels.add(str(value), weight)
        else:
            raise TypeError(f"value must be int, float, str or bool, not {type(value).__name__}")

    def categories(self) -> CategoricalStat:
        """The categorical view: labels plus the numbers as text."""
        view = self.labels.copy()
        view.merge(self.number_labels)
        return view

    def merge(self, other: FieldStat) -> None:
        self.numbers.merge(other.numbers)
        self.labels.merge(other.labels)
        self.number_labels.merge(other.number_labels)

    def copy(self) -> FieldStat:
        return FieldStat(self.numbers.copy(), self.labels.copy(), self.number_labels.copy())

    def scaled(self, factor: float) -> FieldStat:
        return FieldStat(self.numbers.scaled(factor), self.labels.scaled(factor),
                         self.number_labels.scaled(factor))


@dataclass(slots=True)
class OutcomeAggregate:
    """Per-field statistics over many outcome maps, each weighted by its cases."""

    fields: dict[str, FieldStat] = field(default_factory=dict)
    #: Total weight of the outcomes added (packets' ``n``, times similarity in answers).
    weight: float = 0.0
    #: Field values not kept because the aggregate already tracks ``MAX_FIELDS`` fields.
    dropped: float = 0.0

    def add_outcome(self, outcome: Mapping[str, OutcomeValue], weight: float) -> None:
        """Add one packet's outcome map, counted ``weight`` times."""
        if weight <= 0:
            return
        self.weight += weight
        for name, value in outcome.items():
            stat = self._field(name)
            if stat is None:
                self.dropped += weight
            else:
                stat.add(value, weight)

    def get(self, name: str) -> FieldStat | None:
        return self.fields.get(name)

    def _field(self, name: str) -> FieldStat | None:
        stat = self.fields.get(name)
        if stat is None and len(self.fields) < MAX_FIELDS:
            stat = self.fields[name] = FieldStat()
        return stat

    def merge(self, other: OutcomeAggregate) -> None:
        """Pool ``other`` in: the result equals adding all of its outcomes here."""
        self.weight += other.weight
        self.dropped += other.dropped
        # Most supported fields first, so a merge that hits MAX_FIELDS keeps them.
        for name, stat in sorted(other.fields.items(), key=lambda kv: (-kv[1].cases, kv[0])):
            mine = self._field(name)
            if mine is None:
                self.dropped += stat.cases
            else:
                mine.merge(stat)

    def items(self) -> Iterator[tuple[str, FieldStat]]:
        """Fields by support (most cases first), ties by name."""
        return iter(sorted(self.fields.items(), key=lambda kv: (-kv[1].cases, kv[0])))

    def copy(self) -> OutcomeAggregate:
        return OutcomeAggregate(
            {k: v.copy() for k, v in self.fields.items()}, self.weight, self.dropped
        )

    def scaled(self, factor: float) -> OutcomeAggregate:
        """Every weight times ``factor`` (>= 0): how a query weighs a synthesis by
        its similarity. Means and variances are unchanged."""
        if factor < 0:
            raise ValueError(f"factor: must be >= 0, got {factor}")
        return OutcomeAggregate(
            {k: v.scaled(factor) for k, v in self.fields.items()},
            self.weight * factor, self.dropped * factor,
        )
