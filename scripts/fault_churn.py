#!/usr/bin/env python3
"""Churn: stop a share of a swarm's nodes at random, check nothing is lost, restart them.

Real qisd DHT nodes (the production node code, each with its own SQLite store and
state directory) on 127.0.0.1 over real UDP, all in this one process:

1. ``--nodes`` nodes join; ``--packets`` packets are put from random nodes (each at
   the ``replicas`` closest nodes of each of its LSH keys).
2. Once every node has run its first republish, ``--stop`` of the nodes (at random)
   stop: socket closed, store closed.
   Every packet is then looked for from a random running node, **by its exact
   keys** (one ``find_packets`` per key until one answer holds it); a sample is also
   looked for **by a query with its own vector** (all multi-probe keys, top 5 by
   similarity, as ``qisd query`` does). While they are down, republish (interval
   ``--republish``) brings every surviving (key, packet) entry back to ``replicas`` copies on
   the running nodes: the time that takes is measured. ``--outage-packets`` more
   packets are put meanwhile.
3. The stopped nodes restart on their old ports with their stores and routing
   tables; each must hold exactly the packets it held when it stopped. The time
   until the ``replicas`` closest nodes of every key hold every packet of that key
   (outage packets included: hand-off and republish must bring them) is measured,
   then every packet is looked for again.

    .venv/bin/python scripts/fault_churn.py                      # 50 nodes, 5,000 packets
    .venv/bin/python scripts/fault_churn.py --nodes 20 --packets 400 --republish 10

Prints a Markdown table (the one in docs/reliability.md); ``--json`` prints the raw
figures instead.
"""

from __future__ import annotations

import random
import sys
import tempfile
from dataclasses import asdict, dataclass, field
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
    pct,
    print_result,
    put_all,
    secs,
    table,
)
from faultmeasure import Entry, count_found, held_entries, replication, short_entries, wait_until

from qisd.manifest import Manifest


@dataclass
class ChurnParams:
    nodes: int = 50
    packets: int = 5000
    stop: float = 0.3
    outage_packets: int = 250
    topics: int = 4
    republish: float = 60.0
    rpc_timeout: float = 1.0
    probe_sample: int = 500
    put_concurrency: int = 32
    seed: int = 1
    #: Longest wait for re-replication, each phase.
    settle_timeout: float = 600.0


@dataclass
class ChurnResult:
    params: dict[str, Any]
    replicas: int
    put_ok: int = 0
    put_seconds: float = 0.0
    entries: int = 0
    stopped: list[int] = field(default_factory=list)
    holders_stopped: int = 0
    #: After the stop, on the running nodes.
    entries_lost: int = 0
    entries_under_replicas: int = 0
    found_exact: int = 0
    asked_exact: int = 0
    found_probe: int = 0
    asked_probe: int = 0
    outage_put_ok: int = 0
    rereplicate_seconds: float | None = None
    restarted_kept_store: int = 0
    restarted_store_mismatch: list[int] = field(default_factory=list)
    closest_before: float = 0.0
    restored_seconds: float | None = None
    final_closest: float = 0.0
    final_full: float = 0.0
    found_after: int = 0
    asked_after: int = 0
    total_seconds: float = 0.0


