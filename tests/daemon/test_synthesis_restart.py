"""A restarted daemon takes its cohorts back: its next synthesis of a cohort supersedes
the one from before the restart instead of starting over beside it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from daemon_helpers import Daemon

from qisd import Client

DIM = 16
BASE = np.random.default_rng(7).standard_normal(DIM)


def case(i: int) -> list[float]:
    """A case a few degrees from BASE (one cohort at the default similarity 0.9)."""
    noise = np.random.default_rng(100 + i).standard_normal(DIM) * 0.05
    return [float(x) for x in BASE + noise]


def syntheses(client: Client) -> list[dict[str, Any]]:
    result = client.query(topic="icu", vector=case(0), k=50)
    return [m for m in result["matches"] if m["kind"] == "synthesis"]


def wait_for_synthesis_of(client: Client, cases: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = syntheses(client)
        if any(m["n"] == cases for m in found):
            return
        time.sleep(0.3)
    raise AssertionError(f"no synthesis of {cases} cases; syntheses: {found}")


def test_restarted_daemon_supersedes_its_earlier_synthesis(
    workdir: Path, daemons: list[Daemon]
) -> None:
    node = Daemon(workdir, "r").start()
    daemons.append(node)
    with Client(node.socket, timeout=30) as client:
        for i in range(6):
            client.emit(topic="icu", vector=case(i), outcome={"survived": i % 2 == 0})
        wait_for_synthesis_of(client, 6)
        before = syntheses(client)
        assert [m["n"] for m in before] == [6]
    assert node.stop() == 0

    node.start()
    with Client(node.socket, timeout=30) as client:
        client.emit(topic="icu", vector=case(6), outcome={"survived": True})
        # One new case: alone it is below the minimum cohort, so only a cohort taken
        # back from before the restart can publish a synthesis of all seven.
        wait_for_synthesis_of(client, 7)
        after = syntheses(client)
        assert [m["n"] for m in after] == [7]  # the old one was superseded, not kept
        assert after[0]["outcome"] == {"_origins": 1, "_packets": 7, "survived?true": 4,
                                       "survived?false": 3}
    resumed = [json.loads(line) for line in node.log.read_text().splitlines()
               if "synthesis resumed its cohorts" in line]
    assert [(r["syntheses"], r["cohorts"]) for r in resumed] == [(1, 1)]
