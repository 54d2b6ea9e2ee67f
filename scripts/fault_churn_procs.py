#!/usr/bin/env python3
"""Churn with one ``qisd run`` process per node: stop a share of them, check nothing
is lost, restart them.

The same experiment as ``scripts/fault_churn.py``, but every node is a real daemon
(its own process, store, state directory, UDP socket on 127.0.0.1 and control
socket), and everything is done the way an application and an operator do it:
packets are emitted and looked for through the control socket (``emit_many``,
``query``), nodes are stopped with SIGTERM and started again with ``qisd run`` on
their old port. Only the measurements of where copies sit read the nodes' SQLite
files directly (read-only, beside the running daemons).

1. ``--nodes`` daemons start (the first three are the others' bootstrap peers);
   ``--packets`` packets are emitted from random nodes, ``--batch`` per call.
2. Once every node has run its first republish (1.75 ``--republish`` intervals
   after the start), ``--stop`` of the nodes (at random) get SIGTERM. Every packet
   is then looked for **by a query with its own vector** (``k=10``; found if its id
   is among the matches) from a random running node, while republish brings the
   surviving (key, packet) entries back to ``replicas`` copies on the running
   nodes (the time that takes is measured). ``--outage-packets`` more are emitted.
3. The stopped nodes start again on their old ports; each must hold what it held
   when it stopped. The time until the ``replicas`` closest nodes of every key hold
   every packet of that key is measured, then every packet is looked for again.

    .venv/bin/python scripts/fault_churn_procs.py                 # 50 nodes, 5,000 packets
    .venv/bin/python scripts/fault_churn_procs.py --nodes 8 --packets 80 --republish 8

Prints a Markdown table (the one in docs/reliability.md); ``--json`` prints the raw
figures instead. The machine's CPU use in each phase is part of it: on a small
machine the swarm's own load is what a run measures as much as churn.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultlib import log, parse_params, pct, print_result, secs, table
from faultmeasure import Entry, held_entries, replication, short_entries
from faultproc import QisdProcess

from qisd import DEFAULT_MANIFEST, AsyncClient, ControlError, keys_for, make_sketch

QUERY_K = 10
#: Seconds a control call may take: an emit_many batch on a loaded swarm is slow.
CALL_TIMEOUT = 300.0


@dataclass
class ProcChurnParams:
    nodes: int = 50
    packets: int = 5000
    stop: float = 0.3
    outage_packets: int = 250
    topics: int = 4
    dim: int = 16
    republish: float = 300.0
    rpc_timeout: float = 1.0
    #: Packets per ``emit_many`` call, and calls (or queries) in flight at once.
    batch: int = 25
    concurrency: int = 16
    seed: int = 1
    #: Longest wait for re-replication, each phase.
    settle_timeout: float = 1200.0


@dataclass
class ProcChurnResult:
    params: dict[str, Any]
    replicas: int
    start_seconds: float = 0.0
    emit_ok: int = 0
    emit_errors: int = 0
    emit_seconds: float = 0.0
    entries: int = 0
    stopped: list[int] = field(default_factory=list)
    stop_exit_codes: list[int] = field(default_factory=list)
    entries_lost: int = 0
    entries_under_replicas: int = 0
    packets_without_copy: int = 0
    found_down: int = 0
    asked_down: int = 0
    query_errors_down: int = 0
    found_down_seconds: float = 0.0
    outage_emit_ok: int = 0
    rereplicate_seconds: float | None = None
    rereplicated_share: float = 0.0
    #: From the first restart until every stopped node answered ``status`` again.
    restart_seconds: float = 0.0
    restarted_kept_store: int = 0
    restarted_store_mismatch: list[int] = field(default_factory=list)
    closest_before: float = 0.0
    restored_seconds: float | None = None
    final_closest: float = 0.0
    found_after: int = 0
    asked_after: int = 0
    query_errors_after: int = 0
    #: Share of both cores busy (all processes on the machine), per phase.
    cpu_busy: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0


@dataclass
class Emitted:
    origin: int
    topic: str
    vector: list[float]
    id: bytes
    keys: list[bytes]


# -- the machine's load ---------------------------------------------------------------


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


class LoadMeter:
    """Share of the machine's CPU time that was busy between marks."""

    def __init__(self) -> None:
        self._last = _cpu_jiffies()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        busy, total = _cpu_jiffies()
        b0, t0 = self._last
        self.phases[phase] = round((busy - b0) / max(1, total - t0), 3)
        self._last = (busy, total)
        log(f"  cpu busy during {phase}: {100 * self.phases[phase]:.0f}% of "
            f"{os.cpu_count()} cores")


