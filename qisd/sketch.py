"""Fingerprint vectors: normalisation and the quantized sketch a packet carries.

A packet keeps every dimension of its normalised vector (DESIGN "Fingerprints and
keys": projecting down loses most of the ranking), quantized to int8 while that fits
the packet cap and to int4 above it. Responsible nodes rank their buckets by the cosine
of these sketches, so nothing here may depend on a library RNG or on float details that
differ between platforms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: Largest dimension stored at 8 bits per component; above it, 4 bits.
#: 640 int8 bytes plus the packet's fixed fields stay under the 1 KiB cap.
INT8_MAX_DIM = 640
#: Largest dimension a sketch may have at all (int4, half a byte each).
MAX_DIM = 1280

FloatArray = npt.NDArray[np.float64]


class FingerprintError(ValueError):
    """A vector or sketch that cannot be used; the message says why."""


def normalize(vector: Sequence[float] | npt.ArrayLike) -> FloatArray:
    """Return ``vector`` as a unit-length float64 array.

    Rejects empty, non-1-D, non-finite and zero vectors with a message that names
    the problem, so bad input from an application never reaches the wire.
    """
    try:
        arr = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FingerprintError(f"vector: not a list of numbers ({exc})") from None
    if arr.ndim != 1:
        raise FingerprintError(f"vector: must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise FingerprintError("vector: is empty")
    if arr.size > MAX_DIM:
        raise FingerprintError(f"vector: {arr.size} dimensions, at most {MAX_DIM} allowed")
    if not np.all(np.isfinite(arr)):
        raise FingerprintError("vector: contains NaN or infinity")
    peak = float(np.max(np.abs(arr)))
    if peak == 0.0:
        raise FingerprintError("vector: has zero length (every component is 0)")
    if not _SAFE_PEAK[0] < peak < _SAFE_PEAK[1]:
        # Squares of components this large or small overflow or underflow: scale
        # first (only here, so every other vector normalizes exactly as it always has).
        arr = arr / peak
    return arr / float(np.linalg.norm(arr))


#: Largest |component| whose squares (summed over MAX_DIM components) stay finite and
#: normal in float64.
_SAFE_PEAK = (1e-150, 1e150)


@dataclass(frozen=True, slots=True)
class Sketch:
    """A quantized unit vector: ``dim`` components at ``bits`` (8 or 4) each.

    int8: one signed byte per component, scaled so the largest |component| is 127.
    int4: two components per byte (high nibble first), signed -7..7, scaled so the
    largest |component| is 7. Scaling per vector keeps the direction, which is all a
    cosine needs.
    """

    dim: int
    bits: int
    data: bytes

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise FingerprintError(f"sketch: bits must be 4 or 8, got {self.bits}")
        if not 1 <= self.dim <= MAX_DIM:
            raise FingerprintError(f"sketch: dim must be in 1..{MAX_DIM}, got {self.dim}")
        if len(self.data) != sketch_nbytes(self.dim, self.bits):
            raise FingerprintError(
                f"sketch: {self.dim} dims at {self.bits} bits need "
                f"{sketch_nbytes(self.dim, self.bits)} bytes, got {len(self.data)}"
            )
        if not _any_component(self.data, self.dim, self.bits):
            # No direction: nothing to route by or to compare with.
            raise FingerprintError("sketch: every component is zero")

    def to_array(self) -> FloatArray:
        """The sketch as a unit float64 vector (zero vector if all components are 0)."""
        return dequantize(self)


def _any_component(data: bytes, dim: int, bits: int) -> bool:
    if bits == 4 and dim % 2:
        # The low nibble of the last byte is padding, not a component.
        return any(data[:-1]) or bool(data[-1] >> 4)
    return any(data)


def sketch_nbytes(dim: int, bits: int) -> int:
    return dim if bits == 8 else (dim + 1) // 2


def bits_for_dim(dim: int) -> int:
    """The quantization the wire uses for a vector of ``dim`` dimensions."""
    return 8 if dim <= INT8_MAX_DIM else 4


def quantize(unit: FloatArray, bits: int | None = None) -> Sketch:
    """Quantize a unit vector (see :func:`normalize`) into a :class:`Sketch`."""
    dim = int(unit.size)
    bits = bits_for_dim(dim) if bits is None else bits
    peak = float(np.max(np.abs(unit)))
    if peak == 0.0:
        raise FingerprintError("vector: has zero length")
    levels = 127 if bits == 8 else 7
    q = np.rint(unit / peak * levels).astype(np.int8)
    if bits == 8:
        return Sketch(dim, 8, q.tobytes())
    nib = (q.astype(np.int16) & 0x0F).astype(np.uint8)
    if dim % 2:
        nib = np.concatenate([nib, np.zeros(1, dtype=np.uint8)])
    packed = (nib[0::2] << 4) | nib[1::2]
    return Sketch(dim, 4, packed.astype(np.uint8).tobytes())


def dequantize(sketch: Sketch) -> FloatArray:
    if sketch.bits == 8:
        arr = np.frombuffer(sketch.data, dtype=np.int8).astype(np.float64)
    else:
        raw = np.frombuffer(sketch.data, dtype=np.uint8)
        nib = np.empty(raw.size * 2, dtype=np.int16)
        nib[0::2] = raw >> 4
        nib[1::2] = raw & 0x0F
        nib = np.where(nib > 7, nib - 16, nib)
        arr = nib[: sketch.dim].astype(np.float64)
    norm = float(np.linalg.norm(arr))
    return arr / norm if norm > 0 else arr


def make_sketch(vector: Sequence[float] | npt.ArrayLike) -> Sketch:
    """Normalise and quantize in one step."""
    return quantize(normalize(vector))


def cosine(a: Sketch, b: Sketch) -> float:
    """Cosine similarity of two sketches, in [-1, 1] (rounding can put the dot
    product of two unit vectors a hair past it); 0.0 when their dimensions differ."""
    if a.dim != b.dim:
        return 0.0
    return min(1.0, max(-1.0, float(np.dot(a.to_array(), b.to_array()))))


def cosine_many(query: Sketch, others: Sequence[Sketch]) -> FloatArray:
    """Cosine of ``query`` against many sketches at once (vectorised for int8)."""
    return SketchRows([(s.dim, s.bits, s.data) for s in others]).cosine(query)


class SketchRows:
    """Raw ``(dim, bits, data)`` sketches prepared once for many cosine queries.

    The int8 rows of each dimension become one matrix (with their norms), scored by
    one product; rows of other widths stay raw and are read (and checked) only by a
    query of their dimension; rows of another dimension score 0.
    """

    __slots__ = ("_int8", "_other", "count", "nbytes")

    def __init__(self, rows: Sequence[tuple[int, int, bytes]]) -> None:
        self.count = len(rows)
        by_dim: dict[int, list[int]] = {}
        self._other: list[tuple[int, int, int, bytes]] = []
        for i, (dim, bits, data) in enumerate(rows):
            if bits == 8:
                by_dim.setdefault(dim, []).append(i)
            else:
                self._other.append((i, dim, bits, data))
        self._int8: dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.int8],
                                    FloatArray]] = {}
        #: Bytes held: the int8 matrices, and raw rows counted twice (the data and
        #: the Sketch a query builds from it).
        self.nbytes = sum(2 * len(r[3]) for r in self._other)
        for dim, idx in by_dim.items():
            mat = np.frombuffer(b"".join(rows[i][2] for i in idx), dtype=np.int8)
            mat = mat.reshape(len(idx), dim)
            norms = np.linalg.norm(mat.astype(np.float64), axis=1)
            norms[norms == 0] = 1.0
            self._int8[dim] = (np.asarray(idx, dtype=np.int64), mat, norms)
            self.nbytes += mat.nbytes + norms.nbytes

    def cosine(self, query: Sketch) -> FloatArray:
        """Cosine of ``query`` against every row, in [-1, 1] (0 for rows of another
        dimension)."""
        out = np.zeros(self.count, dtype=np.float64)
        q = query.to_array()
        same = self._int8.get(query.dim)
        if same is not None:
            idx, mat, norms = same
            out[idx] = (mat.astype(np.float64) @ q) / norms
        for i, dim, bits, data in self._other:
            if dim == query.dim:
                out[i] = float(np.dot(q, Sketch(dim, bits, data).to_array()))
        return np.clip(out, -1.0, 1.0, out=out)
