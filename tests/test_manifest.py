"""Swarm manifest: pinned default swarm id, validation, encodings, signatures."""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
import unicodedata
from pathlib import Path
from typing import Any

import msgpack
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qisd.fingerprint import keys_for
from qisd.manifest import (
    DEFAULT_MANIFEST,
    DEFAULT_SEED,
    MAX_ENCODED_BYTES,
    Manifest,
    ManifestError,
    TopicParams,
    check_local_topic,
    check_topic,
    load_manifest,
)

# Wire protocol: every key of the zero-config swarm hashes this id. Computed once from
# the canonical body; if it changes, default-swarm nodes of different versions split.
DEFAULT_SWARM_ID = "2c8901e4f27ae9bdf64036dc1495c7ab9c92600d3430d593493d459db84ff50d"

KEY_A = nacl.signing.SigningKey(bytes(range(32)))
KEY_B = nacl.signing.SigningKey(bytes(range(1, 33)))
PUB_A = bytes(KEY_A.verify_key)
PUB_B = bytes(KEY_B.verify_key)


def rich_manifest() -> Manifest:
    """A manifest with every optional feature in use."""
    return Manifest(
        name="clinic-π",
        seed=bytes(range(32)),
        tables=12,
        bits=6,
        probes=48,
        topics={"sepsis": TopicParams(tables=4, bits=10), "icu/v2": TopicParams(16, 3)},
        replicas=3,
        ttl_default_s=3600,
        ttl_max_s=86400,
        packet_max_bytes=768,
        max_generation=2,
        max_parents=8,
        membership="closed",
        members=(PUB_B, PUB_A),
    ).signed(KEY_A)


def test_default_swarm_id_is_pinned() -> None:
    assert hashlib.blake2b(b"qisd default swarm v1", digest_size=32).digest() == DEFAULT_SEED
    assert Manifest() == DEFAULT_MANIFEST
    assert DEFAULT_MANIFEST.swarm_id.hex() == DEFAULT_SWARM_ID
    assert len(DEFAULT_MANIFEST.swarm_id) == 32
    assert (
        DEFAULT_MANIFEST.swarm_id
        == hashlib.blake2b(DEFAULT_MANIFEST.canonical_body(), digest_size=32).digest()
    )


def test_canonical_body_has_sorted_keys_and_no_signature() -> None:
    body = msgpack.unpackb(rich_manifest().canonical_body(), raw=False)
    assert list(body) == sorted(body)
    assert list(body["topics"]) == sorted(body["topics"])
    assert "signature" not in body
    assert set(body) == {f.name for f in dataclasses.fields(Manifest)} - {"signature"}


# One changed value per field; the test below checks the list covers every field.
FIELD_CHANGES: dict[str, dict[str, Any]] = {
    "name": {"name": "other"},
    "seed": {"seed": bytes(32)},
    "tables": {"tables": 9},
    "bits": {"bits": 5},
    "probes": {"probes": 31},
    "topics": {"topics": {"demo": TopicParams(8, 4)}},
    "replicas": {"replicas": 7},
    "ttl_default_s": {"ttl_default_s": 86400},
    "ttl_max_s": {"ttl_max_s": 30 * 86400},
    "packet_max_bytes": {"packet_max_bytes": 1000},
    "max_generation": {"max_generation": 0},
    "max_parents": {"max_parents": 15},
    "membership": {"membership": "closed", "members": (PUB_A,)},
    "members": {"membership": "closed", "members": (PUB_A, PUB_B)},
    "creator": {"creator": PUB_A},
}


def test_field_changes_cover_every_field_but_signature() -> None:
    names = {f.name for f in dataclasses.fields(Manifest)}
    assert set(FIELD_CHANGES) == names - {"signature"}


@pytest.mark.parametrize("field", sorted(FIELD_CHANGES))
def test_changing_any_field_changes_swarm_id(field: str) -> None:
    changed = dataclasses.replace(DEFAULT_MANIFEST, **FIELD_CHANGES[field])
    assert changed.swarm_id != DEFAULT_MANIFEST.swarm_id
    assert changed != DEFAULT_MANIFEST


