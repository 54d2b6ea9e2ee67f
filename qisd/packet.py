"""Outcome packets, wire v1: schema, canonical encoding, signatures, validation.

A packet is one msgpack map with short, sorted keys (DESIGN "Outcome packets"):

=====  ==========  ==================================================
key    field       rule
=====  ==========  ==================================================
``g``  generation  int 0..255; 0 for observations, >= 1 for syntheses
``k``  kind        ``"o"`` (observation) or ``"s"`` (synthesis)
``n``  n           cases distilled, int 1..2**31-1
``o``  origin      32-byte Ed25519 public key of the signer
``p``  parents     array of 16-byte packet ids (observations: empty)
``q``  outcome     map str -> int | float | str | bool, 1..16 entries
``r``  series      bytes, empty or 16: a newer packet of the same origin and
                   series supersedes the older (synthesis of one cohort)
``s``  sketch      array ``[dim, bits, bytes]`` (see :mod:`qisd.sketch`)
``t``  created     creation time, ms since the Unix epoch
``tp`` topic       str, 1..64 printable characters
``ttl`` ttl        seconds the packet lives after ``created``
``v``  version     1
``w``  swarm       32-byte swarm id (hash of the swarm manifest)
``x``  signature   Ed25519 over the canonical encoding of the other keys
=====  ==========  ==================================================

Canonical means: keys sorted, the smallest msgpack form for every int, float64 for
floats, bin for bytes. A decoder re-encodes what it read and refuses anything that
is not byte-identical, so a packet has exactly one encoding and its id (BLAKE2b-128
of that encoding) is stable across nodes.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import nacl.bindings
import nacl.exceptions
import nacl.signing

from qisd.sketch import FingerprintError, Sketch

if TYPE_CHECKING:
    from qisd.manifest import Manifest

VERSION = 1
MAX_PACKET_BYTES = 1024
KIND_OBSERVATION = "observation"
KIND_SYNTHESIS = "synthesis"
_KIND_WIRE = {KIND_OBSERVATION: "o", KIND_SYNTHESIS: "s"}
_KIND_NAME = {v: k for k, v in _KIND_WIRE.items()}

MAX_TOPIC_BYTES = 64  # the same rule as qisd.manifest.check_topic
MAX_OUTCOME_FIELDS = 16
MAX_OUTCOME_KEY_CHARS = 32
MAX_OUTCOME_STR_CHARS = 64
MAX_PARENTS = 32
MAX_GENERATION = 255
MAX_N = 2**31 - 1
MAX_TTL_S = 10 * 365 * 86400
MAX_CREATED_MS = 2**53
_INT64 = 2**63

OutcomeValue = int | float | str | bool
_FIELDS = frozenset({"g", "k", "n", "o", "p", "q", "r", "s", "t", "tp", "ttl", "v", "w", "x"})
_WIRE_ORDER = sorted(_FIELDS)
_SIG_ENTRY = b"\xa1x\xc4\x40"  # fixstr "x", then bin8 of length 64
_FIELD_NAMES = {
    "g": "generation", "k": "kind", "n": "n", "o": "origin", "p": "parents",
    "q": "outcome", "r": "series", "s": "sketch", "t": "created_ms", "tp": "topic", "ttl": "ttl_s",
    "v": "version", "w": "swarm", "x": "signature",
}


class PacketError(ValueError):
    """A packet that must not be stored or relayed.

    ``field`` names the offending field, ``reason`` is a short category for metrics
    (malformed, too_large, bad_signature, wrong_swarm, expired, future, generation,
    not_member, quota).
    """

    def __init__(self, field: str, message: str, *, reason: str = "malformed") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True, eq=False)
class OutcomePacket:
    """A signed outcome packet. Build with :func:`create_packet` or :func:`decode_packet`."""

    version: int
    swarm: bytes
    topic: str
    kind: str
    origin: bytes
    created_ms: int
    ttl_s: int
    sketch: Sketch
    outcome: Mapping[str, OutcomeValue]
    n: int
    generation: int
    parents: tuple[bytes, ...]
    series: bytes
    signature: bytes
    _encoded: bytes = field(repr=False)
    _id: bytes = field(repr=False, default=b"")

    @property
    def encoded(self) -> bytes:
        """The canonical signed encoding (what goes on the wire and into the store)."""
        return self._encoded

    @property
    def id(self) -> bytes:
        """BLAKE2b-128 of :attr:`encoded`: the packet's name everywhere (computed once)."""
        if not self._id:
            object.__setattr__(self, "_id", packet_id(self._encoded))
        return self._id

    @property
    def expires_ms(self) -> int:
        return self.created_ms + self.ttl_s * 1000

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OutcomePacket) and other._encoded == self._encoded

    def __hash__(self) -> int:
        return hash(self._encoded)

    def to_summary(self) -> dict[str, Any]:
        """A JSON-friendly view (ids and keys as hex) for the control API and the CLI."""
        return {
            "id": self.id.hex(),
            "topic": self.topic,
            "kind": self.kind,
            "origin": self.origin.hex(),
            "n": self.n,
            "outcome": dict(self.outcome),
            "generation": self.generation,
            "parents": [p.hex() for p in self.parents],
            "series": self.series.hex(),
            "created_ms": self.created_ms,
            "ttl_s": self.ttl_s,
            "dim": self.sketch.dim,
        }


