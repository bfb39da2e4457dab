"""Batching of concurrent async calls into one call of a synchronous batch function, per event loop.

The engine decides many requests with one Cedar batch more cheaply than one by one; :class:`Batcher` gathers
the requests that arrive while it is busy and hands them over together.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

MAX_BATCH = 256
"""Largest number of requests one batch evaluates at once."""

In = TypeVar("In")
Out = TypeVar("Out")


class _Pending(Generic[In, Out]):
    """Requests waiting for one event loop's next batch."""

    def __init__(self) -> None:
        self.items: list[tuple[In, asyncio.Future[Out]]] = []
        self.busy = False


class Batcher(Generic[In, Out]):
    """Runs ``run_batch`` on batches of the items submitted concurrently, each caller getting its own result.

    On the event loop (the default), the first call of an event-loop iteration is run at once, alone; the calls
    that follow it in the same iteration are collected and run together at the start of the next iteration.
    With ``offload=True``, batches run in a worker thread and the calls arriving while one runs form the next.
    """

    def __init__(
        self, run_batch: Callable[[list[In]], list[Out]], *, offload: bool = False, thread_name: str = "batcher"
    ) -> None:
        """Batches calls of ``run_batch``, which returns one result per item, in order.

        Args:
            run_batch: The batch function; thread-safe if ``offload``.
            offload: Run batches in a worker thread instead of on the event loop.
            thread_name: Name prefix of the worker thread.
        """
        self._run_batch = run_batch
        self._offload = offload
        self._thread_name = thread_name
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pending[In, Out]] = (
            weakref.WeakKeyDictionary()
        )

    async def submit(self, item: In) -> Out:
        """The result for ``item``, run in a batch with the items that arrive while the batcher is busy."""
        loop = asyncio.get_running_loop()
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = _Pending()
        if not pending.busy and not self._offload:
            pending.busy = True  # until the flush below runs: later calls of this iteration queue for it
            loop.call_soon(self._flush, pending, loop)
            return self._run([item])[0]
        future: asyncio.Future[Out] = loop.create_future()
        pending.items.append((item, future))
        if not pending.busy:
            pending.busy = True
            loop.call_soon(self._flush, pending, loop)
        return await future

    def close(self) -> None:
        """Stops the worker thread of an offloading batcher; it still runs batches afterwards."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def _run(self, items: list[In]) -> list[Out]:
        results = self._run_batch(items)
        if len(results) != len(items):  # a bug in the batch function: fail its callers rather than hang some
            raise RuntimeError(f"the batch function returned {len(results)} results for {len(items)} items")
        return results

    def _flush(self, pending: _Pending[In, Out], loop: asyncio.AbstractEventLoop) -> None:
        batch = pending.items[:MAX_BATCH]
        del pending.items[:MAX_BATCH]
        live = [(r, f) for r, f in batch if not f.done()]  # drop callers that were cancelled meanwhile
        if not live:
            self._next(pending, loop)
            return
        items = [r for r, _ in live]
        if self._offload:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._thread_name)
                executor = self._executor
            job = loop.run_in_executor(executor, self._run, items)
            job.add_done_callback(lambda done: self._settle(pending, loop, live, done))
            return
        try:
            results = self._run(items)
        except Exception as exc:  # a bug: fail every waiter rather than hang them
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)
        self._next(pending, loop)

    def _settle(
        self,
        pending: _Pending[In, Out],
        loop: asyncio.AbstractEventLoop,
        live: Sequence[tuple[In, asyncio.Future[Out]]],
        done: asyncio.Future[list[Out]],
    ) -> None:
        error = None if done.cancelled() else done.exception()
        for index, (_, future) in enumerate(live):
            if future.done():
                continue
            if done.cancelled():
                future.cancel()
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(done.result()[index])
        self._next(pending, loop)

    def _next(self, pending: _Pending[In, Out], loop: asyncio.AbstractEventLoop) -> None:
        if pending.items:
            loop.call_soon(self._flush, pending, loop)
        else:
            pending.busy = False
