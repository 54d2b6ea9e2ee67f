"""Swarm manifest: the parameters every node of a swarm must agree on.

A manifest fixes the LSH seed and shape (``tables`` L x ``bits`` b, per topic where it
says so), the multi-probe budget, replication, TTLs, packet limits and the membership
policy. Its canonical msgpack body hashes to the **swarm id**, which is mixed into every
key (DESIGN "Fingerprints and keys"), so nodes with different manifests never share keys
by accident. A creator may sign the body with Ed25519.

Pure logic apart from :func:`load_manifest`, which reads one file (TOML or msgpack).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
import types
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing

#: Seed of the zero-config swarm: BLAKE2b-256 of a fixed label.
DEFAULT_SEED = hashlib.blake2b(b"qisd default swarm v1", digest_size=32).digest()

SEED_BYTES = 32
PUBKEY_BYTES = 32
SIGNATURE_BYTES = 64
NAME_MAX_BYTES = 64
#: Topic names are mixed into keys with a u16 length prefix; keep them short.
TOPIC_MAX_BYTES = 64
MAX_TOPICS = 256
MAX_MEMBERS = 1024
MAX_TABLES = 32
MAX_BITS = 24
MAX_PROBES = 4096
MAX_REPLICAS = 64
#: Ten years; longer TTLs are indistinguishable from "forever" and defeat expiry.
MAX_TTL_S = 10 * 365 * 86400
#: A STORE must fit one UDP datagram (8 KiB) with room for the RPC envelope.
PACKET_MAX_BYTES_RANGE = (256, 4096)
MAX_GENERATION = 16
MAX_PARENTS = 256
#: Largest encoded manifest accepted (1024 members at 34 bytes fit comfortably).
MAX_ENCODED_BYTES = 64 * 1024

MEMBERSHIP_POLICIES = ("open", "closed")


class ManifestError(ValueError):
    """An invalid manifest; the message names the field (and the source, if any)."""


def _fail(fieldname: str, problem: str) -> ManifestError:
    return ManifestError(f"{fieldname}: {problem}")


def _check_int(fieldname: str, value: object, lo: int, hi: int) -> None:
    # bool is an int subclass; ``tables = true`` in a TOML file is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(fieldname, f"must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _fail(fieldname, f"must be in {lo}..{hi}, got {value}")


def _check_bytes(fieldname: str, value: object, size: int) -> None:
    if not isinstance(value, bytes):
        raise _fail(fieldname, f"must be {size} bytes, got {type(value).__name__}")
    if len(value) != size:
        raise _fail(fieldname, f"must be {size} bytes, got {len(value)}")


def check_name(fieldname: str, value: object, max_bytes: int) -> str:
    """Validate a short printable UTF-8 name (swarm name, topic) and return it."""
    if not isinstance(value, str):
        raise _fail(fieldname, f"must be a string, got {type(value).__name__}")
    if not value:
        raise _fail(fieldname, "must not be empty")
    if len(value.encode("utf-8", errors="replace")) > max_bytes:
        raise _fail(fieldname, f"must be at most {max_bytes} UTF-8 bytes")
    if not value.isprintable():
        raise _fail(fieldname, "must not contain control or unprintable characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(fieldname, "is not valid UTF-8 (lone surrogate)") from None
    return value


def check_topic(topic: object) -> str:
    """Validate a topic name as used in keys and packets; returns it unchanged."""
    return check_name("topic", topic, TOPIC_MAX_BYTES)


def check_local_topic(topic: object) -> str:
    """A topic this node's own users may name (emit, query, watch, packets), as it
    is to be used: in Unicode NFC, so ``café`` typed as one character or as ``e`` and
    an accent is one topic; the wire rule of :func:`check_topic`; and no whitespace
    at either end, since ``"cancer "`` would be a topic of its own that a query for
    ``"cancer"`` never meets. Packets from peers are held to the wire rule only, so
    one from a node that allowed such a topic is still stored, routed and
    synthesised."""
    return _local_name("topic", topic)


def _local_name(fieldname: str, topic: object) -> str:
    if not isinstance(topic, str):
        return check_topic(topic)  # (raises, naming the type)
    # Normalised before the length is checked: NFC is what is kept and sent.
    name = check_name(fieldname, unicodedata.normalize("NFC", topic), TOPIC_MAX_BYTES)
    if name != name.strip():
        raise _fail(fieldname, f"must not begin or end with whitespace: {name!r}")
    return name


@dataclass(frozen=True)
class TopicParams:
    """LSH shape for one topic: ``tables`` hash tables of ``bits`` sign bits each."""

    tables: int
    bits: int

    def __post_init__(self) -> None:
        _check_int("tables", self.tables, 1, MAX_TABLES)
        _check_int("bits", self.bits, 1, MAX_BITS)

    def to_dict(self) -> dict[str, int]:
        return {"bits": self.bits, "tables": self.tables}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Swarm parameters; validated on construction (see :meth:`validate`)."""

    name: str = "qisd-default"
    seed: bytes = DEFAULT_SEED
    tables: int = 8
    bits: int = 4
    #: Default multi-probe budget: key lookups per query.
    probes: int = 32
    #: Per-topic LSH overrides; stored as a read-only mapping.
    topics: Mapping[str, TopicParams] = field(default_factory=dict)
    replicas: int = 6
    ttl_default_s: int = 7 * 86400
    ttl_max_s: int = 90 * 86400
    packet_max_bytes: int = 1024
    max_generation: int = 1
    max_parents: int = 16
    membership: str = "open"
    #: Ed25519 public keys allowed to publish in a closed swarm; kept sorted.
    members: tuple[bytes, ...] = ()
    creator: bytes | None = None
    signature: bytes | None = None

    def __post_init__(self) -> None:
        # Normalise containers so equal manifests compare (and hash) equal and the
        # instance cannot be mutated through an alias of the caller's dict or list.
        if isinstance(self.topics, Mapping):
            object.__setattr__(self, "topics", types.MappingProxyType(dict(self.topics)))
        if isinstance(self.members, list | tuple):
            object.__setattr__(self, "members", tuple(self.members))
        self.validate()
        object.__setattr__(self, "members", tuple(sorted(self.members)))

    def __hash__(self) -> int:
        return hash((self.swarm_id, self.signature))

    def validate(self) -> None:
        """Check every field; raise :class:`ManifestError` naming the first bad one."""
        check_name("name", self.name, NAME_MAX_BYTES)
        _check_bytes("seed", self.seed, SEED_BYTES)
        _check_int("tables", self.tables, 1, MAX_TABLES)
        _check_int("bits", self.bits, 1, MAX_BITS)
        _check_int("probes", self.probes, 1, MAX_PROBES)
        self._validate_topics()
        _check_int("replicas", self.replicas, 1, MAX_REPLICAS)
        _check_int("ttl_max_s", self.ttl_max_s, 1, MAX_TTL_S)
        _check_int("ttl_default_s", self.ttl_default_s, 1, MAX_TTL_S)
        if self.ttl_default_s > self.ttl_max_s:
            raise _fail(
                "ttl_default_s",
                f"must not exceed ttl_max_s ({self.ttl_max_s}), got {self.ttl_default_s}",
            )
        _check_int("packet_max_bytes", self.packet_max_bytes, *PACKET_MAX_BYTES_RANGE)
        _check_int("max_generation", self.max_generation, 0, MAX_GENERATION)
        _check_int("max_parents", self.max_parents, 0, MAX_PARENTS)
        self._validate_membership()
        if self.creator is not None:
            _check_bytes("creator", self.creator, PUBKEY_BYTES)
        if self.signature is not None:
            _check_bytes("signature", self.signature, SIGNATURE_BYTES)
            if self.creator is None:
                raise _fail("signature", "present without a creator public key")

    def _validate_topics(self) -> None:
        if not isinstance(self.topics, Mapping):
            raise _fail("topics", f"must be a mapping, got {type(self.topics).__name__}")
        if len(self.topics) > MAX_TOPICS:
            raise _fail("topics", f"at most {MAX_TOPICS} topics, got {len(self.topics)}")
        for topic, params in self.topics.items():
            # As the node's users can name it (qisd.manifest.check_local_topic): a
            # shape for a topic no emit or query can reach would never apply.
            if _local_name(f"topics[{topic!r}]", topic) != topic:
                raise _fail(f"topics[{topic!a}]", "must be written in Unicode NFC, as "
                            f"{unicodedata.normalize('NFC', topic)!a}")
            if not isinstance(params, TopicParams):
                raise _fail(f"topics.{topic}", f"must be TopicParams, got {type(params).__name__}")

    def _validate_membership(self) -> None:
        if self.membership not in MEMBERSHIP_POLICIES:
            raise _fail("membership", f"must be 'open' or 'closed', got {self.membership!r}")
        if not isinstance(self.members, tuple):
            raise _fail("members", f"must be a list, got {type(self.members).__name__}")
        if len(self.members) > MAX_MEMBERS:
            raise _fail("members", f"at most {MAX_MEMBERS} keys, got {len(self.members)}")
        for i, key in enumerate(self.members):
            _check_bytes(f"members[{i}]", key, PUBKEY_BYTES)
        if len(set(self.members)) != len(self.members):
            raise _fail("members", "contains a duplicate key")
        if self.membership == "closed" and not self.members:
            raise _fail("members", "a closed swarm needs at least one member key")
        if self.membership == "open" and self.members:
            raise _fail("members", "must be empty for an open swarm (set membership='closed')")

    # -- identity -------------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        """Every field but the signature, keys sorted, as msgpack-ready values."""
        body: dict[str, Any] = {
            "bits": self.bits,
            "creator": self.creator,
            "max_generation": self.max_generation,
            "max_parents": self.max_parents,
            "members": list(self.members),
            "membership": self.membership,
            "name": self.name,
            "packet_max_bytes": self.packet_max_bytes,
            "probes": self.probes,
            "replicas": self.replicas,
            "seed": self.seed,
            "tables": self.tables,
            "topics": {t: self.topics[t].to_dict() for t in sorted(self.topics)},
            "ttl_default_s": self.ttl_default_s,
            "ttl_max_s": self.ttl_max_s,
        }
        return body

    def canonical_body(self) -> bytes:
        """Canonical msgpack of every field except ``signature`` (what is signed)."""
        return _pack(self._body())

    @cached_property
    def swarm_id(self) -> bytes:
        """BLAKE2b-256 of :meth:`canonical_body`; mixed into every key."""
        return hashlib.blake2b(self.canonical_body(), digest_size=32).digest()

    def params_for(self, topic: str) -> TopicParams:
        """LSH shape for ``topic``: its override, else the manifest defaults."""
        params = self.topics.get(topic)
        return params if params is not None else TopicParams(self.tables, self.bits)

    def is_member(self, pubkey: bytes) -> bool:
        """Whether ``pubkey`` may publish here (always True in an open swarm)."""
        return self.membership == "open" or pubkey in self.members

    # -- signature ------------------------------------------------------------------

    def signed(self, signing_key: nacl.signing.SigningKey) -> Manifest:
        """A copy with ``creator`` set to the key's public half and signed by it."""
        creator = bytes(signing_key.verify_key)
        unsigned = dataclasses.replace(self, creator=creator, signature=None)
        signature = signing_key.sign(unsigned.canonical_body()).signature
        return dataclasses.replace(unsigned, signature=bytes(signature))

    def verify_signature(self) -> bool:
        """True iff the manifest carries a creator signature that verifies."""
        if self.creator is None or self.signature is None:
            return False
        try:
            nacl.signing.VerifyKey(self.creator).verify(self.canonical_body(), self.signature)
        except (nacl.exceptions.CryptoError, ValueError):
            return False
        return True

    # -- encodings ------------------------------------------------------------------

    def encode(self) -> bytes:
        """Canonical msgpack of every field, signature included (nil if unsigned)."""
        return _pack({**self._body(), "signature": self.signature})

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Parse :meth:`encode` output strictly; a bad signature is rejected too."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ManifestError(f"manifest: expected bytes, got {type(data).__name__}")
        if len(data) > MAX_ENCODED_BYTES:
            raise ManifestError(f"manifest: {len(data)} bytes, at most {MAX_ENCODED_BYTES} allowed")
        try:
            raw = msgpack.unpackb(
                bytes(data),
                raw=False,
                strict_map_key=True,
                max_bin_len=MAX_ENCODED_BYTES,
                max_str_len=MAX_ENCODED_BYTES,
                max_array_len=MAX_MEMBERS,
                max_map_len=max(MAX_TOPICS, len(_FIELDS)),
                max_ext_len=0,
            )
        except (ValueError, msgpack.UnpackException) as exc:
            raise ManifestError(f"manifest: not valid msgpack ({exc})") from None
        if not isinstance(raw, dict):
            raise ManifestError(f"manifest: must be a map, got {type(raw).__name__}")
        missing = [k for k in _FIELDS if k not in raw]
        if missing:
            raise ManifestError(f"manifest: missing key {missing[0]!r}")
        return _build(raw, binary=True, source="manifest")

    def to_toml_dict(self) -> dict[str, Any]:
        """Plain values for a TOML manifest file (binary fields as hex, no None)."""
        out: dict[str, Any] = {
            "name": self.name,
            "seed": self.seed.hex(),
            "tables": self.tables,
            "bits": self.bits,
            "probes": self.probes,
            "replicas": self.replicas,
            "ttl_default_s": self.ttl_default_s,
            "ttl_max_s": self.ttl_max_s,
            "packet_max_bytes": self.packet_max_bytes,
            "max_generation": self.max_generation,
            "max_parents": self.max_parents,
            "membership": self.membership,
            "members": [m.hex() for m in self.members],
        }
        if self.creator is not None:
            out["creator"] = self.creator.hex()
        if self.signature is not None:
            out["signature"] = self.signature.hex()
        out["topics"] = {t: self.topics[t].to_dict() for t in sorted(self.topics)}
        return out

    def to_toml(self) -> str:
        """Render :meth:`to_toml_dict` as TOML text (stdlib has no TOML writer)."""
        lines: list[str] = []
        for key, value in self.to_toml_dict().items():
            if key != "topics":
                lines.append(f"{key} = {_toml_value(value)}")
        for topic, params in self.to_toml_dict()["topics"].items():
            lines.append("")
            lines.append(f"[topics.{_toml_value(topic)}]")
            lines.extend(f"{k} = {v}" for k, v in params.items())
        return "\n".join(lines) + "\n"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "manifest") -> Manifest:
        """Build from TOML-style values (hex strings); missing keys take defaults.

        Errors are prefixed with ``source`` (e.g. the file path) and name the key.
        """
        if not isinstance(data, Mapping):
            raise ManifestError(f"{source}: must be a table, got {type(data).__name__}")
        return _build(data, binary=False, source=source)


