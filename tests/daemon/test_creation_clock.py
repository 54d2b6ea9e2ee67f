"""CreationClock: identical content in one millisecond gets distinct times; nothing else moves."""

from __future__ import annotations

from qisd.daemon.created import PRUNE_AT, CreationClock


def test_same_content_in_one_millisecond_gets_the_next_ones() -> None:
    now = [1000]
    clock = CreationClock(lambda: now[0])
    assert [clock.created_ms(b"a") for _ in range(3)] == [1000, 1001, 1002]
    assert clock.created_ms(b"b") == 1000  # other content keeps the real time
    now[0] = 1001
    assert clock.created_ms(b"a") == 1003  # still ahead of the clock for "a"
    assert clock.created_ms(b"b") == 1001
    now[0] = 2000
    assert clock.created_ms(b"a") == 2000  # caught up: real time again


def test_it_stays_small_and_forgets_only_what_cannot_collide() -> None:
    now = [0]
    clock = CreationClock(lambda: now[0])
    for i in range(PRUNE_AT):
        clock.created_ms(i.to_bytes(4, "big"))
    clock.created_ms(b"ahead")
    clock.created_ms(b"ahead")  # given 1: ahead of the clock after it moves to 1
    now[0] = 1
    clock.created_ms(b"new")  # the prune: everything given 0 goes
    assert len(clock) == 2
    assert clock.created_ms(b"ahead") == 2