def test_members_differing_only_in_closed_lists_differ() -> None:
    one = Manifest(membership="closed", members=(PUB_A,))
    two = Manifest(membership="closed", members=(PUB_A, PUB_B))
    assert one.swarm_id != two.swarm_id


def test_member_order_and_container_do_not_matter() -> None:
    a = Manifest(membership="closed", members=[PUB_A, PUB_B])  # type: ignore[arg-type]
    b = Manifest(membership="closed", members=(PUB_B, PUB_A))
    assert a == b and a.swarm_id == b.swarm_id and hash(a) == hash(b)
    assert a.members == tuple(sorted((PUB_A, PUB_B)))


def test_topics_are_copied_and_read_only() -> None:
    topics = {"demo": TopicParams(2, 3)}
    m = Manifest(topics=topics)
    topics["demo"] = TopicParams(9, 9)
    assert m.params_for("demo") == TopicParams(2, 3)
    with pytest.raises(TypeError):
        m.topics["x"] = TopicParams(1, 1)  # type: ignore[index]


def test_signature_does_not_change_swarm_id_but_creator_does() -> None:
    signed = DEFAULT_MANIFEST.signed(KEY_A)
    assert signed.creator == PUB_A
    assert signed.swarm_id != DEFAULT_MANIFEST.swarm_id
    other_sig = dataclasses.replace(signed, signature=bytes(64))
    assert other_sig.swarm_id == signed.swarm_id


def test_params_for_and_is_member() -> None:
    m = rich_manifest()
    assert m.params_for("sepsis") == TopicParams(4, 10)
    assert m.params_for("anything-else") == TopicParams(12, 6)
    assert m.is_member(PUB_A) and m.is_member(PUB_B)
    assert not m.is_member(bytes(32))
    assert DEFAULT_MANIFEST.is_member(bytes(32))


def test_signature_verifies_and_detects_tampering() -> None:
    assert not DEFAULT_MANIFEST.verify_signature()
    signed = rich_manifest()
    assert signed.verify_signature()
    assert not dataclasses.replace(signed, replicas=4).verify_signature()
    assert not dataclasses.replace(signed, creator=PUB_B).verify_signature()
    bad = bytearray(signed.signature or b"")
    bad[0] ^= 1
    assert not dataclasses.replace(signed, signature=bytes(bad)).verify_signature()
    # a point that is not a valid Ed25519 key must give False, not an exception
    assert not dataclasses.replace(signed, creator=b"\xff" * 32).verify_signature()


def test_decode_rejects_a_tampered_signed_manifest() -> None:
    raw = msgpack.unpackb(rich_manifest().encode(), raw=False)
    raw["replicas"] = 5
    with pytest.raises(ManifestError, match="signature: does not verify"):
        Manifest.decode(msgpack.packb(raw, use_bin_type=True))


@pytest.mark.parametrize("manifest", [DEFAULT_MANIFEST, rich_manifest()], ids=["default", "rich"])
def test_round_trips(manifest: Manifest, tmp_path: Path) -> None:
    assert Manifest.decode(manifest.encode()) == manifest
    assert Manifest.from_mapping(manifest.to_toml_dict()) == manifest
    text = manifest.to_toml()
    assert Manifest.from_mapping(tomllib.loads(text)) == manifest
    (tmp_path / "m.toml").write_text(text, encoding="utf-8")
    (tmp_path / "m.msgpack").write_bytes(manifest.encode())
    for name in ("m.toml", "m.msgpack"):
        loaded = load_manifest(tmp_path / name)
        assert loaded == manifest
        assert loaded.swarm_id == manifest.swarm_id
        assert loaded.signature == manifest.signature


def test_toml_file_with_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text('name = "lab"\nbits = 6\n\n[topics.demo]\ntables = 2\nbits = 3\n')
    m = load_manifest(path)
    assert m == Manifest(name="lab", bits=6, topics={"demo": TopicParams(2, 3)})
    # As a Windows editor may save it: a byte-order mark and CRLF line ends.
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert load_manifest(path) == m


