"""The synthesis worker under a mock clock: deliveries in, drafts out, catch-up."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from synth_helpers import KEYS, NOW_MS, direction, near, obs, sign_draft

from qisd.dht.api import Delivery
from qisd.packet import OutcomePacket
from qisd.store import PacketStore
from qisd.synthesis import (
    CohortSynthesizer,
    SynthesisDraft,
    SynthesizerSettings,
    WorkerState,
    run_worker,
)
from qisd.synthesis.worker import RESCAN_TRIES

INTERVAL = 2.0


def cluster(seed: int, count: int, key_index: int = 0) -> list[OutcomePacket]:
    rng = np.random.default_rng(seed)
    return [obs(near(direction(seed), rng), {"ok": i % 2 == 0}, key=KEYS[key_index])
            for i in range(count)]


class Harness:
    def __init__(self, *, is_primary: Callable[[OutcomePacket], bool] = lambda p: True,
                 catch_up: Callable[[], Iterable[OutcomePacket]] | None = None,
                 resume: Callable[[], Iterable[OutcomePacket]] | None = None,
                 fail_publish: bool = False, interval: float = INTERVAL,
                 settle: Callable[[], Awaitable[None]] | None = None) -> None:
        self.send, self.receive = trio.open_memory_channel[OutcomePacket | Delivery](64)
        self.synth = CohortSynthesizer(SynthesizerSettings(min_cohort=5))
        self.published: list[SynthesisDraft] = []
        self.is_primary = is_primary
        self.catch_up = catch_up
        self.resume = resume
        self.fail_publish = fail_publish
        self.interval = interval
        self.settle = settle

    async def publish(self, draft: SynthesisDraft) -> None:
        await trio.sleep(0.01)  # like a DHT put, it takes time
        if self.fail_publish:
            raise RuntimeError("no peers")
        self.published.append(draft)

    async def start(self, nursery: trio.Nursery) -> WorkerState:
        state: WorkerState = await nursery.start(functools.partial(
            run_worker, self.receive, self.synth, is_primary=self.is_primary,
            publish=self.publish, catch_up=self.catch_up, resume=self.resume,
            settle=self.settle, interval=self.interval,
            now_ms=lambda: NOW_MS,
        ))
        return state


async def test_deliveries_become_published_drafts(
        autojump_clock: trio.testing.MockClock) -> None:
    h = Harness()
    async with trio.open_nursery() as nursery:
        state = await h.start(nursery)
        for p in cluster(1, 5):
            await h.send.send(p)
        await trio.sleep(INTERVAL * 1.5)
        assert len(h.published) == 1 and h.published[0].n == 5
        await trio.sleep(INTERVAL * 5)  # passes with no new input emit nothing
        assert len(h.published) == 1
        assert state.passes >= 5
        # Delivery records (as the DHT hands them out) work as well; one per key held.
        extra = cluster(1, 7)[5:]
        for p in extra:
            await h.send.send(Delivery(key=bytes(20), packet=p, source="store"))
            await h.send.send(Delivery(key=bytes([1]) * 20, packet=p, source="store"))
        await trio.sleep(INTERVAL)
        assert [d.n for d in h.published] == [5, 7]
        assert h.published[1].series == h.published[0].series
        stats = state.statistics()
        assert stats.consumed == 7 and stats.duplicates == 2
        assert stats.drafts_published == 2 and stats.cohorts == 1 and stats.backlog == 0
        await h.send.aclose()  # the worker makes a last pass and returns
    assert state.statistics().to_dict()["drafts_published"] == 2


async def test_last_pass_when_the_channel_closes(
        autojump_clock: trio.testing.MockClock) -> None:
    h = Harness()
    async with trio.open_nursery() as nursery:
        await h.start(nursery)
        for p in cluster(1, 6):
            await h.send.send(p)
        await h.send.aclose()
    assert [d.n for d in h.published] == [6]
    assert trio.current_time() < INTERVAL  # it did not wait for the next tick


async def test_packets_this_node_is_not_primary_for_are_skipped(
        autojump_clock: trio.testing.MockClock) -> None:
    mine = bytes(KEYS[0].verify_key)
    h = Harness(is_primary=lambda p: p.origin == mine)
    async with trio.open_nursery() as nursery:
        state = await h.start(nursery)
        for p in cluster(1, 4, key_index=0) + cluster(1, 4, key_index=1):
            await h.send.send(p)
        await trio.sleep(INTERVAL * 1.5)
        stats = state.statistics()
        assert (stats.consumed, stats.skipped_not_primary) == (4, 4)
        assert h.published == []  # 4 cases < min_cohort
        await h.send.aclose()


async def test_generation_capped_and_failures_are_counted(
        autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(fail_publish=True)
    async with trio.open_nursery() as nursery:
        state = await h.start(nursery)
        packets = cluster(1, 5)
        for p in packets:
            await h.send.send(p)
        await trio.sleep(INTERVAL * 1.5)
        stats = state.statistics()
        assert stats.publish_failures == 1 and stats.drafts_published == 0
        synth = CohortSynthesizer(SynthesizerSettings(min_cohort=5))
        for p in packets:
            synth.consume(p)
        (draft,) = synth.ready(NOW_MS)
        await h.send.send(sign_draft(draft))
        await trio.sleep(INTERVAL)
        assert state.statistics().skipped_generation == 1
        await h.send.aclose()


async def test_catch_up_from_the_store_after_falling_behind(tmp_path: Path) -> None:
    """Real clock: the store is read in a worker thread, and a mock clock would jump
    while the thread runs. Waits are for worker passes, bounded by fail_after."""
    store = PacketStore.open(tmp_path / "packets.db")
    try:
        packets = cluster(1, 6)
        store.put_many([(bytes([i]) * 20, p) for i, p in enumerate(packets)], now_ms=NOW_MS)
        reads = 0

        def catch_up() -> Iterable[OutcomePacket]:
            nonlocal reads
            reads += 1
            return store.iter_packets(now_ms=NOW_MS)

        h = Harness(catch_up=catch_up, interval=0.05)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                state = await h.start(nursery)
                # Two were delivered; four were dropped on a full channel (as the
                # daemon would count them), but they are in the store.
                for p in packets[:2]:
                    await h.send.send(p)
                state.mark_behind(4)
                while not h.published:
                    await state.wait_pass()
                assert reads == 1 and [d.n for d in h.published] == [6]
                stats = state.statistics()
                assert stats.caught_up == 4 and stats.behind == 4 and stats.consumed == 6
                for _ in range(3):
                    await state.wait_pass()
                assert reads == 1  # no new misses, no new catch-up
                state.mark_behind()
                await state.wait_pass()  # the catch-up and ready() run in one pass
                assert reads == 2 and len(h.published) == 1  # all seen: none counted twice
                assert state.statistics().caught_up == 4
                await h.send.aclose()
    finally:
        store.close()


class Restarted:
    """A node's store after a restart: six cases and its synthesis of them from
    before; ``read_store`` (the worker's catch-up) counts its calls in ``reads``."""

    def __init__(self) -> None:
        before = CohortSynthesizer(SynthesizerSettings(min_cohort=5))
        self.held = cluster(1, 6)
        for p in self.held:
            before.consume(p)
        (self.draft,) = before.ready(NOW_MS)
        self.reads: list[int] = []

    def read_store(self) -> list[OutcomePacket]:
        self.reads.append(1)
        return self.held

    def own_syntheses(self) -> list[OutcomePacket]:
        return [sign_draft(self.draft)]


async def test_after_a_restart_the_store_is_read_again_once() -> None:
    """Real clock (the resume and the re-read run in worker threads, see above)."""
    r = Restarted()
    draft, reads = r.draft, r.reads
    h = Harness(catch_up=r.read_store, resume=r.own_syntheses, interval=0.05)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            state = await h.start(nursery)
            for _ in range(4):
                await state.wait_pass()
            assert (state.resumed, len(reads), h.published) == (1, 1, [])  # nothing new
            await h.send.send(cluster(1, 7)[6])
            while not h.published:
                await state.wait_pass()
            assert [(d.series, d.n) for d in h.published] == [(draft.series, 7)]
            assert len(reads) == 1
            await h.send.aclose()


async def test_after_a_restart_stored_cases_in_no_synthesis_count() -> None:
    """Real clock. Four cases (under the minimum of five) were stored before the
    restart and nothing was synthesised: the re-read at start takes them, so the
    fifth, delivered after it, completes the cohort as without a restart."""
    held = cluster(1, 5)
    reads: list[int] = []

    def read_store() -> list[OutcomePacket]:
        reads.append(1)
        return held[:4]

    h = Harness(catch_up=read_store, resume=list, interval=0.05)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            state = await h.start(nursery)
            await h.send.send(held[4])
            while not h.published:
                await state.wait_pass()
            assert len(reads) == 1 and [d.n for d in h.published] == [5]
            await h.send.aclose()


async def test_after_a_restart_the_store_waits_for_the_routing_table_to_settle() -> None:
    """Who is primary for a stored packet depends on the routing table: right after a
    start it may be empty (every packet would look like ours) or stale, so the
    re-read waits for it (the daemon: saved peers checked, first bootstrap done)."""
    r = Restarted()
    reads = r.reads
    settled = trio.Event()
    h = Harness(catch_up=r.read_store, resume=r.own_syntheses, interval=0.05,
                settle=settled.wait)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            state = await h.start(nursery)
            await trio.sleep(0.5)  # ten intervals
            assert (state.resumed, reads, state.passes) == (1, [], 0)
            settled.set()
            for _ in range(3):
                await state.wait_pass()
            assert len(reads) == 1 and h.published == []  # the same cohort: nothing new
            await h.send.aclose()


async def test_a_store_that_fails_to_read_is_read_again_at_the_next_pass() -> None:
    """Real clock (the re-read runs in a worker thread). A failing re-read (a disk
    error) must not end the worker, and the missed packets are not forgotten."""
    held = cluster(1, 6)
    reads: list[int] = []

    def read_store() -> list[OutcomePacket]:
        reads.append(1)
        if len(reads) == 1:
            raise OSError(5, "Input/output error")
        return held

    h = Harness(catch_up=read_store, interval=0.05)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            state = await h.start(nursery)
            state.mark_behind(6)
            while not h.published:
                await state.wait_pass()
            assert state.catch_up_failures == 1 and len(reads) == 2
            assert state.caught_up == 6 and [d.n for d in h.published] == [6]
            assert state.statistics().catch_up_failures == 1
            await h.send.aclose()


async def test_after_a_restart_a_failed_re_read_keeps_the_resume_open() -> None:
    """Real clock. The resumed cohort waits for its members from the re-read: a
    failed one must neither forget it nor draft, or the next read would synthesise
    the same cases again."""
    r = Restarted()

    def read_store() -> list[OutcomePacket]:
        if not r.reads:
            r.reads.append(0)
            raise OSError(5, "Input/output error")
        return r.read_store()

    h = Harness(catch_up=read_store, resume=r.own_syntheses, interval=0.05)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            state = await h.start(nursery)
            while len(r.reads) < 2:
                await state.wait_pass()
            for _ in range(4):
                await state.wait_pass()
            assert (state.catch_up_failures, len(r.reads), h.published) == (1, 2, [])
            await h.send.send(cluster(1, 7)[6])
            while not h.published:
                await state.wait_pass()
            assert [(d.series, d.n) for d in h.published] == [(r.draft.series, 7)]
            await h.send.aclose()


async def test_a_store_that_never_reads_holds_synthesis_back_only_a_few_passes() -> None:
    """Real clock. The resume waits for a re-read, but not for ever: a store that
    cannot be read must not stop the synthesis of what is delivered."""
    r = Restarted()

    def unreadable() -> list[OutcomePacket]:
        raise OSError(5, "Input/output error")

    h = Harness(catch_up=unreadable, resume=r.own_syntheses, interval=0.05)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            state = await h.start(nursery)
            fresh = cluster(2, 5)
            for p in fresh:
                await h.send.send(p)
            while not h.published:
                await state.wait_pass()
            assert state.catch_up_failures == RESCAN_TRIES and not state.rescan
            assert [d.n for d in h.published] == [5]
            await h.send.aclose()


async def test_own_syntheses_that_cannot_be_read_are_a_store_failure() -> None:
    """Real clock. A disk error reading them back at start is counted as a failed
    store read, not blamed on the plug-in; the worker goes on without a resume."""
    r = Restarted()

    def unreadable() -> list[OutcomePacket]:
        raise OSError(5, "Input/output error")

    h = Harness(catch_up=r.read_store, resume=unreadable, interval=0.05)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            state = await h.start(nursery)
            await state.wait_pass()
            assert (state.catch_up_failures, state.synthesizer_errors, state.resumed) == (1, 0, 0)
            await h.send.aclose()


class _Faulty:
    """A plug-in whose ready() breaks in one of the ways third-party code can."""

    def __init__(self, how: str) -> None:
        self.how = how

    def consume(self, packet: OutcomePacket) -> None:
        pass

    def ready(self, now_ms: int) -> Any:
        if self.how == "none":
            return None
        if self.how == "dict":
            return {"topic": "t"}
        if self.how == "not a draft":
            return ["draft"]
        if self.how == "generator":
            return self._raising()
        raise AssertionError(self.how)

    def _raising(self) -> Iterator[SynthesisDraft]:
        raise RuntimeError("plug-in bug")
        yield  # a generator

    def statistics(self) -> dict[str, Any]:
        return {"cohorts": "many", "skipped_generation": None}


@pytest.mark.parametrize("how", ["none", "dict", "not a draft", "generator"])
async def test_a_faulty_plugin_is_counted_not_fatal(
        how: str, autojump_clock: trio.testing.MockClock) -> None:
    h = Harness()
    h.synth = _Faulty(how)  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        state = await h.start(nursery)
        await trio.sleep(INTERVAL * 3.5)
        assert state.passes >= 3 and state.synthesizer_errors >= 3
        assert state.statistics().cohorts == 0  # its odd counters left out
        await h.send.aclose()
