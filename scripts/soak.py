#!/usr/bin/env python3
"""Soak: a few real ``qisd run`` daemons under steady load for a long while; does
anything grow that should not, or slow down, or get lost?

``--nodes`` daemons on 127.0.0.1 (port 0, metrics on), the first a seed the others
bootstrap through. For ``--minutes`` a driver (4 client threads) emits ``--emit-rate``
packets a second one by one, plus a bulk ``emit_many`` of ``--batch`` every 10 s, and
runs ``--query-rate`` queries a second, each at a daemon picked at random (an
operation due while 8 are still in flight is skipped and counted); one
``watch`` stream stays open on the first daemon the whole time. Packets live ``--ttl``
seconds, so once the first have expired (ttl + the store's expiry sweep) inflow
and expiry balance and every store should hold steady: a steady state in which
anything that still grows is a leak.

Every ``--sample`` seconds it records each daemon's RSS, open file descriptors,
threads, store files' bytes and stored packets; the latency (p50/p99) and errors of
the operations finished in that window; the daemons' CPU per operation (work that
grows per request would show there) and the machine's steal time (on a virtual
machine, CPU the host gave to other guests: latency that is not qisd's). At the end
every daemon is stopped with SIGTERM (it must exit 0) and every store checked offline
(SQLite integrity, every packet decodes and verifies, no orphans), and every packet
acknowledged in the last ``ttl / 2`` seconds must be held by some store.

The verdict: RSS growth over the steady state as a least-squares slope (MB/hour, the
largest of the daemons), fds at the start and end of it, latency, CPU per operation
and steal in its first and last thirds (medians), errors, exit codes, store checks,
lost packets.

    .venv/bin/python scripts/soak.py --minutes 30 --plot docs/soak.png  # 5 daemons
    .venv/bin/python scripts/soak.py --minutes 1 --nodes 2 --ttl 10 \
        --expire-interval 5 --sample 5                      # a smoke run
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from faultlib import log, parse_params, print_result, table
from faultproc import QisdProcess, StoreCheck, check_store

from qisd.control.client import Client

TOPIC = "soak"
DIM = 32
CENTRES = 24
BULK_EVERY_S = 10.0
WORKERS = 4
#: Slack between the daemon's expiry (wall clock, whole ms) and this script's clock.
EXPIRY_MARGIN = 0.5


@dataclass
class SoakParams:
    nodes: int = 5
    minutes: float = 30.0
    emit_rate: float = 8.0
    query_rate: float = 4.0
    batch: int = 50
    ttl: int = 180
    #: The daemons' ``store.expire_interval`` (the production default is 60 s).
    expire_interval: float = 60.0
    sample: float = 30.0
    seed: int = 1
    #: A PNG of RSS and latency over time ("" for none).
    plot: str = ""


@dataclass
class Sample:
    t: float
    rss_mb: list[float]
    fds: list[int]
    threads: list[int]
    store_mb: list[float]
    packets: list[int]
    emits: int
    emit_p50_ms: float
    emit_p99_ms: float
    queries: int
    #: Packets acknowledged by the bulk emits finished in the window.
    bulk_packets: int
    query_p50_ms: float
    query_p99_ms: float
    errors: int
    #: CPU seconds all daemons used in the window, and the share of the machine's CPU
    #: time the host gave to other guests (steal) in it.
    cpu_s: float = 0.0
    steal_pct: float = 0.0


@dataclass
class SoakResult:
    params: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)
    steady_from_s: float = 0.0
    emitted: int = 0
    queried: int = 0
    empty_answers: int = 0
    #: Operations skipped because the daemons were not keeping up (see Load.submit).
    skipped: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    watch_events: int = 0
    #: How the watch stream ended, if it did before the load did.
    watch_ended_early: list[str] = field(default_factory=list)
    watch_events_last_window: int = 0
    rss_slope_mb_per_hour: list[float] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    checks: list[StoreCheck] = field(default_factory=list)
    recent_acked: int = 0
    recent_lost: int = 0
    stop_seconds: float = 0.0

    @property
    def steady(self) -> list[Sample]:
        return [s for s in self.samples if s.t >= self.steady_from_s]


# -- what a daemon uses ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(all, steal) CPU ticks of the machine so far: steal is time a virtual machine's
    CPUs were runnable but given to another guest by the host."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values), values[7] if len(values) > 7 else 0


def proc_figures(pid: int) -> tuple[float, int, int]:
    """RSS (MB), open file descriptors and threads of process ``pid``."""
    rss_kb = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return rss_kb / 1024, fds, threads


def store_bytes(daemon: QisdProcess) -> int:
    return sum(p.stat().st_size for p in daemon.state_dir.glob("packets.db*"))


def held_ids(daemon: QisdProcess) -> set[str]:
    conn = sqlite3.connect(str(daemon.store_path), timeout=30.0)
    try:
        return {bytes(r[0]).hex() for r in conn.execute("SELECT id FROM packets")}
    finally:
        conn.close()


# -- the load ----------------------------------------------------------------------------


class Load:
    """Operations at fixed rates against random daemons; what finished, when, how."""

    def __init__(self, daemons: list[QisdProcess], p: SoakParams) -> None:
        self.daemons = daemons
        self.p = p
        self.rng = random.Random(p.seed)
        self.centres = np.random.default_rng(p.seed).normal(size=(CENTRES, DIM))
        self.local = threading.local()
        self.lock = threading.Lock()
        #: (finished at, "emit" | "bulk" | "query", seconds) of every successful operation.
        self.done: list[tuple[float, str, float]] = []
        self.errors: list[tuple[float, str]] = []
        self.acked: list[tuple[float, str]] = []
        self.empty = 0
        #: Operations submitted and not finished, and those skipped because too many
        #: were (the daemons are not keeping up with the rates asked).
        self.in_flight = 0
        self.skipped = 0
        #: Every client the worker threads opened (closed at the end).
        self.clients: list[Client] = []

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def vector(self, rng: random.Random) -> list[float]:
        centre = self.centres[rng.randrange(CENTRES)]
        noise = np.array([rng.gauss(0.0, 0.3) for _ in range(DIM)])
        return [float(x) for x in centre + noise]

    def item(self, rng: random.Random) -> dict[str, Any]:
        return {"topic": TOPIC, "vector": self.vector(rng), "ttl": self.p.ttl,
                "outcome": {"treated": rng.random() < 0.5, "score": round(rng.random(), 3)}}

    def client(self, i: int) -> Client:
        clients = getattr(self.local, "clients", None)
        if clients is None:
            clients = self.local.clients = {}
        if i not in clients:
            clients[i] = Client(self.daemons[i].socket, timeout=60.0)
            with self.lock:
                self.clients.append(clients[i])
        client: Client = clients[i]
        return client

    def submit(self, pool: ThreadPoolExecutor, kind: str) -> None:
        """Start one operation at a random daemon, unless the workers are all busy
        and as many again wait (then it is skipped and counted)."""
        with self.lock:
            if self.in_flight >= 2 * WORKERS:
                self.skipped += 1
                return
            self.in_flight += 1
        pool.submit(self.run, kind, self.rng.randrange(len(self.daemons)),
                    self.rng.getrandbits(32))

    def run(self, kind: str, target: int, seed: int) -> None:
        try:
            self._run(kind, target, seed)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _run(self, kind: str, target: int, seed: int) -> None:
        rng = random.Random(seed)
        started = time.monotonic()
        try:
            client = self.client(target)
            if kind == "emit":
                ids = [client.emit(**self.item(rng))]
            elif kind == "bulk":
                results = client.emit_many([self.item(rng) for _ in range(self.p.batch)])
                bad = [r for r in results if "id" not in r]
                if bad:
                    raise RuntimeError(f"emit_many refused {len(bad)}: {bad[0]}")
                ids = [r["id"] for r in results]
            else:
                ids = []
                answer = client.query(topic=TOPIC, vector=self.vector(rng), k=10)
                if not answer["matches"]:
                    with self.lock:
                        self.empty += 1
        except Exception as exc:
            with self.lock:
                self.errors.append((time.monotonic(), f"{kind}: {type(exc).__name__}: {exc}"))
            return
        now = time.monotonic()
        with self.lock:
            self.done.append((now, kind, now - started))
            # Each packet was made after its request was sent: it expires no sooner
            # than ``started`` + ttl.
            self.acked.extend((started, i) for i in ids)


def watch_events(daemon: QisdProcess, seen: list[float], ended: list[str]) -> None:
    """Count the events of one ``watch`` of the topic until the stream ends."""
    try:
        with Client(daemon.socket).watch(topic=TOPIC) as events:
            for _ in events:
                seen.append(time.monotonic())
        ended.append("closed by the daemon")
    except Exception as exc:
        ended.append(f"{type(exc).__name__}: {exc}")


# -- the run -----------------------------------------------------------------------------


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def start_swarm(root: Path, n: int, expire_interval: float) -> list[QisdProcess]:
    config = root / "soak.toml"
    config.write_text(f"[store]\nexpire_interval = {expire_interval}\n")
    daemons = [QisdProcess(root, f"n{i}", metrics=True, extra=("--config", str(config)))
               for i in range(n)]
    daemons[0].start()
    with Client(daemons[0].socket) as client:
        seed = client.status()["listen"]
    for d in daemons[1:]:
        d.extra = (*d.extra, "--bootstrap", seed)
        d.start()
    return daemons


class Meter:
    """CPU of the daemons and steal of the machine, per window."""

    def __init__(self, daemons: list[QisdProcess]) -> None:
        self.pids = [d.proc.pid for d in daemons if d.proc is not None]
        self.last = self.read()

    def read(self) -> tuple[float, int, int]:
        return (sum(cpu_seconds(pid) for pid in self.pids), *machine_ticks())

    def window(self) -> tuple[float, float]:
        now = self.read()
        cpu, ticks, steal = (a - b for a, b in zip(now, self.last, strict=True))
        self.last = now
        return cpu, 100.0 * steal / ticks if ticks else 0.0


def sample(t: float, daemons: list[QisdProcess], load: Load, since: float,
           meter: Meter) -> Sample:
    figures = [proc_figures(d.proc.pid) for d in daemons if d.proc is not None]
    cpu_s, steal_pct = meter.window()
    packets = []
    for d in daemons:
        with Client(d.socket) as client:
            packets.append(int(client.status()["packets"]))
    with load.lock:
        done = [x for x in load.done if x[0] >= since]
        errors = sum(1 for e in load.errors if e[0] >= since)
    emits = [s for _, kind, s in done if kind == "emit"]
    bulks = sum(1 for _, kind, _ in done if kind == "bulk")
    queries = [s for _, kind, s in done if kind == "query"]
    return Sample(
        t=round(t, 1),
        rss_mb=[round(f[0], 1) for f in figures], fds=[f[1] for f in figures],
        threads=[f[2] for f in figures],
        store_mb=[round(store_bytes(d) / 2**20, 2) for d in daemons], packets=packets,
        emits=len(emits), emit_p50_ms=percentile_ms(emits, 50),
        emit_p99_ms=percentile_ms(emits, 99),
        queries=len(queries), bulk_packets=bulks * load.p.batch,
        query_p50_ms=percentile_ms(queries, 50),
        query_p99_ms=percentile_ms(queries, 99), errors=errors,
        cpu_s=round(cpu_s, 2), steal_pct=round(steal_pct, 1),
    )


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    if len(ts) < 3:
        return float("nan")
    return float(np.polyfit(np.array(ts), np.array(ys), 1)[0] * 3600)


def run_soak(root: Path, p: SoakParams) -> SoakResult:
    result = SoakResult(params=vars(p).copy())
    result.steady_from_s = p.ttl + p.expire_interval + p.sample
    daemons = start_swarm(root, p.nodes, p.expire_interval)
    log(f"{p.nodes} daemons up; load for {p.minutes} min")
    load = Load(daemons, p)
    seen: list[float] = []
    ended: list[str] = []
    watcher = threading.Thread(target=watch_events, args=(daemons[0], seen, ended), daemon=True)
    try:
        watcher.start()
        # Each kind of operation has its own schedule; the main thread hands each, when
        # due, to the pool (Load.submit skips it if the daemons are behind).
        rates = {"emit": p.emit_rate, "query": p.query_rate, "bulk": 1.0 / BULK_EVERY_S}
        t0 = time.monotonic()
        next_at = {kind: t0 for kind in rates}
        next_sample = t0 + p.sample
        meter = Meter(daemons)
        window_start = t0
        end = t0 + p.minutes * 60
        pool = ThreadPoolExecutor(WORKERS)
        try:
            while (now := time.monotonic()) < end:
                for kind, rate in rates.items():
                    while rate > 0 and next_at[kind] <= now:
                        load.submit(pool, kind)
                        next_at[kind] += 1.0 / rate
                if now >= next_sample:
                    s = sample(now - t0, daemons, load, window_start, meter)
                    result.samples.append(s)
                    log(f"t={s.t:.0f}s rss={max(s.rss_mb):.0f} MB fds={max(s.fds)} "
                        f"packets={s.packets} emit p50={s.emit_p50_ms:.0f} ms "
                        f"query p50={s.query_p50_ms:.0f} ms cpu={s.cpu_s:.1f}s "
                        f"steal={s.steal_pct:.0f}% errors={s.errors}")
                    window_start = now
                    next_sample += p.sample
                time.sleep(max(0.0, min([*next_at.values(), next_sample, end]) - time.monotonic()))
        finally:
            # On Ctrl-C or SIGTERM too: what waits is dropped, what runs is awaited.
            pool.shutdown(wait=True, cancel_futures=True)
        load.close()
        result.watch_ended_early = list(ended)
        result.watch_events = len(seen)
        result.watch_events_last_window = sum(1 for x in seen if x >= end - p.sample)
    finally:
        result.exits = [d.stop() if d.running else -1 for d in daemons]
        stopped = time.monotonic()
        watcher.join(timeout=10)
    # The packets acknowledged in the last ttl/2 seconds that were still live when
    # the last daemon stopped (so no expiry sweep can have removed them; a stop that
    # is slow leaves fewer to check, never a false loss): some store has each.
    result.stop_seconds = stopped - end
    recent = {i for at, i in load.acked
              if at >= end - p.ttl / 2 and at + p.ttl > stopped + EXPIRY_MARGIN}
    held: set[str] = set()
    for d in daemons:
        held |= held_ids(d)
        result.checks.append(check_store(d.store_path, set()))
    result.recent_acked = len(recent)
    result.recent_lost = len(recent - held)
    result.emitted = len(load.acked)
    result.queried = sum(1 for _, kind, _ in load.done if kind == "query")
    result.empty_answers = load.empty
    result.skipped = load.skipped
    result.errors = len(load.errors)
    for _, message in load.errors:
        result.error_kinds[message[:120]] = result.error_kinds.get(message[:120], 0) + 1
    steady = result.steady
    for i in range(p.nodes):
        result.rss_slope_mb_per_hour.append(
            round(slope_per_hour([s.t for s in steady], [s.rss_mb[i] for s in steady]), 1))
    return result


# -- the report --------------------------------------------------------------------------


def cpu_ms_per_op(s: Sample) -> float:
    """The daemons' CPU per operation finished in the window (a bulk emit of a batch
    counts as its packets)."""
    ops = s.emits + s.queries + s.bulk_packets
    return 1000 * s.cpu_s / ops if ops else float("nan")


def thirds(values: list[float]) -> tuple[float, float]:
    """Medians of the first and the last third of ``values``."""
    third = max(1, len(values) // 3)
    return float(np.median(values[:third])), float(np.median(values[-third:]))


def render(r: SoakResult) -> str:
    p = r.params
    rows = [[f"{s.t:.0f}", f"{max(s.rss_mb):.0f}", f"{max(s.fds)}", f"{max(s.threads)}",
             f"{sum(s.store_mb):.1f}", f"{min(s.packets)}-{max(s.packets)}",
             f"{s.emits}", f"{s.emit_p50_ms:.0f} / {s.emit_p99_ms:.0f}",
             f"{s.queries}", f"{s.query_p50_ms:.0f} / {s.query_p99_ms:.0f}",
             f"{cpu_ms_per_op(s):.0f}", f"{s.steal_pct:.0f}", f"{s.errors}"]
            for s in r.samples]
    lines = [
        f"{p['nodes']} daemons, {p['minutes']} min: {p['emit_rate']} emits/s + a batch of "
        f"{p['batch']} every {BULK_EVERY_S:.0f} s, {p['query_rate']} queries/s, ttl "
        f"{p['ttl']} s; steady state from t={r.steady_from_s:.0f} s",
        table(rows, ["t (s)", "RSS max (MB)", "fds max", "threads", "stores (MB)",
                     "packets/node", "emits", "emit p50/p99 ms", "queries",
                     "query p50/p99 ms", "CPU ms/op", "steal %", "errors"]),
    ]
    steady = r.steady
    verdict = [
        ["packets acknowledged", f"{r.emitted:,}"],
        ["queries answered (empty)", f"{r.queried:,} ({r.empty_answers})"],
        ["errors", f"{r.errors}"],
        ["operations skipped (daemons behind)", f"{r.skipped}"],
        ["watch events (last window)", f"{r.watch_events:,} ({r.watch_events_last_window})"],
        ["watch ended early", "; ".join(r.watch_ended_early) or "no"],
    ]
    if steady:
        a, b = steady[0], steady[-1]

        def first_last(values: list[float], fmt: str = "{:.0f}") -> str:
            first, last = thirds(values)
            return f"{fmt.format(first)} -> {fmt.format(last)}"

        verdict += [
            ["RSS slope in steady state, max (MB/h)", f"{max(r.rss_slope_mb_per_hour):.1f}"],
            ["RSS max, steady start -> end (MB)", f"{max(a.rss_mb):.0f} -> {max(b.rss_mb):.0f}"],
            ["fds max, steady start -> end", f"{max(a.fds)} -> {max(b.fds)}"],
            ["packets/node, steady start -> end",
             f"{min(a.packets)}-{max(a.packets)} -> {min(b.packets)}-{max(b.packets)}"],
            ["emit p50 (ms), first -> last third", first_last([s.emit_p50_ms for s in steady])],
            ["query p50 (ms), first -> last third",
             first_last([s.query_p50_ms for s in steady])],
            ["daemon CPU ms per op, first -> last third",
             first_last([cpu_ms_per_op(s) for s in steady], "{:.1f}")],
            ["steal %, first -> last third",
             first_last([s.steal_pct for s in steady], "{:.1f}")],
        ]
    verdict += [
        ["exit codes on SIGTERM", " ".join(map(str, r.exits))],
        ["stores clean", f"{sum(c.clean for c in r.checks)}/{len(r.checks)}"],
        ["recent packets lost", f"{r.recent_lost} of {r.recent_acked:,}"],
        ["load end to every daemon stopped", f"{r.stop_seconds:.1f} s"],
    ]
    lines.append(table(verdict, ["measure", "value"]))
    for message, count in r.error_kinds.items():
        lines.append(f"error x{count}: {message}")
    return "\n".join(lines)


def plot(r: SoakResult, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.t / 60 for s in r.samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for i in range(r.params["nodes"]):
        top.plot(minutes, [s.rss_mb[i] for s in r.samples], linewidth=1.2, label=f"daemon {i}")
    top.set_ylabel("RSS (MB)")
    top.set_ylim(bottom=0)
    top.legend(fontsize=8, ncol=3)
    bottom.plot(minutes, [s.emit_p50_ms for s in r.samples], label="emit p50")
    bottom.plot(minutes, [s.emit_p99_ms for s in r.samples], ":", label="emit p99")
    bottom.plot(minutes, [s.query_p50_ms for s in r.samples], label="query p50")
    bottom.plot(minutes, [s.query_p99_ms for s in r.samples], ":", label="query p99")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("minutes")
    bottom.set_yscale("log")
    bottom.legend(fontsize=8, ncol=2)
    for ax in (top, bottom):
        ax.axvline(r.steady_from_s / 60, color="grey", linewidth=0.8)
    p = r.params
    top.set_title(f"{p['nodes']} qisd daemons, {p['emit_rate']:g} emits/s + batches, "
                  f"{p['query_rate']:g} queries/s, ttl {p['ttl']} s "
                  "(steady state right of the line)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p, as_json = parse_params(SoakParams, __doc__)
    # SIGTERM ends the run as Ctrl-C does: the daemons are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # A short directory: Unix socket paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="qisd-soak-", dir="/tmp") as tmp:
        result = run_soak(Path(tmp), p)
    print_result(result, render, as_json)
    if p.plot:
        plot(result, Path(p.plot))


if __name__ == "__main__":
    main()
