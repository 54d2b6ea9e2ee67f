"""The evidence scripts: ``scripts/bench_recall.py``, ``scripts/evaluate.py`` and the
pure helpers of ``scripts/make_embeddings.py``.

Each benchmark runs once end to end with ``--smoke`` (a real swarm on 127.0.0.1, tiny
sizes, well under a minute) and its printed table is checked; the pure helpers they
rest on (splits, cohorts, kNN, the FedAvg byte count, the sentence filter) get direct
tests. Nothing here needs torch; ``evaluate.py`` and the digits data need scikit-learn
(the ``bench`` extra) and are skipped, with the reason, without it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"evidence_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str) -> tuple[str, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=180, check=False)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, elapsed


def table_rows(text: str, first: str) -> list[list[str]]:
    """Rows of the plain table whose header starts with ``first``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first])
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


# -- bench_recall ----------------------------------------------------------------------


def test_bench_recall_smoke_prints_its_table(tmp_path: Path) -> None:
    out, elapsed = run_script("bench_recall", "--smoke", "--json", str(tmp_path / "r.json"))
    assert elapsed < 60
    swarm_rows = table_rows(out, "dataset")
    assert [(r[1], r[2], r[3]) for r in swarm_rows] == [("4", "4", "4"), ("4", "4", "8")]
    for r in swarm_rows:
        # The swarm delivers what LSH promises: nothing lost on the way.
        assert float(r[4]) == pytest.approx(float(r[6]), abs=1e-9)
        assert 0.0 <= float(r[5]) <= 1.0  # two standard errors
        assert float(r[7]) <= float(r[8])  # p50 <= p99
        assert float(r[9].replace(",", "")) > 0  # bytes moved per query
        assert r[13].endswith("%")
    # More probes never find less.
    assert float(swarm_rows[1][4]) >= float(swarm_rows[0][4]) > 0
    model_rows = table_rows(out, "data")
    assert [(r[1], r[2]) for r in model_rows] == [("4", "4"), ("4", "6")]  # 2 shapes
    for r in model_rows:
        assert 0.0 <= float(r[4]) <= float(r[5]) <= 1.0  # 4 then 8 lookups
    assert model_rows[0][4:6] == [swarm_rows[0][6], swarm_rows[1][6]]
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data) == 4 and {d["budget"] for d in data} == {4, 8}
    assert sum(d["recall"] is not None for d in data) == 2
    assert "sentences: cheapest (swarm)" in out
    assert "manifest default" in out


def test_bench_recall_exact_knn_and_model() -> None:
    bench = load("bench_recall")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    q, stored = bench.split(x, 5, 0, seed=1)
    assert q.shape == (5, 16) and stored.shape == (195, 16)
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0)
    truth = bench.exact_knn(q, stored, 3)
    for qi, want in enumerate(truth):
        sims = stored @ q[qi]
        assert want == set(np.argsort(-sims)[:3].tolist())


def test_bench_recall_model_is_perfect_with_one_bucket() -> None:
    # One table of one bit, probed on both codes, covers everything: recall 1.
    bench = load("bench_recall")
    from qisd.sketch import normalize, quantize

    rng = np.random.default_rng(2)
    stored = rng.normal(size=(60, 8))
    stored = stored / np.linalg.norm(stored, axis=1, keepdims=True)
    q = rng.normal(size=(4, 8))
    sketches = [quantize(normalize(v)) for v in stored]
    mat = np.array([s.to_array() for s in sketches])
    queries = [(normalize(v), quantize(normalize(v))) for v in q]
    # Truth in sketch space, so only the bucketing can cost recall here.
    qmat = np.array([s.to_array() for _, s in queries])
    prepared = bench.Prepared(name="t", queries=queries, sketches=sketches, sketch_mat=mat,
                              truth=bench.exact_knn(qmat, mat, bench.K))
    model = bench.model_recall(prepared, 1, 1, [1, 2])
    assert model.recall[2] == 1.0 and model.se2[2] == 0.0
    assert model.recall[1] < 1.0  # one code of one bit sees about half the packets
    assert model.scan[2] == pytest.approx(1.0)  # both buckets: the whole topic
    assert 0.0 < model.scan[1] < 1.0
    assert model.bucket == pytest.approx(30, abs=15)


