#!/usr/bin/env python3
"""Crash: ``kill -9`` a ``qisd run`` daemon in the middle of a bulk emit, again and again.

One daemon (N=1, so every acknowledged packet is in its own store) takes
``Client.emit_many`` batches (``--batch`` items each, as ``qisd emit --file`` sends
them) in a loop; after a random time (0.3-2 s) it gets SIGKILL, usually while a
batch is being signed and written. Then it is started again on the same state
directory and must come up (``READY=1``), and its store must:

- pass SQLite's ``PRAGMA integrity_check`` and ``foreign_key_check``;
- hold every packet whose emit was acknowledged to the client before the kill;
- hold nothing half-written: every stored packet decodes, its signature verifies, its
  id matches its row, and it is held under at least one key, every entry points at
  a packet (no orphan on either side).

After the last cycle the daemon is stopped with SIGTERM and the store checked once
more, offline.

    .venv/bin/python scripts/fault_crash.py                # 20 kill cycles
    .venv/bin/python scripts/fault_crash.py --cycles 5 --batch 200
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultlib import parse_params, print_result, table
from faultproc import STORE_FILE, QisdProcess, StoreCheck, check_store

from qisd.control.client import Client


@dataclass
class Cycle:
    acked_before_kill: int
    killed_after_s: float
    in_flight_at_kill: bool
    restart_s: float
    check: StoreCheck


@dataclass
class CrashResult:
    cycles: list[Cycle] = field(default_factory=list)
    acked: int = 0
    final: StoreCheck | None = None
    final_exit: int | None = None

    @property
    def lost(self) -> int:
        return max([c.check.missing_acked for c in self.cycles]
                   + [self.final.missing_acked if self.final else 0])

    @property
    def all_clean(self) -> bool:
        return all(c.check.clean for c in self.cycles) and bool(self.final and self.final.clean)


def emit_until_killed(
    daemon: QisdProcess, rng: random.Random, *, batch: int, kill_after: float
) -> tuple[list[str], bool]:
    """Emit batches until the daemon is killed ``kill_after`` s in; the acked ids, and
    whether a batch was in flight when the kill came."""
    assert daemon.proc is not None
    acked: list[str] = []
    in_flight = threading.Event()
    timer = threading.Timer(kill_after, daemon.kill)
    timer.start()
    try:
        with Client(daemon.socket, timeout=60.0) as client:
            while daemon.proc.poll() is None:
                items = [
                    {"topic": "crash", "vector": [rng.gauss(0, 1) for _ in range(16)],
                     "outcome": {"ok": rng.random() < 0.5, "i": rng.randrange(10**6)}}
                    for _ in range(batch)
                ]
                in_flight.set()
                try:
                    results = client.emit_many(items)
                except (OSError, ConnectionError):
                    break  # killed mid-request: nothing of this batch was acknowledged
                in_flight.clear()
                acked.extend(r["id"] for r in results if "id" in r)
    finally:
        timer.join()
    return acked, in_flight.is_set()


def run_crash(root: Path, *, cycles: int, batch: int, seed: int) -> CrashResult:
    rng = random.Random(seed)
    daemon = QisdProcess(root)
    result = CrashResult()
    acked: set[str] = set()
    daemon.start()
    try:
        for _ in range(cycles):
            kill_after = rng.uniform(0.3, 2.0)
            ids, in_flight = emit_until_killed(daemon, rng, batch=batch, kill_after=kill_after)
            acked.update(ids)
            restart = daemon.start()
            check = check_store(daemon.state_dir / STORE_FILE, acked)
            result.cycles.append(Cycle(len(ids), kill_after, in_flight, restart, check))
        result.final_exit = daemon.stop()
        result.final = check_store(daemon.state_dir / STORE_FILE, acked)
    finally:
        daemon.kill()
    result.acked = len(acked)
    return result


def render(r: CrashResult) -> str:
    rows: list[tuple[Any, ...]] = []
    for n, c in enumerate(r.cycles, 1):
        rows.append((
            n, f"{c.killed_after_s:.2f}", c.acked_before_kill,
            "yes" if c.in_flight_at_kill else "no",
            f"{c.restart_s:.1f}", c.check.integrity, c.check.packets, c.check.bad_packets,
            c.check.foreign_key_violations + c.check.packets_without_entries,
            c.check.missing_acked,
        ))
    out = table(rows, ("kill", "after s", "acked", "mid-batch", "restart s", "integrity",
                       "packets held", "bad packets", "orphans", "acked missing"))
    f = r.final
    assert f is not None
    out += (
        f"\n\n{len(r.cycles)} kills, {r.acked:,} emits acknowledged, "
        f"{sum(c.in_flight_at_kill for c in r.cycles)} kills mid-batch; after SIGTERM "
        f"(exit {r.final_exit}): integrity {f.integrity}, {f.packets:,} packets, "
        f"{f.bad_packets} bad, {f.missing_acked} acknowledged missing"
    )
    return out


@dataclass
class CrashParams:
    cycles: int = 20
    batch: int = 100
    seed: int = 1


def main() -> None:
    p, as_json = parse_params(CrashParams, __doc__)
    # A short directory: Unix socket paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="qisd-crash-", dir="/tmp") as tmp:
        result = run_crash(Path(tmp), cycles=p.cycles, batch=p.batch, seed=p.seed)
    print_result(result, render, as_json)


if __name__ == "__main__":
    main()
