"""The only socket I/O in the DHT: rpcudp-framed requests and responses over UDP.

:class:`Transport` runs the receive loop and the client side of RPCs over any
:class:`DatagramEndpoint` (a real UDP socket here, or :mod:`qisd.dht.memnet` in
simulations). Inbound requests are rate limited per source and in total before they
are decoded, then handed to the node's ``handler``. A handler answers at once (ping,
find_node: cheap, run inline) or returns :class:`Deferred` work (packet storage, a
thread hop to SQLite) that runs in a nursery capped at ``max_handlers`` tasks;
beyond that, requests are dropped and counted, so a flood cannot spawn unbounded
tasks. Outgoing calls take a slot in a semaphore (``max_outstanding``) and wait at
most ``timeout`` for the answer; a response is only accepted from the address the
request went to.
"""

from __future__ import annotations

import hashlib
import os
import socket as stdsocket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from qisd.dht.ratelimit import RateLimiter, RateLimits
from qisd.dht.stats import Counters
from qisd.dht.wire import (
    MAX_DATAGRAM,
    REQUEST,
    Address,
    WireError,
    decode_request,
    encode_request,
    encode_response,
    split_header,
    unpack,
)
from qisd.logs import get_logger

log = get_logger(__name__)
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


#: Returned by a handler (or deferred work) that must not answer at all.
NO_REPLY: Any = object()


@dataclass(frozen=True, slots=True)
class Deferred:
    """Handler work that must await (storage); run in the bounded handler nursery.

    ``busy`` is the answer sent at once when the nursery is full (qisd RPCs say
    "busy" so the caller can tell an overloaded peer from a stock node that ignores
    them); the default drops the request.
    """

    work: Callable[[], Awaitable[Any]]
    busy: Any = NO_REPLY


Handler = Callable[[str, list[Any], Address], Any]


class _Pending:
    __slots__ = ("addr", "error", "event", "result")

    def __init__(self, addr: Address) -> None:
        self.addr = addr
        self.event = trio.Event()
        self.result: Any = None
        self.error: str | None = None


def source_key(addr: Address) -> object:
    """Rate-limit key: the IP, except on loopback where tests run many nodes per host."""
    ip = addr[0]
    if ip.startswith("127.") or ip == "::1":
        return addr
    return ip


