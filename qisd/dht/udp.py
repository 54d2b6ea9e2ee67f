"""The datagram endpoints the transport runs on: the protocol and a real UDP socket.

:class:`DatagramEndpoint` is all :class:`qisd.dht.transport.Transport` needs from a
socket (:mod:`qisd.dht.memnet` implements it in memory for simulations);
:class:`UdpEndpoint` is the one UDP socket of a node, IPv4 or IPv6.
"""

from __future__ import annotations

import socket as stdsocket
from typing import Protocol

import trio

from qisd.dht.wire import MAX_DATAGRAM, Address

#: Datagrams received back to back before the receive loop yields to other tasks.
RECV_BURST = 32


class DatagramEndpoint(Protocol):
    """What the transport needs from a datagram socket."""

    @property
    def local_address(self) -> Address: ...

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

    def __init__(self, sock: stdsocket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self._local: Address = (host, port)
        self._burst = 0

    @property
    def local_address(self) -> Address:
        return self._local

    async def sendto(self, data: bytes, addr: Address) -> None:
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
                return data, (addr[0], addr[1])
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
    """Bind a UDP socket on ``host``:``port`` (port 0: any free port)."""
    infos = await trio.socket.getaddrinfo(host, port, type=stdsocket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve bind address {host!r}")
    family, _, _, _, sockaddr = infos[0]
    sock = stdsocket.socket(family, stdsocket.SOCK_DGRAM)
    try:
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
    return UdpEndpoint(sock)
