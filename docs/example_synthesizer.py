"""An example qisd synthesizer plug-in: one synthesis per topic. Copy and adapt.

It pools every observation of a topic into a single summary and publishes it whenever
new packets arrived and the pool describes at least ``min_cohort`` cases. The default
``cohort`` synthesizer does the same per cohort of similar cases.

Register it in your package's ``pyproject.toml`` and select it in ``qisd.toml``::

    [project.entry-points."qisd.synthesizers"]
    example = "example_synth:ExampleSynthesizer"

    # qisd.toml
    [synthesis]
    synthesizer = "example"

The daemon calls ``ExampleSynthesizer(settings)`` once, then ``consume(packet)`` for
each packet this node is primary for and ``ready(now_ms)`` every ``interval`` seconds;
each returned draft is signed by the node and stored in the DHT. Keep both methods
quick and free of I/O: they run inside the daemon's event loop.
"""

from __future__ import annotations

import math

from qisd.packet import KIND_OBSERVATION, OutcomePacket
from qisd.synthesis import (
    OutcomeAggregate,
    SynthesisDraft,
    SynthesizerSettings,
    bounded_parents,
    encode_aggregate,
    series_id,
)


class _Pool:
    def __init__(self, dim: int) -> None:
        self.vector_sum = [0.0] * dim
        self.aggregate = OutcomeAggregate()
        self.members: set[bytes] = set()
        self.origins: set[bytes] = set()
        self.first: bytes | None = None
        self.cases = 0
        self.new = 0
        self.expires_ms = 0


class ExampleSynthesizer:
    """Pools all observations of each topic (and vector dimension)."""

    def __init__(self, settings: SynthesizerSettings) -> None:
        self.settings = settings
        self.pools: dict[tuple[str, int], _Pool] = {}

    def consume(self, packet: OutcomePacket) -> None:
        # Only observations: syntheses must never be re-synthesised past the cap.
        if packet.kind != KIND_OBSERVATION or packet.generation >= self.settings.max_generation:
            return
        vector = packet.sketch.to_array()
        pool = self.pools.setdefault((packet.topic, len(vector)), _Pool(len(vector)))
        if packet.id in pool.members:  # the same packet may be delivered twice
            return
        pool.first = pool.first or packet.id
        pool.members.add(packet.id)
        pool.origins.add(packet.origin)
        pool.vector_sum = [s + float(x) for s, x in zip(pool.vector_sum, vector, strict=True)]
        pool.aggregate.add_outcome(packet.outcome, packet.n)
        pool.cases += packet.n
        pool.expires_ms = max(pool.expires_ms, packet.expires_ms)
        pool.new += 1

    def ready(self, now_ms: int) -> list[SynthesisDraft]:
        drafts = []
        for (topic, _dim), pool in sorted(self.pools.items()):
            if pool.new == 0 or pool.cases < self.settings.min_cohort or pool.first is None:
                continue
            norm = math.sqrt(sum(x * x for x in pool.vector_sum)) or 1.0
            encoded = encode_aggregate(pool.aggregate, n=pool.cases,
                                       packets=len(pool.members), origins=len(pool.origins))
            parents, digest = bounded_parents(pool.members, self.settings.max_parents)
            drafts.append(SynthesisDraft(
                topic=topic,
                centroid=tuple(x / norm for x in pool.vector_sum),
                outcome=encoded.outcome,
                n=pool.cases,
                parents=parents,
                parents_digest=digest,
                # Stable for the pool, so each new draft supersedes the previous one.
                series=series_id(self.settings.salt, topic, pool.first),
                generation=1,
                expires_ms=pool.expires_ms,
            ))
            pool.new = 0
        return drafts
