"""Identity: key file creation, permissions, node id derivation."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qisd.identity import Identity, IdentityError, node_id_for


def test_created_on_first_use_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "identity.key"
    ident = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Identity.load_or_create(path)
    assert again.public_key == ident.public_key
    assert not list(path.parent.glob(".*tmp"))


def test_node_id_is_sha1_of_public_key() -> None:
    ident = Identity.from_seed(b"\x07" * 32)
    assert ident.node_id == hashlib.sha1(ident.public_key).digest()
    assert node_id_for(ident.public_key) == ident.node_id
    assert len(ident.node_id) == 20


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_group_or_world_readable_key_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.key"
    Identity.load_or_create(path)
    os.chmod(path, mode)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("garbage", "not a qisd key file"),
        ("qisd-ed25519-seed-v1 zz", "not hex"),
        ("qisd-ed25519-seed-v1 abcd", "32 bytes"),
        (b"\xd3\x00\xff binary", "not a qisd key file"),
    ],
)
def test_corrupt_key_file_names_the_problem(tmp_path: Path, content: str | bytes,
                                            message: str) -> None:
    path = tmp_path / "identity.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content if isinstance(content, bytes) else content.encode())
    os.close(fd)
    with pytest.raises(IdentityError, match=message) as info:
        Identity.load(path)
    assert str(path) in str(info.value)


def test_a_directory_where_the_key_file_should_be_is_named(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.mkdir(mode=0o755)
    with pytest.raises(IdentityError, match="not a regular file"):
        Identity.load(path)


def test_same_key_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    ident = Identity.load_or_create(path)
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from qisd.identity import Identity;"
         "print(Identity.load(Path(sys.argv[1])).node_id.hex())", str(path)],
        check=True, capture_output=True, text=True,
    )
    assert out.stdout.strip() == ident.node_id.hex()