#: Bytes in a packet id (BLAKE2b-128 of the signed encoding).
PACKET_ID_BYTES = 16


def wall_ms() -> int:
    """Now, as packets count time: whole milliseconds since the Unix epoch."""
    return int(time.time() * 1000)


def packet_id(encoded: bytes) -> bytes:
    """BLAKE2b-128 of a packet's canonical signed encoding."""
    return hashlib.blake2b(encoded, digest_size=PACKET_ID_BYTES).digest()


def _pack(obj: Mapping[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _body_map(
    *,
    swarm: bytes,
    topic: str,
    kind: str,
    origin: bytes,
    created_ms: int,
    ttl_s: int,
    sketch: Sketch,
    outcome: Mapping[str, OutcomeValue],
    n: int,
    generation: int,
    parents: Sequence[bytes],
    series: bytes,
) -> dict[str, Any]:
    # Insertion order is the wire order: keep these sorted by key.
    return {
        "g": generation,
        "k": _KIND_WIRE[kind],
        "n": n,
        "o": origin,
        "p": list(parents),
        "q": {k: outcome[k] for k in sorted(outcome)},
        "r": series,
        "s": [sketch.dim, sketch.bits, sketch.data],
        "t": created_ms,
        "tp": topic,
        "ttl": ttl_s,
        "v": VERSION,
        "w": swarm,
    }


def _with_signature(body: dict[str, Any], signature: bytes) -> dict[str, Any]:
    full = dict(body)
    full["x"] = signature  # "x" sorts after every other key
    return full


def create_packet(
    signing_key: nacl.signing.SigningKey,
    *,
    swarm: bytes,
    topic: str,
    sketch: Sketch,
    outcome: Mapping[str, OutcomeValue],
    n: int = 1,
    ttl_s: int,
    kind: str = KIND_OBSERVATION,
    generation: int | None = None,
    parents: Sequence[bytes] = (),
    series: bytes = b"",
    created_ms: int | None = None,
    max_bytes: int = MAX_PACKET_BYTES,
) -> OutcomePacket:
    """Validate, sign and encode a new packet; raises :class:`PacketError` naming the field."""
    if kind not in _KIND_WIRE:
        raise PacketError("kind", f"must be {KIND_OBSERVATION!r} or {KIND_SYNTHESIS!r}")
    if generation is None:
        generation = 0 if kind == KIND_OBSERVATION else 1
    origin = bytes(signing_key.verify_key)
    fields: dict[str, Any] = {
        "swarm": swarm,
        "topic": topic,
        "kind": kind,
        "origin": origin,
        "created_ms": wall_ms() if created_ms is None else created_ms,
        "ttl_s": ttl_s,
        "sketch": sketch,
        "outcome": dict(outcome),
        "n": n,
        "generation": generation,
        "parents": tuple(parents),
        "series": series,
    }
    _validate(fields)
    body = _body_map(**fields)
    body_bytes = _pack(body)
    signature = signing_key.sign(body_bytes).signature
    encoded = _pack(_with_signature(body, signature))
    if len(encoded) > max_bytes:
        raise PacketError(
            "packet", f"encodes to {len(encoded)} bytes, cap is {max_bytes}", reason="too_large"
        )
    return OutcomePacket(version=VERSION, signature=signature, _encoded=encoded, **fields)


def decode_packet(
    data: bytes, *, max_bytes: int = MAX_PACKET_BYTES, verify: bool = True
) -> OutcomePacket:
    """Parse, validate and verify one packet. Anything wrong raises :class:`PacketError`.

    ``verify=False`` skips only the signature check; it is for bytes this node already
    verified and wrote to its own store, never for anything that came off the network.
    """
    try:
        return _decode(data, max_bytes, verify)
    except PacketError:
        raise
    except Exception as exc:
        # A malformation no rule above names: still the one error type, so no caller
        # (a peer's bytes, a store row) can be crashed by it.
        raise PacketError("packet", f"malformed ({type(exc).__name__})") from None


def _decode(data: bytes, max_bytes: int, verify: bool) -> OutcomePacket:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PacketError("packet", f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise PacketError(
            "packet", f"{len(data)} bytes, cap is {max_bytes}", reason="too_large"
        )
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=MAX_PARENTS + 8,
            max_map_len=MAX_OUTCOME_FIELDS + 16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for bad input; all mean "malformed"
        raise PacketError("packet", f"not a msgpack map ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise PacketError("packet", f"expected a map, got {type(raw).__name__}")
    unknown = set(raw) - _FIELDS
    if unknown:
        # Map keys may be of any msgpack type (mixed str and bytes do not sort).
        name = min(unknown, key=repr)
        raise PacketError(name if isinstance(name, str) else repr(name), "unknown field")
    missing = _FIELDS - set(raw)
    if missing:
        name = sorted(missing)[0]
        raise PacketError(_FIELD_NAMES[name], "missing")
    if raw["v"] != VERSION or type(raw["v"]) is not int:
        raise PacketError("version", f"unsupported version {raw['v']!r}, expected {VERSION}")
    sketch_raw = raw["s"]
    if not (isinstance(sketch_raw, list) and len(sketch_raw) == 3):
        raise PacketError("sketch", "must be [dim, bits, bytes]")
    dim, bits, sdata = sketch_raw
    if type(dim) is not int or type(bits) is not int or not isinstance(sdata, bytes):
        raise PacketError("sketch", "must be [int, int, bytes]")
    try:
        sketch = Sketch(dim, bits, sdata)
    except FingerprintError as exc:
        raise PacketError("sketch", str(exc)) from None
    kind_wire = raw["k"]
    if not isinstance(kind_wire, str) or kind_wire not in _KIND_NAME:
        raise PacketError("kind", f"unknown kind {kind_wire!r}")
    parents = raw["p"]
    if not isinstance(parents, list):
        raise PacketError("parents", "must be an array")
    outcome = raw["q"]
    if not isinstance(outcome, dict):
        raise PacketError("outcome", "must be a map")
    fields: dict[str, Any] = {
        "swarm": raw["w"],
        "topic": raw["tp"],
        "kind": _KIND_NAME[kind_wire],
        "origin": raw["o"],
        "created_ms": raw["t"],
        "ttl_s": raw["ttl"],
        "sketch": sketch,
        "outcome": outcome,
        "n": raw["n"],
        "generation": raw["g"],
        "parents": tuple(parents),
        "series": raw["r"],
    }
    _validate(fields)
    signature = raw["x"]
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise PacketError("signature", "must be 64 bytes")
    if list(raw) != _WIRE_ORDER or data[-68:-64] != _SIG_ENTRY or data[0] != 0x8E:
        raise PacketError("packet", "not in canonical form (keys sorted, signature last)")
    if _pack(_with_signature(_body_map(**fields), signature)) != data:
        # The same content in another encoding (an int in more bytes than it needs, a
        # float32, unsorted outcome keys) would be another packet id for it.
        raise PacketError("packet", "not in canonical form (re-encoded, it differs)")
    # The signature covers the body map: the same bytes minus the "x" entry, with the
    # fixmap header for 13 entries instead of 14. Verifying the bytes as received (not a
    # re-encoding) means no one but the origin can produce another encoding of a packet.
    if not verify:
        return OutcomePacket(version=VERSION, signature=signature, _encoded=data, **fields)
    body_bytes = b"\x8d" + data[1:-68]
    try:
        # The bindings call is what VerifyKey.verify does, minus two object layers.
        nacl.bindings.crypto_sign_open(signature + body_bytes, fields["origin"])
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        raise PacketError("signature", "does not verify", reason="bad_signature") from None
    return OutcomePacket(version=VERSION, signature=signature, _encoded=data, **fields)


def _validate(f: Mapping[str, Any]) -> None:
    """Field rules shared by create and decode; the message names the field."""
    swarm = f["swarm"]
    if not isinstance(swarm, bytes) or len(swarm) != 32:
        raise PacketError("swarm", "must be 32 bytes")
    topic = f["topic"]
    if not isinstance(topic, str) or not 1 <= len(topic.encode()) <= MAX_TOPIC_BYTES:
        raise PacketError("topic", f"must be a string of 1..{MAX_TOPIC_BYTES} UTF-8 bytes")
    if not topic.isprintable():
        raise PacketError("topic", "contains non-printable characters")
    origin = f["origin"]
    if not isinstance(origin, bytes) or len(origin) != 32:
        raise PacketError("origin", "must be a 32-byte Ed25519 public key")
    _check_int("created_ms", f["created_ms"], 0, MAX_CREATED_MS)
    _check_int("ttl_s", f["ttl_s"], 1, MAX_TTL_S)
    _check_int("n", f["n"], 1, MAX_N)
    _check_int("generation", f["generation"], 0, MAX_GENERATION)
    kind, generation = f["kind"], f["generation"]
    if kind == KIND_OBSERVATION and generation != 0:
        raise PacketError("generation", "observations have generation 0")
    if kind == KIND_SYNTHESIS and generation < 1:
        raise PacketError("generation", "syntheses have generation >= 1")
    parents = f["parents"]
    if len(parents) > MAX_PARENTS:
        raise PacketError("parents", f"{len(parents)} entries, at most {MAX_PARENTS}")
    if kind == KIND_OBSERVATION and parents:
        raise PacketError("parents", "observations have no parents")
    for p in parents:
        if not isinstance(p, bytes) or len(p) != 16:
            raise PacketError("parents", "each parent must be a 16-byte packet id")
    series = f["series"]
    if not isinstance(series, bytes) or len(series) not in (0, 16):
        raise PacketError("series", "must be empty or 16 bytes")
    _check_outcome(f["outcome"])


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if type(value) is not int:
        raise PacketError(name, f"must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise PacketError(name, f"{value} is outside {lo}..{hi}")


def _check_outcome(outcome: Any) -> None:
    if not isinstance(outcome, Mapping):
        raise PacketError("outcome", "must be a map of name -> value")
    if not 1 <= len(outcome) <= MAX_OUTCOME_FIELDS:
        raise PacketError("outcome", f"must have 1..{MAX_OUTCOME_FIELDS} fields")
    for key, value in outcome.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_OUTCOME_KEY_CHARS:
            raise PacketError("outcome", f"field name {key!r} must be 1..32 characters")
        if not key.isprintable():
            raise PacketError("outcome", f"field name {key!r} has non-printable characters")
        where = f"outcome.{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            if not -_INT64 <= value < _INT64:
                raise PacketError(where, "integer out of 64-bit range")
        elif isinstance(value, float):
            # Bounded like integers, so sums of squares in aggregates stay finite.
            if not (math.isfinite(value) and -_INT64 <= value <= _INT64):
                raise PacketError(where, "must be finite and within +-2**63")
        elif isinstance(value, str):
            if len(value) > MAX_OUTCOME_STR_CHARS:
                raise PacketError(where, f"longer than {MAX_OUTCOME_STR_CHARS} characters")
        else:
            raise PacketError(where, f"must be int, float, str or bool, not {type(value).__name__}")


def check_admissible(
    packet: OutcomePacket,
    manifest: Manifest,
    *,
    now_ms: int,
    skew_ms: int = 300_000,
) -> None:
    """Swarm rules a well-formed packet must also meet before it is stored or relayed."""
    if packet.swarm != manifest.swarm_id:
        raise PacketError("swarm", "belongs to another swarm", reason="wrong_swarm")
    if len(packet.encoded) > manifest.packet_max_bytes:
        raise PacketError(
            "packet",
            f"{len(packet.encoded)} bytes, swarm cap is {manifest.packet_max_bytes}",
            reason="too_large",
        )
    if packet.created_ms > now_ms + skew_ms:
        raise PacketError("created_ms", "is in the future", reason="future")
    if packet.ttl_s > manifest.ttl_max_s:
        raise PacketError("ttl_s", f"exceeds the swarm maximum {manifest.ttl_max_s}")
    if packet.expires_ms <= now_ms:
        raise PacketError("ttl_s", "packet has expired", reason="expired")
    if packet.generation > manifest.max_generation:
        raise PacketError(
            "generation",
            f"{packet.generation} exceeds the swarm cap {manifest.max_generation}",
            reason="generation",
        )
    if len(packet.parents) > manifest.max_parents:
        raise PacketError("parents", f"more than {manifest.max_parents}")
    if not manifest.is_member(packet.origin):
        raise PacketError("origin", "is not a member of this closed swarm", reason="not_member")
