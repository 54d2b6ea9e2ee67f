#!/usr/bin/env python3
"""Outcome routing against local-only, pooled and FedAvg learning, on real data.

Real labelled data bundled with scikit-learn (Wisconsin breast cancer, 569 cases x 30
features, 2 classes; handwritten digits, 1,797 x 64, 10 classes) is split over 20
sites, non-IID: each site draws its class mix from a Dirichlet(alpha) prior (label
skew), its training cases from that mix, and its held-out test cases from the same
mix. Eight sites are tiny (n = 1, 1, 5, 5, 10, 10, 20, 20); twelve share the rest.

Every site runs its own qisd node: a DHT node from ``open_node`` on 127.0.0.1 (real
UDP, one SQLite store each, all 20 in one trio run) with the daemon's own
``NodeService`` on top, so emits and queries take exactly the daemon's code path
(``NodeService.emit_many`` and ``NodeService.query``: probe keys, ``find_packets`` over
the DHT, ``answer_query``) without the control socket. Fingerprints are the
standardised feature vectors (the standardisation is part of the shared fingerprint
function; here it uses the pooled training means and sds, as a published reference
would). Synthesis workers do not run, so answers come from the packets emitted.

For each site, accuracy on its held-out cases of:

* ``local``   kNN (k = min(5, n), cosine) on the site's own cases alone;
* ``qisd``    the argmax of the ``y`` probabilities in the ``query`` answer
              Two packet modes: ``case``, one observation packet per case, answers
              from k = 10 matches; ``cohort`` (privacy mode), per site clusters of at
              least ``--cohort-min`` (5) cases within each outcome class (spherical
              k-means, about 5 cases each), one synthesis-encoded packet per cohort
              carrying only its class count and centroid; a site with fewer cases of
              a class publishes nothing about them. Since a cohort stands for several
              cases, answers read k = 3 cohorts (k = 10 cohorts average ~50 cases and
              blur the classes). A query that finds nothing falls back to ``local``;
* ``pooled kNN``  the same similarity-weighted 10-NN vote over all sites' cases in
              one place (what ``answer_query`` computes, with exact search);
* ``pooled LR``  scikit-learn's logistic regression on all sites' cases (C from a
              small grid, picked on the test sets). The **ceiling** each ratio is taken
              against is the better of the two pooled models for that group of sites;
* ``fedavg``  FedAvg of a multinomial logistic regression (numpy): every round all
              sites receive the global weights, run E local epochs of minibatch SGD
              and send their weights back (float32 both ways); the server averages
              them weighted by n. Accuracy is that of the round with the best mean site
              accuracy; bytes are counted only up to the first round within 0.005 of
              that best (rounds x 2 x 4 x parameters per site, payload only, no
              framing). The learning rate is the one of a small grid that gets there
              in the fewest rounds, judged on the test sets. All three choices favour
              FedAvg.

Bytes per site: qisd counts what the site's node sent and received (UDP payloads, from
``node.statistics()``) while it emitted its packets and while it ran its own queries,
one at a time so the counts are its own (``own``); everything the node sent and
received, serving the other sites' emits and queries too, is ``node``. The goal line
judges ``own`` (the like of FedAvg's per-site count, which leaves the server out) and
prints both.

    .venv/bin/python scripts/evaluate.py               # both data sets (~10 min on 2 cores)
    .venv/bin/python scripts/evaluate.py --smoke       # tiny, < 1 minute
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
TINY_SIZES = (1, 1, 5, 5, 10, 10, 20, 20)
#: FedAvg has "reached its best" once its mean site accuracy is this close to it.
REACH_SLACK = 0.005
K = 10
FIELD = "y"

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


# -- data and the non-IID split -------------------------------------------------------


@dataclass
class Task:
    name: str
    classes: list[str]
    x_train: FloatArray
    y_train: IntArray
    x_test: FloatArray
    y_test: IntArray


@dataclass
class Site:
    index: int
    prior: FloatArray
    train: IntArray
    test: IntArray

    @property
    def n(self) -> int:
        return len(self.train)


def load_task(name: str, seed: int, test_share: float = 0.25, max_train: int = 0) -> Task:
    """The data set standardised, split into training and held-out cases (stratified);
    ``max_train`` > 0 keeps a random subset of the training cases (for ``--smoke``)."""
    try:
        from sklearn import datasets
    except ImportError:
        raise SystemExit("evaluate.py needs scikit-learn: pip install -e '.[bench]'") from None

    if name == "breast_cancer":
        data = datasets.load_breast_cancer()
    elif name == "digits":
        data = datasets.load_digits()
    else:
        raise SystemExit(f"--datasets: unknown data set {name!r} (breast_cancer, digits)")
    x = np.asarray(data.data, dtype=np.float64)
    y = np.asarray(data.target, dtype=np.int64)
    classes = [str(c) for c in data.target_names]
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(len(classes)):  # stratified hold-out
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: round(test_share * len(idx))]] = True
    mean = x[~test].mean(axis=0)
    sd = x[~test].std(axis=0)
    z = (x - mean) / np.where(sd > 0, sd, 1.0)
    # A few digits pixels are constant: add a tiny constant feature so no
    # fingerprint is the zero vector (a blank row would otherwise be rejected).
    z = np.hstack([z, np.full((len(z), 1), 1e-3)])
    train = np.flatnonzero(~test)
    if 0 < max_train < len(train):
        train = np.sort(rng.choice(train, size=max_train, replace=False))
    return Task(name, classes, z[train], y[train], z[test], y[test])


def site_sizes(total: int, sites: int, rng: np.random.Generator) -> list[int]:
    """The tiny sizes, then the remaining cases over the other sites (Dirichlet(2)
    shares on top of a floor of 25 cases each)."""
    large = sites - len(TINY_SIZES)
    rest = total - sum(TINY_SIZES)
    floor = min(25, rest // max(large, 1))
    extra = rng.multinomial(rest - floor * large, rng.dirichlet(np.full(large, 2.0)))
    return [*TINY_SIZES, *(floor + int(e) for e in extra)]


def partition(task: Task, *, sites: int, alpha: float, tests: int, seed: int) -> list[Site]:
    """Label-skewed sites: each draws a class prior from Dirichlet(alpha) and its
    training cases (without replacement, across sites) and test cases from it."""
    rng = np.random.default_rng(seed)
    n_classes = len(task.classes)
    sizes = site_sizes(len(task.y_train), sites, rng)
    free = np.ones(len(task.y_train), dtype=bool)
    out: list[Site] = []
    for i, size in enumerate(sizes):
        prior = rng.dirichlet(np.full(n_classes, alpha))
        avail = np.flatnonzero(free)
        w = prior[task.y_train[avail]] + 1e-6
        train = rng.choice(avail, size=min(size, len(avail)), replace=False, p=w / w.sum())
        free[train] = False
        wt = prior[task.y_test] + 1e-6
        test = rng.choice(len(task.y_test), size=min(tests, len(task.y_test)), replace=False,
                          p=wt / wt.sum())
        out.append(Site(i, prior, np.sort(train), np.sort(test)))
    return out


# -- the baselines -------------------------------------------------------------------


def unit_rows(x: FloatArray) -> FloatArray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def knn_predict(train_x: FloatArray, train_y: IntArray, query: FloatArray, k: int,
                n_classes: int) -> IntArray:
    """Cosine kNN, each neighbour weighted by max(similarity, 0) (as ``answer_query``
    weighs matches); ties go to the nearest neighbour's class."""
    sims = unit_rows(query) @ unit_rows(train_x).T
    k = min(k, train_x.shape[0])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    out = np.empty(len(query), dtype=np.int64)
    for i, row in enumerate(top):
        votes = np.zeros(n_classes)
        for j in row:
            votes[train_y[j]] += max(sims[i, j], 0.0)
        best = np.flatnonzero(votes == votes.max())
        out[i] = train_y[row[0]] if len(best) > 1 or votes.max() == 0 else best[0]
    return out


