"""How an :class:`OutcomeAggregate` becomes a synthesis packet's outcome map, and back.

A synthesis packet's ``n`` is the cohort's total cases; its outcome map (at most 16
entries, keys of at most 32 characters; see :mod:`qisd.packet`) carries:

==================  =======  ===============================================
key                 value    meaning
==================  =======  ===============================================
``_packets``        int      member packets synthesised; the parents are listed
                             explicitly exactly when ``len(parents)`` equals it
                             (otherwise ``parents`` holds one digest, or none)
``_origins``        int      distinct origins among the members
``F.mean``          float    numeric field F: weighted mean
``F.sd``            float    numeric field F: weighted population sd
``F.n``             int      cases with field F, only when that is not ``n``
``F=C``             int      categorical field F: cases with the str value C
``F?true``          int      ... cases with the bool value True (``F?false``)
``F~``              int      ... cases in categories not listed (no room, or the
                             key would be too long or not printable)
==================  =======  ===============================================

Value types decide the reading: floats are always means/sds, ints always counts. The
field name F is everything before the first ``=``, ``?`` or ``~``, so a field whose
name contains one of those characters cannot be carried (nor a numeric field whose
``F.mean`` would exceed 32 characters); such fields are reported in
:attr:`Encoded.dropped`, never silently lost.

When the fields do not all fit, the most supported fields (most cases, ties by name)
get their minimum entries first (numeric: mean and sd, plus ``F.n``; categorical: the
top category, plus ``F~`` if anything else remains); the rest are dropped. Leftover
entries then go round-robin, in the same order, to the next category of each
categorical field (categories by count, ties by type then text). The result depends
only on the aggregate, never on the order packets arrived in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from qisd.packet import (
    KIND_SYNTHESIS,
    MAX_OUTCOME_FIELDS,
    MAX_OUTCOME_KEY_CHARS,
    OutcomePacket,
)
from qisd.synthesis.stats import (
    NUMERIC,
    CategoricalStat,
    Category,
    FieldStat,
    NumericStat,
    OutcomeAggregate,
    OutcomeValue,
)

PACKETS_KEY = "_packets"
ORIGINS_KEY = "_origins"
#: Characters that end a field name in a category key (``F=C``, ``F?true``, ``F~``).
SEPARATORS = "=?~"
_BOOL_TEXT = {True: "true", False: "false"}
_TEXT_BOOL = {v: k for k, v in _BOOL_TEXT.items()}


class EncodingError(ValueError):
    """A synthesis outcome that does not follow this scheme; ``key`` names the entry."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"outcome.{key}: {message}")
        self.key = key


@dataclass(frozen=True, slots=True)
class Encoded:
    """An outcome map ready for :func:`qisd.packet.create_packet`."""

    outcome: dict[str, OutcomeValue]
    #: Fields not carried, most supported first (no room, or an unusable name).
    dropped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Decoded:
    aggregate: OutcomeAggregate
    packets: int
    origins: int


def category_key(name: str, value: Category) -> str:
    if isinstance(value, bool):
        return f"{name}?{_BOOL_TEXT[value]}"
    return f"{name}={value}"


def carry_problem(name: str, value: OutcomeValue) -> str | None:
    """Why a synthesis could not carry outcome field ``name`` (with values like
    ``value``), or None if it can. The daemon refuses such names at emit: a field
    no synthesis carries would be missing from answers that count its cases through
    a synthesis."""
    if any(c in name for c in SEPARATORS):
        return "a field name may not contain '=', '?' or '~' (synthesis packets use them)"
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    suffix = ".mean" if numeric else "~"
    if len(name) + len(suffix) > MAX_OUTCOME_KEY_CHARS:
        longest = MAX_OUTCOME_KEY_CHARS - len(suffix)
        kind = "a numeric" if numeric else "a category"
        return (f"{kind} field name may have at most {longest} characters "
                f"(synthesis packets add {suffix!r})")
    return None


def _usable_key(key: str) -> bool:
    return len(key) <= MAX_OUTCOME_KEY_CHARS and key.isprintable()


@dataclass(slots=True)
class _Numeric:
    name: str
    stat: NumericStat
    partial: bool

    def cost(self) -> int:
        return 3 if self.partial else 2


@dataclass(slots=True)
class _Categorical:
    name: str
    fit: list[tuple[Category, float]]
    hidden: float
    shown: int = 0

    def remainder(self, shown: int) -> int:
        return round(self.hidden + sum(w for _, w in self.fit[shown:]))

    def cost(self, shown: int | None = None) -> int:
        shown = self.shown if shown is None else shown
        return shown + (1 if self.remainder(shown) > 0 else 0)


def encode_aggregate(
    aggregate: OutcomeAggregate,
    *,
    n: int,
    packets: int,
    origins: int,
    max_fields: int = MAX_OUTCOME_FIELDS,
) -> Encoded:
    """Encode ``aggregate`` (of a synthesis whose ``n`` is ``n``) within ``max_fields``."""
    if max_fields < 3:
        raise ValueError(f"max_fields: {max_fields} leaves no room for any field")
    budget = max_fields - 2  # _packets and _origins
    dropped: list[str] = []
    chosen: list[_Numeric | _Categorical] = []
    for name, stat in aggregate.items():
        plan = _plan(name, stat, n)
        if plan is None:
            dropped.append(name)
            continue
        cost = plan.cost() if isinstance(plan, _Numeric) else plan.cost(1)
        if cost > budget:
            dropped.append(name)
            continue
        if isinstance(plan, _Categorical):
            plan.shown = 1
        budget -= cost
        chosen.append(plan)
    # Round-robin the leftover entries over the categorical fields.
    grown = True
    while grown and budget > 0:
        grown = False
        for plan in chosen:
            if not isinstance(plan, _Categorical) or plan.shown >= len(plan.fit):
                continue
            delta = plan.cost(plan.shown + 1) - plan.cost()
            if delta <= budget:
                plan.shown += 1
                budget -= delta
                grown = True
    outcome: dict[str, OutcomeValue] = {PACKETS_KEY: int(packets), ORIGINS_KEY: int(origins)}
    for plan in chosen:
        if isinstance(plan, _Numeric):
            outcome[f"{plan.name}.mean"] = float(plan.stat.mean)
            outcome[f"{plan.name}.sd"] = float(plan.stat.sd)
            if plan.partial:
                outcome[f"{plan.name}.n"] = max(0, round(plan.stat.weight))
        else:
            for value, weight in plan.fit[: plan.shown]:
                outcome[category_key(plan.name, value)] = max(0, round(weight))
            rest = plan.remainder(plan.shown)
            if rest > 0:
                outcome[f"{plan.name}~"] = rest
    return Encoded(outcome, tuple(dropped))


