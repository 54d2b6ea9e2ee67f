#!/usr/bin/env python3
"""Disk full and read-only state directory: a clear error, the daemon stays up for
queries, nothing corrupt, and writes resume without a restart.

A real ``qisd run`` daemon whose state directory is a tmpfs of its own (``--size``
bytes; needs root to mount), driven through its control socket:

1. **Full.** ``--packets`` packets are emitted, then the filesystem is filled to the
   last byte. Emits go on until the store refuses one (SQLite can still use the
   pages its files already hold); then ``--attempts`` single emits and one
   ``emit_many`` batch must all be refused with ``storage_full`` naming the file,
   while ``status`` and ``query`` (every acknowledged packet, by its own vector)
   keep working. A second daemon joins and emits ``--peer-packets``: the full node
   refuses the copies it is sent (``qisd_packets_rejected_total{reason="disk"}``)
   and stays up; its own emits now succeed, kept by the peer. The filler is
   deleted, and the next emit must be stored here again, without a restart.
2. **Read-only.** The daemon is stopped (exit 0), the filesystem remounted
   read-only and the daemon started on it: it must come up, say
   ``storage_read_only`` in ``status``, refuse ``--attempts`` emits with that code
   and answer every query. The filesystem is remounted read-write under the running
   daemon and the next emit must be stored.
3. After each phase the store file passes ``PRAGMA integrity_check`` and holds every
   acknowledged packet, each verifying, none half-written.

    sudo .venv/bin/python scripts/fault_disk.py
    sudo .venv/bin/python scripts/fault_disk.py --packets 200 --attempts 50
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultlib import log, parse_params, print_result, table
from faultproc import (
    QisdProcess,
    StoreCheck,
    check_store,
    fill,
    free_bytes,
    metric,
    remount,
    tmpfs,
)

from qisd.control.client import Client
from qisd.control.errors import ControlError

TOPIC = "disk"
DIM = 16
FILLER = "filler"
ROUTING_FILE = "dht-routing.msgpack"


@dataclass
class DiskParams:
    packets: int = 100
    attempts: int = 20
    batch: int = 10
    peer_packets: int = 20
    #: Size of the state directory's tmpfs, bytes.
    size: int = 16 << 20
    #: Most emits tried after the fill before the store must refuse one.
    max_after_fill: int = 2000
    seed: int = 1


@dataclass
class Phase:
    """What one phase tried and what came of it."""

    name: str
    tried: int = 0
    refused: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    named_the_file: int = 0
    stored_anyway: int = 0
    queries: int = 0
    found: int = 0
    status_state: str = ""
    recovered_s: float | None = None
    check: StoreCheck | None = None


@dataclass
class DiskResult:
    params: dict[str, Any]
    acked: int = 0
    stored_after_fill: int = 0
    filled_bytes: int = 0
    full: Phase = field(default_factory=lambda: Phase("disk full"))
    peer_sent: int = 0
    peer_acked: int = 0
    refused_disk_metric: float = 0.0
    swarm_emit_ok: bool = False
    peer_holds_swarm_emit: bool = False
    read_only: Phase = field(default_factory=lambda: Phase("read-only"))
    read_only_start_s: float = 0.0
    exits: list[int] = field(default_factory=list)
    #: Log lines of the disk-bound daemon at level error or above (a task that failed).
    errors_logged: int = 0
    warnings_logged: int = 0


class Emitter:
    """Emits through one daemon's socket, remembering what was acknowledged."""

    def __init__(self, daemon: QisdProcess, rng: random.Random) -> None:
        self.daemon = daemon
        self.rng = rng
        self.acked: dict[str, list[float]] = {}

    def item(self) -> dict[str, Any]:
        return {"topic": TOPIC, "vector": [self.rng.gauss(0, 1) for _ in range(DIM)],
                "outcome": {"ok": self.rng.random() < 0.5}}

    def emit(self) -> ControlError | None:
        item = self.item()
        try:
            with Client(self.daemon.socket, timeout=60.0) as client:
                pid = client.emit(**item)
        except ControlError as exc:
            return exc
        self.acked[pid] = item["vector"]
        return None

    def emit_many(self, count: int) -> list[ControlError | None]:
        items = [self.item() for _ in range(count)]
        with Client(self.daemon.socket, timeout=60.0) as client:
            results = client.emit_many(items)
        out: list[ControlError | None] = []
        for item, res in zip(items, results, strict=True):
            if "id" in res:
                self.acked[res["id"]] = item["vector"]
                out.append(None)
            else:
                out.append(ControlError(res["error"]["code"], res["error"]["message"]))
        return out


