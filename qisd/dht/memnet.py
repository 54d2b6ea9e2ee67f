"""An in-memory datagram network, so the real node code runs in simulations.

Each :class:`MemoryEndpoint` satisfies :class:`qisd.dht.transport.DatagramEndpoint`.
Delivery is immediate into the receiver's bounded queue (full queue: the datagram is
lost, as with UDP); optional random loss; an endpoint can be taken down and brought
back to model churn. With ``trio.testing.MockClock(autojump_threshold=0)``, RPC
timeouts to dead nodes cost no real time.
"""

from __future__ import annotations

import random

import trio

from qisd.dht.wire import MAX_DATAGRAM, Address


class MemoryNetwork:
    def __init__(self, *, loss: float = 0.0, seed: int = 0, queue_size: int = 512) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError("memnet: loss must be in [0, 1)")
        self.loss = loss
        self.queue_size = queue_size
        self.endpoints: dict[Address, MemoryEndpoint] = {}
        self.down: set[Address] = set()
        self.delivered = 0
        self.lost = 0
        self._rng = random.Random(seed)
        self._next = 1

    def endpoint(self, addr: Address | None = None) -> MemoryEndpoint:
        """A new endpoint at ``addr`` (default: the next of 10.x.y.z:4000)."""
        if addr is None:
            n = self._next
            self._next += 1
            addr = (f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}", 4000)
        if addr in self.endpoints:
            raise OSError(f"memnet: address {addr} in use")
        ep = MemoryEndpoint(self, addr)
        self.endpoints[addr] = ep
        return ep

    def deliver(self, data: bytes, src: Address, dst: Address) -> None:
        ep = self.endpoints.get(dst)
        if (
            ep is None
            or dst in self.down
            or src in self.down
            or len(data) > MAX_DATAGRAM
            or (self.loss and self._rng.random() < self.loss)
        ):
            self.lost += 1
            return
        try:
            ep.queue_in.send_nowait((data, src))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.lost += 1
            return
        self.delivered += 1


class MemoryEndpoint:
    def __init__(self, network: MemoryNetwork, addr: Address) -> None:
        self.network = network
        self._addr = addr
        self.queue_in, self._queue_out = trio.open_memory_channel[tuple[bytes, Address]](
            network.queue_size
        )

    @property
    def local_address(self) -> Address:
        return self._addr

    @property
    def dual_stack(self) -> bool:
        return False

    async def sendto(self, data: bytes, addr: Address) -> None:
        await trio.lowlevel.checkpoint()
        self.network.deliver(bytes(data), self._addr, addr)

    async def recvfrom(self) -> tuple[bytes, Address]:
        return await self._queue_out.receive()

    def close(self) -> None:
        if self.network.endpoints.get(self._addr) is self:
            del self.network.endpoints[self._addr]
        self.queue_in.close()
        self._queue_out.close()