def test_pick_default_prefers_fewer_lookups_then_fewer_tables() -> None:
    bench = load("bench_recall")

    def row(tables: int, bits: int, budget: int, recall: float) -> object:
        return bench.Row(dataset="d", tables=tables, bits=bits, budget=budget, model=recall,
                         bucket=1.0, queries=1, packets=1)

    rows = [row(8, 4, 32, 0.99), row(4, 4, 16, 0.96), row(8, 4, 16, 0.97),
            row(4, 6, 8, 0.90), row(4, 4, 64, 1.0)]
    best = bench.pick_default(rows, "d", measured=False)
    assert (best.tables, best.bits, best.budget) == (4, 4, 16)
    assert bench.pick_default(rows, "d", goal=0.999, measured=False) is None  # 64 > 32
    assert bench.pick_default(rows, "d") is None  # nothing ran on a swarm
    # Measured rows only, and the goal must hold with two standard errors to spare.
    rows[0].recall, rows[0].se2 = 0.98, 0.02
    rows[1].recall, rows[1].se2 = 0.96, 0.02
    best = bench.pick_default(rows, "d")
    assert (best.tables, best.bits, best.budget) == (8, 4, 32)


# -- evaluate --------------------------------------------------------------------------


def test_evaluate_smoke_prints_its_tables(tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="evaluate.py needs the 'bench' extra")
    out, elapsed = run_script("evaluate", "--smoke", "--json", str(tmp_path / "e.json"))
    assert elapsed < 60
    acc = table_rows(out, "sites")
    groups = [r[0] for r in acc]
    assert groups[:4] == ["n=1", "n=5", "n=10", "n=20"]
    for r in acc:
        if r[0] in ("tiny", "all"):
            continue
        for value in r[2:8]:  # local, qisd x 2, pooled kNN, pooled LR, fedavg
            assert 0.0 <= float(value) <= 1.0
    assert "goal, case:" in out and "goal, cohort:" in out
    data = json.loads((tmp_path / "e.json").read_text())
    summary = data["summaries"][0]
    fed = summary["fedavg"]
    assert fed["total"] == fed["reach_round"] * fed["bytes_per_round"] > 0
    assert 1 <= fed["reach_round"] <= fed["best_round"] <= 10
    for g in summary["groups"].values():
        assert g["ceiling"] == max(g["pooled"], g["pooled_lr"])
    assert summary["bytes_case"]["per_query"] > 0
    sites = data["sites"]
    assert len(sites) == 10
    for s in sites:
        assert s["packets"]["case"] == s["n"]
        assert s["emit_bytes"]["case"] > 0
        assert s["query_bytes"]["case"] > 0
        # Privacy mode: cohorts of >= 5 cases of one class, so a site with fewer than
        # 5 cases of every class emits nothing.
        assert 0 <= s["packets"]["cohort"] <= s["n"] // 5
    assert any(s["packets"]["cohort"] > 0 for s in sites)
    # Sites that hold one case learn from the swarm what they cannot alone.
    assert data["summaries"][0]["groups"]["n=1"]["qisd"]["case"] >= 0.5


def test_partition_sizes_and_disjoint_sites() -> None:
    pytest.importorskip("sklearn", reason="evaluate.py needs the 'bench' extra")
    ev = load("evaluate")
    task = ev.load_task("breast_cancer", seed=1)
    sites = ev.partition(task, sites=20, alpha=0.5, tests=20, seed=1)
    assert [s.n for s in sites[:8]] == list(ev.TINY_SIZES)
    assert all(s.n > 20 for s in sites[8:])
    everyone = np.concatenate([s.train for s in sites])
    assert len(everyone) == len(set(everyone.tolist())) == len(task.y_train)
    assert all(len(s.test) == 20 for s in sites)


def test_cohorts_respect_the_minimum_size() -> None:
    ev = load("evaluate")
    rng = np.random.default_rng(5)
    for n in (1, 4, 5, 7, 23, 60):
        x = rng.normal(size=(n, 6))
        groups = ev.cohorts(x, min_size=5, target=10, seed=n)
        if n < 5:
            assert groups == []
            continue
        assert all(len(g) >= 5 for g in groups)
        assert sorted(np.concatenate(groups).tolist()) == list(range(n))


