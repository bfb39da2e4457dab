"""The policy engine's parts on their own: the decision cache (LRU) and the batcher of concurrent decisions."""

from __future__ import annotations

import asyncio
import threading

import pytest

from stitchwork.security.policy.batch import MAX_BATCH, Batcher, _Pending
from stitchwork.security.policy.cache import LruCache

# -- LruCache ------------------------------------------------------------------------------------------------


def test_the_cache_keeps_at_most_size_entries_dropping_the_least_recently_used() -> None:
    cache: LruCache[str, int] = LruCache(2)
    assert cache.enabled and len(cache) == 0
    cache.put_many([("a", 1), ("b", 2)])
    assert len(cache) == 2
    assert cache.get("a") == 1  # a is now the most recently used: b goes first
    cache.put_many([("c", 3)])
    assert len(cache) == 2
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)


def test_a_batch_larger_than_the_cache_keeps_its_newest_entries() -> None:
    cache: LruCache[int, int] = LruCache(3)
    cache.put_many((i, i * 10) for i in range(5))
    assert len(cache) == 3
    assert [cache.get(i) for i in range(5)] == [None, None, 20, 30, 40]


def test_storing_a_present_key_replaces_its_value_without_growing() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put_many([("a", 1), ("b", 2), ("a", 9)])
    assert len(cache) == 2 and cache.get("a") == 9 and cache.get("b") == 2


def test_exactly_size_entries_are_all_kept() -> None:
    cache: LruCache[int, str] = LruCache(4)
    cache.put_many((i, str(i)) for i in range(4))
    assert len(cache) == 4 and [cache.get(i) for i in range(4)] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("size", [0, -5])
def test_a_cache_of_size_zero_or_less_remembers_nothing(size: int) -> None:
    cache: LruCache[str, int] = LruCache(size)
    assert cache.size == 0 and not cache.enabled
    cache.put_many([("a", 1)])
    assert len(cache) == 0 and cache.get("a") is None


def test_a_cache_of_size_one_is_enabled() -> None:
    cache: LruCache[str, int] = LruCache(1)
    assert cache.enabled
    cache.put_many([("a", 1)])
    assert cache.get("a") == 1


def test_clear_forgets_everything() -> None:
    cache: LruCache[str, int] = LruCache(3)
    cache.put_many([("a", 1), ("b", 2)])
    cache.clear()
    assert len(cache) == 0 and cache.get("a") is None


# -- Batcher -------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, fail_on: object = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: list[str] = []
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.append(threading.current_thread().name)
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [i * 2 for i in items]


async def test_the_first_call_runs_alone_and_the_calls_that_follow_run_together() -> None:
    run = Recorder()
    batcher: Batcher[int, int] = Batcher(run)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
    assert results == [0, 2, 4, 6, 8]
    assert run.batches == [[0], [1, 2, 3, 4]]
    assert run.threads == [threading.current_thread().name] * 2  # on the event loop's thread


async def test_a_lone_call_after_a_quiet_moment_runs_at_once_again() -> None:
    run = Recorder()
    batcher: Batcher[int, int] = Batcher(run)
    assert await batcher.submit(1) == 2
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await batcher.submit(2) == 4
    assert run.batches == [[1], [2]]


async def test_batches_are_capped_at_max_batch() -> None:
    run = Recorder()
    batcher: Batcher[int, int] = Batcher(run)
    total = 1 + MAX_BATCH + 3
    results = await asyncio.gather(*(batcher.submit(i) for i in range(total)))
    assert results == [i * 2 for i in range(total)]
    assert MAX_BATCH == 256  # the documented cap
    assert [len(b) for b in run.batches] == [1, 256, 3]


async def test_a_failing_batch_fails_each_of_its_callers_and_the_next_batch_still_runs() -> None:
    run = Recorder(fail_on=2)
    batcher: Batcher[int, int] = Batcher(run)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert results[0] == 0
    assert all(isinstance(r, ValueError) and str(r) == "bad item 2" for r in results[1:])
    assert await batcher.submit(7) == 14


async def test_a_cancelled_caller_is_dropped_from_its_batch() -> None:
    run = Recorder()
    batcher: Batcher[int, int] = Batcher(run)
    first, second, third = (asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3))
    await asyncio.sleep(0)  # the first ran alone; the others wait for the next batch
    assert run.batches == [[1]]
    second.cancel()
    assert await first == 2 and await third == 6
    assert second.cancelled()
    assert run.batches == [[1], [3]]


async def test_offloaded_batches_run_in_a_named_worker_thread_and_gather_what_arrives_meanwhile() -> None:
    gate = threading.Event()
    run = Recorder()

    def slow(items: list[int]) -> list[int]:
        if items == [0]:
            gate.wait(5)
        return run(items)

    batcher: Batcher[int, int] = Batcher(slow, offload=True, thread_name="decider")
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 4)]
    await asyncio.sleep(0.05)
    gate.set()
    assert await first == 0 and await asyncio.gather(*rest) == [2, 4, 6]
    assert run.batches == [[0], [1, 2, 3]]
    assert all(name.startswith("decider") for name in run.threads)
    batcher.close()
    assert await batcher.submit(5) == 10  # still runs after close (a new worker thread)
    batcher.close()


async def test_an_offloaded_failure_reaches_every_caller_of_that_batch() -> None:
    run = Recorder(fail_on=1)
    batcher: Batcher[int, int] = Batcher(run, offload=True)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert [type(r) for r in results] == [ValueError] * 3 or (
        results[0] == 0 and all(isinstance(r, ValueError) for r in results[1:]))
    assert await batcher.submit(4) == 8
    batcher.close()


async def test_a_batch_whose_callers_all_left_still_frees_the_batcher() -> None:
    run = Recorder()
    batcher: Batcher[int, int] = Batcher(run)
    first, second = asyncio.ensure_future(batcher.submit(1)), asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    second.cancel()
    assert await first == 2
    await asyncio.sleep(0)
    assert await asyncio.wait_for(batcher.submit(3), 5) == 6  # not stuck behind the empty batch
    assert run.batches == [[1], [3]]


async def test_an_offloaded_batch_that_was_cancelled_cancels_its_callers() -> None:
    batcher: Batcher[int, int] = Batcher(Recorder(), offload=True)
    loop = asyncio.get_running_loop()
    waiting: asyncio.Future[int] = loop.create_future()
    settled: asyncio.Future[int] = loop.create_future()
    settled.set_result(9)
    job: asyncio.Future[list[int]] = loop.create_future()
    job.cancel()
    pending: _Pending[int, int] = _Pending()
    pending.busy = True
    batcher._settle(pending, loop, [(1, waiting), (2, settled)], job)
    assert waiting.cancelled() and settled.result() == 9
    assert pending.busy is False  # nothing else queued: the batcher is free again
