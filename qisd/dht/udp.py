"""The datagram endpoints the transport runs on: the protocol and a real UDP socket.

:class:`DatagramEndpoint` is all :class:`qisd.dht.transport.Transport` needs from a
socket (:mod:`qisd.dht.memnet` implements it in memory for simulations);
:class:`UdpEndpoint` is the one UDP socket of a node: IPv4, IPv6, or both.

A node bound to the IPv6 wildcard ``::`` is **dual-stack**: one socket with
``IPV6_V6ONLY`` off takes IPv4 peers too. The kernel shows them as v4-mapped
addresses (``::ffff:192.0.2.7``); the endpoint turns those back into plain IPv4
on receive and maps IPv4 destinations on send, so everything above it (routing
table, per-/24 limits, rate limits, node lists sent to IPv4-only peers) only
ever sees one spelling of each address.
"""

from __future__ import annotations

import ipaddress
import socket as stdsocket
from typing import Protocol

import trio

from qisd.dht.wire import MAX_DATAGRAM, Address, normalize_ip

#: Datagrams received back to back before the receive loop yields to other tasks.
RECV_BURST = 32
#: The prefix of an IPv4 address as a dual-stack IPv6 socket sees it (RFC 4291 2.5.5.2).
V4_MAPPED = "::ffff:"


class DatagramEndpoint(Protocol):
    """What the transport needs from a datagram socket."""

    @property
    def local_address(self) -> Address: ...

    @property
    def dual_stack(self) -> bool:
        """True when it reaches IPv4 and IPv6 peers alike (see the module docstring)."""
        ...

    async def sendto(self, data: bytes, addr: Address) -> None: ...

    async def recvfrom(self) -> tuple[bytes, Address]: ...

    def close(self) -> None: ...


class UdpEndpoint:
    """A bound UDP socket (IPv4 or IPv6, following the bind address).

    Sends and receives go straight to the non-blocking socket and only wait (via
    trio's ``wait_readable``/``wait_writable``) when it has nothing or is full:
    trio's socket wrapper yields to the scheduler twice per call, which for small
    datagrams costs more than the system call itself. The receive side still
    yields every :data:`RECV_BURST` datagrams so a flood cannot starve other tasks.
    Destinations are always IP literals (checked where addresses enter), so a send
    never resolves a name.
    """

    def __init__(self, sock: stdsocket.socket, *, dual_stack: bool = False) -> None:
        sock.setblocking(False)
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self._local: Address = (host, port)
        self._burst = 0
        self._dual = dual_stack

    @property
    def local_address(self) -> Address:
        return self._local

    @property
    def dual_stack(self) -> bool:
        return self._dual

    async def sendto(self, data: bytes, addr: Address) -> None:
        if self._dual and ":" not in addr[0]:
            addr = (V4_MAPPED + addr[0], addr[1])
        while True:
            if self._sock.fileno() == -1:
                raise trio.ClosedResourceError("the DHT socket is closed")
            try:
                self._sock.sendto(data, addr)
                return
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)

    async def recvfrom(self) -> tuple[bytes, Address]:
        self._burst += 1
        if self._burst >= RECV_BURST:
            self._burst = 0
            await trio.lowlevel.checkpoint()
        while True:
            if self._sock.fileno() == -1:
                raise trio.ClosedResourceError("the DHT socket is closed")
            try:
                # One byte more than the cap, so an oversized datagram shows as such
                # instead of being silently truncated to a valid-looking one.
                data, addr = self._sock.recvfrom(MAX_DATAGRAM + 1)
                ip = addr[0]
                if self._dual and ip.startswith(V4_MAPPED):
                    ip = normalize_ip(ip)
                return data, (ip, addr[1])
            except BlockingIOError:
                self._burst = 0
                await trio.lowlevel.wait_readable(self._sock)

    def close(self) -> None:
        if self._sock.fileno() != -1:
            try:
                # Wake (with ClosedResourceError) any task still waiting on it.
                trio.lowlevel.notify_closing(self._sock)
            except RuntimeError:
                pass  # not inside trio: nobody can be waiting
        self._sock.close()


async def open_udp_endpoint(host: str, port: int) -> UdpEndpoint:
    """Bind a UDP socket on ``host``:``port`` (port 0: any free port).

    ``::`` binds dual-stack (IPv4 and IPv6 on one socket), whatever the system's
    ``net.ipv6.bindv6only`` default; any other IPv6 address is IPv6 only.
    """
    infos = await trio.socket.getaddrinfo(host, port, type=stdsocket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve bind address {host!r}")
    family, _, _, _, sockaddr = infos[0]
    dual = family == stdsocket.AF_INET6 and ipaddress.ip_address(sockaddr[0]).is_unspecified
    sock = stdsocket.socket(family, stdsocket.SOCK_DGRAM)
    try:
        if dual:
            sock.setsockopt(stdsocket.IPPROTO_IPV6, stdsocket.IPV6_V6ONLY, 0)
        for opt in (stdsocket.SO_RCVBUF, stdsocket.SO_SNDBUF):
            # Bursts of lookups answer at once; a larger buffer drops fewer of them.
            try:
                sock.setsockopt(stdsocket.SOL_SOCKET, opt, 4 * 1024 * 1024)
            except OSError:
                pass
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return UdpEndpoint(sock, dual_stack=dual)
