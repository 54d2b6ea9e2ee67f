"""Group commit of inbound packets: verify and store many requests in one thread hop.

Every ``store_packets`` request must be decoded, signature-checked and written to
SQLite. Done one request at a time, the thread hop and the transaction cost more
than the work; so requests queue here and one drain task at a time takes all that
are waiting, verifies them and writes them in a single ``put_many`` (one
transaction) in one worker-thread call. Under light load a batch is one request and
nothing waits longer than before; under heavy load the fixed costs are shared.

Decoded packets are remembered by id (bounded LRU), so the same packet arriving
again (under another of its keys, by hand-off, by republish) is not verified twice;
admission against the manifest (expiry, swarm) is still checked every time.

A store that cannot write (disk full, read-only, I/O error) refuses the batch whole
(its transaction rolled back): every packet in it is ``rejected:disk``, counted like
any refusal, so the sending peer places it at the next closest node instead and no
handler task fails. The log says so once per change of cause, not once per request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from qisd.dht.api import PacketStore, PutResult
from qisd.logs import get_logger
from qisd.manifest import Manifest
from qisd.packet import OutcomePacket, PacketError, check_admissible, decode_packet, packet_id
from qisd.store import PutResult as StoreResult
from qisd.store import StoreError

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

#: Packets per transaction.
MAX_BATCH_PACKETS = 512
#: Decoded packets remembered by id.
CACHE_SIZE = 4096
#: Seconds the drain waits before its first batch, so that requests arriving
#: together share a thread hop (a hop costs more than verifying a packet).
LINGER = 0.0
#: Refusal reason of a packet the store could not write (``rejected:disk``).
DISK = "disk"

log = get_logger(__name__)

Checked = list[OutcomePacket | PacketError]


class _Job:
    __slots__ = ("checked", "done", "error", "key", "raws", "results")

    def __init__(self, key: bytes, raws: list[bytes]) -> None:
        self.key = key
        self.raws = raws
        self.done = trio.Event()
        self.checked: Checked = []
        self.results: list[PutResult] = []
        self.error: BaseException | None = None


class Ingest:
    def __init__(self, node: DHTNode) -> None:
        self.node = node
        self._queue: list[_Job] = []
        self._draining = False
        self._cache: OrderedDict[bytes, OutcomePacket] = OrderedDict()
        #: The store failure last logged (its code), None while writes succeed.
        self._failing: str | None = None

    def refuse(self, exc: StoreError, count: int) -> list[PutResult]:
        """``count`` results saying the disk refused them (the failure logged)."""
        self.note_failure(exc)
        return _refused(count)

    def note_failure(self, exc: StoreError) -> None:
        """Log a store failure once per change of cause, not once per request."""
        if exc.code != self._failing:
            self._failing = exc.code
            log.warning("store cannot write, refusing packets", code=exc.code, error=str(exc))

    def stored(self) -> None:
        """A write went through: the next failure is news again."""
        if self._failing is not None:
            log.info("store writes again", was=self._failing)
            self._failing = None

    async def submit(self, key: bytes, raws: list[bytes]) -> tuple[Checked, list[PutResult]]:
        """Verify and store ``raws`` under ``key``: each packet or its error, and the
        store's result for each packet that passed (in order)."""
        job = _Job(key, raws)
        self._queue.append(job)
        if not self._draining:
            self._draining = True
            self.node.spawn(self._drain)
        await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.checked, job.results

    async def _drain(self) -> None:
        store = self.node.store
        assert store is not None
        try:
            # Linger a moment so requests arriving together share one hop.
            await trio.sleep(LINGER)
            while self._queue:
                batch: list[_Job] = []
                count = 0
                while self._queue and (not batch or count < MAX_BATCH_PACKETS):
                    job = self._queue.pop(0)
                    batch.append(job)
                    count += len(job.raws)
                try:
                    failure = await self.node.in_thread(
                        self._process, store, self.node.manifest, batch, self.node.wall_ms()
                    )
                except Exception as exc:  # a bug: every waiter hears of it
                    for job in batch:
                        job.error = exc
                else:
                    if failure is not None:
                        self.note_failure(failure)
                    elif any(job.results for job in batch):
                        self.stored()
                for job in batch:
                    job.done.set()
        finally:
            self._draining = False

    def _process(
        self, store: PacketStore, manifest: Manifest, batch: Sequence[_Job], now_ms: int
    ) -> StoreError | None:
        # Runs in a worker thread; only one drain runs at a time, so the cache is
        # never touched concurrently. A store failure is returned (and each job gets
        # placeholder results of the right length) for the drain to turn into refusals.
        items: list[tuple[bytes, OutcomePacket]] = []
        for job in batch:
            job.checked = [self._check(raw, manifest, now_ms) for raw in job.raws]
            items.extend((job.key, p) for p in job.checked if isinstance(p, OutcomePacket))
        failure = None
        try:
            results = list(store.put_many(items, now_ms=now_ms)) if items else []
        except StoreError as exc:
            failure = exc
            results = _refused(len(items))
        at = 0
        for job in batch:
            good = sum(1 for p in job.checked if isinstance(p, OutcomePacket))
            job.results = results[at : at + good]
            at += good
        return failure

    def _check(self, raw: bytes, manifest: Manifest, now_ms: int) -> OutcomePacket | PacketError:
        pid = packet_id(raw)
        try:
            packet = self._cache.get(pid)
            if packet is None:
                packet = decode_packet(raw, max_bytes=manifest.packet_max_bytes)
                self._cache[pid] = packet
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            check_admissible(packet, manifest, now_ms=now_ms)
        except PacketError as exc:
            return exc
        return packet


def _refused(count: int) -> list[PutResult]:
    return [StoreResult("rejected", DISK)] * count
