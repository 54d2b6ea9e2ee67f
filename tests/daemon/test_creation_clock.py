"""CreationClock: identical content gets one millisecond each, never ahead of the clock."""

from __future__ import annotations

from qisd.daemon.created import PRUNE_AT, STEPPED_BACK_MS, CreationClock


def test_same_content_in_one_millisecond_waits_for_the_next_ones() -> None:
    now = [1000]
    clock = CreationClock(lambda: now[0])
    assert clock.created_ms(b"a") == 1000 and clock.wait_s(1000) == 0
    second = clock.created_ms(b"a")
    assert second == 1001 and clock.wait_s(second) == 0.001  # the emit waits for it
    assert clock.created_ms(b"b") == 1000  # other content keeps the real time
    now[0] = 1001
    assert clock.created_ms(b"a") == 1002
    now[0] = 2000
    assert clock.created_ms(b"a") == 2000  # real time again


def test_a_clock_that_stepped_back_is_not_waited_for() -> None:
    now = [10_000]
    clock = CreationClock(lambda: now[0])
    clock.created_ms(b"a")
    now[0] -= STEPPED_BACK_MS + 1
    assert clock.created_ms(b"a") == now[0]  # not 10,001, a second and more away


def test_it_stays_small() -> None:
    now = [0]
    clock = CreationClock(lambda: now[0])
    for i in range(PRUNE_AT):
        clock.created_ms(i.to_bytes(4, "big"))
    clock.created_ms(b"x")
    clock.created_ms(b"x")  # given 1: not yet past
    now[0] = 1
    clock.created_ms(b"new")  # the prune: what was given before now goes
    assert len(clock) == 2
    assert clock.created_ms(b"x") == 2