def local_predict(task: Task, site: Site) -> IntArray:
    return knn_predict(task.x_train[site.train], task.y_train[site.train],
                       task.x_test[site.test], min(5, site.n), len(task.classes))


def pooled_predict(task: Task, sites: Sequence[Site], site: Site) -> IntArray:
    everyone = np.concatenate([s.train for s in sites])
    return knn_predict(task.x_train[everyone], task.y_train[everyone],
                       task.x_test[site.test], K, len(task.classes))


def pooled_lr(task: Task, sites: Sequence[Site],
              cs: Sequence[float] = (0.1, 1.0, 10.0)) -> list[IntArray]:
    """A second pooled ceiling: scikit-learn's logistic regression on all sites' cases
    (the centralised version of the FedAvg model). C is picked from ``cs`` by mean site
    accuracy on the test sets, as FedAvg's learning rate is: an optimistic ceiling."""
    from sklearn.linear_model import LogisticRegression

    everyone = np.concatenate([s.train for s in sites])
    best: tuple[float, list[IntArray]] | None = None
    for c in cs:
        model = LogisticRegression(C=c, max_iter=5000)
        model.fit(task.x_train[everyone], task.y_train[everyone])
        preds = [np.asarray(model.predict(task.x_test[s.test]), dtype=np.int64)
                 for s in sites]
        score = float(np.mean([np.mean(p == task.y_test[s.test])
                               for p, s in zip(preds, sites, strict=True)]))
        if best is None or score > best[0]:
            best = (score, preds)
    assert best is not None
    return best[1]


