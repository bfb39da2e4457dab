"""The model door's meter front (:class:`Meters`) with exact answers: what one batch stores and how it is dated,
additions that count nothing, a flush that leaves batching on, closing, a writer that died, and additions that
outlive their event loop (a CLI may run several loops in turn, or close one with its writer still pending).

Fast and in memory: the first file the mutation run of ``gateway/meters.py`` executes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from stitchwork.gateway.meters import Delta, MemoryMeters, Meters, Windows, fold
from tests.gateway.test_meters import T0, CountingStore


async def _turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _stored(store: MemoryMeters, key: str, *, rounds: int = 2000) -> int:
    """Tokens ``store`` holds for ``key``, once some are there (polls; bounded by rounds, not by a clock)."""
    for _ in range(rounds):
        tokens = (await store.read(key, Windows.at(T0))).tokens_total
        if tokens:
            return tokens
        await asyncio.sleep(0.001)
    return 0


class GatedStore(CountingStore):
    """Holds every write until ``release`` is set (a slow remote store)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def add_many(self, additions: Sequence[tuple[str, Windows, Delta]]) -> None:
        self.batches.append(list(additions))
        await self.release.wait()
        await MemoryMeters.add_many(self, additions)


class ClosingStore(CountingStore):
    def __init__(self) -> None:
        super().__init__()
        self.closed_with: list[int] = []

    async def aclose(self) -> None:
        self.closed_with.append(len(self.batches))


async def test_a_batch_row_is_dated_by_the_newest_addition_it_sums() -> None:
    store = CountingStore()
    times = iter([T0 + 1.0, T0 + 5.0, T0 + 3.0])  # one minute; the newest is the second
    meters = Meters(store, clock=lambda: next(times), flush_s=3600)
    for _ in range(3):
        meters.add(["agent:a"], Delta(tokens=1))
    await meters.flush()
    ((key, windows, delta),) = store.batches[0]
    assert (key, windows.now, delta.tokens) == ("agent:a", T0 + 5.0, 3)  # age limits keep it as long as its newest


async def test_an_addition_of_nothing_is_neither_counted_nor_stored() -> None:
    store = CountingStore()
    meters = Meters(store, clock=lambda: T0, flush_s=3600)
    meters.add(["agent:a"], Delta())
    meters.add(["agent:a"], Delta(requests=0, tokens=0, cost_microusd=0))
    await meters.flush()
    assert (store.batches, meters.batches) == ([], 0)
    meters.add(["agent:a"], Delta(cost_microusd=1))  # any one non-zero field counts
    await meters.flush()
    assert [[(k, d.cost_microusd) for k, _, d in batch] for batch in store.batches] == [[("agent:a", 1)]]


async def test_after_a_flush_later_additions_are_batched_again() -> None:
    store = CountingStore()
    meters = Meters(store, clock=lambda: T0, flush_s=3600)
    meters.add(["agent:a"], Delta(tokens=1))
    await meters.flush()
    meters.add(["agent:a"], Delta(tokens=2))
    meters.add(["agent:a"], Delta(tokens=3))
    await _turns()
    assert len(store.batches) == 1  # waiting for the next flush (or flush_s), not written one by one
    await meters.flush()
    assert [[d.tokens for _, _, d in batch] for batch in store.batches] == [[1], [5]]


async def test_closing_stores_what_is_pending_then_closes_the_store() -> None:
    store = ClosingStore()
    meters = Meters(store, clock=lambda: T0, flush_s=3600)
    meters.add(["agent:a"], Delta(tokens=4))
    await meters.aclose()
    assert store.closed_with == [1] and (await store.read("agent:a", Windows.at(T0))).tokens_total == 4


async def test_a_second_write_waits_for_the_first_so_nothing_is_stored_twice() -> None:
    store = GatedStore()
    meters = Meters(store, clock=lambda: T0, flush_s=0)
    meters.add(["agent:a"], Delta(tokens=1))
    await _turns()
    assert len(store.batches) == 1  # the first batch is being written
    meters.add(["agent:a"], Delta(tokens=2))
    await _turns()
    assert len(store.batches) == 1  # the second waits for the first
    store.release.set()
    await meters.flush()
    assert [[d.tokens for _, _, d in batch] for batch in store.batches] == [[1], [2]]
    assert (await store.read("agent:a", Windows.at(T0))).tokens_total == 3
    assert (await meters.read("agent:a")).tokens_total == 3


async def test_a_flush_stores_what_a_dead_writer_left() -> None:
    store = CountingStore()
    meters = Meters(store, clock=lambda: T0, flush_s=3600)
    meters.add(["agent:a"], Delta(tokens=6))
    writer = meters._writer
    assert writer is not None
    writer.cancel()  # e.g. a task group shutting down the writer while it waited
    await asyncio.gather(writer, return_exceptions=True)
    await asyncio.wait_for(meters.flush(), 30)  # bound only against a hang
    assert (await store.read("agent:a", Windows.at(T0))).tokens_total == 6