# -- the swarm of processes ------------------------------------------------------------


def write_config(root: Path, p: ProcChurnParams) -> Path:
    """The swarm's daemon config: the DHT settings the experiment varies."""
    path = root / "qisd.toml"
    path.write_text(
        "[dht]\n"
        f"rpc_timeout = {p.rpc_timeout}\n"
        f"republish_interval = {p.republish}\n"
        f"origin_republish_interval = {p.republish}\n"
        # Refresh evicts dead contacts in quiet buckets; a quarter of this is its period.
        f"refresh_interval = {4 * p.republish}\n"
    )
    return path


class ProcSwarm:
    """``qisd run`` processes on 127.0.0.1, indexed 0..n-1."""

    #: Every swarm not yet killed, for a signal handler to clean up.
    alive: ClassVar[list[ProcSwarm]] = []

    def __init__(self, root: Path, config: Path, nodes: int) -> None:
        ProcSwarm.alive.append(self)
        self.root = root
        self.nodes = [QisdProcess(root, f"n{i:02d}") for i in range(nodes)]
        self.config = config
        self.ports: dict[int, int] = {}
        self.node_ids: dict[int, bytes] = {}

    def sock(self, i: int) -> Path:
        return self.nodes[i].socket

    def store_path(self, i: int) -> Path:
        return self.nodes[i].store_path

    @property
    def running(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.running]

    async def start(self, i: int, bootstrap: Sequence[int]) -> None:
        node = self.nodes[i]
        node.extra = ("--config", str(self.config),
                      *[a for b in bootstrap if b != i and b in self.ports
                        for a in ("--bootstrap", f"127.0.0.1:{self.ports[b]}")])
        if i in self.ports:
            node.listen = f"127.0.0.1:{self.ports[i]}"
        await trio.to_thread.run_sync(node.start)
        async with AsyncClient(node.socket, timeout=CALL_TIMEOUT) as client:
            status = await client.status()
        port = int(str(status["listen"]).rsplit(":", 1)[1])
        node_id = bytes.fromhex(status["node_id"])
        if (self.ports.setdefault(i, port), self.node_ids.setdefault(i, node_id)) != (
            port, node_id
        ):
            raise RuntimeError(f"node {i} came back as {node_id.hex()[:8]} on port {port}, "
                               f"not {self.node_ids[i].hex()[:8]} on {self.ports[i]}")

    async def start_all(self, seeds: int = 3) -> None:
        first = list(range(min(seeds, len(self.nodes))))
        for i in first:
            await self.start(i, first[:i])
        limiter = trio.CapacityLimiter(4)

        async def one(i: int) -> None:
            async with limiter:
                await self.start(i, first)

        async with trio.open_nursery() as nursery:
            for i in range(len(first), len(self.nodes)):
                nursery.start_soon(one, i)

    async def wait_formed(self, least: int, limit: float = 180.0) -> None:
        """Until every node knows at least ``least`` peers."""
        with trio.fail_after(limit):
            for i in range(len(self.nodes)):
                while True:
                    async with AsyncClient(self.sock(i), timeout=CALL_TIMEOUT) as client:
                        if int((await client.status())["peers"]) >= least:
                            break
                    await trio.sleep(1.0)

    async def stop(self, indexes: Iterable[int]) -> list[int]:
        """SIGTERM, and the exit codes; -9 for one killed after not exiting in 30 s."""
        codes: dict[int, int] = {}

        async def one(i: int) -> None:
            try:
                codes[i] = await trio.to_thread.run_sync(self.nodes[i].stop)
            except subprocess.TimeoutExpired:
                self.nodes[i].kill()
                codes[i] = -9

        async with trio.open_nursery() as nursery:
            for i in indexes:
                nursery.start_soon(one, i)
        return [codes[i] for i in sorted(codes)]

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()
        if self in ProcSwarm.alive:
            ProcSwarm.alive.remove(self)


# -- emitting and looking ---------------------------------------------------------------


