"""SimHash LSH: from a fingerprint vector to the DHT keys it is stored and found under.

DESIGN "Fingerprints and keys". For each of the ``tables`` hash tables a topic has
``bits`` random hyperplanes with +-1 entries; a vector's code in a table is the sign
pattern of its projections (SimHash: two unit vectors at angle theta agree on one sign
bit with probability 1 - theta/pi), and its key in that table is

    SHA-1(b"qis/1" | swarm_id | u16 len(topic) | topic | u16 table | code)

20 bytes, the Kademlia id space (paper section 2.1), so storing and looking up a
fingerprint are plain key lookups.

Keys are wire protocol, so everything here is reproducible bit for bit:

* Hyperplanes come from SHAKE-256 over ``b"qisd/hyperplanes/1" | seed | u16 len(topic) |
  topic | u32 dim | u16 table``, one bit per entry (1 -> +1, 0 -> -1), row-major
  (hyperplane 0 first), most significant bit of each byte first. Never a library RNG,
  whose stream may change between versions.
* Projections are computed exactly: the unit vector is rounded to integers at
  2**-24 resolution, and every partial sum of +-1 times those integers is an integer
  below 2**53, so float64 matrix products are exact whatever order BLAS sums in.
* Codes are MSB-first: hyperplane 0 is the most significant of the ``bits`` bits, so
  the code for ``b`` bits is the ``b + 1``-bit code shifted right by one (hyperplane
  rows are a prefix of the same stream). Buckets can later split by growing ``b``
  without moving anything that stays.

Queries use query-directed multi-probe LSH (Lv et al., VLDB 2007): after every table's
exact code, probe the codes whose flipped bits have the smallest total margin |projection|,
best first across all tables, up to a budget.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from qisd.manifest import MAX_BITS, MAX_TABLES, check_topic
from qisd.sketch import MAX_DIM, FingerprintError, normalize

if TYPE_CHECKING:
    from qisd.manifest import Manifest

HYPERPLANE_DOMAIN = b"qisd/hyperplanes/1"
KEY_DOMAIN = b"qis/1"
KEY_BYTES = 20
#: Unit vector components are rounded to multiples of 2**-FIXED_POINT_BITS before
#: projecting; 1280 dims x 2**24 < 2**35, far inside float64's exact integers.
FIXED_POINT_BITS = 24

FloatArray = npt.NDArray[np.float64]


def _topic_bytes(topic: str) -> bytes:
    raw = topic.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


def hyperplane_block(seed: bytes, topic: str, dim: int, table: int, bits: int) -> FloatArray:
    """The ``bits x dim`` matrix of +-1 hyperplanes of one table (see module doc)."""
    msg = HYPERPLANE_DOMAIN + seed + _topic_bytes(topic) + struct.pack(">IH", dim, table)
    count = bits * dim
    stream = hashlib.shake_256(msg).digest((count + 7) // 8)
    raw = np.unpackbits(np.frombuffer(stream, dtype=np.uint8), bitorder="big")[:count]
    return (raw.astype(np.float64) * 2.0 - 1.0).reshape(bits, dim)


@lru_cache(maxsize=64)
def hyperplanes(seed: bytes, topic: str, dim: int, tables: int, bits: int) -> FloatArray:
    """All tables' hyperplanes stacked as a read-only ``(tables * bits) x dim`` matrix."""
    mat = np.concatenate([hyperplane_block(seed, topic, dim, t, bits) for t in range(tables)])
    mat.setflags(write=False)  # shared through the cache
    return mat