@pytest.mark.parametrize("text", ["", "\n# nothing here\n"], ids=["empty", "comments"])
def test_an_empty_manifest_file_is_refused_not_the_default_swarm(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text(text)
    with pytest.raises(ManifestError, match=r"swarm\.toml: empty manifest"):
        load_manifest(path)


names = st.text(st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=20)
topic_params = st.builds(TopicParams, tables=st.integers(1, 32), bits=st.integers(1, 24))
manifests = st.builds(
    Manifest,
    name=names,
    seed=st.binary(min_size=32, max_size=32),
    tables=st.integers(1, 32),
    bits=st.integers(1, 24),
    probes=st.integers(1, 4096),
    # (topics as users can name them: NFC, check_local_topic)
    topics=st.dictionaries(names.map(lambda t: unicodedata.normalize("NFC", t)),
                           topic_params, max_size=4),
    replicas=st.integers(1, 64),
    ttl_default_s=st.integers(1, 86400),
    ttl_max_s=st.integers(86400, 10 * 86400),
    packet_max_bytes=st.integers(256, 4096),
    max_generation=st.integers(0, 16),
    max_parents=st.integers(0, 256),
)


@settings(max_examples=60, deadline=None)
@given(manifests, st.booleans())
def test_round_trip_property(manifest: Manifest, sign: bool) -> None:
    if sign:
        manifest = manifest.signed(KEY_B)
    assert Manifest.decode(manifest.encode()) == manifest
    assert Manifest.from_mapping(tomllib.loads(manifest.to_toml())) == manifest
    assert Manifest.decode(manifest.encode()).swarm_id == manifest.swarm_id


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"name": 5}, "name"),
        ({"seed": b"short"}, "seed"),
        ({"seed": "00" * 32}, "seed"),
        ({"tables": 0}, "tables"),
        ({"tables": 33}, "tables"),
        ({"tables": True}, "tables"),
        ({"bits": 25}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"probes": 0}, "probes"),
        ({"topics": {"x": TopicParams(1, 1), "": TopicParams(1, 1)}}, "topics"),
        ({"topics": {"x": (1, 1)}}, "topics.x"),
        ({"topics": [1]}, "topics"),
        ({"replicas": 0}, "replicas"),
        ({"ttl_max_s": 0}, "ttl_max_s"),
        ({"ttl_default_s": 100 * 86400}, "ttl_default_s"),
        ({"packet_max_bytes": 100}, "packet_max_bytes"),
        ({"max_generation": -1}, "max_generation"),
        ({"max_parents": 1000}, "max_parents"),
        ({"membership": "invite"}, "membership"),
        ({"membership": "closed"}, "members"),
        ({"members": (PUB_A,)}, "members"),
        ({"membership": "closed", "members": (PUB_A, PUB_A)}, "members"),
        ({"membership": "closed", "members": (b"short",)}, r"members\[0\]"),
        ({"creator": b"x" * 31}, "creator"),
        ({"signature": bytes(64)}, "signature"),
        ({"creator": PUB_A, "signature": bytes(63)}, "signature"),
    ],
)
def test_bad_values_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestError, match=rf"^{field}(:|\[)"):
        Manifest(**changes)


def test_topic_params_validate() -> None:
    with pytest.raises(ManifestError, match=r"^tables:"):
        TopicParams(0, 4)
    with pytest.raises(ManifestError, match=r"^bits:"):
        TopicParams(4, 25)


def test_closed_swarm_without_members_is_rejected() -> None:
    with pytest.raises(ManifestError, match="members: a closed swarm needs"):
        Manifest(membership="closed")
    with pytest.raises(ManifestError, match="members"):
        Manifest.from_mapping({"membership": "closed", "members": []}, source="s.toml")


def test_unknown_keys_are_named() -> None:
    with pytest.raises(ManifestError, match=r"^s\.toml: unknown key 'tabels'"):
        Manifest.from_mapping({"tabels": 8}, source="s.toml")
    with pytest.raises(ManifestError, match=r"topics\.demo: unknown key 'dim'"):
        Manifest.from_mapping({"topics": {"demo": {"tables": 1, "bits": 2, "dim": 3}}})
    raw = msgpack.unpackb(DEFAULT_MANIFEST.encode(), raw=False)
    raw["colour"] = "blue"
    with pytest.raises(ManifestError, match="unknown key 'colour'"):
        Manifest.decode(msgpack.packb(raw, use_bin_type=True))


