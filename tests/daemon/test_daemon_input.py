"""Odd but possible input to a real `qisd run`, through the Python client: names a
synthesis could not carry, mixed dimensions in one topic (query and watch), and
bootstrap addresses that cannot answer. Each gets a clear answer; the daemon stays up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from daemon_helpers import Daemon

from qisd import Client
from qisd.control.errors import ControlError
from qisd.packet import OutcomePacket

pytestmark = pytest.mark.slow


def test_odd_input_gets_named_answers(workdir: Path, daemons: list[Daemon]) -> None:
    d = Daemon(workdir, "odd").start()
    daemons.append(d)
    with Client(d.socket, timeout=30) as client:
        # Names a synthesis packet could not carry are refused at emit, by name.
        for name, value in (("bp?high", True), ("x" * 28, 1.5), ("a=b", "c")):
            with pytest.raises(ControlError, match=re.escape(f"outcome.{name}: ")) as info:
                client.emit(topic="t", vector=[1.0, 0.0, 0.0], outcome={name: value})
            assert info.value.code == "invalid"
        client.emit(topic="t", vector=[1.0, 0.0, 0.0], outcome={"x" * 27: 1.5, "y" * 31: "ok"})
        # One name typed two Unicode ways (e + accent, or é) is one topic, one field.
        nfd, nfc = "cafe\u0301", "caf\u00e9"
        pid = client.emit(topic=nfd, vector=[1.0, 0.0, 0.5], outcome={nfd: "x"})
        (match,) = client.query(topic=nfc, vector=[1.0, 0.0, 0.5])["matches"]
        assert (match["id"], match["outcome"]) == (pid, {nfc: "x"})
        assert [p["id"] for p in client.packets(topic=nfd)] == [pid]
        with pytest.raises(ControlError, match=f"outcome.{nfc}: given twice, in two Unicode"):
            client.emit(topic="t", vector=[1.0, 0.0, 0.0], outcome={nfd: 1, nfc: 2})
        # A topic with whitespace at an end would be a topic of its own: refused in
        # every call that names one.
        for call in (
            lambda: client.emit(topic="t ", vector=[1.0, 0.0, 0.0], outcome={"a": 1}),
            lambda: client.query(topic=" t", vector=[1.0, 0.0, 0.0]),
            lambda: client.packets(topic="t  "),
            lambda: client.watch(topic=" "),
        ):
            with pytest.raises(ControlError, match="topic: must not begin or end with whitespace"):
                call()

        # A topic carrying 4-d and 3-d vectors: a 3-d query compares with 3-d only.
        four = client.emit(topic="mixed", vector=[1.0, 0.2, 0.1, 0.0], outcome={"a": 1})
        assert four
        found = client.query(topic="mixed", vector=[1.0, 0.2, 0.1])
        assert found["matches"] == []
        assert found["notes"] == [
            "left out 1 packets of topic 'mixed' with 4 dimensions; the query has 3"
        ]
        three = client.emit(topic="mixed", vector=[1.0, 0.2, 0.1], outcome={"a": 2})
        found = client.query(topic="mixed", vector=[1.0, 0.2, 0.1])
        assert [m["id"] for m in found["matches"]] == [three]

        # A watch with a 3-d vector survives a 4-d packet of its topic.
        with client.watch(topic="mixed", vector=[1.0, 0.2, 0.1]) as events:
            other = client.emit(topic="mixed", vector=[0.0, 1.0, 0.0, 0.0], outcome={"a": 3})
            same = client.emit(topic="mixed", vector=[1.0, 0.2, 0.2], outcome={"a": 4})
            got = [next(iter(events)) for _ in range(2)]
        assert (got[0]["id"], got[0]["similarity"]) == (other, 0.0)
        assert got[1]["id"] == same and got[1]["similarity"] > 0.9

        # Bootstrap addresses that cannot answer are named, each with its reason.
        # (Addresses that are no one host's are refused before anything is sent.)
        reply = client.bootstrap(["[::1]:4470", "127.0.0.1:9", "0.0.0.0:4470",
                                  "255.255.255.255:4470", "224.0.0.1:4470"])
        assert reply["contacted"] == 0
        assert {f["address"]: f["reason"] for f in reply["failed"]} == {
            "[::1]:4470": "not an IPv4 address (this node listens on IPv4)",
            "127.0.0.1:9": "no answer",
            "0.0.0.0:4470": "0.0.0.0 is the unspecified address, not a host's: give the"
                            " peer's own address",
            "255.255.255.255:4470": "255.255.255.255 is a broadcast or multicast address,"
                                    " not one peer's",
            "224.0.0.1:4470": "224.0.0.1 is a broadcast or multicast address, not one peer's",
        }
        with pytest.raises(ControlError, match="port 0"):
            client.bootstrap(["127.0.0.1:0"])
        assert client.status()["packets"] >= 4


async def test_a_slow_watcher_is_told_what_it_missed() -> None:
    from qisd.daemon.service import _events
    from qisd.daemon.watch import WatchHub
    from qisd.identity import Identity
    from qisd.packet import create_packet
    from qisd.sketch import make_sketch

    ident = Identity.generate()

    def make_packet(i: int) -> OutcomePacket:
        return create_packet(ident.signing_key, swarm=bytes(32), topic="w",
                             sketch=make_sketch([1.0, float(i)]), outcome={"i": i}, ttl_s=60)

    packets = [make_packet(i) for i in range(4)]
    hub = WatchHub(buffer=1)
    async with hub.subscribe(packets[0].topic) as sub:
        for p in packets:  # the buffer holds one: three are missed
            hub.publish(p)
        events = _events(sub, None)
        first = await events.__anext__()
        assert first["id"] == packets[0].id.hex() and first["missed"] == 3
        hub.publish(packets[0])  # a repeat is not news
        fresh = make_packet(9)
        hub.publish(fresh)
        second = await events.__anext__()
        assert second["id"] == fresh.id.hex() and "missed" not in second
        await events.aclose()
    assert hub.dropped == 3