async def run_churn(p: ChurnParams, root: Path) -> ChurnResult:
    rng = random.Random(p.seed)
    manifest = Manifest()
    # Refresh evicts dead contacts in quiet buckets; a quarter of this is its period.
    config = dht_config(rpc_timeout=p.rpc_timeout, republish=p.republish,
                        refresh=4 * p.republish, failure_backoff=min(30.0, p.republish / 2))
    started = trio.current_time()
    result = ChurnResult(params=asdict(p), replicas=manifest.replicas)
    topics = [f"churn-{t}" for t in range(p.topics)]

    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery, root, config=config, manifest=manifest, seed=p.seed)
        log(f"forming a swarm of {p.nodes} nodes")
        await swarm.form(p.nodes)
        ids = {i: swarm.identities[i].node_id for i in range(p.nodes)}

        t0 = trio.current_time()
        batch = make_packets(swarm, rng, list(range(p.nodes)), p.packets, topics)
        result.put_ok = await put_all(swarm, batch, p.put_concurrency)
        result.put_seconds = trio.current_time() - t0
        packets = [pk for _, pk in batch]
        expected: list[Entry] = [(k, pk.id) for pk in packets for k in packet_keys(manifest, pk)]
        result.entries = len(expected)
        log(f"put {result.put_ok}/{p.packets} packets in {result.put_seconds:.0f} s")
        # One round of republish before the stop (the first comes 1-1.5 intervals
        # after a node starts): a put under load can end short of ``replicas``
        # copies, and the holders' first republish is what brings them up. A swarm
        # stopped before that measures the put under load, not churn.
        await trio.sleep(max(0.0, started + 1.75 * p.republish - trio.current_time()))

        # -- stop a share at random ------------------------------------------------
        before = await held_entries(swarm, range(p.nodes))
        result.stopped = sorted(rng.sample(range(p.nodes), round(p.stop * p.nodes)))
        result.holders_stopped = sum(1 for i in result.stopped if before[i])
        kept = {i: before[i] for i in result.stopped}
        for i in result.stopped:
            await swarm.stop(i)
        t_stop = trio.current_time()
        live = swarm.running
        log(f"stopped {len(result.stopped)} nodes: {result.stopped}")
        now_held = await held_entries(swarm, live)
        rep = replication(expected, now_held, ids, manifest.replicas)
        result.entries_lost = rep.lost
        result.entries_under_replicas = rep.entries - rep.full

        def random_live(_: int) -> Any:
            return swarm.sites[rng.choice(live)].node

        # Watch the copies on the running nodes come back while the queries run: of
        # the entries some running node still holds (an entry whose every holder
        # stopped can come back only from its origin or the restart; counted above).
        surviving = set().union(*now_held.values())
        origin = {pk.id: i for i, pk in batch}
        original = [e for e in expected if e in surviving]
        settled = trio.Event()
        poll = max(2.0, p.republish / 6)

        async def watch_copies() -> None:
            while True:
                held = await held_entries(swarm, live)
                r = replication(original, held, ids, manifest.replicas)
                log(f"  running nodes: {r.full}/{r.entries} entries with >= "
                    f"{manifest.replicas} copies (min {r.min_copies}, lost {r.lost})")
                if 0 < r.entries - r.full <= 3:
                    for line in short_entries(original, held, ids, manifest.replicas, origin):
                        log("    short: " + line)
                if r.full == r.entries:
                    result.rereplicate_seconds = trio.current_time() - t_stop
                    settled.set()
                    return
                await trio.sleep(poll)

        # Measured while the others are down only: the restart ends the watch.
        watch_scope = trio.CancelScope()

        async def watch_while_down() -> None:
            with watch_scope:
                await watch_copies()

        nursery.start_soon(watch_while_down)
        t0 = trio.current_time()
        missing = await count_found(packets, random_live, manifest)
        result.asked_exact, result.found_exact = len(packets), len(packets) - len(missing)
        log(f"found {result.found_exact}/{len(packets)} by exact keys "
            f"in {trio.current_time() - t0:.0f} s")
        sample = rng.sample(packets, min(p.probe_sample, len(packets)))
        missing = await count_found(sample, random_live, manifest, probe=True)
        result.asked_probe, result.found_probe = len(sample), len(sample) - len(missing)
        log(f"found {result.found_probe}/{len(sample)} by query with own vector")

        extra = make_packets(swarm, rng, live, p.outage_packets, topics)
        result.outage_put_ok = await put_all(swarm, extra, p.put_concurrency)
        packets += [pk for _, pk in extra]
        expected += [(k, pk.id) for _, pk in extra for k in packet_keys(manifest, pk)]
        log(f"put {result.outage_put_ok}/{len(extra)} packets during the outage")
        with trio.move_on_after(p.settle_timeout):
            await settled.wait()
        watch_scope.cancel()
        log(f"re-replicated on the running nodes: {result.rereplicate_seconds}")
        if result.rereplicate_seconds is None:
            held = await held_entries(swarm, live)
            for line in short_entries(original, held, ids, manifest.replicas, origin):
                log("  short: " + line)

        # -- restart them ------------------------------------------------------------
        for i in result.stopped:
            await swarm.start(i, port=swarm.ports[i])
        t0 = trio.current_time()
        back = await held_entries(swarm, result.stopped)
        for i in result.stopped:
            if back[i] >= kept[i]:
                result.restarted_kept_store += 1
            else:
                result.restarted_store_mismatch.append(i)
        log(f"restarted; {result.restarted_kept_store}/{len(result.stopped)} kept their store")
        everyone = list(range(p.nodes))
        held = await held_entries(swarm, everyone)
        result.closest_before = replication(expected, held, ids, manifest.replicas).closest_share

        async def restored() -> bool:
            held = await held_entries(swarm, everyone)
            r = replication(expected, held, ids, manifest.replicas)
            log(f"  all nodes: {r.closest_hold}/{r.entries} entries at all {manifest.replicas} "
                f"closest nodes")
            return r.closest_hold == r.entries

        result.restored_seconds = await wait_until(
            restored, limit=p.settle_timeout, every=max(2.0, p.republish / 6)
        )
        log(f"replication restored: {result.restored_seconds}")
        held = await held_entries(swarm, everyone)
        final = replication(expected, held, ids, manifest.replicas)
        result.final_closest, result.final_full = final.closest_share, final.full_share

        def random_any(_: int) -> Any:
            return swarm.sites[rng.randrange(p.nodes)].node

        missing = await count_found(packets, random_any, manifest)
        result.asked_after, result.found_after = len(packets), len(packets) - len(missing)
        log(f"after restart found {result.found_after}/{len(packets)}")
        await swarm.stop_all()
        nursery.cancel_scope.cancel()
    result.total_seconds = trio.current_time() - started
    return result