def test_from_mapping_errors_name_source_and_field() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"seed": "zz"}, "seed: is not valid hex"),
        ({"seed": 7}, "seed: must be a hex string"),
        ({"bits": 99}, "bits: must be in 1..24"),
        ({"members": "ab"}, "members: must be a list"),
        ({"membership": "closed", "members": ["00"]}, r"members\[0\]: must be 32 bytes"),
        ({"topics": {"demo": {"tables": 1}}}, r"topics\.demo: missing key 'bits'"),
        ({"topics": {"demo": {"tables": 1, "bits": 0}}}, r"topics\.demo\.bits: must be in"),
        ({"topics": {"demo": 3}}, r"topics\.demo: must be a table"),
        ({"topics": 3}, "topics: must be a table"),
    ]
    for data, message in cases:
        with pytest.raises(ManifestError, match=rf"^f\.toml: {message}"):
            Manifest.from_mapping(data, source="f.toml")


def test_decode_rejects_malformed_input() -> None:
    good = msgpack.unpackb(DEFAULT_MANIFEST.encode(), raw=False)
    missing = {k: v for k, v in good.items() if k != "probes"}
    cases: list[tuple[bytes, str]] = [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (msgpack.packb(missing, use_bin_type=True), "missing key 'probes'"),
        (msgpack.packb({**good, "seed": "00" * 32}, use_bin_type=True), "seed: must be 32"),
        (msgpack.packb({**good, "members": {}}, use_bin_type=True), "members: must be a list"),
        (msgpack.packb({1: 2}), "not valid msgpack"),  # strict_map_key
        (b"\x00" * (MAX_ENCODED_BYTES + 1), "at most"),
        (DEFAULT_MANIFEST.encode() + b"\x00", "not valid msgpack"),  # trailing bytes
    ]
    for data, message in cases:
        with pytest.raises(ManifestError, match=message):
            Manifest.decode(data)


def test_load_manifest_errors_name_the_file(tmp_path: Path) -> None:
    cases = {
        "m.json": "unknown manifest format",
        "missing.toml": "no such file",
        "bad.toml": "not valid TOML",
        "bad.msgpack": "not valid msgpack",
        "field.toml": "replicas: must be in",
    }
    (tmp_path / "m.json").write_text("{}")
    (tmp_path / "bad.toml").write_text("tables = = 3")
    (tmp_path / "bad.msgpack").write_bytes(b"\xc1")
    (tmp_path / "field.toml").write_text("replicas = 0\n")
    for name, message in cases.items():
        path = tmp_path / name
        with pytest.raises(ManifestError, match=message) as info:
            load_manifest(path)
        assert str(path) in str(info.value)


def test_a_topic_with_whitespace_at_an_end_is_refused_locally_but_keyed_for_peers() -> None:
    for topic in ("sepsis ", " sepsis", " "):
        assert check_topic(topic) == topic  # the wire rule: a peer's packet may carry it
        assert len(keys_for(DEFAULT_MANIFEST, topic, [1.0, 0.5])) == DEFAULT_MANIFEST.tables
        with pytest.raises(ManifestError, match="topic: must not begin or end with whitespace"):
            check_local_topic(topic)
    assert check_local_topic("two words") == "two words"
    # NFC is what is kept and sent, so its length is the one that counts.
    assert check_local_topic("e\u0301" * 32) == "\u00e9" * 32  # 96 bytes typed, 64 kept
    # A manifest's per-topic shape must be reachable by the names users can give.
    for topic, problem in (("sepsis ", "must not begin or end with whitespace"),
                           ("cafe\u0301", r"must be written in Unicode NFC, as 'caf\\xe9'")):
        with pytest.raises(ManifestError, match=problem):
            Manifest(topics={topic: TopicParams(2, 3)})
