"""Outcome packets: encoding, signatures, strict validation, size caps."""

from __future__ import annotations

import contextlib
import math

import msgpack
import nacl.signing
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qisd.packet import (
    KIND_OBSERVATION,
    KIND_SYNTHESIS,
    MAX_PACKET_BYTES,
    OutcomePacket,
    PacketError,
    create_packet,
    decode_packet,
)
from qisd.sketch import make_sketch

KEY = nacl.signing.SigningKey(bytes(range(32)))
SWARM = bytes(32)
OUTCOME4 = {"survived": True, "los_days": 4.5, "drug": "abc", "score": 7}


def make(dim: int = 64, **kw: object) -> OutcomePacket:
    rng = np.random.default_rng(dim)
    args: dict[str, object] = {
        "swarm": SWARM,
        "topic": "icu/sepsis",
        "sketch": make_sketch(rng.standard_normal(dim)),
        "outcome": OUTCOME4,
        "ttl_s": 86400,
        "created_ms": 1_700_000_000_000,
    }
    args.update(kw)
    return create_packet(KEY, **args)  # type: ignore[arg-type]


def test_64_dim_packet_with_four_outcomes_fits_512_bytes() -> None:
    p = make(64)
    assert len(p.encoded) <= 512


def test_384_dim_packet_fits_the_cap_at_int8() -> None:
    p = make(384)
    assert p.sketch.bits == 8
    assert len(p.encoded) <= MAX_PACKET_BYTES


def test_1024_dim_packet_fits_the_cap_at_int4() -> None:
    p = make(1024)
    assert p.sketch.bits == 4
    assert len(p.encoded) <= MAX_PACKET_BYTES


def test_round_trip_keeps_every_field_and_id() -> None:
    p = make(384)
    q = decode_packet(p.encoded)
    assert q == p and q.id == p.id and len(p.id) == 16
    assert q.outcome == OUTCOME4
    assert q.origin == bytes(KEY.verify_key)
    assert q.kind == KIND_OBSERVATION and q.generation == 0
    assert q.sketch == p.sketch


def test_encoding_is_deterministic() -> None:
    # Ed25519 is deterministic, so the same content gives the same bytes and id.
    assert make(64).encoded == make(64).encoded


def test_synthesis_carries_generation_and_parents() -> None:
    parents = (b"\x01" * 16, b"\x02" * 16)
    p = make(kind=KIND_SYNTHESIS, parents=parents)
    q = decode_packet(p.encoded)
    assert q.generation == 1 and q.parents == parents and q.kind == KIND_SYNTHESIS


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"topic": ""}, "topic"),
        ({"topic": "x" * 65}, "topic"),
        ({"topic": "a\nb"}, "topic"),
        ({"swarm": b"short"}, "swarm"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"outcome": {}}, "outcome"),
        ({"outcome": {"x": math.nan}}, "outcome.x"),
        ({"outcome": {"x": -1e300}}, "outcome.x"),
        ({"outcome": {"x": [1, 2]}}, "outcome.x"),
        ({"outcome": {"x": "y" * 65}}, "outcome.x"),
        ({"outcome": {f"f{i}": i for i in range(17)}}, "outcome"),
        ({"parents": (b"\x00" * 16,)}, "parents"),
        ({"kind": KIND_SYNTHESIS, "generation": 0}, "generation"),
        ({"kind": "guess"}, "kind"),
        ({"created_ms": -1}, "created_ms"),
    ],
)
def test_bad_fields_are_named(kw: dict[str, object], field: str) -> None:
    with pytest.raises(PacketError) as info:
        make(**kw)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")


def _tamper(p: OutcomePacket, **changes: object) -> bytes:
    raw = msgpack.unpackb(p.encoded, raw=False)
    raw.update(changes)
    return msgpack.packb({k: raw[k] for k in sorted(raw)}, use_bin_type=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"q": {"survived": False}}, "signature", "bad_signature"),
        ({"v": 2}, "version", "malformed"),
        ({"zz": 1}, "zz", "malformed"),
        ({"s": [64, 8, b"\x00" * 10]}, "sketch", "malformed"),
        ({"s": [64, 5, b"\x00" * 64]}, "sketch", "malformed"),
        ({"k": "z"}, "kind", "malformed"),
        ({"x": b"\x00" * 10}, "signature", "malformed"),
        ({"t": "yesterday"}, "created_ms", "malformed"),
    ],
)
def test_decode_names_the_bad_field(changes: dict[str, object], field: str, reason: str) -> None:
    with pytest.raises(PacketError) as info:
        decode_packet(_tamper(make(), **changes))
    assert info.value.field == field
    assert info.value.reason == reason


def test_missing_field_is_named() -> None:
    raw = msgpack.unpackb(make().encoded, raw=False)
    del raw["n"]
    with pytest.raises(PacketError, match=r"^n: missing"):
        decode_packet(msgpack.packb(raw, use_bin_type=True))


def test_non_canonical_key_order_is_refused() -> None:
    raw = msgpack.unpackb(make().encoded, raw=False)
    shuffled = {k: raw[k] for k in reversed(sorted(raw))}
    with pytest.raises(PacketError, match="canonical"):
        decode_packet(msgpack.packb(shuffled, use_bin_type=True))


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(PacketError) as info:
        decode_packet(b"\x80" + b"\x00" * MAX_PACKET_BYTES)
    assert info.value.reason == "too_large"


def test_create_refuses_a_packet_over_the_cap() -> None:
    with pytest.raises(PacketError) as info:
        make(384, max_bytes=512)
    assert info.value.reason == "too_large"


