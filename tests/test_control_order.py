"""Control-socket replies stay in request order around a watch, a refused watch leaves
the connection usable, a key named twice is refused, and emit_many names each
refused item by its place in the request (real sockets, the real server)."""

from __future__ import annotations

from test_control import FakeAPI, ask, raw_connect, read_lines, req, serving


def test_replies_stay_in_order_behind_a_watch() -> None:
    with serving(FakeAPI()) as (path, _), raw_connect(path) as sock:
        sock.sendall(req("w", "watch", topic="t") + req(2, "status"))
        ack, refusal = read_lines(sock, 2)
        assert ack["id"] == "w" and ack["result"] == {"watching": "t"}
        assert refusal["id"] == 2 and refusal["error"]["code"] == "bad_request"


def test_a_refused_watch_leaves_the_connection_usable() -> None:
    with serving(FakeAPI()) as (path, _), raw_connect(path) as sock:
        sock.sendall(req(1, "watch", topic="refuse") + req(2, "status"))
        refused, status = read_lines(sock, 2)
        assert refused["id"] == 1 and refused["error"]["code"] == "invalid"
        assert status["id"] == 2 and status["ok"] is True


def test_a_key_named_twice_is_refused() -> None:
    line = (b'{"v":1,"id":1,"method":"emit","params":{"topic":"t","vector":[1,0,0],'
            b'"outcome":{"a":1},"outcome":{"b":2}}}\n')
    with serving(FakeAPI()) as (path, _):
        (reply,) = ask(path, line)
    assert reply["error"]["code"] == "bad_request"
    assert "'outcome' appears twice" in reply["error"]["message"]


def test_emit_many_names_refused_items_by_their_place() -> None:
    api = FakeAPI()
    good = {"topic": "t", "vector": [1.0, 0.0, 0.0], "outcome": {"a": 1}}
    items = [{"topic": 5}, good, {**good, "topic": "refuse"}]  # server, ok, daemon
    with serving(api) as (path, _):
        (reply,) = ask(path, req(1, "emit_many", items=items))
    first, second, third = reply["result"]["results"]
    assert first["error"]["message"].startswith("items[0]: ")
    assert second["id"]
    assert third["error"]["message"] == "items[2]: store is read-only"