def test_cohort_outcome_reads_back_as_class_counts() -> None:
    ev = load("evaluate")
    from qisd.synthesis.encoding import decode_outcome

    outcome = ev.cohort_outcome(["benign", "malignant", "benign", "benign", "benign"])
    assert outcome == {"_packets": 5, "_origins": 1, "y=benign": 4, "y=malignant": 1}
    decoded = decode_outcome(outcome, 5)
    assert decoded.packets == 5 and decoded.origins == 1


def test_knn_weights_votes_by_similarity() -> None:
    ev = load("evaluate")
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = np.array([0, 0, 1])
    pred = ev.knn_predict(train, labels, np.array([[1.0, 0.05], [0.05, 1.0]]), 3, 2)
    assert pred.tolist() == [0, 1]


def test_fedavg_counts_float32_both_ways() -> None:
    pytest.importorskip("sklearn", reason="evaluate.py needs the 'bench' extra")
    ev = load("evaluate")
    task = ev.load_task("breast_cancer", seed=2)
    sites = ev.partition(task, sites=10, alpha=1.0, tests=10, seed=2)
    fed = ev.fedavg(task, sites, rounds=3, epochs=1, batch=10, lrs=(0.1,), l2=1e-4, seed=2)
    d = task.x_train.shape[1] + 1  # features + bias
    assert fed.params == d * 2
    assert fed.bytes_per_round == 2 * 4 * d * 2
    assert 1 <= fed.best_round <= 3 and len(fed.curve) == 3
    assert 1 <= fed.reach_round <= fed.best_round
    assert fed.curve[fed.reach_round - 1] >= max(fed.curve) - ev.REACH_SLACK
    assert fed.bytes_to_best == fed.reach_round * fed.bytes_per_round
    assert max(fed.curve) > 0.6


def test_fedavg_reports_the_rate_that_gets_there_first() -> None:
    pytest.importorskip("sklearn", reason="evaluate.py needs the 'bench' extra")
    ev = load("evaluate")
    task = ev.load_task("breast_cancer", seed=3)
    sites = ev.partition(task, sites=20, alpha=0.5, tests=20, seed=3)
    common = {"rounds": 12, "epochs": 2, "batch": 10, "l2": 1e-4, "seed": 3}
    lrs = (0.01, 0.1, 0.3)
    both = ev.fedavg(task, sites, lrs=lrs, **common)
    singles = [ev.fedavg(task, sites, lrs=(lr,), **common) for lr in lrs]
    target = max(max(s.curve) for s in singles) - ev.REACH_SLACK
    firsts = [next((i + 1 for i, a in enumerate(s.curve) if a >= target), None)
              for s in singles]
    assert both.reach_round == min(f for f in firsts if f is not None)
    assert both.lr == lrs[firsts.index(both.reach_round)]
    assert both.curve == singles[lrs.index(both.lr)].curve  # the runs are deterministic


# -- make_embeddings (the parts that need no model) -------------------------------------


def test_sentence_filter_keeps_prose_and_drops_code() -> None:
    emb = load("make_embeddings")
    doc = ("Return the number of items in the queue, counted when the lock is held.\n\n"
           "Example::\n\n    >>> q.qsize()\n    3\n\n"
           "Call f(x) == 3 to check it. Short one. This sentence is plain English prose "
           "about the buffer that is written to the socket.")
    found = emb.prose_sentences(doc)
    assert found == [
        "Return the number of items in the queue, counted when the lock is held.",
        "This sentence is plain English prose about the buffer that is written to the socket.",
    ]


def test_shipped_sentence_embeddings_are_unit_384d() -> None:
    with np.load(SCRIPTS / "data" / "sentences-384.npz") as data:
        vectors = data["vectors"].astype(np.float64)
        hashes = data["hashes"]
    assert vectors.shape[1] == 384 and vectors.shape[0] >= 3000
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-2)
    assert len({h.tobytes() for h in hashes}) == len(hashes)  # distinct sentences
