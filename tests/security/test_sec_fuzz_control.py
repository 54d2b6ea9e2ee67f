"""Fuzzing the control socket: hostile request lines into the real daemon API.

The real :class:`~qisd.daemon.service.NodeService` (a lone DHT node on 127.0.0.1 and
a SQLite store) is served by the real control server on a Unix socket, in a
background thread with its own ``trio.run``. Each hypothesis example opens a
connection, writes a batch of lines (random bytes, broken JSON, requests with wrong
or hostile params, valid requests, over-long lines, a ``watch``), half-closes, and
reads every reply until the server closes.

A crash is: the server's ``trio.run`` ending, a reply that is not one protocol
line, an ``internal`` error (an exception inside the daemon), more replies than
lines, or the server no longer answering ``status`` on a fresh connection. Memory
must stay bounded (process RSS growth under a bound).

The normal suite runs :data:`QUICK_EXAMPLES` connections; ``QISD_LONG_FUZZ=1`` runs
the long mode (>= 100,000 lines), which prints its counts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from sec_helpers import running_node

from qisd.config import Config
from qisd.control.protocol import ERROR_CODES, INTERNAL, METHODS
from qisd.control.server import serve_control
from qisd.control.stats import ControlStats
from qisd.daemon.service import NodeService
from qisd.daemon.watch import WatchHub
from qisd.dht import DHTConfig
from qisd.identity import Identity
from qisd.manifest import DEFAULT_MANIFEST
from qisd.store import PacketStore

LONG = os.environ.get("QISD_LONG_FUZZ") == "1"
QUICK_EXAMPLES = 100
LONG_INPUTS = 100_000
LONG_EXAMPLES = 7_000  # batches of 15..30 lines: >= 100,000 in all
LONG_CHUNK = 250  # examples per hypothesis run in the long mode
MAX_REQUEST = 4096
RSS_BOUND = 96 * 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@dataclass
class Server:
    path: Path
    token: trio.lowlevel.TrioToken
    stats: ControlStats
    lines: int = 0
    replies: int = 0


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    tmp = Path(tempfile.mkdtemp(prefix="qisd-cf-", dir="/tmp"))
    ready, box = threading.Event(), {}

    async def main() -> None:
        identity = Identity.generate()
        async with running_node(
            identity, DEFAULT_MANIFEST, None, config=DHTConfig(rpc_timeout=0.2)
        ) as node:
            store = PacketStore.open(tmp / "packets.sqlite")
            try:
                service = NodeService(
                    config=Config(), ident=identity, manifest=DEFAULT_MANIFEST,
                    store=store, node=node, watches=WatchHub(),
                )
                stats = ControlStats()
                service.control_stats = stats
                async with trio.open_nursery() as nursery:
                    path = await nursery.start(
                        lambda task_status: serve_control(
                            tmp / "c.sock", service, max_request_bytes=MAX_REQUEST,
                            write_timeout=5.0, stats=stats, task_status=task_status,
                        )
                    )
                    stop = trio.Event()
                    box["server"] = Server(path, trio.lowlevel.current_trio_token(), stats)
                    box["stop"] = stop
                    ready.set()
                    await stop.wait()
                    nursery.cancel_scope.cancel()
            finally:
                store.close()

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # the server crashed: the tests report it
            box["crash"] = exc
            ready.set()

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    assert ready.wait(20)
    assert "crash" not in box, box.get("crash")
    srv: Server = box["server"]
    yield srv
    trio.from_thread.run_sync(box["stop"].set, trio_token=srv.token)
    thread.join(20)
    shutil.rmtree(tmp, ignore_errors=True)
    assert "crash" not in box, box.get("crash")


def exchange(path: Path, data: bytes) -> list[bytes]:
    """Send ``data``, half-close, and read replies until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close first (after a watch ends)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    body = b"".join(chunks)
    assert not body or body.endswith(b"\n"), f"a reply line was cut: {body[-80:]!r}"
    return body.splitlines()


def check_reply(line: bytes) -> None:
    msg = json.loads(line)
    assert isinstance(msg, dict) and msg.get("v") == 1, line
    if "event" in msg:
        assert isinstance(msg["event"], dict), line
        return
    if msg.get("ok") is True:
        assert isinstance(msg.get("result"), dict), line
        return
    assert msg.get("ok") is False, line
    error = msg["error"]
    assert error["code"] in ERROR_CODES, line
    assert error["code"] != INTERNAL, f"the daemon failed: {line!r}"
    assert isinstance(error["message"], str) and error["message"], line


# -- strategies ---------------------------------------------------------------------

