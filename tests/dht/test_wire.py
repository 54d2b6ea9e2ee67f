"""The rpcudp framing and argument validators, against u-msgpack-python (what stock
nodes use) so both directions of the wire are pinned."""

from __future__ import annotations

import msgpack
import pytest
import umsgpack
from hypothesis import given
from hypothesis import strategies as st

from qisd.dht import wire
from qisd.dht.wire import WireError

MSGID = bytes(range(20))


def test_request_matches_rpcudp_framing() -> None:
    data = wire.encode_request(MSGID, "find_node", [b"\x01" * 20, b"\x02" * 20])
    assert data == b"\x00" + MSGID + umsgpack.packb(["find_node", (b"\x01" * 20, b"\x02" * 20)])
    kind, msgid, body = wire.split_header(data)
    assert (kind, msgid) == (wire.REQUEST, MSGID)
    request = wire.decode_request(msgid, body)
    assert request.name == "find_node" and request.args == [b"\x01" * 20, b"\x02" * 20]


def test_response_from_stock_decodes() -> None:
    stock = b"\x01" + MSGID + umsgpack.packb([(b"\x05" * 20, "127.0.0.1", 4000)])
    kind, _, body = wire.split_header(stock)
    assert kind == wire.RESPONSE
    nodes = wire.contact_list("find_node", wire.unpack(body), 20)
    assert nodes == [(b"\x05" * 20, "127.0.0.1", 4000)]
    # And what we send decodes with umsgpack as bytes/str, as stock expects.
    ours = wire.encode_response(MSGID, {"value": "x"})
    assert umsgpack.unpackb(ours[21:]) == {"value": "x"}


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"", "too_short"),
        (b"\x00" + MSGID, "too_short"),
        (b"\x02" + MSGID + b"\x90", "bad_kind"),
        (b"\x00" * (wire.MAX_DATAGRAM + 1), "oversized"),
    ],
)
def test_header_errors(datagram: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        wire.split_header(datagram)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xc1", "bad_msgpack"),  # never-used byte
        (msgpack.packb(["ping", [b"x"]])[:-1], "bad_msgpack"),  # truncated
        (msgpack.packb(["ping", [1]]) + b"\x00", "bad_msgpack"),  # trailing data
        (msgpack.packb({1: 2}), "bad_msgpack"),  # int map key (strict_map_key)
        (msgpack.packb(msgpack.ExtType(1, b"x")), "bad_msgpack"),  # ext types refused
        (msgpack.packb("ping"), "malformed"),
        (msgpack.packb([1, []]), "malformed"),
        (msgpack.packb(["ping", "args"]), "malformed"),
        (msgpack.packb(["ping", [0] * 17]), "malformed"),
    ],
)
def test_request_body_errors(body: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        wire.decode_request(MSGID, body)
    assert info.value.reason == reason


def test_deep_nesting_is_refused_not_crashing() -> None:
    body = b"\x91" * 5000 + b"\xc0"
    with pytest.raises(WireError):
        wire.decode_request(MSGID, body)


def test_oversized_request_refused() -> None:
    with pytest.raises(WireError) as info:
        wire.encode_request(MSGID, "store", [b"x" * wire.MAX_PAYLOAD])
    assert info.value.reason == "oversized"


def test_v4_mapped_contacts_are_plain_ipv4() -> None:
    """One host, one spelling: what a dual-stack node saw as ``::ffff:`` is IPv4."""
    nodes = wire.contact_list("find_node", [[b"\x01" * 20, "::ffff:192.0.2.7", 5]], 20)
    assert nodes == [(b"\x01" * 20, "192.0.2.7", 5)]
    assert wire.normalize_ip("2001:DB8::1") == "2001:db8::1"


def test_validators_name_rpc_and_field() -> None:
    with pytest.raises(WireError, match=r"find_node: key must be 20 bytes"):
        wire.id20("find_node", "key", b"short")
    with pytest.raises(WireError, match=r"store: expected 3 arguments \(nodeid, key, value\)"):
        wire.check_arity("store", [1], ("nodeid", "key", "value"))
    with pytest.raises(WireError, match="store: value must be str, bytes"):
        wire.stock_value("store", "value", [1, 2])
    with pytest.raises(WireError, match="finite"):
        wire.stock_value("store", "value", float("nan"))
    with pytest.raises(WireError, match=r"nodes\[0\].ip"):
        wire.contact_list("find_node", [[b"\x00" * 20, "not-an-ip", 1]], 20)
    with pytest.raises(WireError, match=r"nodes\[0\].port"):
        wire.contact_list("find_node", [[b"\x00" * 20, "10.0.0.1", 0]], 20)
    with pytest.raises(WireError, match="at most 2"):
        wire.contact_list("find_node", [[b"\x00" * 20, "10.0.0.1", 1]] * 3, 2)
    with pytest.raises(WireError, match=r"packets\[1\]"):
        wire.bytes_list("store_packets", "packets", [b"a", "b"], max_items=4, max_bytes=10)
    assert wire.stock_value("store", "value", True) is True
    assert wire.contact_triple("x", "n", [b"\x00" * 20, "::0:1", 9])[1] == "::1"


@given(st.binary(max_size=300))
def test_random_bodies_only_raise_wire_errors(body: bytes) -> None:
    try:
        wire.decode_request(MSGID, body)
    except WireError:
        pass
