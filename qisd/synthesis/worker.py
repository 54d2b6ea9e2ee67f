"""The synthesis worker: the thin trio loop between deliveries and a synthesizer.

Deliveries (packets this node accepted as a responsible node, or that arrived for a
local watch) come through a bounded channel; the node never waits on it: when it is
full the daemon counts the miss with :meth:`WorkerState.mark_behind`, and on its next
pass the worker re-reads the store through ``catch_up`` so nothing stored is missed.
Only packets for which ``is_primary`` says this node is the closest one it knows to
the packet's key are synthesised, so replicas do not repeat the work.

Every ``interval`` seconds (and once more when the channel closes) the worker catches
up if needed, lets the synthesizer forget expired state, asks it for drafts and hands
each to ``publish`` (the daemon signs it and stores it in the DHT). A failing plug-in
or publish is logged and counted; it never stops the daemon.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import structlog
import trio

from qisd.packet import OutcomePacket, wall_ms
from qisd.synthesis.base import SynthesisDraft, Synthesizer

log = structlog.get_logger("qisd.synthesis")

#: Packet ids remembered to skip repeated deliveries (one per key a node holds).
SEEN_CAPACITY = 65_536
#: Packets read from the store per worker-thread call while catching up.
CATCH_UP_BATCH = 500
#: Longest wait, after resuming, for the routing table to settle before the store
#: is re-read (who is primary for a packet depends on it).
SETTLE_WAIT_S = 60.0
#: Failed re-reads after a restart that hold synthesis back (the resumed cohorts
#: wait for their members); past them the resume is given up and synthesis goes on.
RESCAN_TRIES = 5


class CarriesPacket(Protocol):
    """A delivery record (such as the DHT's ``Delivery``) that wraps a packet."""

    @property
    def packet(self) -> OutcomePacket: ...


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    """An immutable snapshot of the worker's counters (what metrics read)."""

    consumed: int
    duplicates: int
    skipped_not_primary: int
    skipped_generation: int
    drafts_published: int
    publish_failures: int
    synthesizer_errors: int
    caught_up: int
    behind: int
    cohorts: int
    backlog: int
    passes: int
    resumed: int = 0
    #: Re-reads of the store that failed (tried again at the next pass).
    catch_up_failures: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(eq=False)
class WorkerState:
    """Shared between the daemon and the worker: the daemon marks missed deliveries,
    the worker keeps its counters here, and :meth:`statistics` snapshots both."""

    behind: int = 0
    consumed: int = 0
    duplicates: int = 0
    skipped_not_primary: int = 0
    drafts_published: int = 0
    publish_failures: int = 0
    synthesizer_errors: int = 0
    caught_up: int = 0
    catch_up_failures: int = 0
    passes: int = 0
    #: ``behind`` as of the last catch-up.
    handled_behind: int = 0
    #: Cohorts taken back after a restart, and whether the store is still to be
    #: re-read for them (see ``resume`` in :func:`run_worker`).
    resumed: int = 0
    rescan: bool = False
    rescan_failures: int = 0
    synthesizer: Synthesizer | None = None
    receive: trio.abc.ReceiveChannel[Any] | None = None
    _seen: OrderedDict[bytes, None] = field(default_factory=OrderedDict, repr=False)
    _pass_done: trio.Event = field(default_factory=trio.Event, repr=False)

    async def wait_pass(self) -> int:
        """Wait until the worker finishes its next pass; returns the passes so far."""
        await self._pass_done.wait()
        return self.passes

    def _finish_pass(self) -> None:
        self.passes += 1
        done, self._pass_done = self._pass_done, trio.Event()
        done.set()

    def mark_behind(self, count: int = 1) -> None:
        """A delivery could not be queued: the next pass catches up from the store."""
        self.behind += count

    @property
    def needs_catch_up(self) -> bool:
        return self.behind > self.handled_behind or self.rescan

    def seen(self, packet_id: bytes) -> bool:
        """True if ``packet_id`` was handled recently; remembers it otherwise."""
        if packet_id in self._seen:
            self._seen.move_to_end(packet_id)
            return True
        self._seen[packet_id] = None
        if len(self._seen) > SEEN_CAPACITY:
            self._seen.popitem(last=False)
        return False

    def statistics(self) -> WorkerStatistics:
        synth: dict[str, Any] = {}
        stats_fn = getattr(self.synthesizer, "statistics", None)
        if callable(stats_fn):
            try:
                synth = {k: int(v) for k, v in dict(stats_fn()).items()
                         if k in ("skipped_generation", "cohorts")}
            except Exception:  # a plug-in's counters must not break a metrics scrape
                log.exception("synthesizer statistics failed")
                synth = {}
        backlog = 0
        if isinstance(self.receive, trio.MemoryReceiveChannel):
            backlog = self.receive.statistics().current_buffer_used
        return WorkerStatistics(
            consumed=self.consumed,
            duplicates=self.duplicates,
            skipped_not_primary=self.skipped_not_primary,
            skipped_generation=int(synth.get("skipped_generation", 0)),
            drafts_published=self.drafts_published,
            publish_failures=self.publish_failures,
            synthesizer_errors=self.synthesizer_errors,
            caught_up=self.caught_up,
            behind=self.behind,
            cohorts=int(synth.get("cohorts", 0)),
            backlog=backlog,
            passes=self.passes,
            resumed=self.resumed,
            catch_up_failures=self.catch_up_failures,
        )


async def run_worker(
    receive: trio.abc.ReceiveChannel[OutcomePacket | CarriesPacket],
    synthesizer: Synthesizer,
    *,
    is_primary: Callable[[OutcomePacket], bool],
    publish: Callable[[SynthesisDraft], Awaitable[None]],
    catch_up: Callable[[], Iterable[OutcomePacket]] | None = None,
    resume: Callable[[], Iterable[OutcomePacket]] | None = None,
    settle: Callable[[], Awaitable[None]] | None = None,
    interval: float,
    state: WorkerState | None = None,
    clock: Callable[[], float] = trio.current_time,
    now_ms: Callable[[], int] = wall_ms,
    task_status: trio.TaskStatus[WorkerState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Drive ``synthesizer`` until ``receive`` closes (then one last pass) or cancelled.

    ``task_status.started`` gets the :class:`WorkerState` (``state`` or a new one).
    ``clock`` is trio's clock (deadlines between passes); ``now_ms`` is wall time in
    ms, which packets' expiry is measured in.

    ``resume`` gives this node's own live syntheses from before a restart: a
    synthesizer with a ``resume(packets)`` method takes its cohorts back from them
    (the default one does), and the first pass then re-reads the store through
    ``catch_up`` (resumed cohorts or not: cases stored in no synthesis yet count
    too), so its next syntheses supersede the old ones. That pass waits for
    ``settle`` (at most :data:`SETTLE_WAIT_S`): the store's packets are judged
    primary or not by the routing table, which right after a start may still be
    empty or stale (deliveries wait in the channel meanwhile; if it fills, the
    re-read covers them).
    """
    if not interval > 0:
        raise ValueError(f"interval: must be > 0 seconds, got {interval}")
    state = state if state is not None else WorkerState()
    state.synthesizer = synthesizer
    state.receive = receive
    task_status.started(state)
    if resume is not None and catch_up is not None:
        await _resume(state, synthesizer, resume)
        if state.rescan and settle is not None:
            with trio.move_on_after(SETTLE_WAIT_S) as waited:
                await settle()
            if waited.cancelled_caught:
                log.warning("synthesis re-reads the store before the routing table settled",
                            waited_s=SETTLE_WAIT_S)
    deadline = clock() + interval
    while True:
        closed = False
        with trio.move_on_at(deadline):
            async for item in receive:
                packet = item if isinstance(item, OutcomePacket) else item.packet
                _handle(state, synthesizer, packet, is_primary)
            closed = True
        await _pass(state, synthesizer, publish, catch_up, is_primary, now_ms)
        state._finish_pass()
        if closed:
            return
        deadline = clock() + interval


def _handle(
    state: WorkerState,
    synthesizer: Synthesizer,
    packet: OutcomePacket,
    is_primary: Callable[[OutcomePacket], bool],
    *,
    delivered: bool = True,
) -> bool:
    """Feed one packet to the synthesizer unless seen or not ours; True if fed.
    (A catch-up re-reads packets already handled: those are not duplicates.)"""
    if state.seen(packet.id):
        state.duplicates += int(delivered)
        return False
    try:
        if not is_primary(packet):
            state.skipped_not_primary += 1
            return False
        synthesizer.consume(packet)
    except Exception:  # third-party plug-in code (or a packet it cannot take): log, count
        state.synthesizer_errors += 1
        log.exception("synthesizer consume failed", packet=packet.id.hex())
        return False
    state.consumed += 1
    return True


async def _pass(
    state: WorkerState,
    synthesizer: Synthesizer,
    publish: Callable[[SynthesisDraft], Awaitable[None]],
    catch_up: Callable[[], Iterable[OutcomePacket]] | None,
    is_primary: Callable[[OutcomePacket], bool],
    now_ms: Callable[[], int],
) -> None:
    if catch_up is not None and state.needs_catch_up:
        try:
            await _catch_up(state, synthesizer, catch_up, is_primary)
        except Exception as exc:  # the store's disk failed, say: the worker goes on
            state.catch_up_failures += 1
            log.warning("synthesis could not re-read the store; again at the next pass",
                        error=f"{type(exc).__name__}: {exc}")
            if state.rescan:
                state.rescan_failures += 1
                if state.rescan_failures < RESCAN_TRIES:
                    # The start's re-read is still to come: resumed cohorts wait for
                    # their members from it (forgetting or drafting now would end the
                    # resume and synthesise them anew: a second series beside the old
                    # one, or a smaller one replacing it), and cohorts under the
                    # minimum for their stored cases. A few passes, not for ever: a
                    # store that cannot be read must not stop synthesis of what is
                    # delivered.
                    return
                state.rescan = False
                log.warning("synthesis gave up re-reading the store at start: resumed"
                            " cohorts whose members do not come back by delivery may be"
                            " synthesised again, and stored cases in no synthesis yet"
                            " are not counted", tries=state.rescan_failures)
    now = now_ms()
    try:
        forget = getattr(synthesizer, "forget", None)
        if callable(forget):
            forget(now)
        # (a plug-in's generator runs here; its typing is a promise, not a check)
        drafts: list[Any] = list(synthesizer.ready(now))
    except Exception:
        state.synthesizer_errors += 1
        log.exception("synthesizer ready failed")
        return
    for draft in drafts:
        if not isinstance(draft, SynthesisDraft):
            state.synthesizer_errors += 1
            log.error("synthesizer ready gave something that is not a draft; skipped",
                      got=type(draft).__name__)
            continue
        try:
            await publish(draft)
        except Exception as exc:  # e.g. a draft the packet rules refuse, or no peers
            state.publish_failures += 1
            log.warning("synthesis not published", topic=repr(draft.topic),
                        series=repr(draft.series), error=f"{type(exc).__name__}: {exc}")
        else:
            state.drafts_published += 1


async def _resume(
    state: WorkerState,
    synthesizer: Synthesizer,
    resume: Callable[[], Iterable[OutcomePacket]],
) -> None:
    take = getattr(synthesizer, "resume", None)
    if not callable(take):
        return
    try:
        previous = await trio.to_thread.run_sync(lambda: list(resume()))
    except Exception as exc:  # the store's disk failed, say: not the plug-in's fault
        state.catch_up_failures += 1
        log.warning("synthesis could not read its own syntheses back; its cohorts "
                    "start anew", error=f"{type(exc).__name__}: {exc}")
        return
    try:
        state.resumed = int(take(previous))
    except Exception:
        state.synthesizer_errors += 1
        log.exception("synthesizer resume failed")
        return
    # The store is read again at start whether cohorts were resumed or not: cases
    # stored before the restart and in no synthesis yet (a cohort still under the
    # minimum) must count as they would have without it.
    state.rescan = True
    if state.resumed:
        log.info("synthesis resumed its cohorts", syntheses=len(previous),
                 cohorts=state.resumed)


async def _catch_up(
    state: WorkerState,
    synthesizer: Synthesizer,
    catch_up: Callable[[], Iterable[OutcomePacket]],
    is_primary: Callable[[OutcomePacket], bool],
) -> None:
    """Re-read the store (in a worker thread, a batch at a time) after missed
    deliveries; packets already handled are skipped by id."""
    target = state.behind
    fed = 0
    packets: Iterator[OutcomePacket] = await trio.to_thread.run_sync(
        lambda: iter(catch_up())
    )
    while True:
        batch = await trio.to_thread.run_sync(
            lambda: list(itertools.islice(packets, CATCH_UP_BATCH))
        )
        for packet in batch:
            if _handle(state, synthesizer, packet, is_primary, delivered=False):
                fed += 1
        if len(batch) < CATCH_UP_BATCH:
            break
    state.caught_up += fed
    state.handled_behind = target
    state.rescan = False
    log.info("synthesis caught up from the store", missed=target, fed=fed)