_FIELDS = tuple(f.name for f in dataclasses.fields(Manifest))
_BINARY_FIELDS = ("seed", "creator", "signature")


def _pack(obj: object) -> bytes:
    packed = msgpack.packb(obj, use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def _unhex(fieldname: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise _fail(fieldname, f"must be a hex string, got {type(value).__name__}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise _fail(fieldname, "is not valid hex") from None


def _topics(value: object) -> dict[str, TopicParams]:
    if not isinstance(value, Mapping):
        raise _fail("topics", f"must be a table, got {type(value).__name__}")
    out: dict[str, TopicParams] = {}
    for topic, params in value.items():
        where = f"topics.{topic}"
        if not isinstance(params, Mapping):
            raise _fail(where, f"must be a table, got {type(params).__name__}")
        for key in params:
            if key not in ("tables", "bits"):
                raise _fail(where, f"unknown key {key!r}")
        for key in ("tables", "bits"):
            if key not in params:
                raise _fail(where, f"missing key {key!r}")
        try:
            out[topic] = TopicParams(tables=params["tables"], bits=params["bits"])
        except ManifestError as exc:
            raise ManifestError(f"{where}.{exc}") from None
    return out


def _build(raw: Mapping[str, Any], *, binary: bool, source: str) -> Manifest:
    """Turn a decoded map into a Manifest, naming ``source`` and the key on error."""
    try:
        for key in raw:
            if key not in _FIELDS:
                raise ManifestError(f"unknown key {key!r}")
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "topics":
                kwargs[key] = _topics(value)
            elif key == "members":
                if not isinstance(value, list):
                    raise _fail("members", f"must be a list, got {type(value).__name__}")
                if binary:
                    kwargs[key] = tuple(value)
                else:
                    kwargs[key] = tuple(_unhex(f"members[{i}]", v) for i, v in enumerate(value))
            elif key in _BINARY_FIELDS:
                if value is None and key != "seed":
                    kwargs[key] = None
                else:
                    kwargs[key] = value if binary else _unhex(key, value)
            else:
                kwargs[key] = value
        manifest = Manifest(**kwargs)
        if manifest.signature is not None and not manifest.verify_signature():
            raise _fail("signature", "does not verify against creator (manifest altered?)")
    except ManifestError as exc:
        raise ManifestError(f"{source}: {exc}") from None
    return manifest


def read_capped(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, refused (ManifestError naming the file) when it cannot be
    read or holds more than ``limit`` bytes; never reads more than ``limit + 1``."""
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise ManifestError(f"{path}: larger than {limit} bytes")
    return data


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest file: ``.toml`` (hex binary fields) or ``.msgpack``."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".msgpack"):
        raise ManifestError(f"{path}: unknown manifest format {suffix!r} (.toml or .msgpack)")
    data = read_capped(path, MAX_ENCODED_BYTES)
    if suffix == ".msgpack":
        try:
            return Manifest.decode(data)
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None
    try:
        table = tomllib.loads(data.decode("utf-8-sig"))  # (a BOM, as some editors write)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError(f"{path}: not valid TOML ({exc})") from None
    if not table:
        # All defaults would be the default swarm: a file cut short (a closed swarm's
        # manifest emptied in a copy) must not join it quietly; the default swarm
        # needs no file at all.
        raise ManifestError(f"{path}: empty manifest; write one with `qisd manifest new`,"
                            " or give no manifest to join the default swarm")
    return Manifest.from_mapping(table, source=str(path))


#: The zero-config swarm every ``qisd run`` without a manifest joins.
DEFAULT_MANIFEST = Manifest()
