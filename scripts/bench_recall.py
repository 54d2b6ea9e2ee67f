#!/usr/bin/env python3
"""Retrieval quality of qisd's query path on real vectors, over a real swarm.

A swarm of qisd DHT nodes (``open_node``, real UDP on 127.0.0.1, one SQLite store
each, all in one trio run) holds one signed outcome packet per vector, signed by one of
the swarm's sites in turn. For held-out query vectors the benchmark runs the query path
of ``NodeService.query`` (qisd/daemon/service.py): normalise, quantize, multi-probe
``probe_keys`` up to a budget, ``node.find_packets(keys, sketch, 10)`` over the DHT,
and scores the top 10 against exact brute-force cosine kNN over the original
(float) vectors of every packet in the swarm: recall@10.

For each LSH shape (tables x bits) a fresh swarm is built with that manifest (the
swarm id changes with the parameters). Packets are placed grouped by key with the
node's own ``place`` (the lookup whose query is ``store_packets``, as ``put_packet``
uses for each key), so every key's packets sit at its ``replicas`` closest nodes.

The first table has the shapes measured on the swarm, per row:

* ``swarm``      mean recall@10 over the queries, through the swarm;
* ``+-2se``      two standard errors of that mean (over the queries);
* ``model``      the same computed on the packets' buckets directly (what LSH plus
                 per-key top-10 promises with no network loss): equal to ``swarm``
                 unless the DHT lost something;
* ``p50/p99 ms`` query latency (wall clock of ``find_packets``; all nodes share this
                 one process and its CPU, so it is mostly the CPU time of the swarm,
                 not network time);
* ``KB/query``   bytes sent by all nodes during the query (every datagram once);
* ``querier KB`` bytes the querying node sent and received;
* ``datagrams``  datagrams sent by all nodes per query (requests + replies);
* ``bucket``     mean packets per key;
* ``scan``       packets the responsible nodes rank per query, as a share of the
                 topic (each probed bucket once; every replica asked ranks it again).

The second table is the bucket model over a wider grid of shapes and budgets (cheap,
no network), which the plot draws as lines; the swarm's figures are its dots. The
defaults check at the end: per data set the cheapest shape whose recall minus two
standard errors reaches 0.95 within 32 lookups (fewest lookups, then fewest tables,
then most bits), on the swarm and in the model, and how the manifest's defaults fare.

Datasets: ``sentences``: real 384-d sentence embeddings (all-MiniLM-L6-v2 over
standard-library docstring sentences, made by ``scripts/make_embeddings.py``, stored
in ``scripts/data/sentences-384.npz``); ``digits``: scikit-learn's bundled 8x8 digits
(64-d, standardised).

    .venv/bin/python scripts/bench_recall.py               # full grid (~11 min on 2 cores)
    .venv/bin/python scripts/bench_recall.py --smoke       # tiny, < 1 minute
    .venv/bin/python scripts/bench_recall.py --json out.json --plot docs/recall.png
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ROOT / "scripts" / "data" / "sentences-384.npz"
TOPIC = "bench"
K = 10

FloatArray = npt.NDArray[np.float64]


@dataclass
class Row:
    dataset: str
    tables: int
    bits: int
    budget: int
    model: float
    bucket: float
    queries: int
    packets: int
    #: Mean share of the topic's packets the responsible nodes rank per query (each
    #: probed bucket counted once; every replica asked ranks it again).
    scan: float = 0.0
    #: Two standard errors of the mean recall over the queries (of ``recall`` where
    #: the shape ran on a swarm, else of ``model``).
    se2: float = 0.0
    #: Measured through the swarm (None where this shape was not run on one).
    recall: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    kb_per_query: float | None = None
    querier_kb: float | None = None
    datagrams: float | None = None
    nodes: int | None = None


# -- data --------------------------------------------------------------------------


def load_dataset(name: str) -> FloatArray:
    """Rows of the data set as float64 (not yet normalised)."""
    if name == "sentences":
        with np.load(SENTENCES) as data:
            return np.asarray(data["vectors"], dtype=np.float64)
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise SystemExit("digits needs scikit-learn: pip install -e '.[bench]'") from None

        x = load_digits().data.astype(np.float64)
        # Standardise (constant pixels stay 0) so cosine compares shapes, not ink.
        sd = x.std(axis=0)
        return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    raise SystemExit(f"--datasets: unknown data set {name!r} (sentences, digits)")


def split(x: FloatArray, queries: int, packets: int, seed: int) -> tuple[FloatArray, FloatArray]:
    """Held-out queries and the stored rows, disjoint, both unit-normalised."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    order = np.random.default_rng(seed).permutation(len(unit))
    q = unit[order[:queries]]
    stored = unit[order[queries:]]
    return q, stored[:packets] if packets else stored