@dataclass
class FedAvgResult:
    lr: float
    best_round: int
    params: int
    bytes_per_round: int
    accuracy: list[float]  # per site, at the best round
    curve: list[float]  # mean site accuracy after each round
    #: First round whose mean site accuracy is within ``REACH_SLACK`` of the best over
    #: all learning rates: the bytes "to reach its best accuracy" are counted to here,
    #: not to a late round that beats it by noise (which would inflate FedAvg's bytes).
    reach_round: int = 0

    @property
    def bytes_to_best(self) -> int:
        return self.reach_round * self.bytes_per_round


def _softmax(z: FloatArray) -> FloatArray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fedavg(task: Task, sites: Sequence[Site], *, rounds: int, epochs: int, batch: int,
           lrs: Sequence[float], l2: float, seed: int) -> FedAvgResult:
    """FedAvg (McMahan et al. 2017) of softmax regression with full participation.

    Every learning rate in ``lrs`` is run; the best mean site accuracy over all of
    them is the target, and the rate that comes within ``REACH_SLACK`` of it in the
    fewest rounds is the one reported (ties: the higher best accuracy). Its accuracy
    is that of its best round; its bytes are counted to the round it came that close.
    Both choices, made on the test sets, favour FedAvg."""
    n_classes = len(task.classes)
    bias = np.ones((len(task.x_train), 1))
    xtr = np.hstack([task.x_train, bias])
    xte = np.hstack([task.x_test, np.ones((len(task.x_test), 1))])
    onehot = np.eye(n_classes)[task.y_train]
    weights = np.array([s.n for s in sites], dtype=np.float64)
    runs: list[tuple[float, list[float], list[list[float]]]] = []
    for lr in lrs:
        rng = np.random.default_rng(seed)
        w_global = np.zeros((xtr.shape[1], n_classes))
        curve: list[float] = []
        per_round: list[list[float]] = []
        for _ in range(rounds):
            local_models = []
            for s in sites:  # each site: download, E epochs of SGD, upload
                w = w_global.copy()
                xs, ys = xtr[s.train], onehot[s.train]
                for _ in range(epochs):
                    order = rng.permutation(len(xs))
                    for start in range(0, len(xs), batch):
                        b = order[start:start + batch]
                        grad = xs[b].T @ (_softmax(xs[b] @ w) - ys[b]) / len(b) + l2 * w
                        w -= lr * grad
                local_models.append(w)
            w_global = np.tensordot(weights / weights.sum(), np.array(local_models), axes=1)
            accs = [float(np.mean(np.argmax(xte[s.test] @ w_global, axis=1)
                                  == task.y_test[s.test])) for s in sites]
            per_round.append(accs)
            curve.append(float(np.mean(accs)))
        runs.append((lr, curve, per_round))
    target = max(max(curve) for _, curve, _ in runs) - REACH_SLACK
    params = xtr.shape[1] * n_classes
    results = []
    for lr, curve, per_round in runs:
        reach = next((i for i, a in enumerate(curve) if a >= target), None)
        if reach is None:
            continue
        top = int(np.argmax(curve))  # first round reaching its best mean accuracy
        results.append(FedAvgResult(lr=lr, best_round=top + 1, params=params,
                                    bytes_per_round=2 * 4 * params, accuracy=per_round[top],
                                    curve=curve, reach_round=reach + 1))
    return min(results, key=lambda r: (r.reach_round, -max(r.curve)))


