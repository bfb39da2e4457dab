"""Deadlines on a heap: what comes due next, and a waiter woken when an earlier deadline is added.

The platform expires approvals with this instead of listing every approval on a timer: each pending approval's
deadline is added when the approval is created (or found pending at start), and the expiry loop sleeps until the
earliest one (:meth:`Deadlines.wait`), or until an earlier one is added.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import threading
import time
from collections.abc import Callable


class Deadlines:
    """Keys with a due time (the same key added again keeps its newest time). Thread safe: :meth:`add` may be
    called from any thread; :meth:`wait` runs on one event loop.

    Args:
        clock: the time source of the due times (tests pass a fake one and call :meth:`poke` after moving it).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, key: str, when: float) -> None:
        """Sets ``key`` due at ``when``; wakes the waiter if it is now the earliest."""
        with self._lock:
            earliest = self._heap[0][0] if self._heap else None
            self._due[key] = when
            heapq.heappush(self._heap, (when, key))
        if earliest is None or when < earliest:
            self.poke()

    def discard(self, key: str) -> None:
        """Forgets ``key`` (decided before its deadline); its heap entry is skipped when it surfaces."""
        with self._lock:
            self._due.pop(key, None)

    def next_at(self) -> float | None:
        """When the earliest deadline is due, or ``None``."""
        with self._lock:
            self._drop_stale()
            return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float | None = None) -> list[str]:
        """Removes and returns the keys due at ``now`` (default: the clock), earliest first."""
        now = self.clock() if now is None else now
        due: list[str] = []
        with self._lock:
            while self._heap:
                self._drop_stale()
                if not self._heap or self._heap[0][0] > now:
                    break
                _, key = heapq.heappop(self._heap)
                del self._due[key]
                due.append(key)
        return due

    def _drop_stale(self) -> None:
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)

    def poke(self) -> None:
        """Wakes :meth:`wait` (a deadline was added, or the clock moved)."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                loop.call_soon_threadsafe(wake.set)

    async def wait(self, *, longest_s: float = 3600.0) -> None:
        """Returns when the earliest deadline is due, when :meth:`poke` is called, or after ``longest_s``."""
        self._loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.clear()
        upcoming = self.next_at()
        delay = longest_s if upcoming is None else min(longest_s, max(0.0, upcoming - self.clock()))
        if delay <= 0:
            return
        # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancellation that races a wake-up.
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({waiter}, timeout=delay)
        finally:
            waiter.cancel()


__all__ = ["Deadlines"]
