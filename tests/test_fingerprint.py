"""SimHash LSH keys: pinned test vectors, determinism, collision statistics, probes.

Statistical tests use seeded vectors and the deterministic hyperplanes, so they are
reproducible; their tolerances are still set several standard errors wide so that they
test the LSH, not one lucky sample.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qisd.fingerprint import LSH, hyperplane_block, hyperplanes, keys_for, probe_keys
from qisd.manifest import Manifest, ManifestError, TopicParams
from qisd.sketch import FingerprintError, cosine, cosine_many, make_sketch, normalize

SEED = bytes(range(32))
MANIFEST = Manifest(seed=SEED)  # defaults: 8 tables x 4 bits
WIDE = Manifest(seed=SEED, topics={"demo": TopicParams(tables=3, bits=12)})
VECTOR = [0.9, -0.3, 0.2, 0.55, -0.75, 0.1, -0.05, 0.4]

# Wire protocol, computed once and hard-coded: a change here splits every swarm.
PINNED_SWARM_ID = "d9ae0917ed1b07064f07db6e93e7b4706fff31fd65e65fd0935af3adc5d37d2a"
PINNED_TABLE0 = [
    [-1, 1, 1, -1, -1, 1, -1, -1],
    [1, 1, 1, -1, -1, 1, 1, -1],
    [-1, 1, 1, -1, 1, -1, -1, -1],
    [-1, -1, -1, -1, 1, 1, -1, -1],
]
PINNED_CODES = [4, 0, 0, 6, 6, 12, 6, 7]
PINNED_KEYS = [
    "792718d9f1fdd9191d2d1984c7de5234dde6cd63",
    "ac8305bf22a6103b5abd3cbadc63a5d31707ff51",
    "99127e19e647e86ce5420b49b349e53256b04b54",
    "d30fe4d7b624a571a0641e7da5427f25c3aa04ed",
    "acc77a06c63c1ce83de1162b55895f137ff28b68",
    "8e1ef0698677ecac63bf829df072037e1eacd03e",
    "9135699b705dc4cd7a876e8e786bc762f974ac2e",
    "3ddb50f6d34a2b4e36b044dc4cb7a60a50dd11c4",
]
PINNED_WIDE_CODES = [1158, 158, 81]  # 12 bits: codes travel as 2 bytes
PINNED_WIDE_KEYS = [
    "469843038c53f950ebe7a87e9dc7fd03816424f3",
    "4d2e510027d42858935e67eb52b3c571023651dd",
    "c29b63245cea3ca5190571a2eafdcd73c435633d",
]

Vec = npt.NDArray[np.float64]


def test_pinned_test_vector() -> None:
    assert MANIFEST.swarm_id.hex() == PINNED_SWARM_ID
    lsh = LSH.for_topic(MANIFEST, "demo", 8)
    # No projection sits near a hyperplane, so the pin does not hinge on rounding.
    assert np.min(np.abs(lsh.projections(VECTOR))) > 1e-3
    assert hyperplane_block(SEED, "demo", 8, 0, 4).astype(int).tolist() == PINNED_TABLE0
    assert lsh.codes(VECTOR) == PINNED_CODES
    assert [k.hex() for k in lsh.keys(VECTOR)] == PINNED_KEYS
    assert [k.hex() for k in keys_for(MANIFEST, "demo", VECTOR)] == PINNED_KEYS
    wide = LSH.for_topic(WIDE, "demo", 8)
    assert wide.codes(VECTOR) == PINNED_WIDE_CODES
    assert [k.hex() for k in keys_for(WIDE, "demo", VECTOR)] == PINNED_WIDE_KEYS


def test_documented_derivations() -> None:
    """The module docstring's formulas, recomputed independently."""
    msg = b"qisd/hyperplanes/1" + SEED + b"\x00\x04demo" + struct.pack(">IH", 8, 5)
    stream = hashlib.shake_256(msg).digest(4)  # 4 hyperplanes x 8 dims = 32 bits
    bits = [(byte >> (7 - i)) & 1 for byte in stream for i in range(8)]
    expected = [[1 if b else -1 for b in bits[r * 8 : r * 8 + 8]] for r in range(4)]
    assert hyperplane_block(SEED, "demo", 8, 5, 4).astype(int).tolist() == expected

    lsh = LSH.for_topic(MANIFEST, "demo", 8)
    proj = lsh.projections(VECTOR)
    code = sum(1 << (3 - i) for i in range(4) if proj[5, i] > 0)  # hyperplane 0 = MSB
    assert lsh.codes(VECTOR)[5] == code
    key = hashlib.sha1(
        b"qis/1" + MANIFEST.swarm_id + b"\x00\x04demo" + b"\x00\x05" + bytes([code])
    ).digest()
    assert lsh.key(5, code) == key
    wide = LSH.for_topic(WIDE, "demo", 8)
    assert (
        wide.key(2, 0xABC)
        == hashlib.sha1(
            b"qis/1" + WIDE.swarm_id + b"\x00\x04demo" + b"\x00\x02" + b"\x0a\xbc"
        ).digest()
    )


