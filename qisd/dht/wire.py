"""The rpcudp datagram framing and the argument rules of every RPC (pure).

Wire format (the one the stock ``kademlia``/``rpcudp`` packages speak)::

    request  = 0x00 | msgid(20) | msgpack([name, [args...]])
    response = 0x01 | msgid(20) | msgpack(result)

rpcudp refuses to send a msgpack body over 8192 bytes; we accept exactly that much
from peers and never send more. Every unpack is bounded (string, bin, array, map and
ext lengths) so nothing a peer sends can make us allocate more than one datagram's
worth of objects. Validators turn a peer's arguments into typed values or raise
:class:`WireError` naming the RPC, the argument and what is wrong.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgpack

REQUEST = 0x00
RESPONSE = 0x01
MSGID_BYTES = 20
#: Largest node list accepted in a reply (stock nodes may run a larger k).
MAX_REPLY_NODES = 64
HEADER_BYTES = 1 + MSGID_BYTES
#: Largest msgpack body (the limit rpcudp enforces when it sends).
MAX_PAYLOAD = 8192
#: Largest datagram accepted or sent.
MAX_DATAGRAM = HEADER_BYTES + MAX_PAYLOAD
ID_BYTES = 20
MAX_NAME_CHARS = 64
MAX_ARGS = 16

Address = tuple[str, int]


class WireError(ValueError):
    """A datagram or argument that breaks the protocol.

    ``reason`` is a short category for counters (``too_short``, ``oversized``,
    ``bad_msgpack``, ``bad_kind``, ``malformed``, ``bad_args``, ``unknown_rpc``).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Request:
    msgid: bytes
    name: str
    args: list[Any]