def _plan(name: str, stat: FieldStat, n: int) -> _Numeric | _Categorical | None:
    """How field ``name`` would be carried, or None when it cannot be."""
    if any(c in name for c in SEPARATORS) or not name:
        return None
    if stat.kind == NUMERIC:
        num = stat.numbers
        if not _usable_key(f"{name}.mean") or not (math.isfinite(num.mean)
                                                    and math.isfinite(num.sd)):
            return None
        if num.weight <= 0:
            return None
        return _Numeric(name, num, partial=round(num.weight) != n)
    view: CategoricalStat = stat.categories()
    fit: list[tuple[Category, float]] = []
    hidden = view.other
    for value, weight in view.ranked():
        if round(weight) > 0 and _usable_key(category_key(name, value)):
            fit.append((value, weight))
        else:
            hidden += weight
    if not fit or not _usable_key(f"{name}~"):
        return None
    return _Categorical(name, fit, hidden)


def decode_outcome(outcome: Mapping[str, OutcomeValue], n: int) -> Decoded:
    """Read a synthesis outcome map back into an aggregate of ``n`` cases.

    Raises :class:`EncodingError` naming the first entry that does not follow the
    scheme (e.g. a synthesis made by a plug-in with its own encoding).
    """
    means: dict[str, float] = {}
    sds: dict[str, float] = {}
    weights: dict[str, int] = {}
    cats: dict[str, CategoricalStat] = {}
    packets: int | None = None
    origins: int | None = None
    for key, value in outcome.items():
        if key in (PACKETS_KEY, ORIGINS_KEY):
            count = _count(key, value)
            if key == PACKETS_KEY:
                packets = count
            else:
                origins = count
        elif isinstance(value, float):
            name, _, suffix = key.rpartition(".")
            if not name or suffix not in ("mean", "sd") or _has_separator(name):
                raise EncodingError(key, "a float entry must be F.mean or F.sd")
            if suffix == "mean":
                means[name] = value
            else:
                if value < 0 or not math.isfinite(value):
                    raise EncodingError(key, "sd must be a finite number >= 0")
                sds[name] = value
        elif isinstance(value, int) and not isinstance(value, bool):
            count = _count(key, value)
            cut = min((key.find(c) for c in SEPARATORS if c in key), default=-1)
            if cut > 0:
                _add_category(cats.setdefault(key[:cut], CategoricalStat()), key, cut, count)
            elif cut < 0 and key.endswith(".n") and len(key) > 2:
                weights[key[:-2]] = count
            else:
                raise EncodingError(key, "an int entry must be F=C, F?true, F?false, F~ or F.n")
        else:
            raise EncodingError(key, f"{type(value).__name__} is not used by synthesis outcomes")
    if packets is None:
        raise EncodingError(PACKETS_KEY, "missing")
    for name in (*sds, *weights):
        if name not in means:
            raise EncodingError(f"{name}.mean", "missing")
    agg = OutcomeAggregate(weight=float(n))
    for name, mean in means.items():
        if name in cats:
            raise EncodingError(f"{name}.mean", "field is both numeric and categorical")
        weight = float(weights.get(name, n))
        stat = FieldStat()
        stat.numbers.add_summary(mean, sds.get(name, 0.0) ** 2, weight)
        # Its values as text are unknown; if the field turns categorical on a merge,
        # these cases count as "other".
        stat.number_labels.other = weight
        agg.fields[name] = stat
    for name, cat in cats.items():
        agg.fields[name] = FieldStat(labels=cat)
    return Decoded(agg, packets, origins if origins is not None else 0)


def _has_separator(name: str) -> bool:
    return any(c in name for c in SEPARATORS)


def _count(key: str, value: OutcomeValue) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EncodingError(key, "must be an int >= 0")
    return value


def _add_category(cat: CategoricalStat, key: str, cut: int, count: int) -> None:
    sep, rest = key[cut], key[cut + 1:]
    if sep == "=":
        cat.add(rest, count)
    elif sep == "?":
        if rest not in _TEXT_BOOL:
            raise EncodingError(key, "a bool category must be F?true or F?false")
        cat.add(_TEXT_BOOL[rest], count)
    else:
        if rest:
            raise EncodingError(key, "the remainder entry is F~ with nothing after it")
        cat.other += count


def aggregate_of(packet: OutcomePacket) -> OutcomeAggregate:
    """A packet's outcome as an aggregate of its ``n`` cases (syntheses decoded)."""
    if packet.kind == KIND_SYNTHESIS:
        return decode_outcome(packet.outcome, packet.n).aggregate
    agg = OutcomeAggregate()
    agg.add_outcome(packet.outcome, packet.n)
    return agg
