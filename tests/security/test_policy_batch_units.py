"""The batcher of concurrent decisions (security/policy/batch.py), unit by unit.

Every test here ends fast when the batcher is broken: callers left waiting are found by turning the event loop a
fixed number of times (on-loop batches settle within a few turns), and a callback that raised on the loop fails the
test at once (the loop only logs such errors, and its callers would wait forever). Offloaded batches settle in a
worker thread: their callers are awaited with a bound that only a hang reaches.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from stitchwork.security.policy.batch import MAX_BATCH, Batcher

HANG = 5.0
"""Seconds an offloaded batch may take before its callers count as left waiting (it takes milliseconds)."""


class Run:
    """A batch function that records each batch, the thread it ran in, and doubles every item."""

    def __init__(self, fail_on: int | None = None, short: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.threads: list[threading.Thread] = []
        self.fail_on = fail_on
        self.short = short
        self.gate: threading.Event | None = None

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.append(threading.current_thread())
        if self.gate is not None and len(self.batches) == 1:
            assert self.gate.wait(HANG), "the test never opened the gate"
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        doubled = [i * 2 for i in items]
        return doubled[:-1] if self.short else doubled


class Loop:
    """The running loop, failing fast on a callback that raised on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.errors: list[str] = []
        self.broken: asyncio.Future[None] = loop.create_future()
        loop.set_exception_handler(self._handle)

    def _handle(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(f"{context.get('message')}: {context.get('exception')!r}")
        if not self.broken.done():
            self.broken.set_result(None)

    async def turn(self, times: int = 1) -> None:
        for _ in range(times):
            await asyncio.sleep(0)

    async def settle(self, *calls: Awaitable[int]) -> list[Any]:
        """The results (or errors) of on-loop calls, which must all end within a few loop turns."""
        futures = [asyncio.ensure_future(c) for c in calls]
        for _ in range(20):
            if all(f.done() for f in futures) or self.errors:
                break
            await asyncio.sleep(0)
        assert not self.errors, self.errors
        waiting = [i for i, f in enumerate(futures) if not f.done()]
        for f in futures:
            f.cancel()
        assert not waiting, f"callers {waiting} left waiting"
        return [f.exception() or f.result() for f in futures]

    async def offloaded(self, *calls: Awaitable[int]) -> list[Any]:
        """The results (or errors) of offloaded calls, which end when the worker thread is done with them."""
        futures = [asyncio.ensure_future(c) for c in calls]
        everything = asyncio.gather(*futures, return_exceptions=True)
        either: set[asyncio.Future[Any]] = {everything, self.broken}
        await asyncio.wait(either, timeout=HANG, return_when=asyncio.FIRST_COMPLETED)
        assert not self.errors, self.errors
        waiting = [i for i, f in enumerate(futures) if not f.done()]
        everything.cancel()
        assert not waiting, f"callers {waiting} left waiting"
        return list(everything.result())


@pytest.fixture
async def loop() -> AsyncIterator[Loop]:
    running = asyncio.get_running_loop()
    watched = Loop(running)
    yield watched
    running.set_exception_handler(None)
    assert not watched.errors, watched.errors


# -- on the event loop ---------------------------------------------------------------------------------------


async def test_calls_of_one_loop_turn_are_run_together_after_the_first(loop: Loop) -> None:
    run = Run()
    batcher: Batcher[int, int] = Batcher(run)
    assert await loop.settle(*(batcher.submit(i) for i in range(4))) == [0, 2, 4, 6]
    assert run.batches == [[0], [1, 2, 3]]
    assert run.threads == [threading.current_thread()] * 2  # not offloaded by default


async def test_the_batcher_is_free_again_after_each_batch(loop: Loop) -> None:
    run = Run()
    batcher: Batcher[int, int] = Batcher(run)
    assert await loop.settle(*(batcher.submit(i) for i in (1, 2, 3))) == [2, 4, 6]
    await loop.turn(3)
    assert await loop.settle(*(batcher.submit(i) for i in (4, 5))) == [8, 10]
    await loop.turn(3)
    assert await loop.settle(batcher.submit(6)) == [12]
    assert run.batches == [[1], [2, 3], [4], [5], [6]]


async def test_more_than_max_batch_waiting_calls_run_in_batches_of_max_batch(loop: Loop) -> None:
    run = Run()
    batcher: Batcher[int, int] = Batcher(run)
    total = 1 + 2 * MAX_BATCH + 1
    results = await loop.settle(*(batcher.submit(i) for i in range(total)))
    assert results == [2 * i for i in range(total)]
    assert MAX_BATCH == 256  # the documented cap
    assert [len(b) for b in run.batches] == [1, MAX_BATCH, MAX_BATCH, 1]
    assert [i for b in run.batches for i in b] == list(range(total))  # in arrival order


async def test_a_failing_batch_fails_each_of_its_callers_and_frees_the_batcher(loop: Loop) -> None:
    run = Run(fail_on=3)
    batcher: Batcher[int, int] = Batcher(run)
    results = await loop.settle(*(batcher.submit(i) for i in range(4)))
    assert results[0] == 0
    assert [str(r) for r in results[1:]] == ["bad item 3"] * 3 and all(isinstance(r, ValueError) for r in results[1:])
    await loop.turn(3)
    assert await loop.settle(batcher.submit(5), batcher.submit(6)) == [10, 12]


async def test_a_batch_function_returning_too_few_results_fails_every_caller_not_hangs_them(loop: Loop) -> None:
    run = Run(short=True)
    batcher: Batcher[int, int] = Batcher(run)
    results = await loop.settle(*(batcher.submit(i) for i in range(4)))
    assert all(isinstance(r, RuntimeError) for r in results)
    assert [str(r) for r in results] == ["the batch function returned 0 results for 1 items"] + [
        "the batch function returned 2 results for 3 items"] * 3
    run.short = False
    assert await loop.settle(batcher.submit(7), batcher.submit(8)) == [14, 16]


async def test_cancelled_callers_are_left_out_of_their_batch(loop: Loop) -> None:
    run = Run()
    batcher: Batcher[int, int] = Batcher(run)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
    await loop.turn()  # 0 ran alone, 1-3 wait
    calls[2].cancel()
    assert await loop.settle(calls[0], calls[1], calls[3]) == [0, 2, 6]
    assert calls[2].cancelled()
    assert run.batches == [[0], [1, 3]]


async def test_a_batch_all_of_whose_callers_left_runs_nothing_and_frees_the_batcher(loop: Loop) -> None:
    run = Run()
    batcher: Batcher[int, int] = Batcher(run)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await loop.turn()
    calls[1].cancel()
    calls[2].cancel()
    assert await loop.settle(calls[0]) == [0]
    await loop.turn(3)
    assert run.batches == [[0]]  # no empty batch was run
    assert await loop.settle(batcher.submit(4), batcher.submit(5)) == [8, 10]
    assert run.batches == [[0], [4], [5]]


async def test_each_event_loop_has_its_own_batches(loop: Loop) -> None:
    run = Run()
    batcher: Batcher[int, int] = Batcher(run)
    assert await loop.settle(*(batcher.submit(i) for i in range(3))) == [0, 2, 4]

    async def elsewhere() -> list[int]:
        return list(await asyncio.gather(*(batcher.submit(i) for i in (10, 11, 12))))

    other: list[list[int]] = []
    thread = threading.Thread(target=lambda: other.append(asyncio.run(elsewhere())))
    thread.start()
    thread.join(HANG)
    assert other == [[20, 22, 24]]
    assert run.batches[2:] == [[10], [11, 12]]  # a fresh loop starts with a lone call, not queued behind ours
    assert await loop.settle(batcher.submit(1), batcher.submit(2)) == [2, 4]


async def test_close_without_a_worker_thread_does_nothing(loop: Loop) -> None:
    run = Run()
    batcher: Batcher[int, int] = Batcher(run)
    batcher.close()
    batcher.close()
    assert await loop.settle(batcher.submit(1)) == [2]


# -- offloaded to a worker thread ----------------------------------------------------------------------------


async def test_offloaded_batches_run_in_one_worker_thread_named_batcher_by_default(loop: Loop) -> None:
    run = Run()
    batcher: Batcher[int, int] = Batcher(run, offload=True)
    assert await loop.offloaded(*(batcher.submit(i) for i in range(3))) == [0, 2, 4]
    assert await loop.offloaded(batcher.submit(3)) == [6]
    assert run.batches == [[0, 1, 2], [3]]  # offloaded, the first call queues too
    assert all(t.name.startswith("batcher_") for t in run.threads), [t.name for t in run.threads]
    assert len(set(run.threads)) == 1 and run.threads[0] is not threading.current_thread()
    batcher.close()
    assert not run.threads[0].is_alive()  # close waits for the worker thread to end


async def test_calls_arriving_while_an_offloaded_batch_runs_form_the_next_batch(loop: Loop) -> None:
    run = Run()
    run.gate = threading.Event()
    batcher: Batcher[int, int] = Batcher(run, offload=True, thread_name="decider")
    first = asyncio.ensure_future(batcher.submit(0))
    await loop.turn(2)  # the first batch is in the worker thread, held at the gate
    later = [asyncio.ensure_future(batcher.submit(1))]
    await loop.turn(2)
    later.append(asyncio.ensure_future(batcher.submit(2)))  # a later loop turn: still the same next batch
    await loop.turn(2)
    run.gate.set()
    assert await loop.offloaded(first, *later) == [0, 2, 4]
    assert run.batches == [[0], [1, 2]]
    assert {t.name.split("_")[0] for t in run.threads} == {"decider"}
    batcher.close()
    assert await loop.offloaded(batcher.submit(5)) == [10]  # a new worker thread after close
    batcher.close()


async def test_an_offloaded_failure_reaches_every_caller_and_frees_the_batcher(loop: Loop) -> None:
    run = Run(fail_on=1)
    batcher: Batcher[int, int] = Batcher(run, offload=True)
    results = await loop.offloaded(*(batcher.submit(i) for i in range(3)))
    assert [str(r) for r in results] == ["bad item 1"] * 3 and all(isinstance(r, ValueError) for r in results)
    assert await loop.offloaded(batcher.submit(4)) == [8]
    batcher.close()


async def test_an_offloaded_batch_function_returning_too_few_results_fails_every_caller(loop: Loop) -> None:
    run = Run(short=True)
    batcher: Batcher[int, int] = Batcher(run, offload=True)
    results = await loop.offloaded(*(batcher.submit(i) for i in range(3)))
    assert all(isinstance(r, RuntimeError) for r in results)
    assert str(results[0]) == "the batch function returned 2 results for 3 items"
    run.short = False
    assert await loop.offloaded(batcher.submit(4)) == [8]
    batcher.close()


async def test_a_caller_cancelled_while_its_offloaded_batch_runs_does_not_disturb_the_others(loop: Loop) -> None:
    run = Run()
    run.gate = threading.Event()
    batcher: Batcher[int, int] = Batcher(run, offload=True)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await loop.turn(2)  # the batch of all three is in the worker thread
    calls[1].cancel()
    await loop.turn()
    run.gate.set()
    assert await loop.offloaded(calls[0], calls[2]) == [0, 4]
    assert calls[1].cancelled()
    assert await loop.offloaded(batcher.submit(5)) == [10]
    assert run.batches == [[0, 1, 2], [5]]
    batcher.close()


async def test_an_offloaded_batch_cancelled_in_the_executor_cancels_its_callers(loop: Loop) -> None:
    run = Run()
    batcher: Batcher[int, int] = Batcher(run, offload=True)
    assert await loop.offloaded(batcher.submit(0)) == [0]
    release = threading.Event()
    batcher._executor.submit(release.wait, HANG)  # type: ignore[union-attr]  # occupy the one worker
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
    await loop.turn(2)
    batcher._executor.shutdown(wait=False, cancel_futures=True)  # type: ignore[union-attr]
    release.set()
    results = await loop.offloaded(*calls)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    assert run.batches == [[0]]

