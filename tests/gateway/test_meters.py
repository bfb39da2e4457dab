"""The meter port's behaviour suite over every adapter (memory, each store, each bus), and the model door's front
(:class:`Meters`): concurrent writers all counted, windows that end read zero, in-flight additions never lost."""

from __future__ import annotations

import asyncio
import calendar
import uuid
from collections.abc import Callable, Sequence

import pytest

from stitchwork.data._base import Store
from stitchwork.gateway.meters import Delta, MemoryMeters, Meters, MeterStore, Reading, StoreMeters, Windows
from stitchwork.messaging._base import Bus
from stitchwork.workers.meters import BusMeters
from stitchwork.workers.subjects import Subjects

T0 = calendar.timegm((2026, 12, 31, 23, 58, 30))  # 90 s before a new minute, day, month and year


async def contract(first: MeterStore, second: MeterStore) -> None:
    """What every adapter must do; ``second`` is another instance over the same backend."""
    key = "agent:" + uuid.uuid4().hex[:8]
    now = Windows.at(T0)
    assert await first.read(key, now) == Reading()
    await first.add([key, "model:m"], now, Delta(requests=1))
    await first.add([key], now, Delta(tokens=100, cost_microusd=7))
    seen = await second.read(key, now)
    assert (seen.requests_minute, seen.tokens_minute, seen.tokens_day, seen.cost_day, seen.tokens_month,
            seen.cost_month, seen.requests_total, seen.tokens_total, seen.cost_total) == (1, 100, 100, 7, 100, 7, 1,
                                                                                         100, 7)
    assert (await second.read("model:m", now)).requests_minute >= 1
    # concurrent writers through both instances: every addition counted
    await asyncio.gather(*(store.add([key], now, Delta(requests=1, tokens=1))
                           for store in [first, second] * 10))
    after = await first.read(key, now)
    assert (after.requests_minute, after.tokens_total) == (21, 120)
    # the next minute: per-minute counts restart; the day, month and total keep counting
    minute = Windows.at(T0 + 60)
    assert minute.minute == now.minute + 1 and minute.day == now.day
    later = await second.read(key, minute)
    assert (later.requests_minute, later.tokens_minute, later.tokens_day, later.tokens_total) == (0, 0, 120, 120)
    await second.add([key], minute, Delta(tokens=5))
    # next day (and month, and year): only the total remains
    year = Windows.at(T0 + 120)
    assert (year.day, year.month) == ("2027-01-01", "2027-01")
    fresh = await first.read(key, year)
    assert (fresh.tokens_day, fresh.cost_day, fresh.tokens_month, fresh.cost_month) == (0, 0, 0, 0)
    assert (fresh.tokens_total, fresh.cost_total, fresh.requests_total) == (125, 7, 21)
    # an unknown key is still zero
    assert await second.read("agent:nobody-" + key, now) == Reading()
    # several additions at once (a batch of the model door): each counted in its own windows
    other = key + "-many"
    await first.add_many([(other, now, Delta(requests=1)), (other, now, Delta(tokens=9, cost_microusd=2)),
                          (other, minute, Delta(tokens=1)), ("model:" + other, now, Delta(requests=3))])
    batch = await second.read(other, minute)
    assert (batch.requests_minute, batch.tokens_minute, batch.tokens_day, batch.cost_day, batch.requests_total,
            batch.tokens_total, batch.cost_total) == (0, 1, 10, 2, 1, 10, 2)
    assert (await first.read("model:" + other, now)).requests_minute == 3
    await first.add_many([])


async def test_memory_meters() -> None:
    shared = MemoryMeters()
    await contract(shared, shared)


async def test_store_meters(make_store: Callable[[], Store]) -> None:
    first, second = make_store(), make_store()
    await contract(StoreMeters(first), StoreMeters(second))


async def test_store_meters_survive_a_reopen(make_store: Callable[[], Store]) -> None:
    store = make_store()
    await StoreMeters(store).add(["agent:a"], Windows.at(T0), Delta(tokens=42))
    store.close()
    assert (await StoreMeters(make_store()).read("agent:a", Windows.at(T0))).tokens_total == 42


async def test_bus_meters(bus: Bus, root: str) -> None:
    subjects = Subjects(root)
    await contract(BusMeters(subjects, abus=bus), BusMeters(subjects, abus=bus))


async def test_bus_meters_keep_only_the_newest_document(bus: Bus, root: str) -> None:
    subjects = Subjects(root)
    meters = BusMeters(subjects, abus=bus)
    for _ in range(5):
        await meters.add(["agent:a"], Windows.at(T0), Delta(tokens=1))
    assert (await meters.read("agent:a", Windows.at(T0))).tokens_total == 5
    found = await bus.latest(subjects.meter())
    assert len(found) == 1


