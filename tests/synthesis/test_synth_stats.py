"""Weighted statistics equal the same statistics computed directly on the inputs."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qisd.synthesis.encoding import decode_outcome, encode_aggregate
from qisd.synthesis.stats import (
    CATEGORICAL,
    MAX_CATEGORIES,
    NUMERIC,
    CategoricalStat,
    NumericStat,
    OutcomeAggregate,
)

values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
weights = st.integers(min_value=1, max_value=1000)
samples = st.lists(st.tuples(values, weights), min_size=1, max_size=40)


def direct(sample: list[tuple[float, int]]) -> tuple[float, float]:
    x = np.array([v for v, _ in sample])
    w = np.array([n for _, n in sample], dtype=float)
    mean = float(np.average(x, weights=w))
    return mean, float(np.average((x - mean) ** 2, weights=w))


def stat_of(sample: list[tuple[float, int]]) -> NumericStat:
    s = NumericStat()
    for v, n in sample:
        s.add(v, n)
    return s


def close(a: float, b: float, scale: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9 * max(1.0, scale))


@settings(max_examples=150, deadline=None)
@given(samples)
def test_numeric_equals_numpy(sample: list[tuple[float, int]]) -> None:
    s = stat_of(sample)
    mean, var = direct(sample)
    spread = max(abs(v) for v, _ in sample)
    assert s.weight == sum(n for _, n in sample)
    assert close(s.mean, mean, spread)
    assert close(s.variance, var, spread**2)
    assert s.low == min(v for v, _ in sample) and s.high == max(v for v, _ in sample)


@settings(max_examples=150, deadline=None)
@given(samples, samples, samples)
def test_numeric_merge_is_associative_and_exact(
    a: list[tuple[float, int]], b: list[tuple[float, int]], c: list[tuple[float, int]]
) -> None:
    left = stat_of(a)
    left.merge(stat_of(b))
    left.merge(stat_of(c))
    bc = stat_of(b)
    bc.merge(stat_of(c))
    right = stat_of(a)
    right.merge(bc)
    mean, var = direct(a + b + c)
    spread = max(abs(v) for v, _ in a + b + c)
    for s in (left, right):
        assert s.weight == sum(n for _, n in a + b + c)
        assert close(s.mean, mean, spread)
        assert close(s.variance, var, spread**2)


def test_numeric_empty_and_zero_weight() -> None:
    s = NumericStat()
    s.add(5.0, 0)
    assert s.weight == 0 and s.variance == 0.0 and s.sd == 0.0
    s.merge(NumericStat())
    assert s.weight == 0
    s.add_summary(10.0, 4.0, 3)
    assert (s.weight, s.mean, s.variance) == (3, 10.0, 4.0)


def test_add_summary_equals_adding_the_values() -> None:
    group = [(1.0, 2), (4.0, 1), (7.0, 3)]
    mean, var = direct(group)
    s = stat_of([(10.0, 5)])
    s.add_summary(mean, var, 6)
    expected = stat_of([(10.0, 5), *group])
    assert math.isclose(s.mean, expected.mean) and math.isclose(s.variance, expected.variance)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.text(max_size=5), st.booleans()), weights), max_size=40))
def test_categorical_equals_counter(sample: list[tuple[str | bool, int]]) -> None:
    cat = CategoricalStat()
    expected: Counter[tuple[type, str | bool]] = Counter()
    for value, n in sample:
        cat.add(value, n)
        expected[(type(value), value)] += n
    got = {(type(v), v): w for v, w in cat.counts.items()}
    assert got == {k: float(v) for k, v in expected.items() if v}
    assert cat.total == sum(n for _, n in sample)


def test_bools_keep_their_type() -> None:
    cat = CategoricalStat()
    cat.add(True, 2)
    cat.add("True", 3)
    assert cat.counts == {True: 2.0, "True": 3.0}
    assert [type(v) for v, _ in cat.ranked()] == [str, bool]  # heavier first


def test_categories_beyond_the_cap_pool_into_other() -> None:
    cat = CategoricalStat()
    for i in range(MAX_CATEGORIES + 10):
        cat.add(f"c{i}", 1)
    assert len(cat.counts) == MAX_CATEGORIES and cat.other == 10
    assert cat.total == MAX_CATEGORIES + 10
    with pytest.raises(TypeError, match="category"):
        cat.add(3, 1)  # type: ignore[arg-type]


def test_aggregate_fields_and_mixed_types() -> None:
    agg = OutcomeAggregate()
    agg.add_outcome({"los": 3, "ok": True}, 2)
    agg.add_outcome({"los": 5.0, "ok": False}, 1)
    los = agg.get("los")
    assert los is not None and los.kind == NUMERIC
    assert los.numbers.weight == 3 and math.isclose(los.numbers.mean, 11 / 3)
    ok = agg.get("ok")
    assert ok is not None and ok.kind == CATEGORICAL and ok.labels.counts == {True: 2, False: 1}
    # A string among the numbers turns the field categorical, numbers as str().
    agg.add_outcome({"los": "unknown"}, 4)
    assert los.kind == CATEGORICAL
    assert los.categories().counts == {"3": 2, "5.0": 1, "unknown": 4}
    assert los.cases == 7 and agg.weight == 7
    with pytest.raises(ValueError, match="finite"):
        agg.add_outcome({"x": math.inf}, 1)


def test_aggregate_absorbs_a_synthesis_as_if_pooled() -> None:
    """A synthesis's outcome, decoded, merges like the cases it summarises."""
    rng = np.random.default_rng(3)
    rows_a = [{"los": float(rng.normal(5, 2)), "ok": bool(rng.random() < 0.7)} for _ in range(30)]
    rows_b = [{"los": float(rng.normal(8, 1)), "ok": bool(rng.random() < 0.2)} for _ in range(20)]
    a = OutcomeAggregate()
    for row in rows_a:
        a.add_outcome(row, 2)
    b = OutcomeAggregate()
    for row in rows_b:
        b.add_outcome(row, 3)
    enc = encode_aggregate(b, n=60, packets=20, origins=1)
    a.merge(decode_outcome(enc.outcome, 60).aggregate)
    pooled = OutcomeAggregate()
    for row in rows_a:
        pooled.add_outcome(row, 2)
    for row in rows_b:
        pooled.add_outcome(row, 3)
    for name in ("los", "ok"):
        got, want = a.get(name), pooled.get(name)
        assert got is not None and want is not None
        assert got.kind == want.kind
    los_got, los_want = a.get("los"), pooled.get("los")
    assert los_got is not None and los_want is not None
    assert math.isclose(los_got.numbers.mean, los_want.numbers.mean, rel_tol=1e-12)
    assert math.isclose(los_got.numbers.variance, los_want.numbers.variance, rel_tol=1e-9)
    ok_got, ok_want = a.get("ok"), pooled.get("ok")
    assert ok_got is not None and ok_want is not None
    assert ok_got.labels.counts == ok_want.labels.counts
    assert a.weight == pooled.weight == 120


def test_scaled_keeps_means_and_scales_weights() -> None:
    agg = OutcomeAggregate()
    agg.add_outcome({"x": 1.0, "c": "a"}, 2)
    agg.add_outcome({"x": 3.0, "c": "b"}, 2)
    half = agg.scaled(0.5)
    x = half.get("x")
    c = half.get("c")
    assert x is not None and c is not None
    assert (x.numbers.weight, x.numbers.mean, x.numbers.variance) == (2.0, 2.0, 1.0)
    assert c.labels.counts == {"a": 1.0, "b": 1.0} and half.weight == 2.0
    with pytest.raises(ValueError, match="factor"):
        agg.scaled(-1)
