"""Fault tests: the experiments live in ``scripts/fault_*.py`` (with
``scripts/faultlib.py`` and ``scripts/faultmeasure.py``) so the full-size runs and these
scaled-down ones execute the same code; the daemon helpers come from ``tests/daemon``."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
for extra in (ROOT / "scripts", ROOT / "tests" / "daemon"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from daemon_helpers import Daemon  # noqa: E402


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths must stay short (108 bytes): not under pytest's tmp_path.
    path = Path(tempfile.mkdtemp(prefix="qisd-f-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for d in made:
        d.kill()
