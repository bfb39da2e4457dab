"""Run events on the bus: published in order by workers (:class:`RunEventPublisher`) and by the control plane,
which also serves them to WebSocket clients (:class:`EventHub`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlsplit

import anyio
from starlette.websockets import WebSocket, WebSocketDisconnect

from stitchwork.agents.runs import RunRecord
from stitchwork.config import Config
from stitchwork.errors import BusError, ConfigError
from stitchwork.messaging._base import Bus, check_subject, open_bus
from stitchwork.messaging.bridge import SyncBus, _run_now
from stitchwork.messaging.embedded import bus_uri
from stitchwork.workers.subjects import Subjects, event_payload

__all__ = ["EventHub", "RunEventPublisher", "resolve_events_uri"]


class RunEventPublisher:
    """A worker's run events: published without waiting (the run loop goes on to its checkpoint meanwhile).

    Events of one run are published in order, each after the one before is stored; :meth:`flush` waits for the
    last (a worker acknowledges a job only once all its events are on the bus). Called as the run loop's
    ``on_event``.
    """

    def __init__(self, bus: Bus, sync: SyncBus, subjects: Subjects, *, worker: str) -> None:
        self.bus: Bus | None = bus
        self.sync = sync
        self.subjects = subjects
        self.worker = worker
        self._tail: dict[str, asyncio.Task[None]] = {}
        """The newest event publish of each run: each waits for the one before, so events stay in order."""

    def __call__(self, record: RunRecord, kind: str, data: dict[str, Any]) -> None:
        body = json.dumps(event_payload(record, kind, data, worker=self.worker), default=str).encode()
        subject = self.subjects.events(record.id)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the worker's loop: wait for the bus in this thread
            self.sync.publish(subject, body)
            return
        previous = self._tail.get(record.id)
        self._tail[record.id] = loop.create_task(self._publish(previous, subject, body))

    async def _publish(self, previous: asyncio.Task[None] | None, subject: str, body: bytes) -> None:
        if previous is not None:
            await previous  # a lost event fails every later one of the run: no gaps out of order
        if self.bus is None:
            raise BusError(f"worker {self.worker} is closed; event on {subject} not published")
        await self.bus.publish(subject, body)

    async def flush(self, run_id: str) -> None:
        """Waits until every event of ``run_id`` published so far is stored (raises the first failure)."""
        tail = self._tail.pop(run_id, None)
        if tail is not None:
            await tail

    async def aclose(self) -> None:
        """Waits for the events still being published, then refuses new ones."""
        if self._tail:
            await asyncio.gather(*self._tail.values(), return_exceptions=True)
            self._tail.clear()
        self.bus = None


def resolve_events_uri(config: Config) -> str:
    """The bus the control plane publishes events to; an in-process bus when no real one is running."""
    try:
        return bus_uri(config)
    except ConfigError:
        return f"memory://stitchwork-{abs(hash(str(config.state_dir)))}"


class EventHub:
    """Publishes the platform's run events to the bus and serves them to WebSocket clients."""

    def __init__(self, uri: str, subjects: Subjects) -> None:
        self.uri = uri
        self.subjects = subjects
        self._memory: Bus | None = None
        if urlsplit(uri).scheme == "memory":
            self._memory = _run_now(open_bus(uri))
        self.sync = SyncBus(uri, bus=self._memory)
        self._bus: Bus | None = self._memory
        self._lock = asyncio.Lock()

    def publish(self, record: RunRecord, kind: str, data: dict[str, Any]) -> int:
        """Publishes one run event (blocking until stored); returns its sequence number."""
        body = json.dumps(event_payload(record, kind, data, worker="control-plane"), default=str).encode()
        return self.sync.publish(self.subjects.events(record.id), body)

    @property
    def memory(self) -> Bus | None:
        """The in-process bus, when the hub's URI is ``memory://`` (else ``None``)."""
        return self._memory

    async def bus(self) -> Bus:
        """The bus connection of this event loop (opened on first use)."""
        async with self._lock:
            if self._bus is None:
                self._bus = await open_bus(self.uri)
            return self._bus

    async def stream(self, websocket: WebSocket, run_id: str, after: int) -> None:
        """Sends events after ``after`` until the client goes away."""
        subject = self.subjects.events(run_id or "*")
        check_subject(subject, wildcards=True)
        bus = await self.bus()
        consumer = bus.consume(subject, start_seq=after + 1)

        async def pump() -> None:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the client went away mid-send
                async for delivery in consumer:
                    event = json.loads(delivery.data)
                    event["seq"] = delivery.seq
                    await websocket.send_text(json.dumps(event, default=str))

        try:
            # An anyio task group: the server cancels the handler through anyio when the client goes away.
            async with anyio.create_task_group() as group:
                group.start_soon(pump)
                with contextlib.suppress(WebSocketDisconnect):
                    while True:
                        await websocket.receive_text()
                group.cancel_scope.cancel()
        finally:
            await consumer.aclose()

    def on_event(self, record: RunRecord, kind: str, data: dict[str, Any]) -> None:
        """The control plane's run loop ``on_event``: publishes, and a bus failure does not fail the run."""
        with contextlib.suppress(BusError):
            self.publish(record, kind, data)

    async def aclose(self) -> None:
        """Closes the bus connections this hub opened."""
        if self._bus is not None and self._bus is not self._memory:
            await self._bus.aclose()
        self._bus = None
        await asyncio.to_thread(self.sync.close)
        if self._memory is not None:
            await self._memory.aclose()
