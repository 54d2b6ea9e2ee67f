#!/usr/bin/env python3
"""What republish costs, interval after interval, with and without paper 2.5's skip rule.

Real qisd DHT nodes (SQLite stores, real UDP on 127.0.0.1, one process): ``--nodes``
nodes join, ``--packets`` packets are put from random nodes, then the nodes' own
republish timers run for ``--intervals`` intervals of ``--interval`` seconds (first
at a random phase, then every interval +-10%, as in production). Per interval: the
store RPCs and bytes the swarm sent, and the copies each (key, packet) entry has.
Two swarms built from the same seed (same ids, packets, placements) differ only in
the rule:

- ``qisd``: a replica holder of a key leaves out the entries another holder of the
  key stored at it within the interval (that holder's republish);
- ``no skip``: the same, but every replica holder re-places every entry of its keys
  each interval (the skip rule switched off).

The origins' own republish runs too, at the same interval (as the defaults have it:
both hourly), the same in both modes (one placement per key for an origin's
packets); it is what restores an entry that a put under load left only on nodes
outside the key's closest, where no replica holder has it. The stock
``kademlia`` package has no packets to compare on; its values already follow the
skip rule (a store refreshes a value's timestamp, and only values older than the
interval are set again), as do qisd's stock values.

    .venv/bin/python scripts/bench_republish.py            # 20 nodes, 400 packets, 6 x 20 s
    .venv/bin/python scripts/bench_republish.py --nodes 10 --packets 40 --interval 4
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultlib import (
    LocalSwarm,
    dht_config,
    log,
    make_packets,
    packet_keys,
    parse_params,
    print_result,
    put_all,
    table,
)
from faultmeasure import held_entries, replication

from qisd.dht.recent import RecentStores
from qisd.manifest import Manifest

DAY = 86400.0


@dataclass
class RepublishParams:
    nodes: int = 20
    packets: int = 400
    topics: int = 4
    interval: float = 20.0
    intervals: int = 6
    seed: int = 1


@dataclass
class Sample:
    """One interval (or the origins' round) over the whole swarm."""

    store_rpcs: int = 0
    bytes_out: int = 0
    placed: int = 0
    skipped: int = 0
    cpu_seconds: float = 0.0
    mean_copies: float = 0.0
    min_copies: int = 0
    max_copies: int = 0
    at_closest: float = 0.0


@dataclass
class RuleRun:
    rule: str
    after_put: Sample = field(default_factory=Sample)
    intervals: list[Sample] = field(default_factory=list)


@dataclass
class RepublishResult:
    params: dict[str, Any]
    entries: int = 0
    runs: list[RuleRun] = field(default_factory=list)


@contextmanager
def skip_rule_off() -> Iterator[None]:
    """No entry ever counts as refreshed: every holder re-places all it holds."""
    fresh = RecentStores.fresh
    RecentStores.fresh = lambda *_: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        RecentStores.fresh = fresh  # type: ignore[method-assign]


def counters(swarm: LocalSwarm) -> Sample:
    s = Sample()
    for site in swarm.sites.values():
        st = site.node.statistics()
        s.store_rpcs += sum(n for (m, way, _), n in st.rpcs.items()
                            if m == "store_packets" and way == "out")
        s.bytes_out += st.bytes_out
        s.placed += st.republished
        s.skipped += st.republish_skipped
    return s


async def sample(swarm: LocalSwarm, start: Sample, cpu: float, expected: list[Any],
                 ids: dict[int, bytes], replicas: int) -> Sample:
    end = counters(swarm)
    held = await held_entries(swarm, swarm.running)
    rep = replication(expected, held, ids, replicas)
    copies: dict[Any, int] = {}
    for entries in held.values():
        for e in entries:
            copies[e] = copies.get(e, 0) + 1
    return Sample(
        store_rpcs=end.store_rpcs - start.store_rpcs,
        bytes_out=end.bytes_out - start.bytes_out,
        placed=end.placed - start.placed,
        skipped=end.skipped - start.skipped,
        cpu_seconds=time.process_time() - cpu,
        mean_copies=rep.mean_copies,
        min_copies=rep.min_copies,
        max_copies=max(copies.values(), default=0),
        at_closest=rep.closest_share,
    )


async def run_rule(p: RepublishParams, root: Path, rule: str) -> tuple[RuleRun, int]:
    rng = random.Random(p.seed)
    manifest = Manifest()
    config = dht_config(rpc_timeout=1.0, republish=p.interval, refresh=DAY,
                        failure_backoff=30.0, origin_republish=p.interval)
    run = RuleRun(rule=rule)
    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery, root, config=config, manifest=manifest, seed=p.seed)
        await swarm.form(p.nodes)
        ids = {i: swarm.identities[i].node_id for i in range(p.nodes)}
        topics = [f"rep-{t}" for t in range(p.topics)]
        batch = make_packets(swarm, rng, list(range(p.nodes)), p.packets, topics)
        start, cpu = counters(swarm), time.process_time()
        await put_all(swarm, batch, 16)
        expected = [(k, pk.id) for _, pk in batch for k in packet_keys(manifest, pk)]
        run.after_put = await sample(swarm, start, cpu, expected, ids, manifest.replicas)
        for n in range(p.intervals):
            start, cpu = counters(swarm), time.process_time()
            await trio.sleep(p.interval)
            run.intervals.append(await sample(swarm, start, cpu, expected, ids,
                                              manifest.replicas))
            log(f"{rule} interval {n + 1}: {run.intervals[-1]}")
        await swarm.stop_all()
        nursery.cancel_scope.cancel()
    return run, len(expected)