def pack(obj: Any) -> bytes:
    """msgpack with bytes as bin and str as str, as u-msgpack-python does."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(body: bytes) -> Any:
    """Bounded, strict unpack of one datagram body; raises ``WireError('bad_msgpack')``."""
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_PAYLOAD,
            max_bin_len=MAX_PAYLOAD,
            max_array_len=MAX_PAYLOAD,
            max_map_len=MAX_PAYLOAD // 2,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for bad input: all are "bad"
        problem = f"body is not valid msgpack ({type(exc).__name__})"
        raise WireError("bad_msgpack", problem) from None


def split_header(datagram: bytes) -> tuple[int, bytes, bytes]:
    """(kind, msgid, body) of a datagram, checking only its size."""
    if len(datagram) > MAX_DATAGRAM:
        raise WireError("oversized", f"datagram of {len(datagram)} bytes, cap {MAX_DATAGRAM}")
    if len(datagram) < HEADER_BYTES + 1:
        raise WireError("too_short", f"datagram of {len(datagram)} bytes has no body")
    kind = datagram[0]
    if kind not in (REQUEST, RESPONSE):
        raise WireError("bad_kind", f"unknown datagram kind 0x{kind:02x}")
    return kind, datagram[1:HEADER_BYTES], datagram[HEADER_BYTES:]


def decode_request(msgid: bytes, body: bytes) -> Request:
    data = unpack(body)
    if not isinstance(data, list) or len(data) != 2:
        raise WireError("malformed", "request must be [name, [args...]]")
    name, args = data
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise WireError("malformed", "request name must be a short string")
    if not isinstance(args, list) or len(args) > MAX_ARGS:
        raise WireError("malformed", f"{name}: arguments must be an array of <= {MAX_ARGS}")
    return Request(msgid, name, args)


def encode_request(msgid: bytes, name: str, args: list[Any] | tuple[Any, ...]) -> bytes:
    body = pack([name, list(args)])
    if len(body) > MAX_PAYLOAD:
        raise WireError("oversized", f"{name}: request body {len(body)} bytes > {MAX_PAYLOAD}")
    return b"\x00" + msgid + body


def encode_response(msgid: bytes, result: Any) -> bytes:
    body = pack(result)
    if len(body) > MAX_PAYLOAD:
        raise WireError("oversized", f"response body {len(body)} bytes > {MAX_PAYLOAD}")
    return b"\x01" + msgid + body


# -- argument validators -----------------------------------------------------------


def bad(rpc: str, field: str, problem: str) -> WireError:
    return WireError("bad_args", f"{rpc}: {field} {problem}")


def check_arity(rpc: str, args: list[Any], names: tuple[str, ...]) -> None:
    if len(args) != len(names):
        raise WireError(
            "bad_args",
            f"{rpc}: expected {len(names)} arguments ({', '.join(names)}), got {len(args)}",
        )


def id20(rpc: str, field: str, value: Any) -> bytes:
    """A 20-byte node id or key (the stock library's SHA-1 ids)."""
    if not isinstance(value, bytes) or len(value) != ID_BYTES:
        raise bad(rpc, field, f"must be {ID_BYTES} bytes")
    return value


def integer(rpc: str, field: str, value: Any, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise bad(rpc, field, f"must be an integer in {lo}..{hi}")
    return value


def stock_value(rpc: str, field: str, value: Any) -> str | bytes | int | float | bool:
    """A value the stock library may store: str, bytes, int, float or bool."""
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(rpc, field, "must be a finite number")
    if not isinstance(value, str | bytes | int | float):
        raise bad(rpc, field, f"must be str, bytes, int, float or bool, not {type(value).__name__}")
    return value


def bytes_list(rpc: str, field: str, value: Any, *, max_items: int, max_bytes: int) -> list[bytes]:
    if not isinstance(value, list) or not 0 < len(value) <= max_items:
        raise bad(rpc, field, f"must be an array of 1..{max_items} byte strings")
    for i, item in enumerate(value):
        if not isinstance(item, bytes) or not 0 < len(item) <= max_bytes:
            raise bad(rpc, f"{field}[{i}]", f"must be 1..{max_bytes} bytes")
    return value


@lru_cache(maxsize=8192)
def normalize_ip(ip: str) -> str:
    """The canonical text of an IP address literal; ValueError if it is not one.

    A v4-mapped IPv6 address (``::ffff:192.0.2.7``, how a dual-stack socket sees an
    IPv4 peer) is that IPv4 address: one host, one spelling, reachable by IPv4 nodes.
    """
    parsed = ipaddress.ip_address(ip)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def contact_triple(rpc: str, field: str, value: Any) -> tuple[bytes, str, int]:
    """One ``[id, ip, port]`` entry of a node list (what stock ``find_node`` returns)."""
    if not isinstance(value, list) or len(value) != 3:
        raise bad(rpc, field, "must be [id, ip, port]")
    node_id, ip, port = value
    id20(rpc, f"{field}.id", node_id)
    if not isinstance(ip, str) or len(ip) > 64:
        raise bad(rpc, f"{field}.ip", "must be an IP address string")
    try:
        ip = normalize_ip(ip)
    except ValueError:
        raise bad(rpc, f"{field}.ip", f"{ip!r} is not an IP address") from None
    integer(rpc, f"{field}.port", port, 1, 65535)
    return node_id, ip, port


def contact_list(rpc: str, value: Any, max_nodes: int) -> list[tuple[bytes, str, int]]:
    if not isinstance(value, list) or len(value) > max_nodes:
        raise bad(rpc, "nodes", f"must be an array of at most {max_nodes} [id, ip, port]")
    out = []
    for i, item in enumerate(value):
        # Fast path for well-formed entries (every reply of every lookup comes here);
        # anything unusual goes through contact_triple, which says what is wrong.
        if type(item) is list and len(item) == 3:
            node_id, ip, port = item
            if (
                type(node_id) is bytes
                and len(node_id) == ID_BYTES
                and type(ip) is str
                and len(ip) <= 64
                and type(port) is int
                and 0 < port < 65536
            ):
                try:
                    out.append((node_id, normalize_ip(ip), port))
                    continue
                except ValueError:
                    pass
        out.append(contact_triple(rpc, f"nodes[{i}]", item))
    return out