def test_a_new_loop_resumes_the_writer_of_a_closed_one_without_a_flush() -> None:
    store = MemoryMeters()
    meters = Meters(store, clock=lambda: T0, flush_s=3600)

    async def add_and_leave() -> None:
        meters.add(["agent:a"], Delta(tokens=3))
        await _turns()  # the writer is waiting for its batch (bound to this loop) when the loop closes

    asyncio.run(add_and_leave())
    meters.flush_s = 0.001

    async def read_only() -> int:
        assert (await meters.read("agent:a")).tokens_total == 3  # still counted, from memory
        return await _stored(store, "agent:a")  # and written by this loop's writer, with no add or flush

    assert asyncio.run(read_only()) == 3


def test_an_addition_on_a_new_loop_is_written_by_that_loop() -> None:
    store = MemoryMeters()
    meters = Meters(store, clock=lambda: T0, flush_s=3600)

    async def add_and_leave() -> None:
        meters.add(["agent:a"], Delta(tokens=3))
        await _turns()

    asyncio.run(add_and_leave())
    meters.flush_s = 0.001

    async def add_again() -> int:
        meters.add(["agent:a"], Delta(tokens=4))
        for _ in range(2000):
            if await _stored(store, "agent:a") == 7:
                return 7
            await asyncio.sleep(0.001)
        return await _stored(store, "agent:a")

    assert asyncio.run(add_again()) == 7


def test_a_new_loop_reads_while_its_writer_holds_the_store() -> None:
    store = GatedStore()
    meters = Meters(store, clock=lambda: T0, flush_s=0)

    async def contend() -> int:
        store.release = asyncio.Event()
        meters.add(["agent:a"], Delta(tokens=1))
        await _turns()  # the writer holds the store; a read waits for it
        reader = asyncio.ensure_future(meters.read("agent:a"))
        await _turns()
        store.release.set()
        return (await reader).tokens_total

    assert asyncio.run(contend()) == 1
    assert asyncio.run(contend()) == 2  # the same Meters on the next loop: its own lock, its own writer


def test_a_loop_closed_with_its_writer_still_pending_leaves_nothing_behind() -> None:
    store = MemoryMeters()
    meters = Meters(store, clock=lambda: T0, flush_s=3600)
    first = asyncio.new_event_loop()

    async def add() -> None:
        meters.add(["agent:a"], Delta(tokens=5))

    first.run_until_complete(add())  # the writer task was created and never ran
    writer = meters._writer
    first.close()

    async def flush() -> int:
        await meters.flush()
        return (await store.read("agent:a", Windows.at(T0))).tokens_total

    try:
        assert asyncio.run(flush()) == 5
    finally:
        if writer is not None:
            writer._log_destroy_pending = False  # type: ignore[attr-defined]  # closed on purpose, never run


async def test_additions_within_the_flush_window_are_one_batch() -> None:
    store = CountingStore()
    meters = Meters(store, clock=lambda: T0, flush_s=0.5)  # under a second still waits for the window
    meters.add(["agent:a"], Delta(tokens=1))
    await _turns()  # the writer is waiting for more
    meters.add(["agent:a"], Delta(tokens=2))
    await meters.flush()
    assert [[d.tokens for _, _, d in batch] for batch in store.batches] == [[3]]


async def test_a_flush_outlives_its_writer_being_cancelled_mid_write() -> None:
    store = GatedStore()
    meters = Meters(store, clock=lambda: T0, flush_s=3600)
    meters.add(["agent:a"], Delta(tokens=2))
    flushing = asyncio.ensure_future(meters.flush())
    await _turns()
    writer = meters._writer
    assert writer is not None and len(store.batches) == 1  # writing, held by the store
    writer.cancel()
    await _turns()
    store.release.set()
    await asyncio.wait_for(flushing, 30)  # not cancelled itself: it writes the batch again with a new writer
    assert (await store.read("agent:a", Windows.at(T0))).tokens_total == 2


def test_the_seconds_left_in_a_minute_are_exact_and_never_zero() -> None:
    assert Windows.at(T0 + 89.5).seconds_left_in_minute == 0.5
    assert Windows.at(T0 + 89.9999).seconds_left_in_minute == 0.001  # a Retry-After is never zero
    assert Windows.at(T0 + 90).seconds_left_in_minute == 60.0


def test_a_meter_document_keeps_tokens_and_cost_apart_in_every_window() -> None:
    now = Windows.at(T0)
    doc = fold(None, now, Delta(requests=1, tokens=5, cost_microusd=2))
    doc = fold(doc, now, Delta(requests=2, tokens=1, cost_microusd=10))
    assert doc == {"minute": [now.minute, 3, 6], "day": [now.day, 6, 12], "month": [now.month, 6, 12],
                   "total": [3, 6, 12]}
    later = fold(doc, Windows.at(T0 + 90), Delta(tokens=1, cost_microusd=1))  # a new minute, day, month and year
    assert later == {"minute": [now.minute + 2, 0, 1], "day": ["2027-01-01", 1, 1], "month": ["2027-01", 1, 1],
                     "total": [3, 7, 13]}