def exact_knn(q: FloatArray, stored: FloatArray, k: int) -> list[set[int]]:
    sims = q @ stored.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return [set(map(int, row)) for row in top]


@dataclass
class Prepared:
    """One data set ready for every shape: query and stored sketches, ground truth."""

    name: str
    queries: list[tuple[FloatArray, Any]]  # (unit vector, Sketch)
    sketches: list[Any]
    sketch_mat: FloatArray
    truth: list[set[int]]


def prepare(name: str, queries: int, packets: int, seed: int) -> Prepared:
    from qisd.sketch import normalize, quantize

    x = load_dataset(name)
    if not 0 < queries <= len(x) - K or packets < 0:
        raise SystemExit(f"--queries/--packets: {name} has {len(x)} rows; need 1 <= queries "
                         f"<= {len(x) - K} and packets >= 0")
    q, stored = split(x, queries, packets, seed)
    if len(stored) < K:
        raise SystemExit(f"--packets: need at least {K} stored rows, got {len(stored)}")
    sketches = [quantize(normalize(x)) for x in stored]
    return Prepared(
        name=name,
        queries=[(normalize(v), quantize(normalize(v))) for v in q],
        sketches=sketches,
        sketch_mat=np.array([s.to_array() for s in sketches]),
        # Ground truth on the original float vectors, not the int8 sketches: the
        # loss from quantizing is part of what is measured.
        truth=exact_knn(q, stored, K),
    )


def manifest_for(tables: int, bits: int) -> Any:
    """The swarm's manifest for one shape (every query passes its budget explicitly)."""
    from qisd.manifest import Manifest

    return Manifest(name="bench-recall", tables=tables, bits=bits)


# -- the bucket model (no network) --------------------------------------------------


@dataclass
class ModelResult:
    recall: dict[int, float]  # per budget, the mean over the queries
    se2: dict[int, float]  # per budget, two standard errors of that mean
    scan: dict[int, float]  # per budget, share of the topic ranked per query
    bucket: float  # mean packets per non-empty key


def two_se(values: Sequence[float]) -> float:
    return 2 * float(np.std(values, ddof=1)) / len(values) ** 0.5 if len(values) > 1 else 0.0


def model_recall(data: Prepared, tables: int, bits: int,
                 budgets: Sequence[int]) -> ModelResult:
    """Recall@K if every probed key returned exactly its bucket's top K by sketch
    cosine (what the responsible nodes compute), merged and re-ranked at the querier;
    the share of the topic the servers rank; the mean number of packets per key."""
    from qisd.fingerprint import LSH

    lsh = LSH.for_topic(manifest_for(tables, bits), TOPIC, data.sketch_mat.shape[1])
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, s in enumerate(data.sketch_mat):
        for table, code in enumerate(lsh.codes(s)):
            buckets[(table, code)].append(i)
    mat = data.sketch_mat
    out = ModelResult({}, {}, {}, float(np.mean([len(v) for v in buckets.values()])))
    for budget in budgets:
        recalls, scanned = [], []
        for (unit, sketch), want in zip(data.queries, data.truth, strict=True):
            qa = sketch.to_array()
            found: set[int] = set()
            ranked_here = 0
            for table, code, _ in lsh.probes(unit, budget):
                ids = buckets.get((table, code))
                if ids:
                    ranked_here += len(ids)
                    sims = mat[ids] @ qa
                    found.update(ids[j] for j in np.argsort(-sims, kind="stable")[:K])
            ranked = sorted(found, key=lambda i: (-float(mat[i] @ qa), i))[:K]
            recalls.append(len(set(ranked) & want) / K)
            scanned.append(ranked_here / len(mat))
        out.recall[budget] = float(np.mean(recalls))
        out.se2[budget] = two_se(recalls)
        out.scan[budget] = float(np.mean(scanned))
    return out


