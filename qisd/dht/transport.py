"""The only socket I/O in the DHT: rpcudp-framed requests and responses over UDP.

:class:`Transport` runs the receive loop and the client side of RPCs over any
:class:`DatagramEndpoint` (a real UDP socket, :mod:`qisd.dht.udp`, or
:mod:`qisd.dht.memnet` in simulations). Inbound requests are rate limited per source
and in total before they are decoded, then handed to the node's ``handler``. A
handler answers at once (ping, find_node: cheap, run inline) or returns
:class:`Deferred` work (packet storage, a thread hop to SQLite) that runs in a
nursery capped at ``max_handlers`` tasks; beyond that, requests are dropped and
counted, so a flood cannot spawn unbounded tasks.

Outgoing requests take one of ``max_outstanding`` slots until answered, timed out
or abandoned; a response is only accepted from the address the request went to.
An unanswered request is sent again within its timeout (``retries``,
:mod:`qisd.dht.resend`); a copy of a request whose deferred work is still running
is dropped (``duplicate_request``).
:meth:`Transport.call` sends one request and waits for it. Code with many requests
in flight at once (lookups, stores at k nodes) uses :meth:`Transport.open_call`
with a :class:`ReplySink` instead (see :mod:`qisd.dht.calls`): the receive loop
hands each answer straight to the sink, so no task or timer is started per
request.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any, Protocol

import trio

from qisd.dht.deferred import NO_REPLY, Deferred
from qisd.dht.ratelimit import RateLimiter, RateLimits, source_key
from qisd.dht.resend import Resender
from qisd.dht.stats import Counters
from qisd.dht.udp import RECV_BURST, DatagramEndpoint, UdpEndpoint, open_udp_endpoint
from qisd.dht.wire import (
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

__all__ = [
    "NO_REPLY",
    "RECV_BURST",
    "DatagramEndpoint",
    "Deferred",
    "Outgoing",
    "ReplySink",
    "Transport",
    "UdpEndpoint",
    "open_udp_endpoint",
    "source_key",
]

log = get_logger(__name__)


Handler = Callable[[str, list[Any], Address], Any]


class ReplySink(Protocol):
    """Where the receive loop hands the outcome of an :class:`Outgoing` request."""

    def on_reply(self, call: Outgoing) -> None: ...


class Outgoing:
    """One request in flight: filled in by the receive loop when its answer comes.

    ``ok`` is True with ``result`` set once a well-formed answer came from the
    address the request went to; False with ``error`` set for an answer that does
    not unpack. ``done`` is set either way (and by a timeout or abandon).
    """

    __slots__ = (
        "addr", "again", "data", "done", "error", "msgid", "name", "ok", "resent", "result",
        "sink", "started", "tag", "timeout",
    )

    def __init__(
        self, addr: Address, msgid: bytes, name: str, started: float, sink: ReplySink, tag: Any
    ) -> None:
        self.addr = addr
        self.msgid = msgid
        self.name = name
        self.started = started
        self.sink = sink
        self.tag = tag
        self.done = False
        self.ok = False
        self.result: Any = None
        self.error: str | None = None
        #: The request as sent, kept while it may be sent again (qisd.dht.resend),
        #: when to send it again (None: never), copies sent again so far, and the
        #: timeout its waiter gives it.
        self.data: bytes | None = None
        self.again: float | None = None
        self.resent = 0
        self.timeout = 0.0


class _Waiter:
    """The sink of a single :meth:`Transport.call`."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = trio.Event()

    def on_reply(self, call: Outgoing) -> None:
        self.event.set()


