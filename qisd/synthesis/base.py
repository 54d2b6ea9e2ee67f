"""The synthesizer plug-in protocol, the drafts it returns, and how plug-ins are loaded.

A synthesizer is pure: the worker (:mod:`qisd.synthesis.worker`) hands it packets with
:meth:`Synthesizer.consume` and asks :meth:`Synthesizer.ready` for drafts; the daemon
signs each :class:`SynthesisDraft` into a synthesis packet and stores it in the DHT like
any other packet. Plug-ins are found in the entry point group ``qisd.synthesizers``:
the entry point names a factory (usually the class) called with one
:class:`SynthesizerSettings`. A copyable example is ``docs/example_synthesizer.py``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from qisd.packet import MAX_PARENTS, OutcomePacket
from qisd.synthesis.stats import OutcomeValue

if TYPE_CHECKING:
    from qisd.config import SynthesisConfig
    from qisd.manifest import Manifest

ENTRY_POINT_GROUP = "qisd.synthesizers"
SERIES_CONTEXT = b"qisd/series/1"
PARENTS_CONTEXT = b"qisd/parents/1"


class SynthesizerError(Exception):
    """A synthesizer that cannot be loaded or was configured wrongly; says which and why."""


@dataclass(frozen=True, slots=True)
class SynthesizerSettings:
    """What every synthesizer is built with (from ``[synthesis]`` and the manifest)."""

    #: Fewest distinct cases (sum of ``n``) a synthesis may describe.
    min_cohort: int = 5
    #: Cosine at or above which a packet joins a cohort.
    similarity: float = 0.9
    #: New packets in a cohort that trigger a new synthesis of it.
    min_new: int = 1
    #: Seconds after which any new evidence triggers a synthesis, even below min_new.
    interval: float = 2.0
    #: Laplace noise parameter; 0 publishes exact statistics.
    epsilon: float = 0.0
    #: Packets of this generation or above are never synthesised (manifest cap).
    max_generation: int = 1
    #: Parent ids listed explicitly up to this many; above, one digest (manifest cap).
    max_parents: int = 16
    #: Makes series ids unique to this node (its public key).
    salt: bytes = b""
    #: Plug-in specific options, passed through untouched.
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> SynthesizerError:
            return SynthesizerError(f"synthesis setting {name}: {rule}")

        if self.min_cohort < 1:
            raise bad("min_cohort", f"must be >= 1, got {self.min_cohort}")
        if not 0.0 <= self.similarity <= 1.0:
            raise bad("similarity", f"must be in 0..1, got {self.similarity}")
        if self.min_new < 1:
            raise bad("min_new", f"must be >= 1, got {self.min_new}")
        if not (math.isfinite(self.interval) and self.interval >= 0):
            raise bad("interval", f"must be seconds >= 0, got {self.interval}")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise bad("epsilon", f"must be >= 0 (0 = no noise), got {self.epsilon}")
        if self.max_generation < 0:
            raise bad("max_generation", f"must be >= 0, got {self.max_generation}")
        if not 0 <= self.max_parents <= MAX_PARENTS:
            raise bad("max_parents", f"must be in 0..{MAX_PARENTS}, got {self.max_parents}")

    @classmethod
    def from_config(
        cls, synthesis: SynthesisConfig, manifest: Manifest, *, salt: bytes,
        options: Mapping[str, Any] | None = None,
    ) -> SynthesizerSettings:
        """Settings from the ``[synthesis]`` config section and the swarm manifest."""
        return cls(
            min_cohort=synthesis.min_cohort,
            similarity=float(synthesis.similarity),
            min_new=synthesis.min_new,
            interval=float(synthesis.interval),
            epsilon=float(synthesis.epsilon),
            max_generation=manifest.max_generation,
            max_parents=manifest.max_parents,
            salt=salt,
            options={**({"ranges": synthesis.range_map()} if synthesis.ranges else {}),
                     **(options or {})},
        )


@dataclass(frozen=True, slots=True)
class SynthesisDraft:
    """A synthesis packet before signing: everything but the node's own fields."""

    topic: str
    #: Unit vector the packet is fingerprinted (and so routed) by.
    centroid: tuple[float, ...]
    outcome: Mapping[str, OutcomeValue]
    n: int
    #: Member ids, sorted; or one BLAKE2b-128 digest of them (``parents_digest``).
    parents: tuple[bytes, ...]
    parents_digest: bool
    #: Stable per cohort: the newer synthesis of a cohort supersedes the older in stores.
    series: bytes
    generation: int = 1
    #: Latest expiry among the members (ms); the daemon may cap the packet's ttl by it.
    expires_ms: int | None = None


def bounded_parents(ids: Iterable[bytes], max_parents: int) -> tuple[tuple[bytes, ...], bool]:
    """Parents for a draft: the sorted ids when at most ``max_parents``, else
    ``(digest,)`` with the digest flag (empty when ``max_parents`` is 0)."""
    ordered = sorted(set(ids))
    if len(ordered) <= max_parents:
        return tuple(ordered), False
    if max_parents == 0:
        return (), False
    digest = hashlib.blake2b(PARENTS_CONTEXT + b"".join(ordered), digest_size=16).digest()
    return (digest,), True


def series_id(salt: bytes, topic: str, first_member: bytes) -> bytes:
    """BLAKE2b-128 naming a cohort for as long as it lives (its first member never
    changes, while its centroid drifts). Length prefixes keep the parts apart."""
    topic_b = topic.encode()
    h = hashlib.blake2b(SERIES_CONTEXT, digest_size=16)
    for part in (salt, topic_b, first_member):
        h.update(len(part).to_bytes(2, "big"))
        h.update(part)
    return h.digest()


@runtime_checkable
class Synthesizer(Protocol):
    """What the worker drives. Optional extras it also uses when present:
    ``forget(now_ms) -> int`` (drop state about expired packets),
    ``statistics() -> Mapping[str, int]`` (counters for metrics, e.g. ``cohorts``,
    ``skipped_generation``) and ``resume(packets) -> int`` (after a restart: this
    node's own live syntheses, to take its state back from; the worker then feeds it
    the store's packets again)."""

    def consume(self, packet: OutcomePacket) -> None:
        """Take one delivered packet into account (ignoring what it must not use)."""

    def ready(self, now_ms: int) -> list[SynthesisDraft]:
        """Drafts to publish now; after returning them, they count as emitted."""


def available_synthesizers() -> list[str]:
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})


def load_synthesizer(name: str, settings: SynthesizerSettings) -> Synthesizer:
    """Build the synthesizer registered as ``name`` in the ``qisd.synthesizers`` group."""
    found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
             if ep.name == name]
    if not found:
        names = ", ".join(available_synthesizers()) or "none"
        raise SynthesizerError(
            f"no synthesizer {name!r} in entry point group {ENTRY_POINT_GROUP}; "
            f"installed: {names}"
        )
    ep = found[0]
    try:
        factory = ep.load()
    except Exception as exc:  # an import of third-party code can fail in any way
        raise SynthesizerError(
            f"synthesizer {name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(factory):
        raise SynthesizerError(f"synthesizer {name!r} ({ep.value}) is not callable")
    try:
        synth = factory(settings)
    except SynthesizerError:
        raise
    except Exception as exc:
        raise SynthesizerError(
            f"synthesizer {name!r} ({ep.value}) failed to start: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(synth, Synthesizer):
        raise SynthesizerError(
            f"synthesizer {name!r} ({ep.value}) returned {type(synth).__name__}, "
            "which lacks consume(packet) and ready(now_ms)"
        )
    return synth