# -- the swarm ----------------------------------------------------------------------


@dataclass
class SwarmResult:
    recall: float
    se2: float
    p50_ms: float
    p99_ms: float
    kb_per_query: float
    querier_kb: float
    datagrams: float


async def measure_swarm(data: Prepared, *, tables: int, bits: int, budgets: Sequence[int],
                        nodes: int, seed: int) -> dict[int, SwarmResult]:
    """Build a swarm of ``nodes`` for this shape, store every packet, run the queries."""
    import trio

    from qisd.dht import DHTNode, open_node
    from qisd.fingerprint import keys_for, probe_keys
    from qisd.identity import Identity
    from qisd.packet import create_packet
    from qisd.store import PacketStore

    manifest = manifest_for(tables, bits)
    rng = random.Random(seed)
    idents = [Identity.from_seed(rng.randbytes(32)) for _ in range(nodes)]
    packets = [
        create_packet(idents[i % nodes].signing_key, swarm=manifest.swarm_id, topic=TOPIC,
                      sketch=s, outcome={"row": i}, ttl_s=manifest.ttl_default_s,
                      max_bytes=manifest.packet_max_bytes)
        for i, s in enumerate(data.sketches)
    ]
    row_of = {p.id: i for i, p in enumerate(packets)}
    by_key: dict[bytes, list[Any]] = defaultdict(list)
    for p in packets:
        # As NodeService.emit: keys from the sketch, so any holder can recompute them.
        for key in keys_for(manifest, TOPIC, p.sketch.to_array()):
            by_key[key].append(p)

    async with AsyncExitStack() as stack:
        swarm: list[DHTNode] = []
        for ident in idents:
            store = PacketStore.open(":memory:")
            stack.callback(store.close)
            swarm.append(await stack.enter_async_context(
                open_node(ident, manifest, store, host="127.0.0.1", port=0)))
        for node in swarm[1:]:
            await node.bootstrap([swarm[0].address])
        for node in swarm:  # a second pass so early joiners learn of late ones
            await node.bootstrap([swarm[0].address])

        t_place = time.perf_counter()
        short: list[int] = []
        limiter = trio.CapacityLimiter(16)

        async def place(i: int, key: bytes, group: list[Any]) -> None:
            async with limiter:
                done = await swarm[i % nodes].packets.place(key, group)
            if done.stored < swarm[0].replicas:
                short.append(done.stored)

        async with trio.open_nursery() as nursery:
            for i, (key, group) in enumerate(sorted(by_key.items())):
                nursery.start_soon(place, i, key, group)
        if short:
            print(f"  warning: {len(short)} keys stored at fewer than "
                  f"{swarm[0].replicas} nodes", file=sys.stderr)
        await settle(swarm)
        print(f"  {data.name} L={tables} b={bits}: {nodes} nodes up and {len(packets)} "
              f"packets placed under {len(by_key)} keys in "
              f"{time.perf_counter() - t_place:.0f} s", file=sys.stderr, flush=True)

        results: dict[int, SwarmResult] = {}
        for budget in budgets:
            recalls, times, sent, mine, dgrams = [], [], [], [], []
            for j, ((unit, sketch), want) in enumerate(zip(data.queries, data.truth,
                                                           strict=True)):
                node = swarm[j % nodes]
                # NodeService.query: probe keys best first, then find_packets for m=k.
                keys = probe_keys(manifest, TOPIC, unit, budget)
                before = [n.statistics() for n in swarm]
                t0 = time.perf_counter()
                found = await node.find_packets(keys, sketch, K)
                times.append(time.perf_counter() - t0)
                after = [n.statistics() for n in swarm]
                pairs = list(zip(after, before, strict=True))
                sent.append(sum(a.bytes_out - b.bytes_out for a, b in pairs))
                dgrams.append(sum(a.datagrams_out - b.datagrams_out for a, b in pairs))
                a, b = pairs[j % nodes]
                mine.append(a.bytes_in - b.bytes_in + a.bytes_out - b.bytes_out)
                top = [row_of[p.id] for _, p in found if p.topic == TOPIC][:K]
                recalls.append(len(set(top) & want) / K)
            results[budget] = SwarmResult(
                recall=float(np.mean(recalls)),
                se2=two_se(recalls),
                p50_ms=1000 * float(np.percentile(times, 50)),
                p99_ms=1000 * float(np.percentile(times, 99)),
                kb_per_query=float(np.mean(sent)) / 1000,
                querier_kb=float(np.mean(mine)) / 1000,
                datagrams=float(np.mean(dgrams)),
            )
        return results