def test_projections_are_signed_distances() -> None:
    rng = np.random.default_rng(3)
    lsh = LSH.for_topic(MANIFEST, "demo", 64)
    for _ in range(20):
        v = rng.standard_normal(64)
        unit = v / np.linalg.norm(v)
        planes = hyperplanes(SEED, "demo", 64, 8, 4) / math.sqrt(64)
        direct = (planes @ unit).reshape(8, 4)
        assert np.allclose(lsh.projections(v), direct, atol=1e-6)
        assert lsh.keys(v) == lsh.keys(v * 7.5)  # scale does not matter


def test_codes_are_prefix_stable_when_bits_grow() -> None:
    rng = np.random.default_rng(4)
    common = {"swarm_id": bytes(32), "seed": SEED, "topic": "t", "dim": 32, "tables": 4}
    short, long = LSH(bits=5, **common), LSH(bits=6, **common)  # type: ignore[arg-type]
    for _ in range(50):
        v = rng.standard_normal(32)
        assert short.codes(v) == [c >> 1 for c in long.codes(v)]


def test_keys_separate_topics_swarms_and_tables() -> None:
    keys = keys_for(MANIFEST, "demo", VECTOR)
    assert len(keys) == 8 and all(len(k) == 20 for k in keys)
    assert len(set(keys)) == 8
    assert not set(keys) & set(keys_for(MANIFEST, "other", VECTOR))
    assert not set(keys) & set(keys_for(Manifest(seed=SEED, name="x"), "demo", VECTOR))
    assert len(keys_for(WIDE, "demo", VECTOR)) == 3


DETERMINISM_SCRIPT = """
import json, math
from qisd.fingerprint import keys_for, probe_keys
from qisd.manifest import Manifest
m = Manifest(seed=bytes(range(32)))
out = []
for i in range(5):
    v = [math.sin(i * 7.0 + j * 1.3) for j in range(48)]
    out.append([k.hex() for k in keys_for(m, "demo", v) + probe_keys(m, "demo", v)])
print(json.dumps(out))
"""


