"""A query's answer, computed locally from the packets it found (pure).

Each matched packet counts with weight ``max(similarity, 0) * cases``: an observation
its ``n`` cases at its one outcome; a synthesis every case it summarises, read back
from its outcome map (:mod:`qisd.synthesis.encoding`). Per outcome field the answer
gives class probabilities (categories) or the weighted mean and sd (numbers, the sd
pooling the spread within syntheses), with the cases behind it; ``support`` says how
much evidence there is in all.

No case is counted twice:

* Of several versions of one synthesis series (same origin and series), only the
  newest is used.
* Syntheses whose parents are listed explicitly (``len(parents)`` equals their
  ``_packets``) claim those parents. Taking the largest first, a synthesis that
  shares a parent with one already taken is left out (``support.overlapping``).
* An observation claimed by a synthesis that was taken is left out
  (``support.covered``): its case is inside the synthesis, weighed there by the
  synthesis's similarity. Only the fields the synthesis carries, though: one has
  room for 16 entries, so fields it had to leave out still count from the
  observations it covers (listed or presumed).
* A synthesis of more packets than it can list names its parents by one digest,
  which no subset can be checked against; two syntheses with the same digest (two
  nodes' syntheses of the very same packets, as after a join moves them to another
  primary) are one set of cases, and only one is used (``support.overlapping``).
  Its members are presumed to be the observations found that were created before
  it (give or take
  :data:`CLOCK_SKEW_MS`: their origins' clocks are not the synthesising node's) and
  are at least :data:`PRESUMED_SIMILARITY` alike to its centroid (a cohort's members are within
  the synthesizer's similarity of its centroid, 0.9 by default), the most similar
  first and never more than the packets it says it summarises; those are left out
  (``support.presumed_covered``). A presumption can be wrong at a cohort's edge (a
  case left out that it did not hold, or one it held kept), but a case is never
  counted twice merely because its synthesis was too large to list it.

``support.origins`` is a lower bound (the distinct origins of the raw packets used,
or the most any one synthesis reports, whichever is larger): syntheses say how many
origins they saw, not which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qisd.packet import KIND_SYNTHESIS, OutcomePacket
from qisd.sketch import cosine
from qisd.synthesis.base import bounded_parents
from qisd.synthesis.encoding import Decoded, EncodingError, decode_outcome
from qisd.synthesis.stats import NUMERIC, FieldStat, OutcomeAggregate


def match_summary(similarity: float, packet: OutcomePacket) -> dict[str, Any]:
    """One match as the query API returns it (ids and keys as hex)."""
    return {
        "id": packet.id.hex(),
        "similarity": float(similarity),
        "outcome": dict(packet.outcome),
        "n": packet.n,
        "origin": packet.origin.hex(),
        "kind": packet.kind,
    }


#: How alike to a digested synthesis's centroid an observation must be to be presumed
#: one of its members (a little under the default cohort similarity, 0.9: a centroid
#: drifts after a member joins, and sketches are quantized).
PRESUMED_SIMILARITY = 0.85
#: How far an origin's clock may run ahead of a synthesising node's for a member to
#: be recognised (NTP keeps hosts within a fraction of it).
CLOCK_SKEW_MS = 10_000


@dataclass(frozen=True, slots=True)
class _Synthesis:
    similarity: float
    packet: OutcomePacket
    decoded: Decoded

    @property
    def explicit(self) -> bool:
        return len(self.packet.parents) == self.decoded.packets


def answer_query(matches: Sequence[tuple[float, OutcomePacket]], *, k: int) -> dict[str, Any]:
    """The answer over the best ``k`` of ``matches`` (see the module docstring)."""
    if k < 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    best: dict[bytes, tuple[float, OutcomePacket]] = {}
    for sim, packet in matches:
        held = best.get(packet.id)
        if held is None or sim > held[0]:
            best[packet.id] = (float(sim), packet)
    top = sorted(best.values(), key=lambda m: (-m[0], m[1].id))[:k]
    observations: list[tuple[float, OutcomePacket]] = []
    latest: dict[tuple[bytes, bytes], _Synthesis] = {}
    undecodable = 0
    for sim, packet in top:
        if packet.kind != KIND_SYNTHESIS:
            observations.append((sim, packet))
            continue
        try:
            decoded = decode_outcome(packet.outcome, packet.n)
        except EncodingError:
            undecodable += 1
            continue
        syn = _Synthesis(sim, packet, decoded)
        # An empty series names nothing: key such packets by their own id.
        key = (packet.origin, packet.series or packet.id)
        held_syn = latest.get(key)
        if held_syn is None or _newer(syn, held_syn):
            latest[key] = syn
    superseded = sum(1 for sim, p in top if p.kind == KIND_SYNTHESIS) - undecodable - len(latest)

    claimed: dict[bytes, _Synthesis] = {}  # observation id -> the synthesis listing it
    digests: set[tuple[str, bytes]] = set()
    syntheses: list[_Synthesis] = []
    overlapping = 0
    for syn in sorted(latest.values(),
                      key=lambda s: (-s.packet.n, -s.packet.created_ms, s.packet.id)):
        if syn.similarity <= 0:
            continue  # weighs nothing: it covers nothing either (its members count alone)
        # One digest, one member set: another node's synthesis of the very same
        # packets (it became their primary after a join), listed or digested (a
        # draft too large for the cap is published digested), is the same cases.
        digest = _digest_of(syn)
        if digest is not None and digest in digests:
            overlapping += 1
            continue
        if syn.explicit:
            parents = set(syn.packet.parents)
            if parents & claimed.keys():
                overlapping += 1
                continue
            claimed.update(dict.fromkeys(parents, syn))
        if digest is not None:
            digests.add(digest)
        syntheses.append(syn)

    presumed = _presumed_members(syntheses, observations, claimed)
    estimate = OutcomeAggregate()
    cases_of: dict[str, float] = {}
    cases = packets = 0
    raw_origins: set[bytes] = set()
    synth_origins = 0
    covered = presumed_covered = 0
    used_observations = used_syntheses = 0
    for sim, packet in observations:
        cover = claimed.get(packet.id) or presumed.get(packet.id)
        if cover is not None:
            if packet.id in claimed:
                covered += 1
            else:
                presumed_covered += 1
            # Its case is in the synthesis; fields the synthesis had no room for
            # (16 entries) are not, and count from here.
            carried = cover.decoded.aggregate.fields
            uncarried = {f: v for f, v in packet.outcome.items() if f not in carried}
            if uncarried and sim > 0:
                estimate.add_outcome(uncarried, sim * packet.n)
                for name in uncarried:
                    cases_of[name] = cases_of.get(name, 0.0) + packet.n
            continue
        weight = max(sim, 0.0) * packet.n
        if weight <= 0:
            continue
        estimate.add_outcome(packet.outcome, weight)
        for name in packet.outcome:
            cases_of[name] = cases_of.get(name, 0.0) + packet.n
        cases += packet.n
        packets += 1
        used_observations += 1
        raw_origins.add(packet.origin)
    for syn in syntheses:
        factor = max(syn.similarity, 0.0)
        if factor <= 0:
            continue
        agg = syn.decoded.aggregate
        estimate.merge(agg.scaled(factor))
        for name, stat in agg.fields.items():
            cases_of[name] = cases_of.get(name, 0.0) + stat.cases
        cases += syn.packet.n
        packets += syn.decoded.packets
        used_syntheses += 1
        synth_origins = max(synth_origins, syn.decoded.origins)

    fields = {
        name: _field_answer(stat, cases_of.get(name, 0.0))
        for name, stat in estimate.items()
        if stat.cases > 0
    }
    return {
        "fields": fields,
        "support": {
            "cases": cases,
            "packets": packets,
            "origins": max(len(raw_origins), synth_origins),
            "observations": used_observations,
            "syntheses": used_syntheses,
            "covered": covered,
            "presumed_covered": presumed_covered,
            "overlapping": overlapping,
            "superseded": superseded,
            "undecodable": undecodable,
        },
    }


def _digest_of(syn: _Synthesis) -> tuple[str, bytes] | None:
    """The (topic, digest) naming ``syn``'s member set, listed or digested; None
    when it names none (no parents, or a single listed one)."""
    parents = syn.packet.parents
    if syn.explicit:
        if len(parents) < 2:
            return None
        parents = bounded_parents(parents, 1)[0]
    return (syn.packet.topic, parents[0]) if parents else None


def _presumed_members(
    syntheses: Sequence[_Synthesis],
    observations: Sequence[tuple[float, OutcomePacket]],
    claimed: Mapping[bytes, _Synthesis],
) -> dict[bytes, _Synthesis]:
    """The observations presumed inside the digested syntheses (module docstring),
    the largest synthesis choosing first."""
    presumed: dict[bytes, _Synthesis] = {}
    for syn in syntheses:
        if syn.explicit:
            continue
        made = syn.packet.created_ms + CLOCK_SKEW_MS
        near = sorted(
            ((cosine(p.sketch, syn.packet.sketch), p.id) for _, p in observations
             if p.id not in claimed and p.id not in presumed and p.created_ms <= made),
            reverse=True,
        )
        for alike, pid in near[: syn.decoded.packets]:
            if alike < PRESUMED_SIMILARITY:
                break
            presumed[pid] = syn
    return presumed


def _newer(a: _Synthesis, b: _Synthesis) -> bool:
    return (a.packet.created_ms, a.packet.n, a.packet.id) > (b.packet.created_ms, b.packet.n,
                                                             b.packet.id)


def _field_answer(stat: FieldStat, cases: float) -> dict[str, Any]:
    if stat.kind == NUMERIC:
        num = stat.numbers
        return {
            "type": "numeric",
            "mean": num.mean,
            "sd": num.sd,
            "cases": round(cases),
            "weight": num.weight,
        }
    view = stat.categories()
    total = view.total
    has_bool = any(isinstance(v, bool) for v in stat.labels.counts)
    probabilities: dict[str, float] = {}
    for value, weight in view.ranked():
        if isinstance(value, bool):
            label = "true" if value else "false"
        elif has_bool and value in ("true", "false"):
            label = f'"{value}"'  # the text beside the bool, told apart as the CLI does
        else:
            label = value
        probabilities[label] = probabilities.get(label, 0.0) + weight / total
    has_str = any(isinstance(v, str) for v in stat.labels.counts)
    has_numbers = stat.numbers.weight > 0
    if has_bool and not has_str and not has_numbers:
        value_type = "bool"
    elif has_str and not has_bool and not has_numbers:
        value_type = "str"
    else:
        value_type = "mixed"
    out: dict[str, Any] = {
        "type": "categorical",
        "value_type": value_type,
        "probabilities": probabilities,
        "cases": round(cases),
        "weight": total,
    }
    if view.other > 0:
        out["other"] = view.other / total
    return out
