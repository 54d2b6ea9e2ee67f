"""Node identity: an Ed25519 key kept in a 0600 file, and the node id derived from it.

The node id is SHA-1 of the public key: 160 bits, the id space Kademlia (and the stock
``kademlia`` package) uses, and a peer cannot choose its id without choosing its key.
The key file holds the 32-byte seed, hex encoded on one line, so an operator can back
it up with ordinary tools; it is created atomically with mode 0600 and refused if any
group or other permission bit is set.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.signing

KEY_FILE_NAME = "identity.key"
_HEADER = "qisd-ed25519-seed-v1"


#: A key file is one short line; anything longer is something else.
_MAX_KEY_FILE = 4096


class IdentityError(Exception):
    """The key file cannot be used; the message names the file and the problem."""


def node_id_for(public_key: bytes) -> bytes:
    """The 20-byte Kademlia node id of a 32-byte Ed25519 public key."""
    return hashlib.sha1(public_key).digest()


@dataclass(frozen=True, slots=True)
class Identity:
    signing_key: nacl.signing.SigningKey

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def node_id(self) -> bytes:
        return node_id_for(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh in-memory identity (tests, simulations)."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(nacl.signing.SigningKey(seed))

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise IdentityError(f"{path}: key file does not exist") from None
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"{path}: not a regular file (a key file is expected here)")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"{path}: key file is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        try:
            with path.open("rb") as fh:
                raw = fh.read(_MAX_KEY_FILE + 1)
            if len(raw) > _MAX_KEY_FILE:
                raise IdentityError(f"{path}: not a qisd key file (over {_MAX_KEY_FILE} bytes)")
            text = raw.decode("ascii").split()
        except UnicodeDecodeError:
            raise IdentityError(
                f"{path}: not a qisd key file (not text; expected '{_HEADER} <hex>')"
            ) from None
        except OSError as exc:
            raise IdentityError(f"{path}: cannot read key file ({exc.strerror or exc})") from None
        if len(text) != 2 or text[0] != _HEADER:
            raise IdentityError(f"{path}: not a qisd key file (expected '{_HEADER} <hex>')")
        try:
            seed = bytes.fromhex(text[1])
        except ValueError:
            raise IdentityError(f"{path}: key is not hex") from None
        if len(seed) != 32:
            raise IdentityError(f"{path}: key must be 32 bytes, got {len(seed)}")
        return cls.from_seed(seed)

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Load the key at ``path``, creating it (and its directory, 0700) on first use."""
        if path.exists():
            return cls.load(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = cls.generate()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(f"{_HEADER} {bytes(identity.signing_key).hex()}\n")
                fh.flush()
                os.fsync(fh.fileno())
            # link() fails if another process won the race: then use its key.
            try:
                os.link(tmp, path)
            except FileExistsError:
                return cls.load(path)
        finally:
            tmp.unlink(missing_ok=True)
        return identity