def make_items(rng: random.Random, count: int, topics: Sequence[str], dim: int
               ) -> list[dict[str, Any]]:
    return [
        {"topic": rng.choice(topics),
         "vector": [rng.gauss(0, 1) for _ in range(dim)],
         "outcome": {"ok": rng.random() < 0.5, "score": round(rng.random(), 4)}}
        for _ in range(count)
    ]


async def emit_all(swarm: ProcSwarm, rng: random.Random, origins: Sequence[int],
                   items: list[dict[str, Any]], p: ProcChurnParams
                   ) -> tuple[list[Emitted], int]:
    """Emit ``items`` in batches from random ``origins``; the acknowledged packets (with
    the keys each is stored under, from its sketch as nodes compute them) and the
    number of items refused."""
    done: dict[int, Emitted] = {}
    errors = 0
    limiter = trio.CapacityLimiter(p.concurrency)

    async def one(origin: int, start: int, batch: list[dict[str, Any]]) -> None:
        nonlocal errors
        async with limiter, AsyncClient(swarm.sock(origin), timeout=CALL_TIMEOUT) as client:
            try:
                results = await client.emit_many(batch)
            except (ControlError, TimeoutError, OSError) as exc:
                errors += len(batch)
                log(f"  emit_many of {len(batch)} at node {origin} failed: {exc}")
                return
        for n, (item, res) in enumerate(zip(batch, results, strict=True)):
            if "id" not in res:
                errors += 1
                if errors <= 5:
                    log(f"  emit refused at node {origin}: {res.get('error')}")
                continue
            keys = keys_for(DEFAULT_MANIFEST, item["topic"],
                            make_sketch(np.array(item["vector"])).to_array())
            done[start + n] = Emitted(origin, item["topic"], item["vector"],
                                      bytes.fromhex(res["id"]), keys)

    async with trio.open_nursery() as nursery:
        for start in range(0, len(items), p.batch):
            nursery.start_soon(one, rng.choice(origins), start, items[start:start + p.batch])
    return [done[n] for n in sorted(done)], errors


async def count_found_by_query(swarm: ProcSwarm, packets: Sequence[Emitted],
                      asker: Callable[[], int], concurrency: int) -> tuple[int, int]:
    """(found, errors): each packet looked for by ``qisd query`` with its own vector
    from the node ``asker()`` picks (in the packets' order, so a seed repeats it);
    found if its id is among the matches."""
    found = errors = 0
    limiter = trio.CapacityLimiter(concurrency)

    async def one(packet: Emitted, i: int) -> None:
        nonlocal found, errors
        async with limiter, AsyncClient(swarm.sock(i), timeout=CALL_TIMEOUT) as client:
            try:
                reply = await client.query(topic=packet.topic, vector=packet.vector, k=QUERY_K)
            except (ControlError, TimeoutError, OSError) as exc:
                errors += 1
                if errors <= 5:
                    log(f"  query at node {i} failed: {exc}")
                return
        found += any(m["id"] == packet.id.hex() for m in reply["matches"])

    async with trio.open_nursery() as nursery:
        for packet in packets:
            nursery.start_soon(one, packet, asker())
    return found, errors


# -- the experiment ---------------------------------------------------------------------


def _stop_everything(signum: int, _frame: Any) -> None:
    for swarm in list(ProcSwarm.alive):
        swarm.kill_all()
        # os._exit skips the TemporaryDirectory's cleanup: remove the swarm's files here.
        shutil.rmtree(swarm.root, ignore_errors=True)
    os._exit(128 + signum)