async def settle(swarm: Sequence[Any], quiet: float = 0.3, limit: float = 20.0) -> None:
    """Wait until no node sends anything for ``quiet`` seconds (hand-offs done), so
    the byte counts of the queries are theirs alone."""
    import trio

    last = -1
    with trio.move_on_after(limit):
        while True:
            total = sum(n.statistics().datagrams_out for n in swarm)
            if total == last:
                return
            last = total
            await trio.sleep(quiet)


# -- output -------------------------------------------------------------------------

HEADER = ("dataset", "tables", "bits", "lookups", "swarm", "+-2se", "model", "p50 ms",
          "p99 ms", "KB/query", "querier KB", "datagrams", "bucket", "scan")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> None:
    """A plain right-aligned table (or Markdown); a blank line ends it."""
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for c in rows:
            print("| " + " | ".join(c) + " |")
    else:
        cells = [tuple(header), *map(tuple, rows)]
        widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
        for n, c in enumerate(cells):
            print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))
            if n == 0:
                print("  ".join("-" * w for w in widths))
    print()


def format_row(r: Row) -> tuple[str, ...]:
    assert r.recall is not None and r.p50_ms is not None and r.p99_ms is not None
    assert r.kb_per_query is not None and r.querier_kb is not None
    assert r.datagrams is not None
    return (r.dataset, str(r.tables), str(r.bits), str(r.budget), f"{r.recall:.3f}",
            f"{r.se2:.3f}", f"{r.model:.3f}", f"{r.p50_ms:.0f}", f"{r.p99_ms:.0f}",
            f"{r.kb_per_query:,.0f}", f"{r.querier_kb:,.0f}", f"{r.datagrams:.0f}",
            f"{r.bucket:.0f}", f"{r.scan:.0%}")


def print_tables(rows: list[Row], markdown: bool) -> None:
    """First the shapes measured on the swarm, then the bucket model's whole grid
    (recall@10 per lookup budget)."""
    measured = [r for r in rows if r.recall is not None]
    print("recall@10 through the swarm (model: the bucket model for the same shape)\n")
    _table(HEADER, [format_row(r) for r in measured], markdown)
    budgets = sorted({r.budget for r in rows})
    print("recall@10 of the bucket model (no network) by key lookups per query; "
          "bucket: mean packets per key\n")
    header = ["data", "tables", "bits", "bucket", *(f"@{b}" for b in budgets)]
    lines = []
    for shape in dict.fromkeys((r.dataset, r.tables, r.bits) for r in rows):
        sel = {r.budget: r for r in rows if (r.dataset, r.tables, r.bits) == shape}
        first = next(iter(sel.values()))
        lines.append([shape[0], str(shape[1]), str(shape[2]), f"{first.bucket:.0f}",
                      *(f"{sel[b].model:.3f}" if b in sel else "-" for b in budgets)])
    _table(header, lines, markdown)


def best_recall(r: Row) -> float:
    """The swarm's figure where the shape ran on a swarm, else the model's."""
    return r.model if r.recall is None else r.recall