def test_summary_is_json_friendly() -> None:
    import json

    s = make().to_summary()
    assert json.loads(json.dumps(s))["id"] == make().id.hex()


outcome_values = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(min_value=-(2.0**63), max_value=2.0**63),
    st.text(max_size=64),
)
outcomes = st.dictionaries(
    st.text(min_size=1, max_size=32).filter(str.isprintable),
    outcome_values,
    min_size=1,
    max_size=16,
)
vectors = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=384
).filter(lambda v: any(abs(x) > 1e-3 for x in v))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vector=vectors,
    outcome=outcomes,
    n=st.integers(min_value=1, max_value=2**31 - 1),
    topic=st.text(min_size=1, max_size=16).filter(str.isprintable),
)
def test_property_round_trip(
    vector: list[float], outcome: dict[str, object], n: int, topic: str
) -> None:
    p = create_packet(
        KEY, swarm=SWARM, topic=topic, sketch=make_sketch(vector), outcome=outcome,  # type: ignore[arg-type]
        n=n, ttl_s=3600,
    )
    q = decode_packet(p.encoded)
    assert q == p and q.outcome == outcome and q.n == n and q.topic == topic


SIGNED = make(64).encoded


@settings(max_examples=300, deadline=None)
@given(index=st.integers(min_value=0, max_value=len(SIGNED) - 1), flip=st.integers(1, 255))
def test_property_any_flipped_byte_is_refused(index: int, flip: int) -> None:
    bad = bytearray(SIGNED)
    bad[index] ^= flip
    with pytest.raises(PacketError):
        decode_packet(bytes(bad))


def test_every_single_bit_flip_is_refused() -> None:
    for i in range(len(SIGNED)):
        for bit in range(8):
            bad = bytearray(SIGNED)
            bad[i] ^= 1 << bit
            with pytest.raises(PacketError):
                decode_packet(bytes(bad))


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=1200))
def test_property_arbitrary_bytes_raise_only_packet_error(data: bytes) -> None:
    with contextlib.suppress(PacketError):
        decode_packet(data)


@settings(max_examples=300, deadline=None)
@given(
    obj=st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text()
        | st.binary(),
        lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=3), c, max_size=5),
        max_leaves=20,
    )
)
def test_property_arbitrary_msgpack_raises_only_packet_error(obj: object) -> None:
    with contextlib.suppress(PacketError):
        decode_packet(msgpack.packb(obj, use_bin_type=True))


def test_series_round_trips_and_is_checked() -> None:
    p = make(kind=KIND_SYNTHESIS, series=b"\x05" * 16)
    assert decode_packet(p.encoded).series == b"\x05" * 16
    with pytest.raises(PacketError, match=r"^series:"):
        make(series=b"\x05" * 3)


def test_unverified_decode_is_only_for_trusted_bytes() -> None:
    bad = _tamper(make(), q={"survived": False})
    assert decode_packet(bad, verify=False).outcome == {"survived": False}
    with pytest.raises(PacketError):
        decode_packet(bad)


def _resigned(p: OutcomePacket, **changes: object) -> bytes:
    """``p`` with ``changes`` to its wire map, signed again by its origin's key: a
    packet only the checks on its fields can refuse."""
    raw = msgpack.unpackb(p.encoded, raw=False)
    raw.update(changes)
    del raw["x"]
    body = msgpack.packb({k: raw[k] for k in sorted(raw)}, use_bin_type=True)
    signature = KEY.sign(body).signature
    return b"\x8e" + body[1:] + b"\xa1x\xc4\x40" + signature


def test_resigned_packets_verify() -> None:
    p = make()
    assert decode_packet(_resigned(p, n=3)).n == 3


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        # No direction: it cannot be routed or compared (and once crashed synthesis).
        ({"s": [64, 8, bytes(64)]}, "sketch"),
        ({"s": [5, 4, bytes(2) + b"\x01"]}, "sketch"),  # only the padding nibble set
        ({"q": {"x": 1e300}}, "outcome.x"),
    ],
)
def test_signed_packets_with_bad_values_are_refused(changes: dict[str, object], field: str) -> None:
    with pytest.raises(PacketError) as info:
        decode_packet(_resigned(make(), **changes))
    assert info.value.field == field


def test_unknown_keys_of_mixed_types_are_named_not_crashed() -> None:
    raw = msgpack.unpackb(make().encoded, raw=False)
    raw[b"zz"] = 1
    raw["zy"] = 2
    with pytest.raises(PacketError) as info:
        decode_packet(msgpack.packb(raw, use_bin_type=True))
    assert info.value.reason == "malformed"
    assert info.value.field in ("b'zz'", "zy")


@pytest.mark.parametrize(("canonical", "other"), [
    (b"\xa1n\x01", b"\xa1n\xcc\x01"),  # n = 1 as a uint8
    (b"\xa1g\x00", b"\xa1g\xd0\x00"),  # generation 0 as an int8
], ids=["n_uint8", "generation_int8"])
def test_another_encoding_of_the_same_content_is_refused_even_signed(
    canonical: bytes, other: bytes
) -> None:
    """Only the origin can sign it, but it would be a second id for one packet."""
    p = create_packet(KEY, swarm=SWARM, topic="t", sketch=make_sketch([1.0, 0.0]),
                      outcome={"a": 1}, n=1, ttl_s=60)
    body = b"\x8d" + p.encoded[1:-68]
    assert body.count(canonical) == 1
    odd = body.replace(canonical, other)
    data = b"\x8e" + odd[1:] + b"\xa1x\xc4\x40" + KEY.sign(odd).signature
    with pytest.raises(PacketError, match="not in canonical form"):
        decode_packet(data)