async def run_churn(p: ProcChurnParams, root: Path) -> ProcChurnResult:
    rng = random.Random(p.seed)
    replicas = DEFAULT_MANIFEST.replicas
    result = ProcChurnResult(params=asdict(p), replicas=replicas)
    topics = [f"churn-{t}" for t in range(p.topics)]
    swarm = ProcSwarm(root, write_config(root, p), p.nodes)
    load = LoadMeter()
    started = time.monotonic()
    try:
        log(f"starting {p.nodes} qisd processes")
        await swarm.start_all()
        await swarm.wait_formed(min(10, p.nodes - 1))
        t_up = time.monotonic()
        result.start_seconds = t_up - started
        log(f"swarm formed in {result.start_seconds:.0f} s")
        load.mark("start")

        t0 = time.monotonic()
        items = make_items(rng, p.packets, topics, p.dim)
        packets, result.emit_errors = await emit_all(swarm, rng, range(p.nodes), items, p)
        result.emit_ok = len(packets)
        result.emit_seconds = time.monotonic() - t0
        expected: list[Entry] = [(k, e.id) for e in packets for k in e.keys]
        result.entries = len(expected)
        log(f"emitted {result.emit_ok}/{p.packets} in {result.emit_seconds:.0f} s "
            f"({result.emit_errors} refused)")
        load.mark("emit")
        # As in fault_churn.py: stop once every node has run its first republish (1-1.5
        # intervals after it started) and every entry has been through one round.
        stop_at = max(t_up + 1.75 * p.republish, time.monotonic() + 1.1 * p.republish)
        await trio.sleep(max(0.0, stop_at - time.monotonic()))
        load.mark("wait for the first republish")

        # -- stop a share at random ------------------------------------------------
        result.stopped = sorted(rng.sample(range(p.nodes), round(p.stop * p.nodes)))
        result.stop_exit_codes = await swarm.stop(result.stopped)
        t_stop = time.monotonic()
        before = await held_entries(swarm, result.stopped)  # what each held when it stopped
        live = swarm.running
        log(f"stopped {len(result.stopped)} nodes (exit codes {result.stop_exit_codes}): "
            f"{result.stopped}")
        now_held = await held_entries(swarm, live)
        rep = replication(expected, now_held, swarm.node_ids, replicas)
        result.entries_lost = rep.lost
        result.entries_under_replicas = rep.entries - rep.full
        surviving = set().union(*now_held.values())
        result.packets_without_copy = sum(
            1 for e in packets if not any((k, e.id) in surviving for k in e.keys))
        log(f"  {rep.lost} entries and {result.packets_without_copy} packets without a "
            f"copy on a running node; {result.entries_under_replicas} entries under "
            f"{replicas} copies")
        original = [e for e in expected if e in surviving]
        origin = {e.id: e.origin for e in packets}
        settled = trio.Event()

        async def watch_copies() -> None:
            while True:
                held = await held_entries(swarm, live)
                r = replication(original, held, swarm.node_ids, replicas)
                result.rereplicated_share = r.full_share
                log(f"  running nodes: {r.full}/{r.entries} entries with >= {replicas} "
                    f"copies (min {r.min_copies}, lost {r.lost})")
                if 0 < r.entries - r.full <= 3:
                    for line in short_entries(original, held, swarm.node_ids, replicas,
                                              origin):
                        log("    short: " + line)
                if r.full == r.entries:
                    result.rereplicate_seconds = time.monotonic() - t_stop
                    settled.set()
                    return
                await trio.sleep(max(5.0, p.republish / 6))

        async with trio.open_nursery() as nursery:
            watch_scope = trio.CancelScope()

            async def watch_while_down() -> None:
                with watch_scope:
                    await watch_copies()

            nursery.start_soon(watch_while_down)
            t0 = time.monotonic()
            result.asked_down = len(packets)
            result.found_down, result.query_errors_down = await count_found_by_query(
                swarm, packets, lambda: rng.choice(live), p.concurrency)
            result.found_down_seconds = time.monotonic() - t0
            log(f"found {result.found_down}/{len(packets)} by query with {len(result.stopped)} "
                f"down in "
                f"{result.found_down_seconds:.0f} s ({result.query_errors_down} errors)")
            load.mark("queries while down")

            extra_items = make_items(rng, p.outage_packets, topics, p.dim)
            extra, _ = await emit_all(swarm, rng, live, extra_items, p)
            result.outage_emit_ok = len(extra)
            packets += extra
            expected += [(k, e.id) for e in extra for k in e.keys]
            log(f"emitted {result.outage_emit_ok}/{p.outage_packets} during the outage")
            with trio.move_on_after(max(0.0, t_stop + p.settle_timeout - time.monotonic())):
                await settled.wait()
            watch_scope.cancel()
        log(f"re-replicated on the running nodes: {result.rereplicate_seconds}")
        # Re-replication itself overlaps the queries: this phase is what came after them.
        load.mark("outage emits and the wait for re-replication")

        # -- restart them ------------------------------------------------------------
        t0 = time.monotonic()
        for i in result.stopped:
            await swarm.start(i, [b for b in range(3) if b in live])
        result.restart_seconds = time.monotonic() - t0
        back = await held_entries(swarm, result.stopped)
        for i in result.stopped:
            if back[i] >= before[i]:
                result.restarted_kept_store += 1
            else:
                result.restarted_store_mismatch.append(i)
        log(f"restarted in {result.restart_seconds:.0f} s; "
            f"{result.restarted_kept_store}/{len(result.stopped)} kept their store")
        everyone = list(range(p.nodes))
        r = replication(expected, await held_entries(swarm, everyone), swarm.node_ids, replicas)
        result.closest_before = r.closest_share
        while True:
            r = replication(expected, await held_entries(swarm, everyone), swarm.node_ids, replicas)
            result.final_closest = r.closest_share
            log(f"  all nodes: {r.closest_hold}/{r.entries} entries at all {replicas} "
                f"closest nodes")
            if r.closest_hold == r.entries:
                result.restored_seconds = time.monotonic() - t0
                break
            if time.monotonic() - t0 > p.settle_timeout:
                break
            await trio.sleep(max(5.0, p.republish / 6))
        log(f"replication restored: {result.restored_seconds}")
        load.mark("restore after restart")

        result.asked_after = len(packets)
        result.found_after, result.query_errors_after = await count_found_by_query(
            swarm, packets, lambda: rng.randrange(p.nodes), p.concurrency)
        log(f"after restart found {result.found_after}/{len(packets)} "
            f"({result.query_errors_after} errors)")
        load.mark("queries after restart")
        await swarm.stop(swarm.running)
    finally:
        swarm.kill_all()
    result.cpu_busy = load.phases
    result.total_seconds = time.monotonic() - started
    return result


