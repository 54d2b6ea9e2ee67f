#!/usr/bin/env python3
"""Network faults: 5% loss and 50 ms delay on every datagram, then a partition and its heal.

Real qisd DHT nodes with SQLite stores on 127.0.0.1 over real UDP, all in this one
process. This kernel has no ``tc netem``, so the impairment sits in each node's
datagram path instead (``faultlib.ImpairedEndpoint``): every datagram a node sends
is dropped with probability ``--loss`` and otherwise handed to the kernel ``--delay``
seconds later (order kept). A round trip crosses it twice: an RPC is lost with
probability 1 - (1 - loss)^2 (9.75% at 5%) and takes at least 2 x delay.

1. ``--nodes`` nodes join and ``--packets`` packets are put, all under impairment.
2. ``--queries`` queries from random nodes, each with a packet's own vector, as
   ``qisd query`` asks (all multi-probe keys, top ``k`` by similarity): a query
   succeeds if that packet is among the answers.
3. The swarm is cut in two halves (datagrams between them dropped) for
   ``--partition`` seconds; each half puts ``--split-packets`` packets meanwhile.
4. Heal: the time until every packet (before and during the partition) is found by
   a node of each half, by its own vector, is measured.

``--partition 0`` stops after step 2 (e.g. to compare ``--rpc-retries 0`` and 1).

    .venv/bin/python scripts/fault_network.py              # 30 nodes, 600 packets
    .venv/bin/python scripts/fault_network.py --nodes 16 --packets 100 --queries 200
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
    Impairment,
    LocalSwarm,
    dht_config,
    log,
    make_packets,
    parse_params,
    pct,
    print_result,
    put_all,
    secs,
    table,
)
from faultmeasure import is_found

from qisd.manifest import Manifest
from qisd.packet import OutcomePacket


@dataclass
class NetworkParams:
    nodes: int = 30
    packets: int = 600
    queries: int = 1000
    loss: float = 0.05
    delay: float = 0.05
    k: int = 10
    partition: float = 60.0
    split_packets: int = 50
    rpc_timeout: float = 1.0
    rpc_retries: int = 1
    refresh: float = 40.0
    republish: float = 40.0
    failure_backoff: float = 5.0
    seed: int = 1
    concurrency: int = 8
    heal_timeout: float = 300.0


@dataclass
class NetworkResult:
    params: dict[str, Any]
    put_ok: int = 0
    queries: int = 0
    query_ok: int = 0
    query_p50_ms: float = 0.0
    query_p99_ms: float = 0.0
    query_resent: int = 0
    datagrams: int = 0
    dropped_by_loss: int = 0
    split_put_ok: int = 0
    split_found_own_side: int = 0
    split_asked_own_side: int = 0
    split_found_other_side: int = 0
    split_asked_other_side: int = 0
    cut_datagrams: int = 0
    heal_seconds: float | None = None
    found_after_heal: dict[str, int] = field(default_factory=dict)
    asked_after_heal: int = 0
    total_seconds: float = 0.0


async def run_network(p: NetworkParams, root: Path) -> NetworkResult:
    rng = random.Random(p.seed)
    manifest = Manifest()
    impairment = Impairment(loss=p.loss, delay=p.delay, seed=p.seed)
    result = NetworkResult(params=asdict(p))
    started = trio.current_time()
    topics = ["net-a", "net-b"]

    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(
            nursery, root,
            config=dht_config(rpc_timeout=p.rpc_timeout, republish=p.republish,
                              refresh=p.refresh, failure_backoff=p.failure_backoff,
                              rpc_retries=p.rpc_retries),
            manifest=manifest,
            impairment=impairment, seed=p.seed,
        )
        log(f"forming {p.nodes} nodes under {p.loss:.0%} loss, {p.delay * 1000:.0f} ms delay")
        await swarm.form(p.nodes)

        async def put_from(origins: list[int], count: int) -> tuple[list[OutcomePacket], int]:
            made = make_packets(swarm, rng, origins, count, topics)
            return [pk for _, pk in made], await put_all(swarm, made, p.concurrency * 2)

        packets, result.put_ok = await put_from(list(range(p.nodes)), p.packets)
        log(f"put {result.put_ok}/{p.packets}")

        # -- queries under loss and delay ---------------------------------------
        impairment.sent = impairment.lost = 0
        resent_before = swarm.resent()
        latencies: list[float] = []
        limiter = trio.CapacityLimiter(p.concurrency)

        async def query(packet: OutcomePacket) -> None:
            asker = rng.randrange(p.nodes)
            async with limiter:
                t0 = trio.current_time()
                ok = await is_found(swarm.sites[asker].node, manifest, packet, probe=True, m=p.k)
                latencies.append(trio.current_time() - t0)
            result.queries += 1
            result.query_ok += ok

        async with trio.open_nursery() as inner:
            for _ in range(p.queries):
                inner.start_soon(query, rng.choice(packets))
        latencies.sort()
        result.query_p50_ms = 1000 * latencies[len(latencies) // 2]
        result.query_p99_ms = 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        result.datagrams, result.dropped_by_loss = impairment.sent, impairment.lost
        result.query_resent = swarm.resent() - resent_before
        log(f"queries {result.query_ok}/{result.queries} ok, p50 {result.query_p50_ms:.0f} ms, "
            f"p99 {result.query_p99_ms:.0f} ms; {impairment.lost}/{impairment.sent} datagrams lost")

        if p.partition <= 0:
            await swarm.stop_all()
            nursery.cancel_scope.cancel()
            result.total_seconds = trio.current_time() - started
            return result

        # -- partition ------------------------------------------------------------
        order = list(range(p.nodes))
        rng.shuffle(order)
        halves = [sorted(order[: p.nodes // 2]), sorted(order[p.nodes // 2 :])]
        impairment.partition([[swarm.address(i) for i in h] for h in halves])
        cut_at = trio.current_time()
        log(f"partitioned: {halves[0]} | {halves[1]}")
        split: list[tuple[int, OutcomePacket]] = []
        for side, half in enumerate(halves):
            made, ok = await put_from(half, p.split_packets)
            result.split_put_ok += ok
            split += [(side, pk) for pk in made]

        async def found_from(half: list[int], packet: OutcomePacket) -> bool:
            return await is_found(
                swarm.sites[rng.choice(half)].node, manifest, packet, probe=True, m=p.k
            )

        async def split_check(side: int, packet: OutcomePacket) -> None:
            async with limiter:
                own = await found_from(halves[side], packet)
                other = await found_from(halves[1 - side], packet)
            result.split_asked_own_side += 1
            result.split_found_own_side += own
            result.split_asked_other_side += 1
            result.split_found_other_side += other

        async with trio.open_nursery() as inner:
            for side, packet in split:
                inner.start_soon(split_check, side, packet)
        log(f"during the partition: {result.split_found_own_side}/{result.split_asked_own_side}"
            f" found on their own side, {result.split_found_other_side}/"
            f"{result.split_asked_other_side} on the other")
        await trio.sleep(max(0.0, p.partition - (trio.current_time() - cut_at)))
        result.cut_datagrams = impairment.cut
        impairment.heal()
        healed_at = trio.current_time()
        log("healed")

        everything = packets + [pk for _, pk in split]
        pending = {side: list(everything) for side in (0, 1)}

        async def sweep() -> bool:
            for side in (0, 1):
                still: list[OutcomePacket] = []
                lim = trio.CapacityLimiter(p.concurrency)

                async def check(
                    packet: OutcomePacket,
                    side: int = side,
                    lim: trio.CapacityLimiter = lim,
                    still: list[OutcomePacket] = still,
                ) -> None:
                    async with lim:
                        if not await found_from(halves[side], packet):
                            still.append(packet)

                async with trio.open_nursery() as inner:
                    for packet in pending[side]:
                        inner.start_soon(check, packet)
                pending[side] = still
            log(f"  after heal: {len(pending[0])} | {len(pending[1])} packets not yet found")
            return not pending[0] and not pending[1]

        sweeps = 0
        while trio.current_time() - healed_at < p.heal_timeout:
            sweeps += 1
            if await sweep():
                result.heal_seconds = trio.current_time() - healed_at
                break
            await trio.sleep(2.0)
        # A full pass from both sides is the one reported: the first sweep was one
        # if it found everything; otherwise ask for every packet once more.
        result.asked_after_heal = len(everything)
        if sweeps != 1 or result.heal_seconds is None:
            for side in (0, 1):
                pending[side] = list(everything)
            await sweep()
        result.found_after_heal = {
            "side_a": len(everything) - len(pending[0]),
            "side_b": len(everything) - len(pending[1]),
        }
        await swarm.stop_all()
        nursery.cancel_scope.cancel()
    result.total_seconds = trio.current_time() - started
    return result


def render(r: NetworkResult) -> str:
    p = r.params
    rows = [
        ("swarm", f"{p['nodes']} nodes, rpc_timeout {p['rpc_timeout']} s, rpc_retries "
                  f"{p['rpc_retries']}, refresh "
                  f"{p['refresh']:.0f} s, republish {p['republish']:.0f} s"),
        ("impairment", f"{p['loss']:.0%} loss + {p['delay'] * 1000:.0f} ms delay per datagram"),
        ("packets put", f"{r.put_ok}/{p['packets']}"),
        ("queries that found their packet (top-k by own vector)",
         f"{r.query_ok}/{r.queries} ({pct(r.query_ok, r.queries)})"),
        ("query latency p50 / p99", f"{r.query_p50_ms:.0f} / {r.query_p99_ms:.0f} ms"),
        ("datagrams dropped by the loss", f"{r.dropped_by_loss}/{r.datagrams}"),
        ("requests resent while unanswered", str(r.query_resent)),
    ]
    if p["partition"] > 0:
        rows += _partition_rows(r)
    rows.append(("wall time", f"{r.total_seconds:.0f} s"))
    return table(rows, ("measure", "value"))


def _partition_rows(r: NetworkResult) -> list[tuple[str, str]]:
    p = r.params
    return [
        ("partition", f"two halves for {p['partition']:.0f} s, {r.cut_datagrams} datagrams cut"),
        ("packets put during the partition", f"{r.split_put_ok}/{2 * p['split_packets']}"),
        ("  found on their own side", f"{r.split_found_own_side}/{r.split_asked_own_side}"),
        ("  found across the cut", f"{r.split_found_other_side}/{r.split_asked_other_side}"),
        ("every packet found from both halves after heal", secs(r.heal_seconds)),
        ("found after heal, half A / half B",
         f"{r.found_after_heal.get('side_a', 0)}/{r.asked_after_heal} / "
         f"{r.found_after_heal.get('side_b', 0)}/{r.asked_after_heal}"),
    ]


def main() -> None:
    params, as_json = parse_params(NetworkParams, __doc__)
    with tempfile.TemporaryDirectory(prefix="qisd-net-") as tmp:
        result = trio.run(run_network, params, Path(tmp))
    print_result(result, render, as_json)


if __name__ == "__main__":
    main()
