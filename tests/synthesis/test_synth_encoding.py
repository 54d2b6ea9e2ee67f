"""Synthesis outcome encoding: round trip, packet limits, deterministic truncation."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synth_helpers import KEYS, SWARM

from qisd.packet import (
    KIND_SYNTHESIS,
    MAX_OUTCOME_FIELDS,
    MAX_OUTCOME_KEY_CHARS,
    create_packet,
    decode_packet,
)
from qisd.sketch import make_sketch
from qisd.synthesis.encoding import (
    ORIGINS_KEY,
    PACKETS_KEY,
    EncodingError,
    aggregate_of,
    decode_outcome,
    encode_aggregate,
)
from qisd.synthesis.stats import CATEGORICAL, NUMERIC, OutcomeAggregate

names = st.text(alphabet="abcdefghij_", min_size=1, max_size=8)
numbers = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)


@st.composite
def aggregates(draw: st.DrawFn) -> tuple[OutcomeAggregate, int]:
    """Up to 4 fields (numeric or categorical with <= 3 categories): all fit."""
    fields = draw(st.dictionaries(names, st.booleans(), min_size=1, max_size=4))
    rows = draw(st.integers(1, 12))
    agg = OutcomeAggregate()
    total = 0
    for _ in range(rows):
        n = draw(st.integers(1, 50))
        row: dict[str, float | str | bool] = {}
        for name, is_num in fields.items():
            if is_num:
                row[name] = draw(numbers)
            else:
                row[name] = draw(st.one_of(st.just(True), st.sampled_from(["x", "yy"])))
        agg.add_outcome(row, n)
        total += n
    return agg, total


@settings(max_examples=100, deadline=None)
@given(aggregates())
def test_round_trip(case: tuple[OutcomeAggregate, int]) -> None:
    agg, n = case
    enc = encode_aggregate(agg, n=n, packets=7, origins=3)
    assert enc.dropped == ()
    dec = decode_outcome(enc.outcome, n)
    assert (dec.packets, dec.origins) == (7, 3)
    assert dec.aggregate.weight == n
    assert set(dec.aggregate.fields) == set(agg.fields)
    for name, stat in agg.fields.items():
        back = dec.aggregate.fields[name]
        assert back.kind == stat.kind
        if stat.kind == NUMERIC:
            assert back.numbers.weight == stat.numbers.weight
            assert math.isclose(back.numbers.mean, stat.numbers.mean, rel_tol=1e-12)
            assert math.isclose(back.numbers.sd, stat.numbers.sd, rel_tol=1e-9, abs_tol=1e-9)
        else:
            assert back.labels.counts == stat.categories().counts
            assert back.labels.other == 0


def test_outcome_is_a_valid_packet_outcome() -> None:
    agg = OutcomeAggregate()
    agg.add_outcome({"los_days": 4.5, "survived": True, "ward": "icu"}, 3)
    agg.add_outcome({"los_days": 6.5, "survived": False, "ward": "icu"}, 1)
    enc = encode_aggregate(agg, n=4, packets=2, origins=2)
    assert enc.outcome == {
        PACKETS_KEY: 2, ORIGINS_KEY: 2,
        "los_days.mean": 5.0, "los_days.sd": math.sqrt(0.75),
        "survived?true": 3, "survived?false": 1,
        "ward=icu": 4,
    }
    packet = create_packet(KEYS[0], swarm=SWARM, topic="t", sketch=make_sketch([1.0, 2.0]),
                           outcome=enc.outcome, n=4, ttl_s=60, kind=KIND_SYNTHESIS)
    again = decode_packet(packet.encoded)
    assert decode_outcome(again.outcome, again.n).aggregate.get("ward") is not None


def test_partial_numeric_field_carries_its_cases() -> None:
    agg = OutcomeAggregate()
    agg.add_outcome({"a": 1.0}, 2)
    agg.add_outcome({"b": "x"}, 3)
    enc = encode_aggregate(agg, n=5, packets=2, origins=1)
    assert enc.outcome["a.n"] == 2 and "b~" not in enc.outcome
    dec = decode_outcome(enc.outcome, 5).aggregate
    a = dec.get("a")
    assert a is not None and a.numbers.weight == 2


def many_fields_aggregate(seed: int) -> OutcomeAggregate:
    """30 categorical fields of 40 categories and 10 numeric fields, rows shuffled."""
    rows = []
    for i in range(200):
        row: dict[str, int | float | str | bool] = {
            f"c{j:02d}": f"v{(i * (j + 1)) % 40}" for j in range(12)
        }
        row.update({f"n{j}": float(i % (j + 3)) for j in range(4)})
        rows.append((row, 1 + i % 3))
    random.Random(seed).shuffle(rows)
    agg = OutcomeAggregate()
    for row, n in rows:
        agg.add_outcome(row, n)
    return agg


def test_too_many_fields_and_categories_truncate_deterministically() -> None:
    agg = many_fields_aggregate(1)
    cases = sum(1 + i % 3 for i in range(200))
    assert agg.weight == cases
    a = encode_aggregate(agg, n=cases, packets=200, origins=1)
    b = encode_aggregate(many_fields_aggregate(2), n=cases, packets=200, origins=1)
    assert a == b  # the order packets arrived in does not matter
    assert len(a.outcome) == MAX_OUTCOME_FIELDS
    assert all(len(k) <= MAX_OUTCOME_KEY_CHARS for k in a.outcome)
    assert a.dropped  # not everything fits; what was left out is said
    dec = decode_outcome(a.outcome, cases).aggregate
    assert set(dec.fields) | set(a.dropped) == {f"c{j:02d}" for j in range(12)} | {
        f"n{j}" for j in range(4)}
    for stat in dec.fields.values():
        if stat.kind == CATEGORICAL:
            # Listed categories plus the remainder account for every case of the field.
            assert stat.labels.total == cases
            assert stat.labels.other > 0


def test_top_categories_are_kept() -> None:
    agg = OutcomeAggregate()
    for i in range(30):
        agg.add_outcome({"c": f"v{i}"}, 100 - i)
    enc = encode_aggregate(agg, n=sum(100 - i for i in range(30)), packets=30, origins=1)
    listed = [k for k in enc.outcome if k.startswith("c=")]
    assert listed == [f"c=v{i}" for i in range(len(listed))]
    assert len(listed) == MAX_OUTCOME_FIELDS - 3  # _packets, _origins, c~
    assert enc.outcome["c~"] == sum(100 - i for i in range(len(listed), 30))


def test_unusable_names_are_reported_not_lost_silently() -> None:
    agg = OutcomeAggregate()
    long_name = "x" * 30  # x...x.mean would exceed 32 characters
    agg.add_outcome({"a=b": "v", long_name: 1.0, "ok": "y" * 40, "fine": 2.0}, 1)
    enc = encode_aggregate(agg, n=1, packets=1, origins=1)
    assert set(enc.dropped) == {"a=b", long_name, "ok"}
    assert "fine.mean" in enc.outcome


@pytest.mark.parametrize(
    ("outcome", "key"),
    [
        ({"_origins": 1}, PACKETS_KEY),
        ({PACKETS_KEY: 1, "x.sd": 1.0}, "x.mean"),
        ({PACKETS_KEY: 1, "x": 1.5}, "x"),
        ({PACKETS_KEY: 1, "x?maybe": 1}, "x?maybe"),
        ({PACKETS_KEY: 1, "x=a": -1}, "x=a"),
        ({PACKETS_KEY: 1, "word": "text"}, "word"),
        ({PACKETS_KEY: 1, "x~y": 2}, "x~y"),
        ({PACKETS_KEY: 1, "x.mean": 1.0, "x=a": 2}, "x.mean"),
        ({PACKETS_KEY: True}, PACKETS_KEY),
    ],
)
def test_decode_errors_name_the_entry(outcome: dict[str, object], key: str) -> None:
    with pytest.raises(EncodingError) as info:
        decode_outcome(outcome, 3)  # type: ignore[arg-type]
    assert info.value.key == key
    assert key in str(info.value)


def test_aggregate_of_observation_and_synthesis() -> None:
    sk = make_sketch([1.0, 0.0])
    o = create_packet(KEYS[0], swarm=SWARM, topic="t", sketch=sk, outcome={"x": 2.0}, n=4,
                      ttl_s=60)
    agg = aggregate_of(o)
    x = agg.get("x")
    assert x is not None and x.numbers.weight == 4
    s = create_packet(KEYS[0], swarm=SWARM, topic="t", sketch=sk, n=4, ttl_s=60,
                      kind=KIND_SYNTHESIS, outcome={PACKETS_KEY: 2, "x.mean": 2.0, "x.sd": 0.5})
    sx = aggregate_of(s).get("x")
    assert sx is not None and sx.numbers.weight == 4 and sx.numbers.variance == 0.25