def any_text(max_size: int) -> st.SearchStrategy[str]:
    """Text, lone surrogates included (json.dumps escapes them as ``\\ud800``: valid
    JSON that is not Unicode text)."""
    return st.text(max_size=max_size) | st.text(
        alphabet=st.characters(exclude_categories=()), max_size=max_size
    )


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text(20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(any_text(8), children, max_size=5),
    max_leaves=12,
)
TOPIC = st.sampled_from(["t", "sepsis", "", " ", "\x00", "x" * 65, "é", "\ud800"]) | any_text(70)
VECTOR = st.lists(
    st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=0, max_size=40
) | st.lists(st.integers(-(10**400), 10**400), max_size=3)
OUTCOME = st.dictionaries(
    any_text(40),
    st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | any_text(70) | JSON,
    max_size=18,
)
EMIT = st.fixed_dictionaries(
    {"topic": TOPIC, "vector": VECTOR, "outcome": OUTCOME},
    optional={"n": st.integers(-5, 2**40), "ttl": st.none() | st.integers(-5, 2**40)},
)
LOOPBACK = st.integers(1, 65535).map(lambda p: f"127.0.0.1:{p}")
PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "status": st.just({}),
    "peers": st.just({}),
    "identity": st.just({}),
    "emit": EMIT,
    "emit_many": st.fixed_dictionaries({"items": st.lists(EMIT | JSON, max_size=4)}),
    "query": st.fixed_dictionaries(
        {"topic": TOPIC, "vector": VECTOR}, optional={"k": st.integers(-5, 10**6)}
    ),
    "watch": st.fixed_dictionaries({"topic": TOPIC}, optional={"vector": st.none() | VECTOR}),
    "packets": st.fixed_dictionaries(
        {}, optional={"topic": st.none() | TOPIC, "limit": st.integers(-5, 10**6)}
    ),
    # Only IP literals: a host name would send the node to DNS.
    "bootstrap": st.fixed_dictionaries({"addresses": st.lists(LOOPBACK, max_size=2)}),
}
assert set(PARAMS) == set(METHODS)


@st.composite
def request(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(sorted(METHODS)) | st.text(max_size=10))
    params = draw(PARAMS[method]) if method in PARAMS else draw(JSON)
    msg: dict[str, Any] = {"v": 1, "id": draw(st.integers(0, 2**31) | any_text(8))}
    msg["method"] = method
    msg["params"] = params
    if draw(st.integers(0, 9)) == 0:  # break one field
        field = draw(st.sampled_from(["v", "id", "method", "params", "extra"]))
        msg[field] = draw(JSON)
    text = json.dumps(msg)
    return text.encode()


LINE = st.one_of(
    request(),
    request(),
    request(),
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ")),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([
        b"[" * 3000 + b"]" * 3000,  # nesting bomb (within the line limit)
        b'{"v":1,"id":1,"method":"status","params":{"x":NaN}}',
        b'{"v":1,"id":1e999,"method":"status"}',
        b"\xff\xfe\xfd",
        b"",
        b"x" * (MAX_REQUEST + 10),  # over the limit: too_large, skipped
        b'{"v":1,"id":2,"method":"status"}\r',
        b'{"v":1,"id":"\\ud800","method":"identity"}',  # an id that cannot be echoed
    ]),
)


def run_fuzz(srv: Server, examples: int, sizes: tuple[int, int], run_seed: int | None = None
             ) -> None:
    """One hypothesis run; ``run_seed`` seeds it (the long mode's runs each get their
    own, so ``--hypothesis-seed`` cannot make them repeat one another)."""
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(lines=st.lists(LINE, min_size=sizes[0], max_size=sizes[1]))
    def fuzz(lines: list[bytes]) -> None:
        replies = exchange(srv.path, b"\n".join(lines) + b"\n")
        srv.lines += len(lines)
        srv.replies += len(replies)
        # A watch takes over the connection: it may answer fewer lines, never more
        # (its events aside).
        answers = [r for r in replies if b'"event"' not in r]
        assert len(answers) <= len(lines)
        for reply in replies:
            check_reply(reply)

    (fuzz if run_seed is None else seed(run_seed)(fuzz))()


def still_serving(srv: Server) -> None:
    replies = exchange(srv.path, b'{"v":1,"id":"last","method":"status"}\n')
    assert len(replies) == 1
    msg = json.loads(replies[0])
    assert msg["ok"] is True and msg["id"] == "last"


def test_control_socket_fuzz(server: Server) -> None:
    run_fuzz(server, QUICK_EXAMPLES, (1, 6))
    still_serving(server)
    assert server.lines >= QUICK_EXAMPLES


@pytest.mark.fuzz
@pytest.mark.skipif(not LONG, reason="long fuzz: set QISD_LONG_FUZZ=1")
def test_control_socket_long_fuzz(server: Server) -> None:
    run_fuzz(server, LONG_CHUNK, (15, 30))  # warm-up: caches, SQLite pages, hypothesis
    start_lines, start_rss = server.lines, rss_bytes()
    # Hypothesis remembers every choice of one run (its data tree, ~150 KB per example
    # here), and the client shares this process: in one 7,000-example run that alone
    # grows RSS by a GiB. Runs of LONG_CHUNK examples free it between runs, so the
    # growth measured is the server's.
    base = random.SystemRandom().getrandbits(32)
    print(f"\nlong fuzz: hypothesis runs seeded {base}..{base + LONG_EXAMPLES // LONG_CHUNK - 1}")
    for i in range(LONG_EXAMPLES // LONG_CHUNK):
        run_fuzz(server, LONG_CHUNK, (15, 30), run_seed=base + i)
    still_serving(server)
    grown = rss_bytes() - start_rss
    count = server.lines - start_lines
    requests = trio.from_thread.run_sync(server.stats.statistics, trio_token=server.token)
    print(
        f"\nlong control fuzz: {count} lines on {LONG_EXAMPLES} connections, 0 crashes, "
        f"RSS growth {grown / 2**20:.1f} MiB; replies by result: "
        f"{dict(sorted(_by_result(requests.requests).items()))}"
    )
    assert count >= LONG_INPUTS
    assert grown < RSS_BOUND, f"RSS grew {grown / 2**20:.1f} MiB"


def _by_result(requests: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for (_, result), n in requests.items():
        out[result] = out.get(result, 0) + n
    return out
