"""The ``hello`` proof of key possession used to admit peers in closed swarms (pure).

A node id is SHA-1 of the node's Ed25519 public key (:mod:`qisd.identity`), but a
datagram can name any id. Before a peer enters the routing table of a node in a
closed swarm, that node (the *verifier*) sends it a fresh random nonce::

    hello(verifier_id, nonce) -> [public_key, signature]

and the peer (the *prover*) answers with its public key and an Ed25519 signature
over :func:`hello_message`::

    "qisd/hello/1" | swarm id (32) | verifier id (20) | nonce (32) | prover id (20)

The verifier accepts the answer only if SHA-1 of the key is the id the peer claimed
(``id_mismatch`` otherwise), the key is a member of the swarm manifest
(``not_member``) and the signature verifies (``bad_proof``). The label keeps these
signatures apart from packet signatures made with the same key; the swarm id keeps
a proof for one swarm from being replayed into another; the verifier id and nonce
make every proof single-use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.signing

from qisd.manifest import Manifest

LABEL = b"qisd/hello/1"
NONCE_BYTES = 32
ID_BYTES = 20
KEY_BYTES = 32
SIGNATURE_BYTES = 64

#: Why a peer was refused entry (also the labels of the ``peers_refused`` counter).
ID_MISMATCH = "id_mismatch"
NOT_MEMBER = "not_member"
BAD_PROOF = "bad_proof"
NO_ANSWER = "no_answer"
REFUSAL_REASONS = (ID_MISMATCH, NOT_MEMBER, BAD_PROOF, NO_ANSWER)


class HelloError(ValueError):
    """A proof that does not admit the peer; ``reason`` is one of the constants above."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Proof:
    public_key: bytes
    signature: bytes

    def to_wire(self) -> list[bytes]:
        return [self.public_key, self.signature]


def hello_message(swarm_id: bytes, verifier_id: bytes, nonce: bytes, prover_id: bytes) -> bytes:
    """The bytes a prover signs (fixed-size fields, so the split is unambiguous)."""
    if len(swarm_id) != 32 or len(verifier_id) != ID_BYTES or len(prover_id) != ID_BYTES:
        raise ValueError("hello: swarm id must be 32 bytes and node ids 20 bytes")
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"hello: nonce must be {NONCE_BYTES} bytes")
    return LABEL + swarm_id + verifier_id + nonce + prover_id


def node_id_of(public_key: bytes) -> bytes:
    return hashlib.sha1(public_key).digest()


def prove(
    signing_key: nacl.signing.SigningKey, swarm_id: bytes, verifier_id: bytes, nonce: bytes
) -> Proof:
    """The answer to ``hello(verifier_id, nonce)`` by the holder of ``signing_key``."""
    public_key = bytes(signing_key.verify_key)
    message = hello_message(swarm_id, verifier_id, nonce, node_id_of(public_key))
    return Proof(public_key, bytes(signing_key.sign(message).signature))


def proof_shaped(answer: object) -> bool:
    """Whether ``answer`` has the shape of a proof: ``[public key, signature]``."""
    return (
        isinstance(answer, list)
        and len(answer) == 2
        and isinstance(answer[0], bytes)
        and len(answer[0]) == KEY_BYTES
        and isinstance(answer[1], bytes)
        and len(answer[1]) == SIGNATURE_BYTES
    )


def check_proof(
    answer: Any,
    *,
    manifest: Manifest,
    verifier_id: bytes,
    nonce: bytes,
    prover_id: bytes,
) -> bytes:
    """The prover's public key if ``answer`` admits it; else :class:`HelloError`.

    ``answer`` is whatever the peer sent back (untrusted, any shape).
    """
    if not proof_shaped(answer):
        raise HelloError(BAD_PROOF, "hello answer must be [public_key(32), signature(64)]")
    public_key, signature = answer
    if node_id_of(public_key) != prover_id:
        raise HelloError(ID_MISMATCH, "the peer's node id is not SHA-1 of its public key")
    if not manifest.is_member(public_key):
        raise HelloError(NOT_MEMBER, "the peer's key is not a member of this closed swarm")
    if not signed_for(public_key, signature, manifest.swarm_id, verifier_id, nonce, prover_id):
        raise HelloError(BAD_PROOF, "the hello signature does not verify")
    return bytes(public_key)


def signed_for(
    public_key: bytes,
    signature: bytes,
    swarm_id: bytes,
    verifier_id: bytes,
    nonce: bytes,
    prover_id: bytes,
) -> bool:
    """Whether ``signature`` by ``public_key`` is a hello proof for ``swarm_id``."""
    message = hello_message(swarm_id, verifier_id, nonce, prover_id)
    try:
        nacl.bindings.crypto_sign_open(signature + message, public_key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True