def test_keys_are_deterministic_across_processes() -> None:
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    result = subprocess.run(
        [sys.executable, "-c", DETERMINISM_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    expected = []
    for i in range(5):
        v = [math.sin(i * 7.0 + j * 1.3) for j in range(48)]
        expected.append(
            [k.hex() for k in keys_for(MANIFEST, "demo", v)]
            + [k.hex() for k in probe_keys(MANIFEST, "demo", v)]
        )
    assert json.loads(result.stdout) == expected


def pairs_at(cos: float, count: int, dim: int, seed: int) -> list[tuple[Vec, Vec]]:
    """``count`` random unit-vector pairs with exactly the given cosine."""
    rng = np.random.default_rng(seed)
    out = []
    sin = math.sqrt(1.0 - cos * cos)
    for _ in range(count):
        u = rng.standard_normal(dim)
        u /= np.linalg.norm(u)
        w = rng.standard_normal(dim)
        w -= (w @ u) * u
        w /= np.linalg.norm(w)
        out.append((u, cos * u + sin * w))
    return out


@pytest.mark.parametrize("theta", [math.pi / 6, math.pi / 3, math.pi / 2])
def test_bit_collision_rate_matches_simhash(theta: float) -> None:
    lsh = LSH.for_topic(MANIFEST, "demo", 64)
    agree = total = 0
    for a, b in pairs_at(math.cos(theta), 2000, 64, seed=int(theta * 1000)):
        same = (lsh.projections(a) > 0) == (lsh.projections(b) > 0)
        agree += int(same.sum())
        total += same.size
    # 64,000 bit comparisons: standard error ~0.002, tolerance 10x that.
    assert abs(agree / total - (1 - theta / math.pi)) < 0.02


def shares_a_key(lsh: LSH, a: Vec, b: Vec) -> bool:
    return bool(set(lsh.keys(a)) & set(lsh.keys(b)))


def test_similar_vectors_share_keys_random_ones_rarely() -> None:
    lsh = LSH.for_topic(MANIFEST, "demo", 64)  # 8 tables x 4 bits
    similar = pairs_at(0.95, 500, 64, seed=11)
    hit_similar = np.mean([shares_a_key(lsh, a, b) for a, b in similar])
    # theory: p = 1 - acos(.95)/pi = 0.899 per bit, p^4 = 0.653 per table,
    # 1 - (1 - 0.653)^8 = 0.9998 for any of 8 tables.
    assert hit_similar > 0.99

    rng = np.random.default_rng(12)
    rand = [(rng.standard_normal(64), rng.standard_normal(64)) for _ in range(1000)]
    hit_random = np.mean([shares_a_key(lsh, a, b) for a, b in rand])
    angles = [math.acos(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in rand]
    expected = np.mean([1 - (1 - (1 - theta / math.pi) ** 4) ** 8 for theta in angles])
    # near-orthogonal pairs: 1 - (1 - 0.5^4)^8 ~ 0.40; standard error ~0.016.
    assert 0.35 < expected < 0.45
    assert abs(hit_random - expected) < 0.05
    assert hit_random < 0.5


@pytest.mark.parametrize(
    ("bits", "min_gain"),
    [(8, 0.12), (4, 0.0)],  # 8 bits: exact ~0.76 vs probed ~0.98; 4 bits: ~0.98 vs ~1.0
)
def test_multi_probe_finds_more_near_neighbours(bits: int, min_gain: float) -> None:
    manifest = Manifest(seed=SEED, bits=bits)
    lsh = LSH.for_topic(manifest, "demo", 64)
    exact_hits = probe_hits = 0
    pairs = pairs_at(0.8, 600, 64, seed=21 + bits)
    for query, stored in pairs:
        stored_keys = set(lsh.keys(stored))
        probed = probe_keys(manifest, "demo", query, budget=32)
        assert len(probed) == 32
        exact_hits += bool(stored_keys & set(probed[:8]))
        probe_hits += bool(stored_keys & set(probed))
    exact, probed_rate = exact_hits / len(pairs), probe_hits / len(pairs)
    assert probed_rate > exact + min_gain
    assert 1 - probed_rate <= (1 - exact) / 2  # at least halves the misses


def test_probes_start_with_exact_keys_and_respect_budget() -> None:
    lsh = LSH.for_topic(MANIFEST, "demo", 8)
    keys = lsh.keys(VECTOR)
    probes = list(lsh.probes(VECTOR, 32))
    assert len(probes) == 32
    assert [k for _, _, k in probes[:8]] == keys
    assert [(t, c) for t, c, _ in probes[:8]] == list(enumerate(PINNED_CODES))
    assert len({k for _, _, k in probes}) == 32
    assert all(lsh.key(t, c) == k for t, c, k in probes)
    assert [k for _, _, k in lsh.probes(VECTOR, 5)] == keys[:5]
    assert list(lsh.probes(VECTOR, 0)) == []
    assert probe_keys(MANIFEST, "demo", VECTOR) == [k for _, _, k in probes]  # default 32
    assert probe_keys(MANIFEST, "demo", VECTOR, budget=10) == [k for _, _, k in probes[:10]]


def probe_scores(lsh: LSH, vector: Vec | list[float], budget: int) -> list[float]:
    """Margin score of each perturbation probe, recomputed from the projections."""
    proj = lsh.projections(vector)
    exact = lsh.codes(vector)
    scores = []
    for table, code, _ in list(lsh.probes(vector, budget))[lsh.tables :]:
        flipped = exact[table] ^ code
        scores.append(
            sum(abs(proj[table, i]) for i in range(lsh.bits) if flipped >> (lsh.bits - 1 - i) & 1)
        )
    return scores


def test_probes_enumerate_every_code_once_in_margin_order() -> None:
    lsh = LSH.for_topic(Manifest(seed=SEED, tables=3, bits=4), "demo", 16)
    v = np.cos(np.arange(16) * 0.7)
    probes = list(lsh.probes(v, 10_000))
    assert len(probes) == 3 * 16
    assert {(t, c) for t, c, _ in probes} == {(t, c) for t in range(3) for c in range(16)}
    scores = probe_scores(lsh, v, 10_000)
    assert scores == sorted(scores)
    # single-bit flips of the smallest margin come first, two-bit flips are included
    proj = lsh.projections(v)
    t0, c0, _ = probes[3]
    assert bin(c0 ^ lsh.codes(v)[t0]).count("1") == 1
    assert math.isclose(scores[0], float(np.min(np.abs(proj))))
    flips = [bin(c ^ lsh.codes(v)[t]).count("1") for t, c, _ in probes[3:]]
    assert 2 in flips[:20]


vectors = st.lists(
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), min_size=16, max_size=16
).filter(lambda xs: any(abs(x) > 1e-6 for x in xs))


@settings(max_examples=60, deadline=None)
@given(vectors, st.integers(0, 80))
def test_probes_are_deterministic_and_ordered(vector: list[float], budget: int) -> None:
    lsh = LSH.for_topic(MANIFEST, "prop", 16)
    first = list(lsh.probes(vector, budget))
    hyperplanes.cache_clear()
    again = list(LSH.for_topic(MANIFEST, "prop", 16).probes(list(vector), budget))
    assert first == again
    assert len(first) == min(budget, 8 * 16)
    assert len({k for _, _, k in first}) == len(first)
    assert [k for _, _, k in first[:8]] == lsh.keys(vector)[: min(budget, 8)]
    scores = probe_scores(lsh, vector, budget)
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(scores))


def test_vectors_of_extreme_magnitude_keep_their_direction() -> None:
    """Finite, non-zero vectors whose squares overflow or underflow float64 are
    scaled first: the same unit vector and keys as at an ordinary scale."""
    base = np.arange(1.0, 9.0)
    for scale in (1e-200, 1e-305, 1e200, 1e300):
        assert np.allclose(normalize(base * scale), normalize(base), rtol=0, atol=1e-12)
        assert keys_for(MANIFEST, "demo", base * scale) == keys_for(MANIFEST, "demo", base)
    assert np.allclose(normalize([5e-324, 0.0]), [1.0, 0.0])  # the smallest subnormal
    big = np.finfo(np.float64).max
    assert np.allclose(normalize([big, big]), [2**-0.5, 2**-0.5])


def test_bad_input_is_named() -> None:
    lsh = LSH.for_topic(MANIFEST, "demo", 8)
    with pytest.raises(FingerprintError, match="vector: has 9 dimensions"):
        lsh.keys([1.0] * 9)
    with pytest.raises(FingerprintError, match="vector: has zero length"):
        keys_for(MANIFEST, "demo", [0.0] * 8)
    with pytest.raises(FingerprintError, match="vector: contains NaN"):
        probe_keys(MANIFEST, "demo", [math.nan] * 8)
    with pytest.raises(FingerprintError, match="budget"):
        lsh.probes(VECTOR, -1)
    with pytest.raises(FingerprintError, match="table"):
        lsh.key(8, 0)
    with pytest.raises(FingerprintError, match="code"):
        lsh.key(0, 16)
    with pytest.raises(ManifestError, match="topic"):
        keys_for(MANIFEST, "", VECTOR)
    common = {"swarm_id": bytes(32), "seed": SEED, "topic": "t", "dim": 8, "tables": 2}
    with pytest.raises(FingerprintError, match="bits"):
        LSH(bits=0, **common)  # type: ignore[arg-type]
    with pytest.raises(FingerprintError, match="seed"):
        LSH(**{**common, "seed": b"x"}, bits=4)  # type: ignore[arg-type]
    with pytest.raises(FingerprintError, match="dim"):
        LSH(**{**common, "dim": 0}, bits=4)  # type: ignore[arg-type]


@pytest.mark.parametrize("dim", [2, 3, 64, 400])
def test_similarity_never_passes_one(dim: int) -> None:
    """A sketch against itself is often 1 + 2e-16 in floating point: reported as 1."""
    rng = np.random.default_rng(dim)
    for _ in range(100):
        s = make_sketch(rng.normal(size=dim))
        assert -1.0 <= cosine(s, s) <= 1.0
        assert -1.0 <= cosine_many(s, [s])[0] <= 1.0
        neg = make_sketch(-s.to_array())
        assert -1.0 <= cosine(s, neg) <= 1.0 and -1.0 <= cosine_many(s, [neg])[0] <= 1.0
