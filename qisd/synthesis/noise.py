"""Optional Laplace noise on what a synthesis publishes (pure; randomness injected).

With ``epsilon > 0`` every released statistic gets Laplace noise before encoding:

* counts (``n``, each category, the remainder, ``_origins``, a field's case count)
  get Laplace(0, 1/epsilon): one case changes a count by at most 1. They are rounded
  and never negative (``n`` and case counts never below 1).
* a numeric field's mean and sd over ``w`` cases get Laplace(0, range/(w*epsilon)),
  where ``range = hi - lo`` bounds how far one case can move them. The mean is then
  clamped to [lo, hi] and the sd to [0, range/2].

**The range assumption.** Give each numeric field its true bounds (``[synthesis]
ranges = ["field=lo:hi", ...]`` in the daemon's config, the ``ranges`` option of the
cohort synthesizer) for the guarantee to hold. Without them the
cohort's observed minimum and maximum are used, which are themselves data: a cohort
whose cases all share one value publishes that value unchanged.

What noise does not hide: each statistic spends ``epsilon``, so a synthesis of ``m``
statistics spends ``m * epsilon`` and every re-synthesis of a cohort spends it again
(basic composition); the set of categories present, the parent ids and ``_packets``
are exact. Observation packets are visible to the swarm in any case; noise protects
what a synthesis adds, chiefly for packets that each distil many cases.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Mapping

from qisd.synthesis.stats import CategoricalStat, FieldStat, NumericStat, OutcomeAggregate


def laplace(rng: random.Random, scale: float) -> float:
    """One draw from Laplace(0, scale): the difference of two exponentials. A scale
    too large for a float (an enormous range over a tiny epsilon) is capped at the
    largest finite one; callers clamp the result to the field's range."""
    if scale <= 0:
        return 0.0
    rate = 1.0 / min(scale, sys.float_info.max)
    return rng.expovariate(rate) - rng.expovariate(rate)


def noisy_count(value: float, epsilon: float, rng: random.Random, *, minimum: int = 0) -> int:
    """``value`` plus Laplace(0, 1/epsilon), rounded, at least ``minimum`` (exact if 0)."""
    if epsilon <= 0:
        return max(minimum, round(value))
    return max(minimum, round(value + laplace(rng, 1.0 / epsilon)))


def noisy_aggregate(
    aggregate: OutcomeAggregate,
    *,
    epsilon: float,
    rng: random.Random,
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> OutcomeAggregate:
    """A noised copy of ``aggregate`` (an exact copy when ``epsilon`` is 0)."""
    if epsilon <= 0:
        return aggregate.copy()
    ranges = ranges or {}
    out = OutcomeAggregate(weight=aggregate.weight, dropped=aggregate.dropped)
    for name, stat in aggregate.items():
        out.fields[name] = FieldStat(
            numbers=_noisy_numbers(stat.numbers, epsilon, rng, ranges.get(name)),
            labels=_noisy_categories(stat.labels, epsilon, rng),
            number_labels=_noisy_categories(stat.number_labels, epsilon, rng),
        )
    return out


def _noisy_numbers(
    num: NumericStat, epsilon: float, rng: random.Random, bounds: tuple[float, float] | None
) -> NumericStat:
    if num.weight <= 0:
        return num.copy()
    lo, hi = bounds if bounds is not None else (num.low, num.high)
    span = max(0.0, hi - lo)
    weight = float(noisy_count(num.weight, epsilon, rng, minimum=1))
    scale = span / (num.weight * epsilon)
    mean = min(hi, max(lo, num.mean + laplace(rng, scale)))
    sd = min(span / 2, max(0.0, num.sd + laplace(rng, scale)))
    if not (math.isfinite(mean) and math.isfinite(sd)):  # bounds too wide for floats:
        middle = lo / 2 + hi / 2  # noise that wide says nothing, and neither may this
        mean, sd = (middle if math.isfinite(middle) else 0.0), 0.0
    return NumericStat(weight, mean, sd * sd * weight, lo, hi)


def _noisy_categories(cat: CategoricalStat, epsilon: float, rng: random.Random) -> CategoricalStat:
    out = CategoricalStat(cap=cat.cap)
    for value, weight in cat.ranked():
        noisy = noisy_count(weight, epsilon, rng)
        if noisy > 0:
            out.counts[value] = float(noisy)
    if cat.other > 0:
        out.other = float(noisy_count(cat.other, epsilon, rng))
    return out