def refusals(phase: Phase, errors: list[ControlError | None], store: Path) -> None:
    for err in errors:
        phase.tried += 1
        if err is None:
            phase.stored_anyway += 1
            continue
        phase.refused += 1
        phase.codes[err.code] = phase.codes.get(err.code, 0) + 1
        phase.named_the_file += str(store) in err.message


def ask_all(phase: Phase, daemon: QisdProcess, acked: dict[str, list[float]]) -> None:
    """Query every acknowledged packet by its own vector; count the ones found."""
    with Client(daemon.socket, timeout=60.0) as client:
        for pid, vector in acked.items():
            matches = client.query(topic=TOPIC, vector=vector, k=5)["matches"]
            phase.queries += 1
            phase.found += any(m["id"] == pid for m in matches)
        phase.status_state = str(client.status()["storage"]["state"])


def until_stored(emitter: Emitter, limit: float = 10.0) -> float | None:
    """Seconds until an emit is stored again, or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if emitter.emit() is None:
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


def saturate(p: DiskParams, r: DiskResult, daemon: QisdProcess, em: Emitter) -> ControlError:
    """Fill the filesystem, then emit until the store refuses (SQLite first uses up
    the pages its files already hold): that first refusal."""
    r.filled_bytes += fill(daemon.state_dir / FILLER)
    for _ in range(p.max_after_fill):
        if (refused := em.emit()) is not None:
            return refused
        r.stored_after_fill += 1
    raise RuntimeError(f"{p.max_after_fill} emits stored on a full disk: none refused")


def full_phase(p: DiskParams, r: DiskResult, daemon: QisdProcess, em: Emitter) -> None:
    ph = r.full
    for _ in range(p.packets):
        if (err := em.emit()) is not None:
            raise RuntimeError(f"emit failed before the disk was filled: {err}")
    log(f"emitted {len(em.acked)}; filling {free_bytes(daemon.state_dir):,} free bytes")
    first = saturate(p, r, daemon, em)
    refusals(ph, [first], daemon.store_path)
    log(f"{r.stored_after_fill} emits still stored after the fill; then: {first}")
    refusals(ph, [em.emit() for _ in range(p.attempts)], daemon.store_path)
    refusals(ph, em.emit_many(p.batch), daemon.store_path)
    ask_all(ph, daemon, em.acked)
    log(f"full: {ph.refused}/{ph.tried} refused {ph.codes}; "
        f"found {ph.found}/{ph.queries}; status {ph.status_state}")
    (daemon.state_dir / FILLER).unlink()
    ph.recovered_s = until_stored(em)
    log(f"space freed: stored again after {ph.recovered_s} s")


def peer_phase(p: DiskParams, r: DiskResult, daemon: QisdProcess, em: Emitter,
               root: Path) -> None:
    """Full again, with a peer: the full node refuses the copies it is sent (counted
    by reason) and stays up; its own emits are kept by the peer."""
    saturate(p, r, daemon, em)
    with Client(daemon.socket) as client:
        address = str(client.status()["listen"])
    peer = QisdProcess(root, "peer", extra=("--bootstrap", address))
    peer.start()
    try:
        peer_em = Emitter(peer, em.rng)
        for _ in range(p.peer_packets):
            r.peer_sent += 1
            r.peer_acked += peer_em.emit() is None
        with Client(daemon.socket) as client:
            url = str(client.status()["metrics"])
        r.refused_disk_metric = metric(url, "qisd_packets_rejected_total", reason="disk")
        own = Emitter(daemon, em.rng)
        r.swarm_emit_ok = own.emit() is None
        r.peer_holds_swarm_emit = check_store(peer.store_path, set(own.acked)).clean
        log(f"peer: {r.peer_acked}/{r.peer_sent} emitted; full node refused "
            f"{r.refused_disk_metric:.0f} copies (reason disk); its own emit ok: "
            f"{r.swarm_emit_ok}, held by the peer: {r.peer_holds_swarm_emit}")
    finally:
        r.exits.append(peer.stop())
    (daemon.state_dir / FILLER).unlink()


def read_only_phase(p: DiskParams, r: DiskResult, daemon: QisdProcess, em: Emitter) -> None:
    ph = r.read_only
    # Alone: no time spent on RPCs to the stopped peer it would remember.
    (daemon.state_dir / ROUTING_FILE).unlink(missing_ok=True)
    remount(daemon.state_dir, read_only=True)
    r.read_only_start_s = daemon.start()
    refusals(ph, [em.emit() for _ in range(p.attempts)], daemon.store_path)
    ask_all(ph, daemon, em.acked)
    log(f"read-only: {ph.refused}/{ph.tried} refused {ph.codes}; "
        f"found {ph.found}/{ph.queries}; status {ph.status_state}")
    remount(daemon.state_dir, read_only=False)
    ph.recovered_s = until_stored(em)
    log(f"remounted rw: stored again after {ph.recovered_s} s")


def run_disk(p: DiskParams, root: Path) -> DiskResult:
    r = DiskResult(params=vars(p).copy())
    em_rng = random.Random(p.seed)
    daemon = QisdProcess(root, "disk", metrics=True)
    with tmpfs(daemon.state_dir, p.size):
        try:
            daemon.start()
            em = Emitter(daemon, em_rng)
            full_phase(p, r, daemon, em)
            peer_phase(p, r, daemon, em, root)
            r.exits.append(daemon.stop())
            r.full.check = check_store(daemon.store_path, set(em.acked))
            read_only_phase(p, r, daemon, em)
            r.exits.append(daemon.stop())
            r.read_only.check = check_store(daemon.store_path, set(em.acked))
            r.acked = len(em.acked)
        finally:
            daemon.kill()
    r.errors_logged, r.warnings_logged = log_levels(daemon.log)
    return r


def log_levels(path: Path) -> tuple[int, int]:
    """Lines logged at error level or above, and at warning level (JSON log lines)."""
    errors = warnings = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            level = json.loads(line).get("level")
        except (ValueError, AttributeError):
            errors += line.startswith("Traceback")
            continue
        errors += level in ("error", "critical", "exception")
        warnings += level == "warning"
    return errors, warnings


def render(r: DiskResult) -> str:
    rows = []
    for ph in (r.full, r.read_only):
        c = ph.check
        rows.append((
            ph.name, ph.tried, ph.refused,
            ", ".join(f"{k} x{v}" for k, v in sorted(ph.codes.items())) or "-",
            ph.named_the_file, ph.stored_anyway, f"{ph.found}/{ph.queries}", ph.status_state,
            "-" if ph.recovered_s is None else f"{ph.recovered_s:.2f}",
            "-" if c is None else c.integrity, "-" if c is None else c.missing_acked,
        ))
    out = table(rows, ("phase", "emits tried", "refused", "codes", "named the file",
                       "stored anyway", "queries answered", "status says",
                       "writes back after s", "integrity", "acked missing"))
    out += (
        f"\n\n{r.acked:,} emits acknowledged in all; {r.stored_after_fill} still stored "
        f"after the two fills ({r.filled_bytes:,} filler bytes; SQLite reusing pages its "
        f"files held) until the first refusal; a peer "
        f"emitted {r.peer_acked}/{r.peer_sent} and the full node refused "
        f"{r.refused_disk_metric:.0f} copies with reason `disk`; an emit from the full "
        f"node with the peer up {'succeeded' if r.swarm_emit_ok else 'failed'}"
        f"{' (held by the peer)' if r.peer_holds_swarm_emit else ''}"
        f"; read-only start took {r.read_only_start_s:.1f} s; exit codes {r.exits}; "
        f"{r.errors_logged} errors and {r.warnings_logged} warnings in the daemon's log"
    )
    return out


def main() -> None:
    params, as_json = parse_params(DiskParams, __doc__)
    # A short directory: Unix socket paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="qisd-disk-", dir="/tmp") as tmp:
        result = run_disk(params, Path(tmp))
    print_result(result, render, as_json)


if __name__ == "__main__":
    main()
