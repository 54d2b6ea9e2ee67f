"""`qisd run` as an operator and an application see it: three daemons on loopback
driven only through the CLI, readiness and shutdown over sd_notify, restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import Daemon, cli, cli_json

from qisd import Client
from qisd.control.errors import ControlError

pytestmark = pytest.mark.slow

VEC_A = [0.9, 0.1, 0.3, -0.2, 0.5, 0.05, -0.4, 0.2]
VEC_B = [-0.5, 0.7, -0.1, 0.6, -0.3, 0.2, 0.1, -0.6]


def emit(d: Daemon, topic: str, vector: list[float], **outcome: object) -> str:
    args = ["emit", "--topic", topic, "--vector", json.dumps(vector)]
    for k, v in outcome.items():
        args += ["--outcome", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    out = cli_json(*args, socket_path=d.socket)
    assert len(out["id"]) == 32
    return str(out["id"])


def test_three_daemons_emit_query_watch_restart(workdir: Path, daemons: list[Daemon]) -> None:
    a = Daemon(workdir, "a").start()
    daemons.append(a)
    b = Daemon(workdir, "b", bootstrap=[a.address]).start()
    c = Daemon(workdir, "c", bootstrap=[a.address]).start()
    daemons += [b, c]

    status = a.status
    for field in ("node_id", "listen", "peers", "packets", "metrics", "version"):
        assert field in status
    assert status["metrics"].startswith("http://127.0.0.1:")
    assert len(status["node_id"]) == 40

    # B watches the topic; the stream starts with nothing and prints JSON lines.
    watch = subprocess.Popen(
        [sys.executable, "-m", "qisd", "watch", "--topic", "icu", "--json",
         "--socket", str(b.socket)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Wait until everyone knows everyone (bootstrap lookups done).
        for d in (a, b, c):
            _wait_peers(d, 2)

        # Each peer was heard from moments ago and has missed nothing.
        peers = cli_json("peers", socket_path=a.socket)["peers"]
        assert sorted(p["address"] for p in peers) == sorted([b.address, c.address])
        for p in peers:
            assert 0 <= p["last_seen_s"] < 30 and p["failures"] == 0

        pid = emit(a, "icu", VEC_A, survived=True, los_days=4.5)
        result = cli_json("query", "--topic", "icu", "--vector", json.dumps(VEC_A), "-k", "5",
                          socket_path=c.socket)
        assert set(result) == {"matches", "answer", "notes"} and result["notes"] == []
        ids = [m["id"] for m in result["matches"]]
        assert pid in ids
        match = result["matches"][ids.index(pid)]
        assert set(match) >= {"id", "similarity", "outcome", "n", "origin", "kind"}
        assert match["outcome"] == {"survived": True, "los_days": 4.5}
        assert match["similarity"] > 0.99
        assert match["origin"] == a.status["public_key"]

        # A packet emitted on C reaches B's watch.
        pid_c = emit(c, "icu", VEC_B, survived=False)
        assert watch.stdout is not None
        seen = _read_until(watch, pid_c)
        assert seen["topic"] == "icu" and seen["outcome"] == {"survived": False}
    finally:
        watch.terminate()
        watch.communicate(timeout=10)

    # SIGTERM: each exits 0 within the grace period, having said STOPPING=1.
    for d in (a, b, c):
        assert d.stop() == 0
    # Restart A: its stored packets are still there.
    a2 = Daemon(workdir, "a").start()
    daemons.append(a2)
    packets = cli_json("packets", "--topic", "icu", socket_path=a2.socket)["packets"]
    assert pid in {p["id"] for p in packets}
    assert a2.status["node_id"] == status["node_id"]
    # Its saved contacts (B and C, now stopped) are back in the table, never heard
    # from since this start.
    restored = cli_json("peers", socket_path=a2.socket)["peers"]
    assert sorted(p["address"] for p in restored) == sorted([b.address, c.address])
    assert all(p["last_seen_s"] is None for p in restored)
    assert a2.stop() == 0


def _wait_peers(d: Daemon, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cli_json("status", socket_path=d.socket)["peers"] >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{d.name} did not find {n} peers")


def _read_until(proc: subprocess.Popen[str], packet_id: str, timeout: float = 30.0) -> dict:
    """Read JSON lines from ``proc`` until one is the packet; a thread does the
    blocking reads (select() on a buffered text pipe misses lines already buffered)."""
    import queue
    import threading

    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if not line:
            break
        event = json.loads(line)
        if event.get("id") == packet_id:
            return dict(event)
    raise AssertionError(f"watch never printed {packet_id}")


def test_sd_notify_ready_then_stopping(workdir: Path, daemons: list[Daemon]) -> None:
    d = Daemon(workdir, "n").start()
    daemons.append(d)
    assert any(m.startswith("READY=1") for m in d.messages)
    assert d.proc is not None
    d.proc.send_signal(15)
    d.wait_for("STOPPING=1")
    assert d.proc.wait(timeout=20) == 0
    ready = next(i for i, m in enumerate(d.messages) if "READY=1" in m)
    stopping = next(i for i, m in enumerate(d.messages) if "STOPPING=1" in m)
    assert ready < stopping


def test_a_stopping_daemon_ends_open_watches_saying_so(
    workdir: Path, daemons: list[Daemon]
) -> None:
    """SIGTERM: a watch gets a last line (code unavailable), not a cut connection
    that looks like a reader left behind."""
    d = Daemon(workdir, "sw").start()
    daemons.append(d)
    with Client(d.socket, timeout=30) as client, client.watch(topic="t") as events:
        pid = client.emit(topic="t", vector=[1.0, 0.0], outcome={"a": 1})
        assert next(iter(events))["id"] == pid
        assert d.stop() == 0
        with pytest.raises(ControlError) as info:
            next(iter(events))
    assert info.value.code == "unavailable"
    assert info.value.message == "the daemon is stopping; the watch ends here"


def test_second_daemon_on_same_state_dir_or_socket_fails(
    workdir: Path, daemons: list[Daemon]
) -> None:
    first = Daemon(workdir, "one").start()
    daemons.append(first)
    same_state = subprocess.run(
        [sys.executable, "-m", "qisd", "run", "--state-dir", str(first.state_dir),
         "--socket", str(workdir / "other.sock"), "--listen", "127.0.0.1:0", "--metrics", "off"],
        capture_output=True, text=True, timeout=30,
    )
    assert same_state.returncode != 0
    assert "another qisd" in same_state.stderr and str(first.state_dir) in same_state.stderr
    same_socket = subprocess.run(
        [sys.executable, "-m", "qisd", "run", "--state-dir", str(workdir / "two"),
         "--socket", str(first.socket), "--listen", "127.0.0.1:0", "--metrics", "off"],
        capture_output=True, text=True, timeout=30,
    )
    assert same_socket.returncode != 0
    assert str(first.socket) in same_socket.stderr
    # The first one is unharmed.
    assert cli_json("status", socket_path=first.socket)["node_id"] == first.status["node_id"]


def test_stale_socket_file_is_replaced(workdir: Path, daemons: list[Daemon]) -> None:
    d = Daemon(workdir, "s").start()
    daemons.append(d)
    assert d.proc is not None
    d.kill()  # SIGKILL leaves the socket file behind
    assert d.socket.exists()
    d2 = Daemon(workdir, "s").start()
    daemons.append(d2)
    assert d2.status["node_id"] == d.status["node_id"]


def test_cli_without_daemon_says_so(workdir: Path) -> None:
    sock = workdir / "nobody.sock"
    proc = cli("status", socket_path=sock, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(sock) in lines[0] and "qisd run" in lines[0]


def test_bulk_emit_file_reports_each_bad_line(workdir: Path, daemons: list[Daemon]) -> None:
    d = Daemon(workdir, "bulk").start()
    daemons.append(d)
    lines = [
        json.dumps({"topic": "t", "vector": [1, 0, 0], "outcome": {"ok": True}}),
        "{not json",
        json.dumps({"topic": "t", "vector": [0, 0, 0], "outcome": {"ok": True}}),
        json.dumps({"topic": "t", "vector": [0, 1, 0], "outcome": {"ok": False}, "n": 3}),
    ]
    path = workdir / "cases.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = cli("emit", "--file", str(path), socket_path=d.socket, check=False)
    assert proc.returncode == 1
    assert "accepted=2" in proc.stdout + proc.stderr
    assert "rejected=2" in proc.stdout + proc.stderr
    assert "line 2" in proc.stderr and "line 3" in proc.stderr
    assert "zero length" in proc.stderr
    assert cli_json("status", socket_path=d.socket)["packets"] == 2


def test_identical_cases_in_one_batch_are_each_kept(workdir: Path, daemons: list[Daemon]) -> None:
    """A hundred and fifty patients alike in every recorded respect are that many
    cases, not one packet stored again and again (the same content in the same
    millisecond would be the same packet); and none is stamped after the synthesis
    that counts it, so a query finding both counts each case once."""
    d = Daemon(workdir, "alike").start()
    daemons.append(d)
    line = json.dumps({"topic": "t", "vector": [1, 2, 3], "outcome": {"died": True}})
    path = workdir / "alike.jsonl"
    path.write_text((line + "\n") * 150)
    started_ms = time.time() * 1000
    proc = cli("emit", "--file", str(path), "--json", socket_path=d.socket)
    summary = json.loads(proc.stdout)
    ids = [r["id"] for r in summary["results"]]
    assert summary["accepted"] == 150 and len(set(ids)) == 150
    held = cli_json("packets", "--topic", "t", "--limit", "500", socket_path=d.socket)["packets"]
    assert sorted(p["id"] for p in held if p["kind"] == "observation") == sorted(ids)
    stamps = [p["created_ms"] for p in held if p["kind"] == "observation"]
    assert len(set(stamps)) == 150 and min(stamps) >= started_ms - 1000
    assert max(stamps) <= time.time() * 1000  # never ahead of the clock
    # The synthesis of them names them by one digest; a query finding it and the
    # cases still counts each case once.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = cli_json("packets", "--topic", "t", socket_path=d.socket)["packets"]
        if any(p["kind"] == "synthesis" and p["n"] == 150 for p in held):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("no synthesis of the 150 within 30 s")
    answer = cli_json("query", "--topic", "t", "--vector", "[1, 2, 3]", "-k", "200",
                      socket_path=d.socket)["answer"]
    assert answer["support"]["syntheses"] == 1
    assert answer["support"]["presumed_covered"] == 150
    assert answer["support"]["cases"] == 150


def test_bad_input_is_named(workdir: Path, daemons: list[Daemon]) -> None:
    d = Daemon(workdir, "bad").start()
    daemons.append(d)
    proc = cli("emit", "--topic", "t", "--vector", "[1, NaN]", "--outcome", "x=1",
               socket_path=d.socket, check=False)
    assert proc.returncode != 0 and "vector" in proc.stderr
    proc = cli("emit", "--topic", "t", "--vector", "[1, 2]", "--outcome", "x",
               socket_path=d.socket, check=False)
    assert proc.returncode != 0 and "outcome" in proc.stderr
    proc = cli("query", "--topic", "t", "--vector", "not-a-list", socket_path=d.socket,
               check=False)
    assert proc.returncode != 0 and "vector" in proc.stderr
    proc = cli("bootstrap", d.address, "--json", socket_path=d.socket, check=False)
    assert proc.returncode == 1  # a node cannot join through itself, and says so
    failed = json.loads(proc.stdout)["failed"]
    assert failed == [{"address": d.address, "reason": "this node's own address"}]
    for topic in ("a\tb", "x" * 65, ""):  # as emit and query would: no such topic exists
        proc = cli("packets", "--topic", topic, socket_path=d.socket, check=False)
        assert proc.returncode == 1 and "topic" in proc.stderr, proc.stderr
    assert os.path.exists(d.socket)
    assert cli_json("status", socket_path=d.socket)["packets"] == 0


def test_config_problems_stop_the_start_with_one_line_and_status_2(workdir: Path) -> None:
    """What only a config change can fix exits 2 (systemd does not retry it) with one
    line naming the key, before anything is created; a port in use (below) exits 1."""
    (workdir / "bad.toml").write_text("junk", encoding="utf-8")
    (workdir / "syn.toml").write_text('[synthesis]\nsynthesizer = "nope"\n', encoding="utf-8")
    a_file = workdir / "a-file"
    a_file.write_text("", encoding="utf-8")
    base = {"--state-dir": str(workdir / "s"), "--socket": str(workdir / "s.sock")}
    cases = [
        ({"--manifest": str(workdir / "missing.toml")}, "node.manifest: no such file"),
        ({"--manifest": str(workdir / "bad.toml")}, "not valid TOML"),
        ({"--config": str(workdir / "syn.toml")}, "synthesis.synthesizer: no 'nope'"),
        ({"--state-dir": str(a_file)}, "node.state_dir: " + repr(str(a_file))),
        ({"--socket": str(workdir / "no" / "dir" / "x.sock")}, "does not exist"),
        ({"--socket": str(workdir / ("x" * 120))}, "Unix sockets allow at most"),
    ]
    for change, named in cases:
        args = [f"{k}={v}" for k, v in {**base, **change}.items()]
        proc = subprocess.run(
            [sys.executable, "-m", "qisd", "run", "--listen", "127.0.0.1:0", "--metrics", "off",
             *args], capture_output=True, text=True, timeout=30,
        )
        assert proc.returncode == 2, (change, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (change, proc.stderr)
        assert named in lines[0], (change, lines[0])
    assert not (workdir / "no").exists()
    assert not (workdir / "s").exists() and not (workdir / "s.sock").exists()


def test_port_in_use_is_named(workdir: Path) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "qisd", "run", "--state-dir", str(workdir / "p"),
             "--socket", str(workdir / "p.sock"), "--listen", f"127.0.0.1:{port}",
             "--metrics", "off"],
            capture_output=True, text=True, timeout=30,
        )
    assert proc.returncode == 1
    assert f"cannot bind UDP 127.0.0.1:{port}" in proc.stderr
    assert not (workdir / "p.sock").exists()


def test_down_bootstrap_peer_is_retried_while_serving_alone(
    workdir: Path, daemons: list[Daemon]
) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # B starts first, its only bootstrap peer not yet running: it serves alone (N=1).
    b = Daemon(workdir, "late-b", bootstrap=[f"127.0.0.1:{port}"]).start()
    daemons.append(b)
    pid = emit(b, "alone", VEC_A, ok=True)
    found = cli_json("query", "--topic", "alone", "--vector", json.dumps(VEC_A),
                     socket_path=b.socket)
    assert [m["id"] for m in found["matches"]] == [pid]
    # The peer comes up on that port; B's backoff retry finds it.
    # (the later --listen wins over the helper's port-0 default)
    a = Daemon(workdir, "late-a", extra=["--listen", f"127.0.0.1:{port}"]).start()
    daemons.append(a)
    assert a.address == f"127.0.0.1:{port}"
    _wait_peers(b, 1, timeout=40)
    # And B's packet spreads to where it belongs: A can find it.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = cli_json("query", "--topic", "alone", "--vector", json.dumps(VEC_A),
                       socket_path=a.socket)
        if pid in [m["id"] for m in got["matches"]]:
            return
        time.sleep(0.5)
    raise AssertionError("A never found B's packet")


@pytest.mark.ipv6
def test_dual_stack_daemon_bridges_ipv4_and_ipv6_daemons(
    workdir: Path, daemons: list[Daemon]
) -> None:
    """`--listen [::]:0` is one socket for both families: an IPv4-only and an
    IPv6-only daemon join through it and find each other's packets at it."""
    dual = Daemon(workdir, "dual", listen="[::]:0").start()
    daemons.append(dual)
    assert dual.address.startswith("[::]:")
    port = dual.address.rsplit(":", 1)[1]
    v4 = Daemon(workdir, "v4", bootstrap=[f"127.0.0.1:{port}"]).start()
    daemons.append(v4)
    v6 = Daemon(workdir, "v6", listen="[::1]:0", bootstrap=[f"[::1]:{port}"]).start()
    daemons.append(v6)
    _wait_peers(dual, 2)
    peers = cli_json("peers", socket_path=dual.socket)["peers"]
    # The IPv4 daemon is known by its IPv4 address, not as ::ffff:127.0.0.1.
    assert sorted(p["address"] for p in peers) == sorted([v4.address, v6.address])

    from_v4 = emit(v4, "icu", VEC_A, survived=True)
    from_v6 = emit(v6, "icu", VEC_B, survived=False)
    for asker, vec, pid in ((v6, VEC_A, from_v4), (v4, VEC_B, from_v6)):
        result = cli_json("query", "--topic", "icu", "--vector", json.dumps(vec),
                          socket_path=asker.socket)
        assert pid in [m["id"] for m in result["matches"]]
    for d in (v4, v6, dual):
        assert d.stop() == 0


def test_a_dead_bootstrap_peer_is_named_even_with_saved_peers(
    workdir: Path, daemons: list[Daemon]
) -> None:
    """The bootstrap peers are tried at every start, a routing table saved by the last
    run or not: a wrong or dead one is said, not skipped in silence."""
    import socket

    a = Daemon(workdir, "saved-a").start()
    daemons.append(a)
    b = Daemon(workdir, "saved-b", bootstrap=[a.address]).start()
    daemons.append(b)
    _wait_peers(b, 1, timeout=20)
    assert b.stop() == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    b.bootstrap = [dead]
    b.start()
    def naming_dead() -> list[dict[str, Any]]:
        rows = [json.loads(r) for r in b.log.read_text().splitlines() if r.startswith("{")]
        return [r for r in rows if dead in r.get("failed", {})]

    deadline = time.monotonic() + 30
    while not naming_dead():
        assert time.monotonic() < deadline, b.log.read_text()[-3000:]
        time.sleep(0.2)
    (line,) = naming_dead()
    assert line["failed"][dead] == "no answer" and line["peers"] >= 1
    assert cli_json("status", socket_path=b.socket)["peers"] >= 1
