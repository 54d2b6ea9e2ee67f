"""The metrics endpoint of a running daemon, scraped over real HTTP and parsed."""

from __future__ import annotations

import json
import re
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from daemon_helpers import Daemon, cli_json
from prometheus_client.parser import text_string_to_metric_families

from qisd.metrics_http import MAX_CONNECTIONS

pytestmark = pytest.mark.slow


ROOT = Path(__file__).resolve().parents[2]
#: How each family type is spelled where it is documented (as in the exposition).
SUFFIX = {"counter": "_total", "info": "_info"}


def page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return resp.read().decode()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(page(url)):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_counters_move_after_emits_and_queries(workdir: Path, daemons: list[Daemon]) -> None:
    a = Daemon(workdir, "ma").start()
    daemons.append(a)
    b = Daemon(workdir, "mb", bootstrap=[a.address]).start()
    daemons.append(b)
    url = a.status["metrics"]
    before = scrape(url)
    assert value(before, "qisd_build_info", version="0.1.0",
                 swarm=a.status["swarm"][:16]) == 1.0
    for i in range(3):
        cli_json("emit", "--topic", "m", "--vector", json.dumps([1.0, i, 0.5]),
                 "--outcome", f"y={i}", socket_path=a.socket)
    cli_json("query", "--topic", "m", "--vector", "[1, 1, 0.5]", socket_path=a.socket)
    after = scrape(url)

    def moved(name: str) -> float:
        return value(after, name) - value(before, name)

    assert moved("qisd_packets_emitted_total") == 3
    assert moved("qisd_queries_total") == 1
    assert value(after, "qisd_stored_packets") >= 3
    assert value(after, "qisd_stored_bytes") > 0
    assert value(after, "qisd_peers") >= 1
    assert total(after, "qisd_rpc_total") > total(before, "qisd_rpc_total")
    assert value(after, "qisd_control_requests_total", method="emit", result="ok") >= 3
    assert value(after, "qisd_control_requests_total", method="query", result="ok") >= 1
    assert moved("qisd_network_sent_bytes_total") > 0
    assert value(after, "qisd_lookup_duration_seconds_count") > 0
    assert total(after, "qisd_rpc_duration_seconds_count") > 0
    # A bootstrapped node records when it last joined.
    b_metrics = scrape(b.status["metrics"])
    assert value(b_metrics, "qisd_bootstrap_last_success_timestamp_seconds") > 1.7e9
    # Every metric served is in the README's list and the operations table.
    docs = {name: (ROOT / name).read_text() for name in ("README.md", "docs/operations.md")}
    for family in text_string_to_metric_families(page(url)):
        documented = family.name + SUFFIX.get(family.type, "")
        for name, text in docs.items():
            assert re.search(f"`{documented}[`{{]", text), f"{documented} is not in {name}"
    # Everything is named by the conventions: qisd_ prefix, no per-peer labels.
    for name, labels in after:
        assert name.startswith("qisd_"), name
        assert not {"peer", "address", "node_id"} & {k for k, _ in labels}


def test_unknown_path_is_404(workdir: Path, daemons: list[Daemon]) -> None:
    d = Daemon(workdir, "m404").start()
    daemons.append(d)
    base = d.status["metrics"].rsplit("/", 1)[0]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(base + "/nope", timeout=10)
    assert info.value.code == 404
    info.value.close()
    # A request that is not HTTP is told so (400); another method, 405.
    host, port = base.removeprefix("http://").rsplit(":", 1)
    for request, status in ((b"hello there\r\n\r\n", b"400"), (b"\r\n\r\n", b"400"),
                            (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
                            (b"GET http://x/metrics HTTP/1.1\r\n\r\n", b"200")):
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(request)
            reply = conn.recv(4096)
            assert reply.split()[1] == status, request
            if status == b"405":
                assert b"\r\nAllow: GET, HEAD\r\n" in reply
    # A scraper that resets its connection (port scanners, some health checks) is
    # nothing to the daemon: it keeps serving.
    for request in (b"", b"GET /metr"):
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(request)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.2)
    assert d.proc is not None and d.proc.poll() is None
    with urllib.request.urlopen(d.status["metrics"], timeout=10) as resp:
        assert resp.status == 200


def test_idle_scrapers_cannot_take_the_daemons_descriptors(
    workdir: Path, daemons: list[Daemon]
) -> None:
    """Connections past the cap are closed at once (before, each was held 10 s with
    no bound: enough of them ran the daemon out of file descriptors)."""
    d = Daemon(workdir, "mcap").start()
    daemons.append(d)
    host, port = d.status["metrics"].removeprefix("http://").split("/")[0].rsplit(":", 1)
    held = [socket.create_connection((host, int(port)), timeout=10)
            for _ in range(MAX_CONNECTIONS)]
    try:
        for conn in held:
            conn.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
        time.sleep(0.5)
        with socket.create_connection((host, int(port)), timeout=10) as extra:
            extra.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            try:  # closed at once (a reset, its request unread): the cap is reached
                assert extra.recv(64) == b""
            except ConnectionResetError:
                pass
    finally:
        for conn in held:
            conn.close()
    time.sleep(0.5)
    with urllib.request.urlopen(d.status["metrics"], timeout=10) as resp:
        assert resp.status == 200
    assert cli_json("status", socket_path=d.socket)["node_id"]
