"""The query answer: weighted estimates, support, and no case counted twice."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from synth_helpers import KEYS, NOW_MS, SWARM, direction, near, obs, sign_draft

from qisd.answer import CLOCK_SKEW_MS, answer_query, match_summary
from qisd.packet import KIND_SYNTHESIS, OutcomePacket, create_packet
from qisd.sketch import cosine, make_sketch
from qisd.synthesis import CohortSynthesizer, SynthesizerSettings
from qisd.synthesis.base import bounded_parents


def test_hand_made_observations() -> None:
    a = obs(direction(1), {"survived": True, "los": 4.0, "ward": "icu"}, n=2, key=KEYS[0])
    b = obs(direction(2), {"survived": False, "los": 8.0}, n=4, key=KEYS[1])
    c = obs(direction(3), {"survived": False, "los": 100.0}, n=9, key=KEYS[2])
    answer = answer_query([(1.0, a), (0.5, b), (-0.3, c)], k=10)
    fields = answer["fields"]
    # weights: a 1.0*2 = 2, b 0.5*4 = 2, c clamped to 0 (left out)
    assert fields["survived"] == {
        "type": "categorical", "value_type": "bool",
        "probabilities": {"false": 0.5, "true": 0.5}, "cases": 6, "weight": 4.0,
    }
    assert fields["los"]["type"] == "numeric"
    assert math.isclose(fields["los"]["mean"], 6.0) and math.isclose(fields["los"]["sd"], 2.0)
    assert fields["los"]["cases"] == 6
    assert fields["ward"]["probabilities"] == {"icu": 1.0} and fields["ward"]["cases"] == 2
    assert answer["support"]["cases"] == 6 and answer["support"]["packets"] == 2
    assert answer["support"]["origins"] == 2
    json.dumps(answer)  # JSON-friendly throughout


def test_k_limits_the_matches_and_duplicates_count_once() -> None:
    a = obs(direction(1), {"x": 1.0}, n=1)
    b = obs(direction(2), {"x": 3.0}, n=1)
    answer = answer_query([(0.9, a), (0.9, a), (0.8, b)], k=1)
    assert answer["fields"]["x"]["mean"] == 1.0 and answer["support"]["packets"] == 1
    assert answer_query([(0.9, a)], k=0)["fields"] == {}
    with pytest.raises(ValueError, match="k"):
        answer_query([], k=-1)


def cohort_and_synthesis(count: int = 6, max_parents: int = 16) -> tuple[
        list[OutcomePacket], OutcomePacket]:
    synth = CohortSynthesizer(SynthesizerSettings(min_cohort=5, max_parents=max_parents))
    rng = np.random.default_rng(0)
    members = [obs(near(direction(1), rng), {"survived": i % 3 != 0, "los": float(i)},
                   n=2, key=KEYS[i % 4]) for i in range(count)]
    for p in members:
        synth.consume(p)
    (draft,) = synth.ready(NOW_MS)
    return members, sign_draft(draft)


def test_synthesis_and_its_parents_are_not_double_counted() -> None:
    members, synthesis = cohort_and_synthesis()
    other = obs(direction(9), {"survived": False, "los": 20.0}, n=3, key=KEYS[5])
    matches = [(0.95, members[0]), (0.93, members[1]), (0.9, synthesis), (0.92, members[2]),
               (0.5, other)]
    answer = answer_query(matches, k=10)
    support = answer["support"]
    assert support["cases"] == 12 + 3  # the synthesis's 12 cases and the other's 3
    assert support["covered"] == 3 and support["syntheses"] == 1
    assert support["observations"] == 1 and support["packets"] == 6 + 1
    assert support["origins"] == 4
    # Expected: the synthesis weighted 0.9 (12 cases: 8 true, 4 false), other 0.5*3.
    surv = answer["fields"]["survived"]
    true_w, false_w = 0.9 * 8, 0.9 * 4 + 0.5 * 3
    assert math.isclose(surv["probabilities"]["true"], true_w / (true_w + false_w))
    assert surv["cases"] == 15
    los_values = [float(i) for i in range(6)]
    mean = (0.9 * 2 * sum(los_values) + 1.5 * 20.0) / (0.9 * 12 + 1.5)
    assert math.isclose(answer["fields"]["los"]["mean"], mean)
    # The same evidence without the synthesis: the raw members count instead.
    raw = answer_query([(0.95, m) for m in members], k=10)
    assert raw["support"]["cases"] == 12 and raw["support"]["covered"] == 0


def test_members_of_a_digested_synthesis_are_presumed_inside_it() -> None:
    """Parents named by one digest cannot be matched, so the observations found near
    the synthesis and not newer than it are presumed its members, never more of them
    than it summarises; without that, each would count twice."""
    members, synthesis = cohort_and_synthesis(count=6, max_parents=4)
    assert len(synthesis.parents) == 1
    answer = answer_query([(0.9, synthesis)] + [(0.9, m) for m in members], k=10)
    support = answer["support"]
    assert support["presumed_covered"] == 6 and support["covered"] == 0
    assert support["cases"] == 12 and support["observations"] == 0


def test_two_nodes_digested_syntheses_of_the_same_packets_count_once() -> None:
    """After a join moves packets to a new primary, it synthesises them again under
    its own series: with listed parents the overlap shows, and with one digest the
    same digest says the same member set."""
    members, synthesis = cohort_and_synthesis(count=6, max_parents=4)
    again = create_packet(
        KEYS[6], swarm=SWARM, topic="t", sketch=synthesis.sketch, n=synthesis.n,
        ttl_s=60, kind=KIND_SYNTHESIS, outcome=synthesis.outcome, series=b"\x01" * 16,
        parents=synthesis.parents, created_ms=synthesis.created_ms + 5000,
    )
    answer = answer_query([(0.9, synthesis), (0.9, again)] + [(0.9, m) for m in members],
                          k=10)
    support = answer["support"]
    assert support["syntheses"] == 1 and support["overlapping"] == 1
    assert support["cases"] == synthesis.n and support["presumed_covered"] == 6


@pytest.mark.parametrize("max_parents", [16, 2], ids=["listed", "digest"])
def test_fields_a_synthesis_has_no_room_for_still_count(max_parents: int) -> None:
    """Ten numeric fields need 20 entries; a synthesis has 16 (7 fields fit): the
    covered observations still answer for the other three, each case once."""
    synth = CohortSynthesizer(SynthesizerSettings(min_cohort=5, max_parents=max_parents))
    rng = np.random.default_rng(3)
    members = [obs(near(direction(1), rng), {f"f{j}": float(i + j) for j in range(10)},
                   created_ms=NOW_MS + i) for i in range(6)]
    for p in members:
        synth.consume(p)
    (draft,) = synth.ready(NOW_MS + 10)
    synthesis = sign_draft(draft)
    carried = {k.split(".")[0] for k in synthesis.outcome if not k.startswith("_")}
    assert len(carried) == 7
    answer = answer_query([(0.9, synthesis)] + [(0.9, m) for m in members], k=10)
    fields = answer["fields"]
    assert sorted(fields) == [f"f{j}" for j in range(10)]
    for j in range(10):
        assert fields[f"f{j}"]["cases"] == 6
        assert math.isclose(fields[f"f{j}"]["mean"], j + 2.5)
    assert answer["support"]["cases"] == 6


def test_a_synthesis_that_weighs_nothing_covers_nothing() -> None:
    """Found with similarity <= 0 (a query opposite its centroid), it adds no cases,
    so the members found beside it must count on their own, not vanish with it."""
    members, synthesis = cohort_and_synthesis()
    answer = answer_query([(-0.2, synthesis)] + [(0.3, m) for m in members], k=10)
    support = answer["support"]
    assert support["covered"] == 0 and support["syntheses"] == 0
    assert support["cases"] == sum(m.n for m in members)


@pytest.mark.parametrize("first", ["listed", "digested"])
def test_a_listed_and_a_digested_synthesis_of_the_same_packets_count_once(first: str) -> None:
    """One node's draft published with its parents listed, another's of the same
    packets digested (too large for the cap beside its sketch): one set of cases."""
    members, listed = cohort_and_synthesis()
    digested = create_packet(
        KEYS[6], swarm=SWARM, topic="t", sketch=listed.sketch, n=listed.n, ttl_s=60,
        kind=KIND_SYNTHESIS, outcome=listed.outcome, series=b"\x02" * 16,
        parents=bounded_parents(listed.parents, 1)[0],
        created_ms=listed.created_ms + (1000 if first == "digested" else -1000),
    )
    found = [(0.9, listed), (0.9, digested)] + [(0.9, m) for m in members]
    support = answer_query(found, k=10)["support"]
    assert support["syntheses"] == 1 and support["overlapping"] == 1
    assert support["cases"] == listed.n


def test_a_bool_and_the_same_word_as_text_stay_two_categories() -> None:
    rng = np.random.default_rng(4)
    found = [(0.9, obs(near(direction(1), rng), {"s": value}))
             for value in (True, True, "true", False)]
    field = answer_query(found, k=10)["fields"]["s"]
    assert field["value_type"] == "mixed"
    assert field["probabilities"] == pytest.approx({"true": 0.5, '"true"': 0.25, "false": 0.25})


def test_presumed_members_are_alike_older_and_no_more_than_it_holds() -> None:
    members, synthesis = cohort_and_synthesis(count=6, max_parents=4)
    rng = np.random.default_rng(7)
    older_alike = [obs(near(direction(1), rng), {"survived": True}, n=5,
                       created_ms=synthesis.created_ms - 1) for _ in range(2)]
    skewed = obs(near(direction(1), rng), {"survived": True}, n=11,
                 created_ms=synthesis.created_ms + CLOCK_SKEW_MS)  # a clock ahead
    newer_alike = obs(near(direction(1), rng), {"survived": True}, n=7,
                      created_ms=synthesis.created_ms + CLOCK_SKEW_MS + 1)
    unlike = obs(direction(9), {"survived": False}, n=3, created_ms=synthesis.created_ms - 1)
    found = members + older_alike + [skewed, newer_alike, unlike]
    answer = answer_query([(0.9, synthesis)] + [(0.8, p) for p in found], k=20)
    support = answer["support"]
    # Nine alike and not too new: the six most alike to its centroid are presumed
    # (it summarises six packets); the newer and the unlike one never are.
    candidates = sorted(members + older_alike + [skewed],
                        key=lambda p: -cosine(p.sketch, synthesis.sketch))
    kept = [*candidates[6:], newer_alike, unlike]
    assert support["presumed_covered"] == 6
    assert support["observations"] == len(kept) == 5
    assert support["cases"] == 12 + sum(p.n for p in kept)


def test_older_versions_and_overlapping_syntheses_are_left_out() -> None:
    members, synthesis = cohort_and_synthesis()
    synth = CohortSynthesizer(SynthesizerSettings(min_cohort=5))
    for p in members:
        synth.consume(p)
    (draft,) = synth.ready(NOW_MS)
    # Another node synthesised the same members: it overlaps and is left out.
    other_node = sign_draft(draft, key=KEYS[6])
    # An older version of the same series by the first node: superseded.
    older = create_packet(
        KEYS[7], swarm=SWARM, topic="t", sketch=synthesis.sketch, n=10, ttl_s=60,
        kind=KIND_SYNTHESIS, outcome={"_packets": 5, "_origins": 3, "los.mean": 1.0,
                                      "los.sd": 0.0},
        series=synthesis.series, parents=synthesis.parents[:5],
        created_ms=synthesis.created_ms - 1000,
    )
    answer = answer_query([(0.9, synthesis), (0.9, other_node), (0.95, older)], k=10)
    support = answer["support"]
    assert support["syntheses"] == 1 and support["overlapping"] == 1
    assert support["superseded"] == 1 and support["cases"] == 12


def test_foreign_synthesis_encodings_are_counted_not_used() -> None:
    foreign = create_packet(KEYS[0], swarm=SWARM, topic="t", sketch=make_sketch([1.0, 0.0]),
                            n=10, ttl_s=60, kind=KIND_SYNTHESIS, outcome={"label": "x"})
    answer = answer_query([(0.9, foreign)], k=5)
    assert answer["support"]["undecodable"] == 1 and answer["fields"] == {}


def test_match_summary_shape() -> None:
    p = obs(direction(1), {"ok": True}, n=3, key=KEYS[2])
    summary = match_summary(np.float64(0.875), p)
    assert summary == {"id": p.id.hex(), "similarity": 0.875, "outcome": {"ok": True},
                       "n": 3, "origin": p.origin.hex(), "kind": "observation"}
    assert type(summary["similarity"]) is float
    json.dumps(summary)
