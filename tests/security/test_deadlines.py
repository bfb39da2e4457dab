"""The deadline heap behind approval expiry: order, re-adding, forgetting, and waking its waiter."""

from __future__ import annotations

import asyncio
import threading

from stitchwork.security.deadlines import Deadlines


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_come_due_in_deadline_order() -> None:
    clock = Clock()
    timers = Deadlines(clock)
    for key, when in (("c", 1030.0), ("a", 1010.0), ("b", 1020.0), ("late", 5000.0)):
        timers.add(key, when)
    assert timers.next_at() == 1010.0 and len(timers) == 4
    assert timers.pop_due() == []
    clock.now = 1020.0
    assert timers.pop_due() == ["a", "b"]  # due at exactly its time, earliest first
    assert timers.pop_due() == [] and timers.next_at() == 1030.0


def test_a_key_added_again_keeps_its_newest_time_and_a_discarded_one_never_comes() -> None:
    timers = Deadlines(Clock())
    timers.add("moved", 1010.0)
    timers.add("moved", 1100.0)
    timers.add("gone", 1005.0)
    timers.discard("gone")
    assert timers.next_at() == 1100.0
    assert timers.pop_due(1050.0) == []
    assert timers.pop_due(1100.0) == ["moved"] and len(timers) == 0 and timers.next_at() is None


async def test_wait_returns_when_the_earliest_is_due_or_an_earlier_one_is_added() -> None:
    clock = Clock()
    timers = Deadlines(clock)
    timers.add("now", 1000.0)
    await asyncio.wait_for(timers.wait(), 5.0)  # already due: no waiting
    timers.pop_due()
    timers.add("hour", 4600.0)
    waiting = asyncio.create_task(timers.wait())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()  # an hour away on its clock
    threading.Thread(target=timers.add, args=("soon", 1000.0)).start()  # from another thread, as the gateway does
    await asyncio.wait_for(waiting, 5.0)
    assert timers.pop_due() == ["soon"]
    waiting = asyncio.create_task(timers.wait())
    await asyncio.sleep(0)
    timers.add("later", 9999.0)  # not earlier: the waiter sleeps on
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    clock.now = 4600.0
    timers.poke()  # the clock moved: look again
    await asyncio.wait_for(waiting, 5.0)
    assert timers.pop_due() == ["hour"]