class Transport:
    def __init__(
        self,
        endpoint: DatagramEndpoint,
        handler: Handler,
        counters: Counters,
        *,
        timeout: float = 2.0,
        retries: int = 1,
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
        self._pending: dict[bytes, Outgoing] = {}
        self._limiter = RateLimiter(limits or RateLimits(), trio.current_time())
        self._active = 0
        #: (source, msgid) of the requests whose deferred work is running: a copy
        #: that arrives meanwhile (the sender resent it) is dropped, not run again.
        self._serving: set[tuple[Address, bytes]] = set()
        self.resender = Resender(retries=retries)
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
        if pending is None:
            self.counters.dropped["unknown_msgid"] += 1
            return
        if pending.addr != addr:
            # Left in place: the real answer may still come from the real peer.
            self.counters.dropped["wrong_source"] += 1
            return
        try:
            pending.result = unpack(body)
            pending.ok = True
        except WireError as exc:
            self.counters.dropped[exc.reason] += 1
            pending.error = exc.reason
        self._settle(pending, "ok" if pending.ok else "error")
        pending.sink.on_reply(pending)

    async def _on_request(self, msgid: bytes, body: bytes, addr: Address) -> None:
        rpcs = self.counters.rpcs
        if self._serving and (addr, msgid) in self._serving:
            self.counters.dropped["duplicate_request"] += 1
            return
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
            self._serving.add((addr, msgid))
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
            self._serving.discard((addr, msgid))
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
        except Exception:  # a handler's result msgpack cannot carry (a bug): not fatal
            self.counters.dropped["handler_error"] += 1
            log.exception("dht reply cannot be encoded; not sent", peer=addr)
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

    def _new_msgid(self) -> bytes:
        self._counter += 1
        return hashlib.blake2b(
            self._counter.to_bytes(8, "big"), key=self._msgid_key, digest_size=20
        ).digest()

    def _settle(self, call: Outgoing, result: str | None) -> None:
        """Take ``call`` out of the table (its slot freed); count it unless abandoned."""
        if call.done:
            return
        call.done = True
        call.data = None
        del self._pending[call.msgid]
        self._slots.release()
        if result == "ok":
            seconds = trio.current_time() - call.started
            self.counters.rpc_done(call.name, result, seconds)
            self.resender.observe(call, seconds)
        elif result is not None:
            self.counters.rpc_done(call.name, result)

    async def open_call(
        self,
        addr: Address,
        name: str,
        args: list[Any],
        sink: ReplySink,
        tag: Any = None,
        *,
        wait: float | None = None,
    ) -> Outgoing | None:
        """Send one request whose outcome goes to ``sink.on_reply``; None if the send
        failed (counted as an error).

        Waits only while all ``max_outstanding`` slots are taken. The caller owns the
        timeout (``wait``, default the transport's): it must end every returned call
        with :meth:`expire` (no answer in time) or :meth:`abandon` (no longer wanted)
        unless its answer came, and call :meth:`resend` once ``call.again`` has come
        (no resends otherwise). Raises
        :class:`WireError` only if the request cannot fit a datagram (a caller bug).
        """
        msgid = self._new_msgid()
        data = encode_request(msgid, name, args)
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        call = Outgoing(addr, msgid, name, trio.current_time(), sink, tag)
        self._pending[msgid] = call
        try:
            sent = await self._send(data, addr)
        except BaseException:  # cancelled while the socket was full
            self.abandon(call)
            raise
        if not sent:
            self._settle(call, "error")
            return None
        call.timeout = self.timeout if wait is None else wait
        if not call.done:  # (an answer may have come while the socket was full)
            call.again = self.resender.next_at(call, call.started, call.timeout)
            if call.again is not None:
                call.data = data
        return call

    async def resend(self, call: Outgoing) -> None:
        """Send ``call``'s request again (same id) if it is still unanswered and in
        time, and set when to send the next copy (``call.again``; None: never)."""
        data, call.again = call.data, None
        if call.done or data is None:
            return
        if not self.resender.in_time(call, trio.current_time(), call.timeout):
            call.data = None  # the loop was late: an answer now would be slow, not lost
            return
        call.resent += 1
        if await self._send(data, call.addr):
            self.counters.resent += 1
        if not call.done:
            # From when this copy went out, not when it was due (a stalled loop
            # must not send the next one right behind it).
            call.again = self.resender.next_at(call, trio.current_time(), call.timeout)
        if call.again is None:
            call.data = None

    def expire(self, call: Outgoing) -> None:
        """``call`` got no answer in time: forget it and count a timeout."""
        if not call.done:
            self.resender.observe(call, trio.current_time() - call.started)
        self._settle(call, "timeout")

    def abandon(self, call: Outgoing) -> None:
        """``call`` is no longer wanted (its lookup ended): forget it, uncounted."""
        self._settle(call, None)

    async def call(
        self, addr: Address, name: str, args: list[Any], *, wait: float | None = None
    ) -> tuple[bool, Any]:
        """Send one request; ``(True, result)`` or ``(False, None)`` (timeout, error).

        ``wait`` overrides the transport's reply timeout for this call.

        The same shape rpcudp futures resolve to. Raises :class:`WireError` only if
        the request itself cannot fit a datagram (a bug in the caller).
        """
        waiter = _Waiter()
        call = await self.open_call(addr, name, args, waiter, wait=wait)
        if call is None:
            return False, None
        deadline = call.started + call.timeout
        try:
            while not call.done and trio.current_time() < deadline:
                again = call.again
                with trio.move_on_at(deadline if again is None else min(again, deadline)):
                    await waiter.event.wait()
                if not call.done and again is not None and trio.current_time() >= again:
                    await self.resend(call)
        except BaseException:
            self.abandon(call)  # cancelled from outside: forget it, uncounted
            raise
        if not call.done:
            self.expire(call)
            return False, None
        return (True, call.result) if call.ok else (False, None)
