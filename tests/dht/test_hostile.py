"""Hostile datagrams over real UDP: the node drops and counts them, and keeps serving.

One node runs in a background thread (its own ``trio.run``) for the whole module, so
whatever the examples leave behind accumulates; a plain stdlib socket plays the
attacker. After each batch the node must still answer a stock-format ping, and no
handler may have failed with anything but a protocol error (``handler_error`` 0).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import umsgpack
from dht_helpers import open_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qisd.dht import DHTNode, open_node
from qisd.dht.wire import MAX_DATAGRAM
from qisd.identity import Identity

SETTINGS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Running:
    node: DHTNode
    token: trio.lowlevel.TrioToken
    addr: tuple[str, int]

    def stats(self) -> Any:
        return trio.from_thread.run_sync(self.node.statistics, trio_token=self.token)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp: Path = tmp_path_factory.mktemp("hostile")
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        store = open_store(tmp / "packets.sqlite")
        try:
            async with open_node(Identity.generate(), store=store, state_dir=tmp) as node:
                box["running"] = Running(node, trio.lowlevel.current_trio_token(), node.address)
                stop = trio.Event()
                box["stop"] = stop
                ready.set()
                await stop.wait()
        finally:
            store.close()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(10)
    running: Running = box["running"]
    yield running
    trio.from_thread.run_sync(box["stop"].set, trio_token=running.token)
    thread.join(10)


@pytest.fixture(scope="module")
def attacker() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def still_serving(addr: tuple[str, int]) -> None:
    """A stock-format ping from a fresh socket gets its answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        msgid = os.urandom(20)
        sock.sendto(b"\x00" + msgid + umsgpack.packb(["ping", [os.urandom(20)]]), addr)
        while True:
            data, _ = sock.recvfrom(9000)
            if data[1:21] == msgid:
                break
    assert data[0] == 1 and len(umsgpack.unpackb(data[21:])) == 20


def request(name: str, args: list[Any]) -> bytes:
    return b"\x00" + os.urandom(20) + msgpack.packb([name, args], use_bin_type=True)


ANY = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=30)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)
GOOD_ARGS: dict[str, list[Any]] = {
    "ping": [b"\x01" * 20],
    "stun": [],
    "store": [b"\x01" * 20, b"\x02" * 20, b"v"],
    "find_node": [b"\x01" * 20, b"\x02" * 20],
    "find_value": [b"\x01" * 20, b"\x02" * 20],
    "store_packets": [b"\x01" * 20, b"\x02" * 20, [b"p"]],
    "find_packets": [b"\x01" * 20, b"\x02" * 20, [4, 8, b"\x01\x02\x03\x04"], 5, 0],
    "find_packet_ids": [b"\x01" * 20, b"\x02" * 20, [4, 8, b"\x01\x02\x03\x04"], 5, 0, 12],
    "get_packets": [b"\x01" * 20, [b"\x03" * 16]],
    "listen": [b"\x01" * 20, b"\x02" * 20, 60],
    "notify": [b"\x01" * 20, b"\x02" * 20, [b"p"]],
}


@st.composite
def wrong_argument(draw: st.DrawFn) -> bytes:
    """A known RPC with one argument (or the arity) replaced by anything."""
    name = draw(st.sampled_from(sorted(GOOD_ARGS)))
    args = list(GOOD_ARGS[name])
    if args and draw(st.booleans()):
        args[draw(st.integers(0, len(args) - 1))] = draw(ANY)
    else:
        args = draw(st.lists(ANY, max_size=6))
    return request(name, args)


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    whole = draw(wrong_argument())
    return whole[: draw(st.integers(0, len(whole) - 1))]


@st.composite
def huge(draw: st.DrawFn) -> bytes:
    size = draw(st.integers(100, 3000))
    shape = draw(st.sampled_from(["list", "nested", "map", "bin", "count"]))
    if shape == "list":
        body = msgpack.packb(["find_node", [b"\x01" * 20, [0] * size]])
    elif shape == "nested":
        body = b"\x92\xa4ping" + b"\x91" * size + b"\xc0"
    elif shape == "map":
        body = msgpack.packb(["store", [{str(i): i for i in range(size)}]])
    elif shape == "bin":
        body = msgpack.packb(["store", [b"\x01" * 20, b"\x02" * 20, b"x" * (size * 2)]])
    else:  # an array header claiming 4 billion entries
        body = b"\x92\xa4ping\xdd\xff\xff\xff\xff"
    return b"\x00" + os.urandom(20) + body


HOSTILE = st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=600).map(lambda b: b"\x00" + os.urandom(20) + b),
    st.binary(min_size=1, max_size=600).map(lambda b: b"\x01" + os.urandom(20) + b),
    wrong_argument(),
    truncated(),
    huge(),
    st.just(b"\x00" * (MAX_DATAGRAM + 100)),
    st.sampled_from(sorted(GOOD_ARGS)).map(lambda n: request(n + "x", [])),
)


@SETTINGS
@given(datagram=HOSTILE)
def storm(target: Running, attacker: socket.socket, datagram: bytes) -> None:
    attacker.sendto(datagram, target.addr)


def test_hostile_datagrams_are_dropped_and_node_keeps_serving(
    target: Running, attacker: socket.socket
) -> None:
    storm(target, attacker)
    # The node is alive and every bad datagram went to a named counter, none to an
    # unexpected handler failure.
    still_serving(target.addr)
    stats = target.stats()
    assert stats.dropped.get("handler_error", 0) == 0
    assert stats.dropped.get("bad_msgpack", 0) > 0
    assert stats.dropped.get("bad_args", 0) > 0
    assert stats.dropped.get("unknown_rpc", 0) > 0
    assert stats.dropped.get("oversized", 0) > 0
    assert stats.dropped.get("unknown_msgid", 0) > 0
    assert stats.values <= target.node.config.max_values
    # Calls the node made to forged senders (hand-off, head pings) time out: nothing
    # stays outstanding.
    deadline = time.monotonic() + 10
    while target.node.transport.outstanding and time.monotonic() < deadline:
        time.sleep(0.1)
    assert target.node.transport.outstanding == 0


@SETTINGS
@given(name=st.sampled_from(sorted(GOOD_ARGS)))
def test_well_formed_requests_are_answered(target: Running, name: str) -> None:
    # The control group: the arguments the storm corrupts are themselves valid, so
    # "dropped" above means the corruption was caught, not that everything is.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        data = request(name, GOOD_ARGS[name])
        sock.sendto(data, target.addr)
        reply, _ = sock.recvfrom(9000)
    assert reply[:21] == b"\x01" + data[1:21]
