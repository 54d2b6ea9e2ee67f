"""The default synthesizer: cohorts, the privacy floor, re-emission, caps, noise."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random

import numpy as np
import pytest
from synth_helpers import KEYS, NOW_MS, direction, near, obs, sign_draft

from qisd.packet import MAX_N, OutcomePacket
from qisd.synthesis import (
    CohortSynthesizer,
    SynthesisDraft,
    SynthesizerError,
    SynthesizerSettings,
    decode_outcome,
)
from qisd.synthesis.base import PARENTS_CONTEXT, bounded_parents, series_id


def settings(**kw: object) -> SynthesizerSettings:
    base: dict[str, object] = {"min_cohort": 5, "similarity": 0.9, "salt": b"node"}
    base.update(kw)
    return SynthesizerSettings(**base)  # type: ignore[arg-type]


def feed_cluster(synth: CohortSynthesizer, seed: int, count: int, *, n: int = 1,
                 outcome: dict[str, object] | None = None, topic: str = "t") -> list[bytes]:
    rng = np.random.default_rng(seed + 1000)
    base = direction(seed)
    ids = []
    for i in range(count):
        row = outcome or {"survived": i % 4 != 0, "los": float(i)}
        p = obs(near(base, rng), row, n=n, key=KEYS[i % 3], topic=topic)  # type: ignore[arg-type]
        synth.consume(p)
        ids.append(p.id)
    return ids


def test_similar_packets_share_a_cohort_dissimilar_do_not() -> None:
    synth = CohortSynthesizer(settings())
    a = feed_cluster(synth, 1, 6)
    b = feed_cluster(synth, 2, 7)
    cohorts = synth.cohorts()
    assert [sorted(c.members) for c in cohorts] == [sorted(a), sorted(b)]
    drafts = synth.ready(NOW_MS)
    assert len(drafts) == 2
    first, second = drafts
    assert (first.n, second.n) == (6, 7)
    assert first.parents == tuple(sorted(a)) and not first.parents_digest
    assert first.generation == 1 and first.topic == "t"
    assert math.isclose(float(np.linalg.norm(first.centroid)), 1.0)
    assert float(np.dot(first.centroid, direction(1))) > 0.95
    assert first.series == series_id(b"node", "t", a[0]) != second.series
    dec = decode_outcome(first.outcome, first.n)
    assert (dec.packets, dec.origins) == (6, 3)
    surv = dec.aggregate.get("survived")
    assert surv is not None and surv.labels.counts == {True: 4, False: 2}
    los = dec.aggregate.get("los")
    assert los is not None and math.isclose(los.numbers.mean, 2.5)
    assert math.isclose(los.numbers.variance, float(np.var(np.arange(6.0))))
    # A signed draft is a valid synthesis packet.
    packet = sign_draft(first)
    assert packet.kind == "synthesis" and packet.parents == first.parents


def test_topics_are_kept_apart() -> None:
    synth = CohortSynthesizer(settings())
    feed_cluster(synth, 1, 5, topic="a")
    feed_cluster(synth, 1, 5, topic="b")
    assert sorted(d.topic for d in synth.ready(NOW_MS)) == ["a", "b"]


def test_cohort_below_minimum_yields_nothing() -> None:
    synth = CohortSynthesizer(settings(min_cohort=5))
    feed_cluster(synth, 1, 4)
    assert synth.ready(NOW_MS) == []
    feed_cluster(synth, 1, 1, n=1)  # the fifth case
    assert len(synth.ready(NOW_MS)) == 1
    # n counts cases, not packets: two packets of 3 cases make a cohort.
    synth2 = CohortSynthesizer(settings(min_cohort=5))
    feed_cluster(synth2, 7, 2, n=3)
    assert [d.n for d in synth2.ready(NOW_MS)] == [6]


def test_cases_past_the_packet_cap_still_make_a_synthesis_packet() -> None:
    """One member claiming n at the cap (any site can): the cohort's total is past
    what a packet can carry; the synthesis says the cap and is still published."""
    synth = CohortSynthesizer(settings())
    feed_cluster(synth, 1, 1, n=MAX_N)
    feed_cluster(synth, 1, 12)
    (draft,) = synth.ready(NOW_MS)
    assert draft.n == MAX_N
    assert sign_draft(draft).n == MAX_N
    feed_cluster(synth, 1, 2)
    (again,) = synth.ready(NOW_MS + 1)
    assert again.n == MAX_N and again.series == draft.series


def test_second_pass_without_input_emits_nothing_and_new_input_supersedes() -> None:
    synth = CohortSynthesizer(settings())
    feed_cluster(synth, 1, 5)
    (draft,) = synth.ready(NOW_MS)
    assert synth.ready(NOW_MS + 1) == []
    assert synth.ready(NOW_MS + 60_000) == []
    feed_cluster(synth, 1, 2)
    (again,) = synth.ready(NOW_MS + 2)
    assert again.series == draft.series and again.n == 7
    assert synth.statistics()["drafts"] == 2


def test_duplicate_deliveries_count_once() -> None:
    synth = CohortSynthesizer(settings())
    p = obs(direction(1), {"x": 1.0}, n=5)
    for _ in range(3):
        synth.consume(p)
    (draft,) = synth.ready(NOW_MS)
    assert draft.n == 5 and synth.statistics()["duplicates"] == 2


def test_min_new_and_interval() -> None:
    synth = CohortSynthesizer(settings(min_new=3, interval=10.0))
    feed_cluster(synth, 1, 5)
    assert len(synth.ready(NOW_MS)) == 1
    feed_cluster(synth, 1, 1)
    assert synth.ready(NOW_MS + 1000) == []  # 1 new < min_new, interval starts now
    assert synth.ready(NOW_MS + 5000) == []
    assert len(synth.ready(NOW_MS + 11_000)) == 1  # interval elapsed with new data


def test_generation_capped_packets_and_syntheses_are_ignored() -> None:
    synth = CohortSynthesizer(settings())
    feed_cluster(synth, 1, 5)
    (draft,) = synth.ready(NOW_MS)
    synth.consume(sign_draft(draft))  # generation 1 == cap: never consumed
    assert synth.statistics()["skipped_generation"] == 1
    assert synth.ready(NOW_MS) == []
    # With a higher cap, syntheses still stay out unless asked for.
    synth2 = CohortSynthesizer(settings(max_generation=2))
    synth2.consume(sign_draft(draft))
    assert synth2.statistics()["skipped_synthesis"] == 1
    synth3 = CohortSynthesizer(settings(max_generation=2,
                                        options={"include_syntheses": True}))
    synth3.consume(sign_draft(draft))
    (second,) = synth3.ready(NOW_MS)
    assert second.generation == 2 and second.n == draft.n


def test_parents_become_a_digest_when_too_many() -> None:
    synth = CohortSynthesizer(settings(max_parents=4))
    ids = feed_cluster(synth, 1, 6)
    (draft,) = synth.ready(NOW_MS)
    assert draft.parents_digest and len(draft.parents) == 1
    assert draft.parents == bounded_parents(ids, 4)[0]
    expected = hashlib.blake2b(PARENTS_CONTEXT + b"".join(sorted(ids)), digest_size=16).digest()
    assert draft.parents == (expected,)
    dec = decode_outcome(draft.outcome, draft.n)
    assert dec.packets == 6 != len(draft.parents)  # readers can tell it is a digest


def test_memory_bounds() -> None:
    synth = CohortSynthesizer(settings(options={"max_members": 4, "max_cohorts_per_topic": 3}))
    feed_cluster(synth, 1, 10)
    sizes = [len(c.members) for c in synth.cohorts()]
    assert sizes == [4, 4, 2]  # full cohorts take no more; a fresh one opens beside
    assert len({c.series for c in synth.cohorts()}) == 3
    feed_cluster(synth, 2, 1)  # a fourth cohort evicts the least recently updated
    assert len(synth.cohorts()) == 3 and synth.statistics()["evicted"] == 1
    assert synth.statistics()["members"] == sum(len(c.members) for c in synth.cohorts())


def test_forget_drops_expired_cohorts() -> None:
    synth = CohortSynthesizer(settings())
    feed_cluster(synth, 1, 5)
    expires = synth.cohorts()[0].expires_ms
    assert synth.forget(expires - 1) == 0
    assert synth.forget(expires) == 1
    assert synth.cohorts() == [] and synth.statistics()["members"] == 0


def noisy_draft(epsilon: float, seed: int) -> SynthesisDraft:
    synth = CohortSynthesizer(
        settings(epsilon=epsilon, options={"ranges": {"los": [0, 20]}}),
        rng=random.Random(seed),
    )
    rng = np.random.default_rng(5)
    base = direction(1)
    for i in range(40):
        synth.consume(obs(near(base, rng), {"survived": i % 4 != 0, "los": float(i % 10)},
                          n=5, created_ms=NOW_MS + i))
    (draft,) = synth.ready(NOW_MS)
    return draft


def test_epsilon_zero_is_exact_and_noise_stays_plausible() -> None:
    exact = noisy_draft(0.0, 1)
    assert exact == noisy_draft(0.0, 2)  # no randomness at all
    assert exact.n == 200
    assert exact.outcome["survived?true"] == 150 and exact.outcome["survived?false"] == 50
    assert math.isclose(float(exact.outcome["los.mean"]), 4.5)
    noisy = [noisy_draft(1.0, seed) for seed in range(8)]
    assert any(d.outcome != exact.outcome for d in noisy)
    for d in noisy:
        assert abs(d.n - 200) <= 25 and d.n >= 1
        assert abs(int(d.outcome["survived?true"]) - 150) <= 25
        assert all(v >= 0 for k, v in d.outcome.items() if isinstance(v, int))
        mean = float(d.outcome["los.mean"])
        assert 0 <= mean <= 20 and abs(mean - 4.5) < 2
        assert d.series == exact.series and d.parents == exact.parents


def test_an_enormous_range_does_not_stop_synthesis() -> None:
    """A range so wide that its noise scale is past a float (over a small epsilon):
    the noise is as wide as it gets (the field may then be left out, its noised
    spread past a float) and the cohort is still synthesised; it raised
    ZeroDivisionError at every pass, for every cohort."""
    synth = CohortSynthesizer(
        settings(epsilon=0.001, options={"ranges": {"los": [-8e307, 8e307]}}),
        rng=random.Random(1),
    )
    feed_cluster(synth, 1, 6)
    (draft,) = synth.ready(NOW_MS)
    assert draft.n >= 1 and "survived?true" in draft.outcome
    assert all(math.isfinite(v) for v in draft.outcome.values() if isinstance(v, float))


def test_bad_options_are_named() -> None:
    with pytest.raises(SynthesizerError, match="'colour'"):
        CohortSynthesizer(settings(options={"colour": 1}))
    with pytest.raises(SynthesizerError, match=r"ranges\.los"):
        CohortSynthesizer(settings(options={"ranges": {"los": [5, 1]}}))
    with pytest.raises(SynthesizerError, match="similarity"):
        settings(similarity=1.5)


def cluster(seed: int, count: int) -> list[OutcomePacket]:
    """``count`` cases near ``direction(seed)`` (each a distinct packet)."""
    rng = np.random.default_rng(seed + 1000)
    return [obs(near(direction(seed), rng), {"survived": i % 4 != 0}, key=KEYS[i % 3])
            for i in range(count)]


@pytest.mark.parametrize("max_parents", [16, 2, 0], ids=["listed", "digest", "none"])
def test_resume_takes_a_cohort_back_under_its_series(max_parents: int) -> None:
    cases = cluster(1, 6)
    before = CohortSynthesizer(settings(max_parents=max_parents))
    for p in cases:
        before.consume(p)
    (draft,) = before.ready(NOW_MS)
    assert draft.parents_digest == (max_parents == 2)
    old = sign_draft(draft)
    # After a restart: an empty synthesizer, and the store re-read in another order
    # with another cohort's cases in between.
    after = CohortSynthesizer(settings(max_parents=max_parents))
    assert after.resume([old, old]) == 1
    other = cluster(2, 5)
    for p in [cases[5], *other[:2], *reversed(cases[:5]), *other[2:]]:
        after.consume(p)
    resumed = [c for c in after.cohorts() if c.series == draft.series]
    assert [sorted(c.members) for c in resumed] == [sorted(p.id for p in cases)]
    # Nothing new in the resumed cohort: only the other one is synthesised.
    assert [d.series for d in after.ready(NOW_MS + 1)] == [
        series_id(b"node", "t", other[0].id)]
    after.consume(cluster(1, 1)[0])
    (newer,) = after.ready(NOW_MS + 2)
    assert (newer.series, newer.n) == (draft.series, 7)  # supersedes the old synthesis
    assert after.statistics()["resumed"] == 1


def test_a_resumed_cohort_nobody_rejoins_is_forgotten() -> None:
    before = CohortSynthesizer(settings())
    for p in cluster(1, 5):
        before.consume(p)
    (draft,) = before.ready(NOW_MS)
    after = CohortSynthesizer(settings())
    assert after.resume([sign_draft(draft), *cluster(3, 2)]) == 1  # observations: not taken
    assert after.ready(NOW_MS) == []
    assert after.forget(NOW_MS) == 1 and after.cohorts() == []


def test_listed_parents_rejoin_their_cohort_whatever_their_similarity() -> None:
    cases = cluster(1, 6)
    before = CohortSynthesizer(settings())
    for p in cases:
        before.consume(p)
    (draft,) = before.ready(NOW_MS)
    # Restarted with a stricter similarity: on their own these cases would scatter.
    strict = CohortSynthesizer(settings(similarity=0.9999))
    for p in cases:
        strict.consume(p)
    assert len(strict.cohorts()) == 6
    after = CohortSynthesizer(settings(similarity=0.9999))
    after.resume([sign_draft(draft)])
    for p in reversed(cases):
        after.consume(p)
    assert [(c.series, len(c.members)) for c in after.cohorts()] == [(draft.series, 6)]


def resumed_from(cases: list[OutcomePacket], *, after_kw: dict[str, object] | None = None,
                 **kw: object) -> tuple[OutcomePacket, CohortSynthesizer]:
    """The synthesis of ``cases`` before a restart, and a synthesizer (with ``kw``,
    updated by ``after_kw``) that resumed it."""
    before = CohortSynthesizer(settings(**kw))
    for p in cases:
        before.consume(p)
    (draft,) = before.ready(NOW_MS)
    old = sign_draft(draft)
    after = CohortSynthesizer(settings(**{**kw, **(after_kw or {})}))
    assert after.resume([old]) == 1
    return old, after


def test_a_new_cohort_never_takes_a_resumed_cohorts_series() -> None:
    cases = cluster(1, 6)
    # Digested parents rejoin by similarity: with a stricter one after the restart,
    # the old first member starts a cohort of its own, which its id would name.
    old, after = resumed_from(cases, max_parents=2, after_kw={"similarity": 0.9999})
    for p in cases:
        after.consume(p)
    series = [c.series for c in after.cohorts()]
    assert old.series == series_id(b"node", "t", cases[0].id) == series[0]
    assert len(series) > 1 and len(set(series)) == len(series)


def test_members_that_do_not_come_back_are_not_waited_for() -> None:
    cases = cluster(1, 6)
    old, after = resumed_from(cases, min_new=3)
    for p in cases[:3]:  # the other three expired while the node was down
        after.consume(p)
    assert after.ready(NOW_MS + 1) == []  # nothing new yet
    rng = np.random.default_rng(5)
    for _ in range(3):
        after.consume(obs(near(direction(1), rng), {"survived": True}))
    (newer,) = after.ready(NOW_MS + 2)  # three new cases: min_new, as without a restart
    assert (newer.series, newer.n) == (old.series, 6)


def test_resumed_cohorts_are_evicted_last_and_their_old_synthesis_not_consumed() -> None:
    cases = cluster(1, 5)
    opts = {"max_cohorts_per_topic": 2, "include_syntheses": True}
    old, after = resumed_from(cases, max_generation=2, options=opts)
    for p in [*cluster(2, 1), *cluster(3, 1), old, *reversed(cases)]:  # two others first
        after.consume(p)
    resumed = [c for c in after.cohorts() if c.series == old.series]
    assert [sorted(c.members) for c in resumed] == [sorted(p.id for p in cases)]
    assert after.statistics()["duplicates"] == 1  # the old synthesis itself


@pytest.mark.parametrize("max_parents", [16, 2], ids=["listed", "digest"])
def test_new_members_replacing_expired_ones_are_new(max_parents: int) -> None:
    """Two of six expired while the node was down and two new cases came: as many
    members as before, but not the same ones, so the cohort is synthesised again."""
    cases = cluster(1, 6)
    old, after = resumed_from(cases, max_parents=max_parents, min_new=2)
    rng = np.random.default_rng(11)
    fresh = [obs(near(direction(1), rng), {"survived": False}) for _ in range(2)]
    for p in [*fresh, *cases[2:]]:  # the new ones delivered before the re-read
        after.consume(p)
    drafts = after.ready(NOW_MS + 1) + after.ready(NOW_MS + 1 + 2000)  # the interval
    assert [(d.series, d.n) for d in drafts] == [(old.series, 6)]
    assert drafts[0].outcome["survived?false"] == 2 + sum(
        1 for p in cases[2:] if p.outcome["survived"] is False)


@pytest.mark.parametrize("max_parents", [16, 2, 0], ids=["listed", "digest", "none"])
def test_a_resumed_cohort_whose_members_all_came_back_is_not_synthesised_again(
    max_parents: int,
) -> None:
    cases = cluster(1, 6)
    _, after = resumed_from(cases, max_parents=max_parents)
    for p in reversed(cases):
        after.consume(p)
    assert after.ready(NOW_MS + 1) == [] and after.ready(NOW_MS + 10_000) == []
    # Its centroid follows its members again: their mean, not the old pinned one.
    (cohort,) = after.cohorts()
    units = np.array([p.sketch.to_array() for p in cases])
    mean = units.sum(axis=0) / np.linalg.norm(units.sum(axis=0))
    assert np.allclose(cohort.centroid, mean)


def test_a_resumed_cohort_published_with_shrunk_parents_is_not_drafted_again() -> None:
    """Its draft was too large for the cap and went out with its parents digested
    (qisd.daemon.synth.publish_draft): the same members are still nothing new."""
    cases = cluster(1, 6)
    before = CohortSynthesizer(settings())
    for p in cases:
        before.consume(p)
    (draft,) = before.ready(NOW_MS)
    shrunk = dataclasses.replace(draft, parents=bounded_parents(draft.parents, 1)[0],
                                 parents_digest=True)
    after = CohortSynthesizer(settings())
    assert after.resume([sign_draft(shrunk)]) == 1
    for p in reversed(cases):
        after.consume(p)
    assert after.ready(NOW_MS + 1) == [] and after.ready(NOW_MS + 10_000) == []


def test_resume_takes_the_newest_syntheses_within_the_cohort_caps() -> None:
    olds = []
    for seed in range(5):
        before = CohortSynthesizer(settings())
        for p in cluster(10 + seed, 5):
            before.consume(p)
        (draft,) = before.ready(NOW_MS)
        olds.append(sign_draft(draft))  # created in this order: the last is the newest
    capped = CohortSynthesizer(settings(options={"max_cohorts": 2}))
    assert capped.resume(olds) == 2
    assert {c.series for c in capped.cohorts()} == {olds[4].series, olds[3].series}
    per_topic = CohortSynthesizer(settings(options={"max_cohorts_per_topic": 3}))
    assert per_topic.resume(olds) == 3
    assert per_topic.statistics()["evicted"] == 0


def test_listed_parents_do_not_overfill_a_resumed_cohort() -> None:
    cases = cluster(1, 6)
    _, after = resumed_from(cases, after_kw={"options": {"max_members": 4}})
    for p in cases:
        after.consume(p)
    assert sorted(len(c.members) for c in after.cohorts()) == [2, 4]
