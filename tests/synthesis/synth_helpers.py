"""Shared helpers of the synthesis tests: real signed packets around chosen directions."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import nacl.signing
import numpy as np

from qisd.manifest import DEFAULT_MANIFEST
from qisd.packet import KIND_OBSERVATION, KIND_SYNTHESIS, OutcomePacket, create_packet
from qisd.sketch import make_sketch
from qisd.synthesis import SynthesisDraft

KEYS = [nacl.signing.SigningKey(bytes([i]) * 32) for i in range(1, 9)]
SWARM = DEFAULT_MANIFEST.swarm_id
NOW_MS = 1_700_000_000_000
DIM = 16
_created = itertools.count(NOW_MS)


def direction(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


def near(base: np.ndarray, rng: np.random.Generator, spread: float = 0.03) -> np.ndarray:
    """A vector within a few degrees of ``base``."""
    return base + rng.standard_normal(base.size) * spread


def obs(
    vec: Sequence[float] | np.ndarray,
    outcome: Mapping[str, int | float | str | bool],
    *,
    n: int = 1,
    key: nacl.signing.SigningKey = KEYS[0],
    topic: str = "t",
    ttl_s: int = 3600,
    created_ms: int | None = None,
) -> OutcomePacket:
    """An observation; each call gets a distinct creation time, so a distinct id."""
    return create_packet(
        key, swarm=SWARM, topic=topic, sketch=make_sketch(np.asarray(vec)),
        outcome=outcome, n=n, ttl_s=ttl_s, kind=KIND_OBSERVATION,
        created_ms=next(_created) if created_ms is None else created_ms,
    )


def sign_draft(draft: SynthesisDraft, key: nacl.signing.SigningKey = KEYS[7],
               created_ms: int | None = None) -> OutcomePacket:
    """What the daemon does with a draft: sign it into a synthesis packet."""
    return create_packet(
        key, swarm=SWARM, topic=draft.topic, sketch=make_sketch(np.asarray(draft.centroid)),
        outcome=draft.outcome, n=draft.n, ttl_s=3600, kind=KIND_SYNTHESIS,
        generation=draft.generation, parents=draft.parents, series=draft.series,
        created_ms=next(_created) if created_ms is None else created_ms,
    )
