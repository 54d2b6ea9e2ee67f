"""Fixtures for daemon tests: a short temp dir (Unix socket paths are limited to 108
bytes) and a list of daemons that are killed at teardown whatever happened."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import Daemon


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths must stay short (108 bytes): not under pytest's tmp_path.
    path = Path(tempfile.mkdtemp(prefix="qisd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemons(workdir: Path) -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for d in made:
        d.kill()