async def run(p: RepublishParams) -> RepublishResult:
    result = RepublishResult(params=vars(p).copy())
    for rule in ("no skip", "qisd"):
        with tempfile.TemporaryDirectory(prefix="qisd-republish-") as tmp:
            if rule == "no skip":
                with skip_rule_off():
                    got, result.entries = await run_rule(p, Path(tmp), rule)
            else:
                got, result.entries = await run_rule(p, Path(tmp), rule)
        result.runs.append(got)
    return result


def steady(run: RuleRun) -> Sample:
    """Medians over the intervals after the first (the first is each node's first
    republish at a random phase; the rest is the steady state)."""
    xs = run.intervals[1:] or run.intervals
    return Sample(
        store_rpcs=int(statistics.median(x.store_rpcs for x in xs)),
        bytes_out=int(statistics.median(x.bytes_out for x in xs)),
        placed=int(statistics.median(x.placed for x in xs)),
        skipped=int(statistics.median(x.skipped for x in xs)),
        cpu_seconds=statistics.median(x.cpu_seconds for x in xs),
        mean_copies=xs[-1].mean_copies,
        min_copies=xs[-1].min_copies,
        max_copies=xs[-1].max_copies,
        at_closest=xs[-1].at_closest,
    )


def render(r: RepublishResult) -> str:
    p = r.params
    head = (f"{p['nodes']} nodes, {p['packets']:,} packets ({r.entries:,} key entries), "
            f"republish every {p['interval']:.0f} s, {p['intervals']} intervals\n\n")
    header = ("rule", "interval", "store RPCs", "MB sent", "entries placed", "skipped",
              "CPU s", "copies/entry mean (min-max)", "at all 6 closest")

    def row(rule: str, when: str, x: Sample) -> tuple[str, ...]:
        return (rule, when, f"{x.store_rpcs:,}", f"{x.bytes_out / 1e6:.1f}", f"{x.placed:,}",
                f"{x.skipped:,}", f"{x.cpu_seconds:.1f}",
                f"{x.mean_copies:.2f} ({x.min_copies}-{x.max_copies})",
                f"{100 * x.at_closest:.1f}%")

    per_interval = []
    for run in r.runs:
        per_interval.append(row(run.rule, "the put", run.after_put))
        for n, x in enumerate(run.intervals, 1):
            per_interval.append(row(run.rule, str(n), x))
    summary = [row(run.rule, "median of 2..", steady(run)) for run in r.runs]
    ratio = ""
    if len(r.runs) == 2 and steady(r.runs[0]).store_rpcs:
        a, b = steady(r.runs[0]), steady(r.runs[1])
        ratio = (f"\nqisd / no skip, per interval: store RPCs "
                 f"{b.store_rpcs / a.store_rpcs:.2f}, bytes "
                 f"{b.bytes_out / max(1, a.bytes_out):.2f}\n")
    return (head + table(per_interval, header) + "\n\n"
            + table(summary, header) + "\n" + ratio)


def main() -> None:
    params, as_json = parse_params(RepublishParams, __doc__)
    result = trio.run(run, params)
    print_result(result, render, as_json)


if __name__ == "__main__":
    main()