def render(r: ProcChurnResult) -> str:
    p = r.params
    busy = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r.cpu_busy.items())
    rows = [
        ("swarm", f"{p['nodes']} qisd processes, replicas={r.replicas}, 8 tables x 4 bits, "
                  f"{p['topics']} topics, republish every {p['republish']:.0f} s"),
        ("swarm formed", f"{r.start_seconds:.0f} s"),
        ("packets emitted", f"{r.emit_ok:,}/{p['packets']:,} ok in {r.emit_seconds:.0f} s "
                            f"({r.entries:,} key entries; {r.emit_errors} refused)"),
        ("nodes stopped (SIGTERM)", f"{len(r.stopped)} (exit codes "
                                    f"{sorted(set(r.stop_exit_codes))})"),
        ("entries / packets with no copy on running nodes",
         f"{r.entries_lost} / {r.packets_without_copy}"),
        ("entries under replicas right after the stop", f"{r.entries_under_replicas:,}"),
        (f"found by query with own vector, {round(100 * p['stop'])}% down",
         f"{r.found_down:,}/{r.asked_down:,} ({pct(r.found_down, r.asked_down)}; "
         f"{r.query_errors_down} errors) in {r.found_down_seconds:.0f} s"),
        ("packets emitted during the outage", f"{r.outage_emit_ok}/{p['outage_packets']}"),
        ("surviving entries back to replicas copies on running nodes",
         f"{secs(r.rereplicate_seconds)} ({100 * r.rereplicated_share:.2f}% at the end)"),
        ("restarted nodes that kept their store",
         f"{r.restarted_kept_store}/{len(r.stopped)}"),
        ("restarted nodes answering again", f"{r.restart_seconds:.0f} s"),
        ("entries at all replicas closest, once restarted", f"{100 * r.closest_before:.2f}%"),
        ("replicas closest hold every entry, from the first restart",
         f"{secs(r.restored_seconds)} ({100 * r.final_closest:.2f}% at the end)"),
        ("found after restart", f"{r.found_after:,}/{r.asked_after:,} "
                                f"({pct(r.found_after, r.asked_after)}; "
                                f"{r.query_errors_after} errors)"),
        ("cpu busy (all processes on the machine)", busy),
        ("wall time", f"{r.total_seconds:.0f} s"),
    ]
    return table(rows, ("measure", "value"))


def main() -> None:
    params, as_json = parse_params(ProcChurnParams, __doc__)
    # SIGTERM to this script: stop its daemons rather than leave them running.
    signal.signal(signal.SIGTERM, _stop_everything)
    with tempfile.TemporaryDirectory(prefix="qisd-churnp-") as tmp:
        result = trio.run(run_churn, params, Path(tmp))
    print_result(result, render, as_json)


if __name__ == "__main__":
    main()