def pick_default(rows: list[Row], dataset: str, goal: float = 0.95, max_lookups: int = 32,
                 *, measured: bool = True) -> Row | None:
    """The cheapest row that reaches the goal with confidence: recall minus two
    standard errors >= ``goal`` within ``max_lookups``. Only rows measured on the swarm
    count when ``measured`` (else only the bucket model's). Cheapest: fewest lookups
    (bytes and latency per query); ties: fewer tables (fewer stored copies), more bits
    (smaller buckets), then higher recall."""
    def value(r: Row) -> float:
        return best_recall(r) if measured else r.model

    ok = [r for r in rows if r.dataset == dataset and (r.recall is not None or not measured)
          and value(r) - r.se2 >= goal and r.budget <= max_lookups]
    return min(ok, key=lambda r: (r.budget, r.tables, -r.bits, -value(r)), default=None)


def describe(r: Row, measured: bool = True) -> str:
    swarm = measured and r.recall is not None
    value = best_recall(r) if swarm else r.model
    return (f"tables={r.tables} bits={r.bits} probes={r.budget}: recall@10 "
            f"{value:.3f} +- {r.se2:.3f} ({'swarm' if swarm else 'bucket model'}), "
            f"{r.scan:.0%} of the topic ranked per query")


def report_choice(rows: list[Row], goal: float = 0.95, max_lookups: int = 32) -> None:
    """The cheapest shapes per data set, and how the manifest's defaults fare."""
    from qisd.manifest import Manifest

    default = Manifest()
    for ds in dict.fromkeys(r.dataset for r in rows):
        for measured in (True, False):
            best = pick_default(rows, ds, goal, max_lookups, measured=measured)
            label = "swarm" if measured else "model"
            if best is None:
                print(f"{ds}: cheapest ({label}): no shape reaches recall@10 - 2se >= {goal} "
                      f"within {max_lookups} lookups")
            else:
                print(f"{ds}: cheapest ({label}) with recall@10 - 2se >= {goal}: "
                      f"{describe(best, measured)}")
        mine = [r for r in rows if r.dataset == ds and (r.tables, r.bits, r.budget)
                == (default.tables, default.bits, default.probes)]
        if mine:
            r = mine[0]
            verdict = "meets" if best_recall(r) - r.se2 >= goal else "MISSES"
            print(f"{ds}: manifest default {describe(r)}: {verdict} the goal")
        else:
            print(f"{ds}: manifest default (tables={default.tables} bits={default.bits} "
                  f"probes={default.probes}) not in this grid")