@dataclass(frozen=True, kw_only=True)
class LSH:
    """SimHash key derivation for one (swarm, topic, dimension)."""

    swarm_id: bytes
    seed: bytes
    topic: str
    dim: int
    tables: int
    bits: int
    _planes: FloatArray = field(init=False, repr=False, compare=False)
    _prefix: bytes = field(init=False, repr=False, compare=False)
    _weights: npt.NDArray[np.int64] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, size in (("swarm_id", 32), ("seed", 32)):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise FingerprintError(f"{name}: must be {size} bytes")
        check_topic(self.topic)
        for name, hi in (("dim", MAX_DIM), ("tables", MAX_TABLES), ("bits", MAX_BITS)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
                raise FingerprintError(f"{name}: must be an integer in 1..{hi}, got {value!r}")
        planes = hyperplanes(self.seed, self.topic, self.dim, self.tables, self.bits)
        object.__setattr__(self, "_planes", planes)
        prefix = KEY_DOMAIN + self.swarm_id + _topic_bytes(self.topic)
        object.__setattr__(self, "_prefix", prefix)
        weights = np.left_shift(1, np.arange(self.bits - 1, -1, -1, dtype=np.int64))
        object.__setattr__(self, "_weights", weights)

    @classmethod
    def for_topic(cls, manifest: Manifest, topic: str, dim: int) -> LSH:
        """The LSH a swarm uses for ``topic`` at dimension ``dim``."""
        params = manifest.params_for(topic)
        return cls(
            swarm_id=manifest.swarm_id,
            seed=manifest.seed,
            topic=topic,
            dim=dim,
            tables=params.tables,
            bits=params.bits,
        )

    def _unit(self, unit: Sequence[float] | npt.ArrayLike) -> FloatArray:
        arr = normalize(unit)
        if arr.size != self.dim:
            raise FingerprintError(
                f"vector: has {arr.size} dimensions, topic {self.topic!r} LSH expects {self.dim}"
            )
        return arr

    def projections(self, unit: Sequence[float] | npt.ArrayLike) -> FloatArray:
        """Signed distance of ``unit`` to each hyperplane, shape ``tables x bits``.

        Divided by sqrt(dim) (each +-1 hyperplane has norm sqrt(dim)), so margins are
        comparable across tables and topics. The sign is exact (see module doc).
        """
        fixed = np.rint(self._unit(unit) * float(1 << FIXED_POINT_BITS))
        exact = self._planes @ fixed  # integers, exactly
        scale = float(1 << FIXED_POINT_BITS) * math.sqrt(self.dim)
        return (exact / scale).reshape(self.tables, self.bits)

    def _codes(self, proj: FloatArray) -> list[int]:
        positive = (proj > 0.0).astype(np.int64)
        return [int(c) for c in positive @ self._weights]

    def codes(self, unit: Sequence[float] | npt.ArrayLike) -> list[int]:
        """One code per table: bit for hyperplane i is set iff projection_i > 0,
        hyperplane 0 as the most significant of the ``bits`` bits."""
        return self._codes(self.projections(unit))

    def key(self, table: int, code: int) -> bytes:
        """The 20-byte DHT key of ``code`` in ``table``."""
        if not 0 <= table < self.tables:
            raise FingerprintError(f"table: must be in 0..{self.tables - 1}, got {table}")
        if not 0 <= code < (1 << self.bits):
            raise FingerprintError(f"code: must fit in {self.bits} bits, got {code}")
        code_bytes = code.to_bytes((self.bits + 7) // 8, "big")
        return hashlib.sha1(self._prefix + struct.pack(">H", table) + code_bytes).digest()

    def keys(self, unit: Sequence[float] | npt.ArrayLike) -> list[bytes]:
        """The keys a fingerprint is stored under: one per table, table order."""
        return [self.key(t, c) for t, c in enumerate(self.codes(unit))]

    def probes(
        self, unit: Sequence[float] | npt.ArrayLike, budget: int
    ) -> Iterator[tuple[int, int, bytes]]:
        """``(table, code, key)`` to look up for a query, best first, at most ``budget``.

        First every table's exact code (table order), then perturbed codes by
        increasing score = sum of the margins of the flipped bits, over all tables.
        Per table, bits are sorted by margin and flip sets are generated with the
        shift/expand operations of Lv et al. 2007 (section 4.4): from {j1..jk}, shift
        replaces jk by jk+1 and expand appends jk+1. Both only raise the score, and
        every non-empty set is reached exactly once from {0}, so a heap over all
        tables yields each (table, code) once, in score order.
        """
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise FingerprintError(f"budget: must be a non-negative integer, got {budget!r}")
        proj = self.projections(unit)  # validate now, not at the first next()
        return self._probe_order(proj, budget)

    def _probe_order(self, proj: FloatArray, budget: int) -> Iterator[tuple[int, int, bytes]]:
        codes = self._codes(proj)
        emitted = 0
        for table, code in enumerate(codes):
            if emitted >= budget:
                return
            yield table, code, self.key(table, code)
            emitted += 1
        margins = np.abs(proj)
        order = np.argsort(margins, axis=1, kind="stable")
        sorted_m = np.take_along_axis(margins, order, axis=1).tolist()
        bit_of = [[self.bits - 1 - int(i) for i in row] for row in order]

        def entry(table: int, subset: tuple[int, ...]) -> tuple[float, int, tuple[int, ...]]:
            # fsum: the score, hence the order, does not depend on summation order.
            return math.fsum(sorted_m[table][j] for j in subset), table, subset

        heap = [entry(t, (0,)) for t in range(self.tables)]
        heapq.heapify(heap)
        while heap and emitted < budget:
            _, table, subset = heapq.heappop(heap)
            flip = 0
            for j in subset:
                flip |= 1 << bit_of[table][j]
            code = codes[table] ^ flip
            yield table, code, self.key(table, code)
            emitted += 1
            last = subset[-1]
            if last + 1 < self.bits:
                heapq.heappush(heap, entry(table, (*subset[:-1], last + 1)))  # shift
                heapq.heappush(heap, entry(table, (*subset, last + 1)))  # expand


def keys_for(
    manifest: Manifest, topic: str, vector: Sequence[float] | npt.ArrayLike
) -> list[bytes]:
    """Storage keys of ``vector`` (normalised here) in ``topic``: one per table."""
    # Normalised once for its size only; the LSH normalises the caller's vector itself,
    # so this equals ``LSH.for_topic(...).keys(vector)`` bit for bit.
    dim = normalize(vector).size
    return LSH.for_topic(manifest, topic, dim).keys(vector)


def probe_keys(
    manifest: Manifest,
    topic: str,
    unit: Sequence[float] | npt.ArrayLike,
    budget: int | None = None,
) -> list[bytes]:
    """Query keys for ``unit`` best first; ``budget`` defaults to ``manifest.probes``."""
    lsh = LSH.for_topic(manifest, topic, normalize(unit).size)
    limit = manifest.probes if budget is None else budget
    return [key for _, _, key in lsh.probes(unit, limit)]