# -- cohorts (privacy mode) ----------------------------------------------------------


def cohorts(x: FloatArray, *, min_size: int, target: int, seed: int) -> list[IntArray]:
    """Clusters of at least ``min_size`` rows: spherical k-means with about ``target``
    rows per cluster, then undersized clusters merged into the nearest centroid."""
    n = len(x)
    if n < min_size:
        return []
    unit = unit_rows(x)
    k = max(1, n // target)
    rng = np.random.default_rng(seed)
    centres = unit[rng.choice(n, size=k, replace=False)]
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(25):
        labels = np.argmax(unit @ centres.T, axis=1)
        for c in range(k):
            members = unit[labels == c]
            if len(members):
                m = members.sum(axis=0)
                centres[c] = m / np.linalg.norm(m)
    groups = [np.flatnonzero(labels == c) for c in range(k)]
    groups = [g for g in groups if len(g)]
    while len(groups) > 1 and min(len(g) for g in groups) < min_size:
        small = min(range(len(groups)), key=lambda i: (len(groups[i]), i))
        cent = [unit[g].mean(axis=0) for g in groups]
        sims = [float(cent[small] @ c) if i != small else -np.inf for i, c in enumerate(cent)]
        into = int(np.argmax(sims))
        groups[into] = np.sort(np.concatenate([groups[into], groups[small]]))
        del groups[small]
    return groups


@dataclass(frozen=True)
class CohortRule:
    """Privacy mode: how a site groups its cases, and how many cohorts a query reads."""

    min_size: int = 5
    target: int = 5
    #: "outcome": clusters within each outcome class (pure cohorts); "features":
    #: clusters of the fingerprints alone, outcomes mixed.
    by: str = "outcome"
    #: Matches an answer uses (each cohort packet already stands for >= min_size cases).
    k: int = 3


def site_cohorts(x: FloatArray, y: IntArray, rule: CohortRule, seed: int) -> list[IntArray]:
    """Row indices of each cohort a site publishes (none smaller than ``min_size``)."""
    if rule.by == "features":
        return cohorts(x, min_size=rule.min_size, target=rule.target, seed=seed)
    out: list[IntArray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        out += [idx[g] for g in cohorts(x[idx], min_size=rule.min_size, target=rule.target,
                                        seed=seed)]
    return out


def cohort_outcome(labels: Sequence[str]) -> dict[str, int]:
    """Class counts in the synthesis outcome encoding (qisd/synthesis/encoding.py)."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[f"{FIELD}={label}"] = counts.get(f"{FIELD}={label}", 0) + 1
    return {"_packets": len(labels), "_origins": 1, **counts}


# -- the swarm -----------------------------------------------------------------------


@dataclass
class ModeResult:
    mode: str
    accuracy: list[float] = field(default_factory=list)  # per site
    no_answer: list[int] = field(default_factory=list)  # per site
    packets: list[int] = field(default_factory=list)  # per site, emitted
    emit_bytes: list[int] = field(default_factory=list)  # per site, in + out
    query_bytes: list[int] = field(default_factory=list)  # per site, all its queries
    node_bytes: list[int] = field(default_factory=list)  # per site, everything
    query_seconds: list[float] = field(default_factory=list)  # every query


def _traffic(node: Any) -> int:
    st = node.statistics()
    return int(st.bytes_in + st.bytes_out)


async def run_swarm(task: Task, sites: Sequence[Site], local: Sequence[IntArray], *,
                    modes: Sequence[str], manifest: Any, rule: CohortRule,
                    seed: int) -> dict[str, ModeResult]:
    """One qisd node per site; every mode is a topic of its own in the same swarm."""

    from qisd.config import Config
    from qisd.daemon.service import NodeService
    from qisd.daemon.watch import WatchHub
    from qisd.dht import open_node
    from qisd.identity import Identity
    from qisd.packet import KIND_SYNTHESIS, create_packet
    from qisd.sketch import normalize, quantize
    from qisd.store import PacketStore

    rng = random.Random(seed)
    results: dict[str, ModeResult] = {}
    async with AsyncExitStack() as stack:
        services: list[NodeService] = []
        for _ in sites:
            ident = Identity.from_seed(rng.randbytes(32))
            store = PacketStore.open(":memory:")
            stack.callback(store.close)
            node = await stack.enter_async_context(
                open_node(ident, manifest, store, host="127.0.0.1", port=0))
            services.append(NodeService(config=Config(), ident=ident, manifest=manifest,
                                        store=store, node=node, watches=WatchHub()))
        nodes = [s.node for s in services]
        for node in nodes[1:]:
            await node.bootstrap([nodes[0].address])
        for node in nodes:
            await node.bootstrap([nodes[0].address])
        await settle(nodes)

        for mode in modes:
            topic = f"{task.name}-{mode}"
            res = results[mode] = ModeResult(mode)
            start_total = [_traffic(n) for n in nodes]
            for site, service in zip(sites, services, strict=True):
                x = task.x_train[site.train]
                labels = [task.classes[c] for c in task.y_train[site.train]]
                before = _traffic(service.node)
                if mode == "case":
                    items = [{"topic": topic, "vector": v.tolist(), "outcome": {FIELD: lab}}
                             for v, lab in zip(x, labels, strict=True)]
                    for start in range(0, len(items), 1000):
                        reply = await service.emit_many(items[start:start + 1000])
                        bad = [r for r in reply["results"] if "error" in r]
                        if bad:
                            raise SystemExit(f"site {site.index}: emit failed: {bad[0]}")
                    res.packets.append(len(items))
                else:
                    groups = site_cohorts(x, task.y_train[site.train], rule,
                                          seed=seed + site.index)
                    for g in groups:
                        packet = create_packet(
                            service.ident.signing_key, swarm=manifest.swarm_id, topic=topic,
                            sketch=quantize(normalize(x[g].mean(axis=0))),
                            outcome=cohort_outcome([labels[i] for i in g]), n=len(g),
                            ttl_s=manifest.ttl_default_s, kind=KIND_SYNTHESIS,
                            max_bytes=manifest.packet_max_bytes)
                        await service.node.put_packet(packet)
                    res.packets.append(len(groups))
                res.emit_bytes.append(_traffic(service.node) - before)
            await settle(nodes)

            for site, service, fallback in zip(sites, services, local, strict=True):
                spent = 0
                right = missing = 0
                for case, guess in zip(site.test, fallback, strict=True):
                    before = _traffic(service.node)
                    t0 = time.perf_counter()
                    reply = await service.query(topic, task.x_test[case].tolist(),
                                                k=K if mode == "case" else rule.k)
                    res.query_seconds.append(time.perf_counter() - t0)
                    spent += _traffic(service.node) - before
                    probs = reply["answer"]["fields"].get(FIELD, {}).get("probabilities")
                    if probs:
                        best = max(probs.items(), key=lambda kv: (kv[1], kv[0]))[0]
                        predicted = task.classes.index(best)
                    else:
                        missing += 1
                        predicted = int(guess)
                    right += int(predicted == task.y_test[case])
                res.accuracy.append(right / len(site.test))
                res.no_answer.append(missing)
                res.query_bytes.append(spent)
            res.node_bytes = [_traffic(n) - b for n, b in zip(nodes, start_total, strict=True)]
            await settle(nodes)  # stray replies land before the next mode's counts
    return results


async def settle(nodes: Sequence[Any], quiet: float = 0.3, limit: float = 20.0) -> None:
    """Wait until no node sends anything for ``quiet`` seconds."""
    import trio

    last = -1
    with trio.move_on_after(limit):
        while True:
            total = sum(n.statistics().datagrams_out for n in nodes)
            if total == last:
                return
            last = total
            await trio.sleep(quiet)


# -- report --------------------------------------------------------------------------


@dataclass
class SiteRow:
    dataset: str
    site: int
    n: int
    tests: int
    local: float
    pooled: float
    pooled_lr: float
    fedavg: float
    qisd: dict[str, float]
    no_answer: dict[str, int]
    packets: dict[str, int]
    emit_bytes: dict[str, int]
    query_bytes: dict[str, int]
    node_bytes: dict[str, int]


def group_of(row: SiteRow) -> str:
    if row.site < len(TINY_SIZES):
        return f"n={row.n}"
    return "n=21-99" if row.n < 100 else "n>=100"


GROUP_ORDER = ["n=1", "n=5", "n=10", "n=20", "n=21-99", "n>=100"]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    cells = [list(header), *map(list, rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for i, c in enumerate(cells):
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _kb(value: float) -> str:
    return f"{value / 1000:,.1f}"


def report(dataset: str, rows: list[SiteRow], fed: FedAvgResult, modes: Sequence[str],
           tests: int, markdown: bool) -> dict[str, Any]:
    print(f"\n## {dataset}: accuracy on each site's held-out cases (mean over its sites)\n")
    header = ["sites", "count", "local", *(f"qisd {m}" for m in modes), "pooled kNN",
              "pooled LR", "fedavg", *(f"{m}/ceiling" for m in modes)]
    out_rows = []
    groups = [g for g in GROUP_ORDER if any(group_of(r) == g for r in rows)]
    summary: dict[str, Any] = {"dataset": dataset, "groups": {}}
    for g in [*groups, "tiny (n<=20)", "all"]:
        sel = [r for r in rows if (g == "all" or (g == "tiny (n<=20)"
                                                  and r.site < len(TINY_SIZES))
                                   or group_of(r) == g)]
        loc = float(np.mean([r.local for r in sel]))
        pool = float(np.mean([r.pooled for r in sel]))
        plr = float(np.mean([r.pooled_lr for r in sel]))
        fa = float(np.mean([r.fedavg for r in sel]))
        q = {m: float(np.mean([r.qisd[m] for r in sel])) for m in modes}
        # The ceiling is the better of the two pooled models on these very sites.
        ceiling = max(pool, plr)
        summary["groups"][g] = {"sites": len(sel), "local": loc, "pooled": pool,
                                "pooled_lr": plr, "ceiling": ceiling, "fedavg": fa, "qisd": q}
        out_rows.append([g, str(len(sel)), f"{loc:.3f}", *(f"{q[m]:.3f}" for m in modes),
                         f"{pool:.3f}", f"{plr:.3f}", f"{fa:.3f}",
                         *(f"{q[m] / ceiling:.1%}" if ceiling else "-" for m in modes)])
    _table(header, out_rows, markdown)

    fed_total = fed.bytes_to_best
    print(f"\n## {dataset}: bytes per site (sent + received, mean over sites; "
          f"{tests} queries per site)\n")
    header = ["method", "packets", "emit KB", "per query KB", "own KB", "node KB",
              "own/fedavg", "node/fedavg"]
    brows = []
    for m in modes:
        emit = float(np.mean([r.emit_bytes[m] for r in rows]))
        query = float(np.mean([r.query_bytes[m] for r in rows]))
        node = float(np.mean([r.node_bytes[m] for r in rows]))
        packets = float(np.mean([r.packets[m] for r in rows]))
        own = emit + query
        summary[f"bytes_{m}"] = {"emit": emit, "queries": query, "per_query": query / tests,
                                 "own": own, "node": node, "packets": packets}
        brows.append([f"qisd {m}", f"{packets:.1f}", _kb(emit), _kb(query / tests), _kb(own),
                      _kb(node), f"{own / fed_total:,.1f}x", f"{node / fed_total:,.1f}x"])
    brows.append([f"fedavg ({fed.params} params, {fed.reach_round} rounds)", "-", "-", "-",
                  _kb(fed_total), _kb(fed_total), "1x", "1x"])
    _table(header, brows, markdown)
    print(f"\nFedAvg: lr {fed.lr}, best mean site accuracy {max(fed.curve):.3f} at round "
          f"{fed.best_round}, within {REACH_SLACK} of the best of all rates from round "
          f"{fed.reach_round}; "
          f"{fed.bytes_per_round:,} bytes per site per round (float32 down + up); bytes "
          f"counted to round {fed.reach_round}.")
    summary["fedavg"] = {"lr": fed.lr, "best_round": fed.best_round,
                         "reach_round": fed.reach_round, "params": fed.params,
                         "bytes_per_round": fed.bytes_per_round, "total": fed_total,
                         "best": max(fed.curve)}
    for m in modes:
        b = summary[f"bytes_{m}"]
        # How many queries a site could run inside the 1/100 budget after emitting.
        room = (fed_total / 100 - b["emit"]) / b["per_query"] if b["per_query"] else 0.0
        print(f"scale, {m}: a site's own qisd bytes equal FedAvg's at {fed.reach_round} "
              f"rounds of a model with {b['own'] / (8 * fed.reach_round):,.0f} parameters "
              f"(this one has {fed.params}); within 1/100 of FedAvg's bytes a site could "
              f"emit and then run {max(room, 0.0):,.1f} queries.")
    for m in modes:
        missing = sum(r.no_answer[m] for r in rows)
        if missing:
            print(f"qisd {m}: {missing} queries found no match (answered by the local "
                  "model instead)")
    tiny = summary["groups"]["tiny (n<=20)"]
    for m in modes:
        ratio = tiny["qisd"][m] / tiny["ceiling"]
        b = summary[f"bytes_{m}"]
        acc_ok = ratio >= 0.95
        bytes_ok = b["own"] <= fed_total / 100
        print(f"goal, {m}: tiny sites reach {ratio:.1%} of the pooled ceiling "
              f"({tiny['qisd'][m]:.3f} vs {tiny['ceiling']:.3f}; goal >= 95%): "
              f"{'met' if acc_ok else 'MISSED'}; bytes per site {b['own'] / fed_total:,.2f}x "
              f"FedAvg's own, {b['node'] / fed_total:,.2f}x with serving others (goal <= "
              f"0.01x): {'met' if bytes_ok else 'MISSED'}"
              + ("" if bytes_ok else f" by a factor of {100 * b['own'] / fed_total:,.0f}"))
    return summary


def plot(all_rows: list[SiteRow], modes: Sequence[str], path: Path) -> None:
    """Mean accuracy per site-size group (the table's groups), one panel per data set;
    series are dodged sideways so equal values stay visible; bars: +-1 standard error
    of the group's pooled held-out cases."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r.dataset for r in all_rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.6),
                             squeeze=False)
    series = [("local", "tab:grey", "o", "local only"),
              *((f"qisd:{m}", c, mk, f"qisd ({m} packets)")
                for m, c, mk in zip(modes, ("tab:blue", "tab:cyan"), ("s", "D"), strict=False)),
              ("pooled", "black", "^", "pooled kNN"), ("pooled_lr", "tab:purple", "v", "pooled LR"),
              ("fedavg", "tab:red", "x", "FedAvg LR")]
    for ax, ds in zip(axes[0], datasets, strict=True):
        rows = [r for r in all_rows if r.dataset == ds]
        groups = [g for g in GROUP_ORDER if any(group_of(r) == g for r in rows)]
        for i, (key, color, marker, label) in enumerate(series):
            def value(r: SiteRow, key: str = key) -> float:
                if key.startswith("qisd:"):
                    return r.qisd[key[5:]]
                return float(getattr(r, key))

            means, errs = [], []
            for g in groups:
                sel = [r for r in rows if group_of(r) == g]
                p = float(np.mean([value(r) for r in sel]))
                cases = sum(r.tests for r in sel)
                means.append(p)
                errs.append((p * (1 - p) / cases) ** 0.5)
            xs = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * 0.09
            ax.errorbar(xs, means, yerr=errs, marker=marker, markersize=5, color=color,
                        label=label, linewidth=1.2, capsize=2,
                        linestyle="--" if key in ("pooled", "pooled_lr", "fedavg") else "-")
        counts = [sum(group_of(r) == g for r in rows) for g in groups]
        ax.set_xticks(range(len(groups)),
                      [f"{g}\n({c} sites)" for g, c in zip(groups, counts, strict=True)])
        ax.set_xlabel("site size (training cases)")
        ax.set_ylabel("accuracy on the site's held-out cases")
        ax.set_title(f"{ds}: {len(rows)} sites, label-skewed", fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run (< 1 minute)")
    parser.add_argument("--datasets", default="breast_cancer,digits")
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--tests", type=int, default=20, help="held-out cases per site")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--modes", default="case,cohort")
    parser.add_argument("--cohort-min", type=int, default=5)
    parser.add_argument("--cohort-target", type=int, default=5, help="cases per cohort")
    parser.add_argument("--cohort-by", choices=("outcome", "features"), default="outcome")
    parser.add_argument("--cohort-k", type=int, default=3, help="cohorts per answer")
    parser.add_argument("--tables", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=100, help="FedAvg rounds")
    parser.add_argument("--epochs", type=int, default=5, help="FedAvg local epochs")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--max-train", type=int, default=0,
                        help="use at most this many training cases (0: all)")
    parser.add_argument("--plot", type=Path,
                        help="PNG to write (default docs/accuracy.png; none with --smoke)")
    parser.add_argument("--json", type=Path, help="also write per-site rows as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--plot-from", type=Path, metavar="JSON",
                        help="measure nothing: redraw the plot from what --json wrote")
    args = parser.parse_args(argv)
    if args.smoke:
        args.datasets, args.sites, args.tests, args.rounds = "breast_cancer", 10, 3, 10
        args.max_train = 150
    elif args.plot is None:
        args.plot = ROOT / "docs" / "accuracy.png"
    if args.plot_from is not None:
        data = json.loads(args.plot_from.read_text())
        rows = [SiteRow(**d) for d in data["sites"]]
        plot(rows, list(rows[0].qisd), args.plot or ROOT / "docs" / "accuracy.png")
        return 0
    if args.sites <= len(TINY_SIZES):
        raise SystemExit(f"--sites: need more than the {len(TINY_SIZES)} tiny sites")
    for name in ("tests", "rounds", "epochs", "cohort_min", "cohort_target", "cohort_k",
                 "tables", "bits", "probes"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: must be at least 1")
    if args.alpha <= 0:
        raise SystemExit("--alpha: must be > 0")

    import trio

    from qisd.manifest import Manifest

    logging.getLogger("qisd").setLevel(logging.CRITICAL)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("case", "cohort"):
            raise SystemExit(f"--modes: unknown mode {m!r} (case, cohort)")
    rule = CohortRule(min_size=args.cohort_min, target=args.cohort_target, by=args.cohort_by,
                      k=args.cohort_k)
    manifest = Manifest(name="evaluate", tables=args.tables, bits=args.bits,
                        probes=args.probes)
    started = time.perf_counter()
    all_rows: list[SiteRow] = []
    summaries = []
    for name in [d for d in args.datasets.split(",") if d]:
        t0 = time.perf_counter()
        task = load_task(name, args.seed, max_train=args.max_train)
        sites = partition(task, sites=args.sites, alpha=args.alpha, tests=args.tests,
                          seed=args.seed)
        local = [local_predict(task, s) for s in sites]
        pooled = [pooled_predict(task, sites, s) for s in sites]
        pooled_lin = pooled_lr(task, sites)
        fed = fedavg(task, sites, rounds=args.rounds, epochs=args.epochs, batch=10,
                     lrs=(0.01, 0.03, 0.1, 0.3), l2=1e-4, seed=args.seed)
        swarm = trio.run(partial(run_swarm, task, sites, local, modes=modes,
                                 manifest=manifest, rule=rule, seed=args.seed))
        rows = []
        for i, s in enumerate(sites):
            truth = task.y_test[s.test]
            rows.append(SiteRow(
                dataset=name, site=s.index, n=s.n, tests=len(s.test),
                local=float(np.mean(local[i] == truth)),
                pooled=float(np.mean(pooled[i] == truth)),
                pooled_lr=float(np.mean(pooled_lin[i] == truth)),
                fedavg=fed.accuracy[i],
                qisd={m: swarm[m].accuracy[i] for m in modes},
                no_answer={m: swarm[m].no_answer[i] for m in modes},
                packets={m: swarm[m].packets[i] for m in modes},
                emit_bytes={m: swarm[m].emit_bytes[i] for m in modes},
                query_bytes={m: swarm[m].query_bytes[i] for m in modes},
                node_bytes={m: swarm[m].node_bytes[i] for m in modes},
            ))
        all_rows += rows
        summary = report(name, rows, fed, modes, args.tests, args.markdown)
        for m in modes:
            secs = swarm[m].query_seconds
            summary[f"query_ms_{m}"] = {"p50": 1000 * float(np.percentile(secs, 50)),
                                        "p99": 1000 * float(np.percentile(secs, 99))}
        summaries.append(summary)
        print(f"({name}: {len(task.y_train)} training and {len(task.y_test)} test cases, "
              f"{args.sites} sites, Dirichlet alpha {args.alpha}; manifest tables="
              f"{args.tables} bits={args.bits} probes={args.probes}; "
              f"{time.perf_counter() - t0:.0f} s)")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"summaries": summaries,
                                         "sites": [asdict(r) for r in all_rows]},
                                        indent=1) + "\n")
    if args.plot is not None:
        plot(all_rows, modes, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