class SlowStore(MemoryMeters):
    """Writes that take a while (a remote store), to catch reads that miss in-flight additions."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def add(self, keys: list[str], windows: Windows, delta: Delta) -> None:  # type: ignore[override]
        await self.release.wait()
        await super().add(keys, windows, delta)


async def test_reads_count_additions_not_yet_stored_and_never_twice_after() -> None:
    slow = SlowStore()
    meters = Meters(slow, clock=lambda: T0)
    for _ in range(3):
        meters.add(["agent:a"], Delta(requests=1, tokens=10, cost_microusd=5))
    in_flight = await meters.read("agent:a")  # counted from memory, in every window
    assert (in_flight.requests_minute, in_flight.tokens_minute, in_flight.tokens_day, in_flight.cost_day,
            in_flight.tokens_month, in_flight.cost_month, in_flight.requests_total, in_flight.tokens_total,
            in_flight.cost_total) == (3, 30, 30, 15, 30, 15, 3, 30, 15)
    next_day = await meters.read("agent:a", Windows.at(T0 + 120))  # made yesterday: only the totals count
    assert (next_day.requests_minute, next_day.tokens_day, next_day.cost_month, next_day.tokens_total) == (0, 0, 0,
                                                                                                          30)
    assert (await slow.read("agent:a", Windows.at(T0))).requests_minute == 0
    slow.release.set()
    await meters.flush()
    reading = await meters.read("agent:a")
    assert (reading.requests_minute, reading.tokens_total) == (3, 30)  # stored: counted once


async def test_a_write_that_fails_once_is_tried_again() -> None:
    class Flaky(MemoryMeters):
        failures = 1

        async def add(self, keys: list[str], windows: Windows, delta: Delta) -> None:  # type: ignore[override]
            if self.failures:
                self.failures -= 1
                raise OSError("busy")
            await super().add(keys, windows, delta)

    store = Flaky()
    meters = Meters(store, clock=lambda: T0)
    meters.add(["agent:a"], Delta(tokens=4))
    await meters.flush()
    assert meters.errors == 0 and (await store.read("agent:a", Windows.at(T0))).tokens_total == 4


async def test_a_failing_store_never_fails_the_caller_and_is_counted() -> None:
    class Broken(MemoryMeters):
        async def add(self, keys: list[str], windows: Windows, delta: Delta) -> None:  # type: ignore[override]
            raise OSError("disk full")

    meters = Meters(Broken(), clock=lambda: T0)
    meters.add(["agent:a"], Delta(tokens=1))
    await meters.flush()
    assert meters.errors == 1


def test_windows_are_utc_and_know_the_seconds_left() -> None:
    windows = Windows.at(T0)
    assert (windows.day, windows.month) == ("2026-12-31", "2026-12")
    assert windows.seconds_left_in_minute == pytest.approx(30.0)


def test_additions_left_by_a_closed_event_loop_are_stored_by_the_next() -> None:
    store = MemoryMeters()
    meters = Meters(store, clock=lambda: T0)

    async def add_and_leave() -> None:
        meters.add(["agent:a"], Delta(tokens=3))  # the loop closes before the write runs

    asyncio.run(add_and_leave())

    async def later() -> Reading:
        assert (await meters.read("agent:a")).tokens_total == 3
        await meters.flush()
        return await store.read("agent:a", Windows.at(T0))

    assert asyncio.run(later()).tokens_total == 3


class CountingStore(MemoryMeters):
    """Records each batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[tuple[str, Windows, Delta]]] = []

    async def add_many(self, additions: Sequence[tuple[str, Windows, Delta]]) -> None:
        self.batches.append(list(additions))
        await super().add_many(additions)


async def test_additions_are_stored_together_one_row_per_key_and_window() -> None:
    store = CountingStore()
    now = [float(T0)]
    meters = Meters(store, clock=lambda: now[0], flush_s=3600)  # only flush() stores
    for _ in range(5):
        meters.add(["agent:a", "model:m"], Delta(requests=1))
        meters.add(["agent:a"], Delta(tokens=10, cost_microusd=3))
    now[0] = T0 + 60  # the next minute: its additions are kept apart
    meters.add(["agent:a"], Delta(tokens=1))
    await asyncio.sleep(0)
    assert store.batches == [] and (await meters.read("agent:a")).tokens_total == 51  # pending, counted
    await meters.flush()
    assert len(store.batches) == 1 and meters.batches == 1
    rows = sorted((key, w.minute, d.requests, d.tokens, d.cost_microusd) for key, w, d in store.batches[0])
    minute = T0 // 60
    assert rows == [("agent:a", minute, 5, 50, 15), ("agent:a", minute + 1, 0, 1, 0), ("model:m", minute, 5, 0, 0)]
    reading = await meters.read("agent:a")  # stored now: counted once
    assert (reading.requests_total, reading.tokens_total, reading.tokens_minute, reading.cost_total) == (5, 51, 1, 15)
    await meters.flush()
    assert len(store.batches) == 1  # nothing left to store


async def test_the_writer_stores_without_a_flush_after_its_wait() -> None:
    store = CountingStore()
    meters = Meters(store, clock=lambda: T0, flush_s=0.001)
    meters.add(["agent:a"], Delta(tokens=2))
    meters.add(["agent:a"], Delta(tokens=3))
    for _ in range(1000):
        if store.batches:
            break
        await asyncio.sleep(0.001)
    assert [[(k, d.tokens) for k, _, d in batch] for batch in store.batches] == [[("agent:a", 5)]]


async def test_a_failed_batch_counts_each_addition_it_dropped() -> None:
    class Broken(MemoryMeters):
        async def add(self, keys: list[str], windows: Windows, delta: Delta) -> None:  # type: ignore[override]
            raise OSError("disk full")

    meters = Meters(Broken(), clock=lambda: T0, flush_s=3600)
    for _ in range(3):
        meters.add(["agent:a"], Delta(tokens=1))
    await meters.flush()
    assert meters.errors == 3 and (await meters.read("agent:a")).tokens_total == 0
