"""The operator scripts: ``scripts/swarm`` (N daemons on 127.0.0.1) and
``scripts/netns-swarm`` (N daemons in network namespaces, root only).

Both run real ``qisd run`` processes, so these tests take a few seconds each; N is
kept small. The netns test is skipped, with the reason, where it cannot run (not
root, no ``ip netns``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SWARM = ROOT / "scripts" / "swarm"
NETNS_SWARM = ROOT / "scripts" / "netns-swarm"
QISD = Path(sys.executable).parent / "qisd"


def _env() -> dict[str, str]:
    # QISD_* in the caller's environment would reach every daemon.
    return {k: v for k, v in os.environ.items() if not k.startswith("QISD_")}


def script(path: Path, directory: Path, *args: str,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(path), "--dir", str(directory), "--qisd", str(QISD), *args],
        capture_output=True, text=True, timeout=timeout, env=_env(), check=False,
    )


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)


def status_rows(path: Path, directory: Path) -> list[dict[str, Any]]:
    proc = script(path, directory, "status", "--json")
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """stdout of ``proc`` up to the line containing ``marker``."""
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"no {marker!r} in output:\n{''.join(seen)}\nstderr:\n{err}")


@pytest.fixture
def swarm_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "swarm"
    yield directory
    if (directory / "swarm.json").exists():  # never leave daemons behind
        script(SWARM, directory, "stop")


# --- scripts/swarm ---------------------------------------------------------------------


def test_swarm_start_forms_supervises_and_stops_on_ctrl_c(swarm_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(SWARM), "--dir", str(swarm_dir), "--qisd", str(QISD),
         "start", "3", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        table = read_until(proc, "supervising", timeout=90)
        lines = [line for line in table.splitlines() if line.startswith("node-")]
        assert len(lines) == 3, table
        rows = status_rows(SWARM, swarm_dir)
        assert [r["name"] for r in rows] == ["node-0", "node-1", "node-2"]
        # Formed: every node knows the two others; each has its own port and id.
        assert all(r["running"] and r["peers"] >= 2 for r in rows), rows
        assert len({r["listen"] for r in rows}) == 3
        assert len({r["node_id"] for r in rows}) == 3
        assert all(r["listen"].startswith("127.0.0.1:") for r in rows)
        pids = [r["pid"] for r in rows]
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=60) == 0
        wait_gone(pids, timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def test_swarm_detach_status_and_stop(swarm_dir: Path) -> None:
    started = script(SWARM, swarm_dir, "start", "2", "--detach", "--timeout", "60")
    assert started.returncode == 0, started.stdout + started.stderr
    rows = status_rows(SWARM, swarm_dir)
    assert len(rows) == 2 and all(r["running"] and r["peers"] >= 1 for r in rows), rows
    again = script(SWARM, swarm_dir, "start", "2")
    assert again.returncode == 1 and "already running" in again.stderr
    stopped = script(SWARM, swarm_dir, "stop")
    assert stopped.returncode == 0, stopped.stderr
    wait_gone([r["pid"] for r in rows], timeout=5)
    after = script(SWARM, swarm_dir, "status")
    assert after.returncode == 3 and "stopped" in after.stdout


def test_swarm_status_without_a_swarm_says_so(tmp_path: Path) -> None:
    proc = script(SWARM, tmp_path / "none", "status")
    assert proc.returncode == 1
    assert "no swarm in" in proc.stderr


# --- scripts/netns-swarm ------------------------------------------------------------------


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root: network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           timeout=10, check=False)
    if probe.returncode != 0:
        return f"`ip netns` unavailable: {probe.stderr.strip()}"
    return None


def _namespaces(run_id: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.startswith(f"qisdnet-{run_id}-")]


@pytest.fixture
def netns_dir(tmp_path: Path) -> Iterator[Path]:
    why = _netns_unavailable()
    if why is not None:
        print(f"netns-swarm test skipped: {why}")
        pytest.skip(why)
    directory = tmp_path / "netns"
    yield directory
    record = directory / "netns-swarm.json"
    if record.exists() and json.loads(record.read_text())["namespaces"]:
        script(NETNS_SWARM, directory, "stop")


@pytest.mark.netns
def test_netns_swarm_builds_runs_partitions_and_tears_down(netns_dir: Path) -> None:
    started = script(NETNS_SWARM, netns_dir, "start", "3", "--detach", "--timeout", "60")
    assert started.returncode == 0, started.stdout + started.stderr
    record = json.loads((netns_dir / "netns-swarm.json").read_text())
    run_id = record["run_id"]
    assert len(_namespaces(run_id)) == 4  # hub + 3 nodes
    rows = status_rows(NETNS_SWARM, netns_dir)
    assert [r["listen"] for r in rows] == [f"10.47.0.{10 + i}:4470" for i in range(3)]
    assert all(r["running"] and r["peers"] >= 2 for r in rows), rows
    hub = f"qisdnet-{run_id}-hub"

    def bridged(port: str) -> bool:
        link = subprocess.run(["ip", "-n", hub, "link", "show", port], capture_output=True,
                              text=True, timeout=10, check=True).stdout
        return "master br0" in link

    assert script(NETNS_SWARM, netns_dir, "partition", "2").returncode == 0
    assert not bridged("p2") and bridged("p1")
    assert script(NETNS_SWARM, netns_dir, "heal", "2").returncode == 0
    assert bridged("p2")
    # The test addresses exist only in the namespaces: the host has no 10.47.0.0/24.
    host = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True,
                          timeout=10, check=True).stdout
    assert "10.47.0." not in host
    stopped = script(NETNS_SWARM, netns_dir, "stop")
    assert stopped.returncode == 0, stopped.stderr
    wait_gone([r["pid"] for r in rows], timeout=5)
    assert _namespaces(run_id) == []


@pytest.mark.netns
def test_netns_swarm_netem_or_clean_failure(netns_dir: Path) -> None:
    # Where the kernel has netem the links get the delay; where it has not, start
    # fails with a clear message and leaves nothing behind. Either way, nothing stays.
    proc = script(NETNS_SWARM, netns_dir, "start", "2", "--delay", "5", "--loss", "1",
                  "--detach", "--timeout", "60")
    run_id = json.loads((netns_dir / "netns-swarm.json").read_text())["run_id"]
    if proc.returncode != 0:
        assert "netem is not available" in proc.stderr, proc.stderr
        print("netem not in this kernel: checked the clean failure instead")
    else:
        qdisc = subprocess.run(["tc", "-n", f"qisdnet-{run_id}-n1", "qdisc", "show",
                                "dev", "eth0"], capture_output=True, text=True, timeout=10,
                               check=True).stdout
        assert "netem" in qdisc and "delay 5ms" in qdisc, qdisc
        assert script(NETNS_SWARM, netns_dir, "stop").returncode == 0
    assert _namespaces(run_id) == []


@pytest.mark.netns
def test_netns_swarm_ctrl_c_tears_down(netns_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(NETNS_SWARM), "--dir", str(netns_dir), "--qisd", str(QISD),
         "start", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        read_until(proc, "supervising", timeout=60)
        record = json.loads((netns_dir / "netns-swarm.json").read_text())
        assert _namespaces(record["run_id"])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert _namespaces(record["run_id"]) == []
        wait_gone([n["pid"] for n in record["nodes"]], timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