class Transport:
    def __init__(
        self,
        endpoint: DatagramEndpoint,
        handler: Handler,
        counters: Counters,
        *,
        timeout: float = 2.0,
        max_outstanding: int = 2048,
        max_handlers: int = 64,
        limits: RateLimits | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.handler = handler
        self.counters = counters
        self.timeout = timeout
        self.max_handlers = max_handlers
        self._slots = trio.Semaphore(max_outstanding)
        self._pending: dict[bytes, _Pending] = {}
        self._limiter = RateLimiter(limits or RateLimits(), trio.current_time())
        self._active = 0
        self._nursery: trio.Nursery | None = None
        # Message ids must be unguessable (a reply is matched by id and source
        # address, and UDP sources can be forged), but os.urandom per request is a
        # system call that costs more than the rest of a send: a keyed hash of a
        # counter is as unpredictable without the key, and cheap.
        self._msgid_key = os.urandom(32)
        self._counter = 0

    @property
    def local_address(self) -> Address:
        return self.endpoint.local_address

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive and dispatch datagrams until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._receive_loop()

    async def _receive_loop(self) -> None:
        counters = self.counters
        dropped = counters.dropped
        while True:
            try:
                data, addr = await self.endpoint.recvfrom()
            except (trio.ClosedResourceError, trio.EndOfChannel):
                return
            except OSError:
                # e.g. an ICMP error surfacing on some platforms; the socket is fine.
                dropped["recv_error"] += 1
                continue
            counters.datagrams_in += 1
            counters.bytes_in += len(data)
            try:
                kind, msgid, body = split_header(data)
            except WireError as exc:
                dropped[exc.reason] += 1
                continue
            if kind != REQUEST:
                self._on_response(msgid, body, addr)
                continue
            refused = self._limiter.check(source_key(addr), trio.current_time())
            if refused is not None:
                dropped[refused] += 1
                continue
            await self._on_request(msgid, body, addr)

    def _on_response(self, msgid: bytes, body: bytes, addr: Address) -> None:
        pending = self._pending.get(msgid)
        if pending is None or pending.event.is_set():
            self.counters.dropped["unknown_msgid"] += 1
            return
        if pending.addr != addr:
            self.counters.dropped["wrong_source"] += 1
            return
        try:
            pending.result = unpack(body)
        except WireError as exc:
            self.counters.dropped[exc.reason] += 1
            pending.error = exc.reason
        pending.event.set()

    async def _on_request(self, msgid: bytes, body: bytes, addr: Address) -> None:
        rpcs = self.counters.rpcs
        name = "?"
        try:
            request = decode_request(msgid, body)
            name = request.name
            result = self.handler(name, request.args, addr)
        except WireError as exc:
            self.counters.dropped[exc.reason] += 1
            if exc.reason == "bad_args":
                rpcs[(name, "in", "error")] += 1
            log.debug("dht request dropped", peer=addr, error=str(exc))
            return
        except Exception:
            self.counters.dropped["handler_error"] += 1
            log.exception("dht handler failed", rpc=name, peer=addr)
            return
        if isinstance(result, Deferred):
            if self._active >= self.max_handlers or self._nursery is None:
                self.counters.dropped["overloaded"] += 1
                rpcs[(name, "in", "busy")] += 1
                await self._reply(msgid, result.busy, addr)
                return
            self._active += 1
            self._nursery.start_soon(self._run_deferred, name, msgid, result, addr)
            return
        rpcs[(name, "in", "ok")] += 1
        await self._reply(msgid, result, addr)

    async def _run_deferred(self, name: str, msgid: bytes, job: Deferred, addr: Address) -> None:
        try:
            result = await job.work()
        except WireError as exc:
            self.counters.dropped[exc.reason] += 1
            self.counters.rpcs[(name, "in", "error")] += 1
            return
        except Exception:
            self.counters.dropped["handler_error"] += 1
            log.exception("dht handler failed", rpc=name, peer=addr)
            return
        finally:
            self._active -= 1
        self.counters.rpcs[(name, "in", "ok")] += 1
        await self._reply(msgid, result, addr)

    async def _reply(self, msgid: bytes, result: Any, addr: Address) -> None:
        if result is NO_REPLY:
            return
        try:
            data = encode_response(msgid, result)
        except WireError:
            self.counters.dropped["oversized_reply"] += 1
            log.error("dht reply does not fit a datagram; not sent", peer=addr)
            return
        await self._send(data, addr)

    async def _send(self, data: bytes, addr: Address) -> bool:
        try:
            await self.endpoint.sendto(data, addr)
        except (OSError, trio.ClosedResourceError):
            self.counters.dropped["send_error"] += 1
            return False
        self.counters.datagrams_out += 1
        self.counters.bytes_out += len(data)
        return True

    async def call(
        self, addr: Address, name: str, args: list[Any], *, wait: float | None = None
    ) -> tuple[bool, Any]:
        """Send one request; ``(True, result)`` or ``(False, None)`` (timeout, error).

        ``wait`` overrides the transport's reply timeout for this call.

        The same shape rpcudp futures resolve to. Raises :class:`WireError` only if
        the request itself cannot fit a datagram (a bug in the caller).
        """
        self._counter += 1
        msgid = hashlib.blake2b(
            self._counter.to_bytes(8, "big"), key=self._msgid_key, digest_size=20
        ).digest()
        data = encode_request(msgid, name, args)
        async with self._slots:
            pending = _Pending(addr)
            self._pending[msgid] = pending
            started = trio.current_time()
            try:
                if not await self._send(data, addr):
                    self.counters.rpc_done(name, "error")
                    return False, None
                with trio.move_on_after(self.timeout if wait is None else wait):
                    await pending.event.wait()
            finally:
                del self._pending[msgid]
        if not pending.event.is_set():
            self.counters.rpc_done(name, "timeout")
            return False, None
        if pending.error is not None:
            self.counters.rpc_done(name, "error")
            return False, None
        self.counters.rpc_done(name, "ok", trio.current_time() - started)
        return True, pending.result
