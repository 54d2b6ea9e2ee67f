"""The Python client's argument checks (``qisd.control.calls``), shared by ``Client``
and ``AsyncClient``: what JSON cannot carry is refused before sending, with an error
naming the argument, and numpy values are taken for the Python values they hold.

Most checks need no daemon (the socket path is never opened); the ones that send run
against the fake daemon of ``test_control`` and look at what it received.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from test_control import TIMEOUT, FakeAPI, serving, short_dir

from qisd.control.async_client import AsyncClient
from qisd.control.client import Client
from qisd.control.errors import ControlSocketError, DaemonNotRunning

NOWHERE = "/nonexistent/qisd.sock"  # never connected to: the checks come first


@pytest.mark.parametrize(("outcome", "named"), [
    ({1: 2}, r"outcome keys must be strings, got 1 \(int\)"),
    ({1: 2, "1": 3}, r"outcome keys must be strings, got 1 \(int\)"),
    ({"a": float("nan")}, r"outcome\.a must be a finite number, got nan"),
    ({"a": np.float32("inf")}, r"outcome\.a must be a finite number, got inf"),
    ({"a": {"b": [1, float("-inf")]}}, r"outcome\.a must be a string, number or boolean"
                                       r" \(what a packet carries\), got dict"),
    ({"a": b"x"}, r"outcome\.a must be a string, number or boolean .* got bytes"),
    ({"a": None}, r"outcome\.a must be a string, number or boolean .* got None"),
    ({"a": [1]}, r"outcome\.a must be a string, number or boolean .* got list"),
    ({"a": {2}}, r"outcome\.a must be .* got set"),
    ({"a": "\udcff"}, r"outcome\.a is not valid text"),
    ([("a", 1)], r"outcome must be a map of name -> value, got list"),
])
def test_outcomes_json_cannot_carry_are_refused_by_name(outcome: Any, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Client(NOWHERE).emit(topic="t", vector=[1, 2, 3], outcome=outcome)


@pytest.mark.parametrize(("vector", "named"), [
    ([10**400], r"vector\[0\] is out of float range"),
    ([1.0, float("nan")], r"vector\[1\] must be finite"),
    (np.array([[1.0, 2.0]]), r"vector\[0\] must be a number, got list"),
])
def test_bad_vectors_are_refused_by_index(vector: Any, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Client(NOWHERE).query(topic="t", vector=vector)


def test_numpy_scalars_are_sent_as_python_values() -> None:
    api = FakeAPI()
    with serving(api) as (path, _), Client(path, timeout=TIMEOUT) as client:
        client.emit(topic="t", vector=np.ones(3, dtype=np.float32),
                    outcome={"age": np.int64(42), "score": np.float32(0.5),
                             "ok": np.bool_(True)},
                    n=np.int64(3), ttl=np.int32(60))
        client.query(topic="t", vector=[1, 2, 3], k=np.int64(2))
    emitted = api.calls[0][1]
    assert emitted == {"topic": "t", "vector": [1.0, 1.0, 1.0],
                       "outcome": {"age": 42, "score": 0.5, "ok": True},
                       "n": 3, "ttl": 60}
    assert type(emitted["outcome"]["ok"]) is bool and type(emitted["n"]) is int
    assert api.calls[1] == ("query", {"topic": "t", "vector": [1.0, 2.0, 3.0], "k": 2})


GOOD = {"topic": "t", "vector": [1, 2, 3], "outcome": {"a": 1}}


def test_emit_many_gives_a_bad_item_its_own_result() -> None:
    api = FakeAPI()
    items: list[Any] = [
        GOOD,
        {**GOOD, "outcome": {"a": float("nan")}},   # refused here
        {"topic": "t", "outcome": {"a": 1}},        # refused by the server
        ["not", "a", "map"],                        # refused here
        {**GOOD, "n": np.int64(2)},
    ]
    with serving(api) as (path, _), Client(path, timeout=TIMEOUT) as client:
        results = client.emit_many(items)
        assert client.emit_many([{5: 1}]) == [{"error": {
            "code": "bad_request", "message": "items[0] keys must be strings, got 5 (int)"}}]
    assert len(results) == len(items)
    assert results[0] == {"id": f"{1:032x}"} and results[4] == {"id": f"{2:032x}"}
    assert results[1]["error"] == {"code": "bad_request", "message":
                                   "items[1]: outcome.a must be a finite number, got nan"}
    # The server saw it as its items[1]; the message names the caller's index.
    assert results[2]["error"] == {"code": "bad_request",
                                   "message": "items[2]: missing field 'vector' for emit"}
    assert results[3]["error"]["message"] == "items[3] must be a map of emit fields, got list"
    # One request, with only the items that could be sent; none at all for [{5: 1}].
    assert [c[0] for c in api.calls] == ["emit_many"]
    assert api.calls[0][1]["items"][1]["n"] == 2


async def test_the_trio_client_checks_the_same_way() -> None:
    client = AsyncClient(NOWHERE)
    with pytest.raises(ValueError, match=r"outcome\.x must be a finite number"):
        await client.emit(topic="t", vector=[1], outcome={"x": float("inf")})
    assert await client.emit_many([{**GOOD, "vector": [10**400]}]) == [{"error": {
        "code": "bad_request", "message": "items[0]: vector[0] is out of float range"}}]
    with pytest.raises(ValueError, match="addresses must be"):
        await client.bootstrap(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(("addresses", "named"), [
    (5, 'addresses must be a "host:port" string or a sequence of them, got int'),
    (b"h:1", r"got bytes \(decode it first\)"),
    ([], "got none"),
    (["h:1", 7], r'addresses\[1\] must be a "host:port" string, got int'),
    (["h:1", ""], r"addresses\[1\] .* got an empty string"),
])
def test_bootstrap_names_a_bad_address_argument(addresses: Any, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Client(NOWHERE).bootstrap(addresses)


# -- socket paths ------------------------------------------------------------------------


def test_socket_paths_that_cannot_be_a_control_socket() -> None:
    with short_dir() as tmp:
        regular = tmp / "file"
        regular.write_text("")
        long_path = Path("/tmp") / ("s" * 120)
        for path, message in [
            (long_path, f"too long for a Unix socket (125 bytes, at most 107): {long_path}"),
            (regular, f"{regular} is a regular file, not a control socket"),
            (tmp, f"{tmp} is a directory, not a control socket"),
        ]:
            with pytest.raises(ControlSocketError) as err:
                Client(path).status()
            assert message in str(err.value)
        # A socket file nobody listens on is still "not running".
        stale = tmp / "stale.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(os.fspath(stale))
        with pytest.raises(DaemonNotRunning, match="nothing is listening"):
            Client(stale).status()


async def test_the_trio_client_names_the_socket_path_too() -> None:
    with (short_dir() as tmp, trio.fail_after(TIMEOUT),
          pytest.raises(ControlSocketError, match="is a directory")):
        await AsyncClient(tmp).status()


def test_an_empty_socket_path_is_refused() -> None:
    with pytest.raises(ValueError, match="socket_path is empty"):
        Client("")


@pytest.mark.parametrize(
    "timeout", [0, -1, float("nan"), float("inf"), 1e10, 7 * 24 * 3600 + 1, True, "5", None])
def test_a_timeout_that_cannot_be_one_is_named(timeout: Any) -> None:
    with pytest.raises(ValueError, match="timeout: must be a number of seconds > 0"):
        Client(NOWHERE, timeout=timeout)
    with pytest.raises(ValueError, match="timeout: must be a number of seconds > 0"):
        AsyncClient(NOWHERE, timeout=timeout)


def test_the_longest_timeout_works() -> None:
    """A week is taken and reaches the socket layer (1e10 seconds overflowed it)."""
    with pytest.raises(DaemonNotRunning):
        Client(NOWHERE, timeout=7 * 24 * 3600).status()