def plot(rows: list[Row], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r.dataset for r in rows}, key=lambda d: d != "sentences")
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.8),
                             squeeze=False)
    # Colour by bits (bucket size), line style by tables.
    colors = {3: "tab:purple", 4: "tab:blue", 5: "tab:green", 6: "tab:orange", 8: "tab:red"}
    styles = {4: ":", 8: "-", 12: "-.", 16: "--"}
    for ax, ds in zip(axes[0], datasets, strict=True):
        mine = [r for r in rows if r.dataset == ds]
        for tables, bits in sorted({(r.tables, r.bits) for r in mine}):
            sel = sorted((r for r in mine if (r.tables, r.bits) == (tables, bits)),
                         key=lambda r: r.budget)
            color = colors.get(bits, "black")
            ax.plot([r.budget for r in sel], [r.model for r in sel], linewidth=1.2,
                    linestyle=styles.get(tables, "-"), color=color, label=f"L={tables} b={bits}")
            swarm = [r for r in sel if r.recall is not None]
            ax.plot([r.budget for r in swarm], [r.recall for r in swarm], "o",
                    color=color, markersize=6, markeredgecolor="black", markeredgewidth=0.6)
        ax.axhline(0.95, color="grey", linewidth=0.8)
        ax.axvline(32, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        budgets = sorted({r.budget for r in mine})
        ax.set_xticks(budgets, [str(b) for b in budgets])
        first = mine[0]
        nodes = next((r.nodes for r in mine if r.nodes), None)
        where = f", {nodes} nodes" if nodes else ""
        ax.set_title(f"{ds}: {first.packets} packets{where}, {first.queries} queries",
                     fontsize=10)
        ax.set_xlabel("key lookups per query (probe budget)")
        ax.set_ylabel("recall@10 vs exact cosine kNN")
        ax.set_ylim(min(0.3, *(r.model for r in mine)) - 0.02, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3, loc="lower right", handlelength=3,
                  title="lines: bucket model; dots: measured on the swarm",
                  title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def shapes(text: str) -> list[tuple[int, int]]:
    """``"8x4,4x4"`` -> [(8, 4), (4, 4)] (tables x bits)."""
    out = []
    for item in text.split(","):
        if item:
            tables, _, bits = item.partition("x")
            out.append((int(tables), int(bits)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny run (8 nodes, 300 packets, 10 queries, 2 shapes)")
    parser.add_argument("--datasets", default="sentences,digits")
    parser.add_argument("--nodes", type=int, default=24)
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--packets", type=int, default=0, help="stored rows (0: all but queries)")
    parser.add_argument("--tables", type=ints, default=[4, 8, 16], help="model grid")
    parser.add_argument("--bits", type=ints, default=[3, 4, 5, 6, 8], help="model grid")
    parser.add_argument("--swarm", type=shapes, default=shapes("4x4,8x4,8x6"),
                        help="shapes (TABLESxBITS) also measured on a real swarm")
    parser.add_argument("--budgets", type=ints, default=[8, 16, 24, 32, 48, 64],
                        help="model grid")
    parser.add_argument("--swarm-budgets", type=ints, default=[8, 16, 32],
                        help="budgets also measured on the swarm")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", type=Path,
                        help="PNG to write (default docs/recall.png; none with --smoke)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="measure nothing: print the tables and plot from rows that "
                             "--json wrote")
    args = parser.parse_args(argv)
    if args.smoke:
        args.nodes, args.queries, args.packets = 8, 10, 300
        args.tables, args.bits, args.budgets = [4], [4, 6], [4, 8]
        args.swarm_budgets = [4, 8]
        args.swarm, args.datasets = [(4, 4)], "sentences"
    elif args.plot is None:
        args.plot = ROOT / "docs" / "recall.png"
    if not set(args.swarm_budgets) <= set(args.budgets):
        raise SystemExit("--swarm-budgets: every one must also be in --budgets")
    if args.nodes < 2:
        raise SystemExit("--nodes: a swarm needs at least 2")
    if min(args.budgets, default=0) < 1:
        raise SystemExit("--budgets: need at least one, each >= 1")

    if args.from_json is not None:
        rows = [Row(**d) for d in json.loads(args.from_json.read_text())]
        report(rows, args)
        return 0

    import trio

    logging.getLogger("qisd").setLevel(logging.CRITICAL)
    started = time.perf_counter()
    rows = []
    for name in [d for d in args.datasets.split(",") if d]:
        data = prepare(name, args.queries, args.packets, args.seed)
        grid = sorted({*((t, b) for t in args.tables for b in args.bits), *args.swarm})
        for tables, bits in grid:
            t0 = time.perf_counter()
            model = model_recall(data, tables, bits, args.budgets)
            measured: dict[int, SwarmResult] = {}
            if (tables, bits) in args.swarm:
                measured = trio.run(partial(
                    measure_swarm, data, tables=tables, bits=bits, budgets=args.swarm_budgets,
                    nodes=args.nodes, seed=args.seed))
            for budget in args.budgets:
                row = Row(dataset=name, tables=tables, bits=bits, budget=budget,
                          model=model.recall[budget], bucket=model.bucket,
                          queries=len(data.queries), packets=len(data.sketches),
                          scan=model.scan[budget], se2=model.se2[budget])
                if budget in measured:
                    row.nodes = args.nodes
                    for key, value in asdict(measured[budget]).items():
                        setattr(row, key, value)
                rows.append(row)
            print(f"  {name} L={tables} b={bits}{' swarm' if measured else ''}: "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    report(rows, args)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def report(rows: list[Row], args: argparse.Namespace) -> None:
    print_tables(rows, args.markdown)
    report_choice(rows)
    if args.plot is not None:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