def render(r: ChurnResult) -> str:
    p = r.params
    rows = [
        ("swarm", f"{p['nodes']} nodes, replicas={r.replicas}, 8 tables x 4 bits, "
                  f"{p['topics']} topics, republish every {p['republish']:.0f} s"),
        ("packets put", f"{r.put_ok:,}/{p['packets']:,} ok in {r.put_seconds:.0f} s "
                        f"({r.entries:,} key entries)"),
        ("nodes stopped", f"{len(r.stopped)} ({r.holders_stopped} holding packets)"),
        ("entries with no copy on running nodes", f"{r.entries_lost}"),
        ("entries under replicas right after the stop", f"{r.entries_under_replicas:,}"),
        ("found by exact keys, 30% down", f"{r.found_exact:,}/{r.asked_exact:,} "
                                          f"({pct(r.found_exact, r.asked_exact)})"),
        ("found by query with own vector, 30% down",
         f"{r.found_probe:,}/{r.asked_probe:,} ({pct(r.found_probe, r.asked_probe)})"),
        ("packets put during the outage", f"{r.outage_put_ok}/{p['outage_packets']}"),
        ("surviving entries back to replicas copies on running nodes",
         secs(r.rereplicate_seconds)),
        ("restarted nodes that kept their store",
         f"{r.restarted_kept_store}/{len(r.stopped)}"),
        ("entries at all replicas closest, at restart", f"{100 * r.closest_before:.2f}%"),
        ("replicas closest hold every entry after restart", secs(r.restored_seconds)),
        ("found after restart", f"{r.found_after:,}/{r.asked_after:,} "
                                f"({pct(r.found_after, r.asked_after)})"),
        ("wall time", f"{r.total_seconds:.0f} s"),
    ]
    return table(rows, ("measure", "value"))


def main() -> None:
    params, as_json = parse_params(ChurnParams, __doc__)
    with tempfile.TemporaryDirectory(prefix="qisd-churn-") as tmp:
        result = trio.run(run_churn, params, Path(tmp))
    print_result(result, render, as_json)


if __name__ == "__main__":
    main()
