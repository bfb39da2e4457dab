"""Blocking access to a bus for synchronous callers (the run store's ``save``, the gateway's ledger).

The run loop checkpoints through a synchronous store interface, and a checkpoint must be durable before the next
step starts. :class:`SyncBus` gives those callers ``publish`` and ``last`` that return once the bus has answered:
a NATS bus runs on its own connection in a background thread's event loop; a ``memory://`` bus (whose operations
never wait) is driven directly in the caller's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from stitchwork.errors import BusError
from stitchwork.messaging._base import Bus, Delivery, open_bus

T = TypeVar("T")


def _run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine that never suspends (the memory bus) to completion in this thread."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise BusError("a memory:// bus operation tried to wait; it cannot be used synchronously")


class SyncBus:
    """Synchronous ``publish``/``last`` over a bus.

    Args:
        uri: the bus URI; for ``memory://`` pass the (shared) ``bus`` object instead of connecting again.
        bus: an already open in-process bus to use directly (``memory://`` only).
        timeout_s: longest wait for one operation.
    """

    def __init__(self, uri: str, *, bus: Bus | None = None, timeout_s: float = 120.0) -> None:
        self.uri = uri
        self.timeout_s = timeout_s
        self._direct = bus if urlsplit(uri).scheme == "memory" else None
        if urlsplit(uri).scheme == "memory" and bus is None:
            raise BusError("SyncBus over memory:// needs the open bus object (bus=...)")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._bus: Bus | None = None
        if self._direct is None:
            self._start()

    def _start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def connect() -> None:
                try:
                    self._bus = await open_bus(self.uri)
                except BaseException as exc:
                    failure.append(exc)
                finally:
                    ready.set()

            connecting = loop.create_task(connect())
            loop.run_forever()
            del connecting

        self._loop = loop
        self._thread = threading.Thread(target=run, name="stitchwork-syncbus", daemon=True)
        self._thread.start()
        ready.wait(self.timeout_s)
        if failure:
            self.close()
            raise failure[0]

    def _call(self, make: Any) -> Any:
        if self._direct is not None:
            return _run_now(make(self._direct))
        if self._loop is None or self._bus is None:
            raise BusError(f"the bus {self.uri} is closed")
        future = asyncio.run_coroutine_threadsafe(make(self._bus), self._loop)
        try:
            return future.result(self.timeout_s)
        except TimeoutError as exc:
            future.cancel()
            raise BusError(f"no answer from {self.uri} within {self.timeout_s:.0f}s") from exc

    def publish(self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None,
                msg_id: str = "") -> int:
        """Publishes and returns the sequence number once the message is stored."""
        seq: int = self._call(lambda bus: bus.publish(subject, data, headers=headers, msg_id=msg_id))
        return seq

    def last(self, subject: str) -> Delivery | None:
        """The newest message on ``subject``, or ``None``."""
        found: Delivery | None = self._call(lambda bus: bus.last(subject))
        return found

    def latest(self, pattern: str) -> list[Delivery]:
        """The newest message of every subject matching ``pattern``."""
        found: list[Delivery] = self._call(lambda bus: bus.latest(pattern))
        return found

    def keep_last(self, subject: str, per_subject: int) -> None:
        """Keeps only the newest ``per_subject`` messages of each subject in ``subject``'s stream."""
        self._call(lambda bus: bus.keep_last(subject, per_subject))

    def purge(self, subject: str, *, keep: int = 0) -> None:
        """Removes the messages of exactly ``subject`` except its newest ``keep``."""
        self._call(lambda bus: bus.purge(subject, keep=keep))

    def close(self) -> None:
        loop, thread, bus = self._loop, self._thread, self._bus
        self._loop = self._thread = None
        self._bus = None
        if loop is None:
            return
        if bus is not None:
            with contextlib.suppress(TimeoutError, BusError):
                asyncio.run_coroutine_threadsafe(bus.aclose(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(5)
        loop.close()
