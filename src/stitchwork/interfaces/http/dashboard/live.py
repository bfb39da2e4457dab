"""Live pages: one follower of every run event on the bus per server, fanned out to the dashboard's WebSockets.

:class:`LiveFeed` consumes ``<prefix>events.*`` (the run events the control plane and every worker publish) from
the sequence number it last stored in ``dashboard_state``, so a restart replays only what it missed; events
older than its start are skipped rather than sent. Each open page holds a bounded queue; a page that falls behind
gets ``{"kind": "resync"}`` and reloads its parts. Pages learn only that something happened (run, agent, kind,
status, steps): they fetch the server-rendered parts again, so no event text reaches the page's DOM as markup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from stitchwork.data._base import Store
from stitchwork.errors import BusError
from stitchwork.messaging._base import Bus, open_bus
from stitchwork.workers.events import EventHub

__all__ = ["LiveFeed"]

log = logging.getLogger(__name__)

STATE = """
CREATE TABLE IF NOT EXISTS dashboard_state (name VARCHAR PRIMARY KEY, value BIGINT NOT NULL)
"""
SAVE_EVERY_S = 2.0
QUEUE = 256
_FIELDS = ("run_id", "agent", "kind", "status", "steps")


class LiveFeed:
    """Follows the run events and hands a summary of each to every subscribed page (see the module)."""

    def __init__(self, hub: EventHub, store: Store, *, on_event: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.hub = hub
        self.store = store
        self.on_event = on_event
        self.clock = clock
        self.seq = 0
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        store.execute(STATE)

    def _load(self) -> int:
        rows = self.store.query("SELECT value FROM dashboard_state WHERE name = 'events_seq'")
        return int(rows[0]["value"]) if rows else 0

    def _save(self, seq: int) -> None:
        self.store.execute("INSERT INTO dashboard_state (name, value) VALUES ('events_seq', ?) ON CONFLICT (name) "
                           "DO UPDATE SET value = excluded.value", [seq])

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.subscribers.discard(queue)

    def broadcast(self, summary: dict[str, Any]) -> None:
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(summary)
            except asyncio.QueueFull:
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait({"kind": "resync"})
        if self.on_event is not None:
            self.on_event(summary)

    async def run(self) -> None:
        """Follows the events until cancelled; reconnects (with backoff) when the bus fails."""
        self.seq = await asyncio.to_thread(self._load)
        started = self.clock()
        saved, saved_at, backoff = self.seq, time.monotonic(), 0.5
        own: Bus | None = None
        try:
            while True:
                try:
                    if own is None:
                        # its own connection, closed with it (an in-process bus is the hub's own, shared)
                        own = await self.hub.bus() if self._in_process else await open_bus(self.hub.uri)
                    async with own.consume(self.hub.subjects.events("*"), start_seq=self.seq + 1) as consumer:
                        async for delivery in consumer:
                            backoff = 0.5
                            self.seq = delivery.seq
                            summary = self._summary(delivery.data, delivery.seq)
                            if summary is not None and float(summary.get("ts") or 0) >= started - 5.0:
                                self.broadcast(summary)
                            if self.seq != saved and time.monotonic() - saved_at >= SAVE_EVERY_S:
                                await asyncio.to_thread(self._save, self.seq)
                                saved, saved_at = self.seq, time.monotonic()
                except Exception as exc:  # the feed outlives any failure (pages fall back to polling meanwhile)
                    log.warning("dashboard live feed: %s; reconnecting in %.1f s", exc, backoff,
                                exc_info=not isinstance(exc, BusError))
                    if own is not None and not self._in_process:
                        with contextlib.suppress(Exception):
                            await own.aclose()
                    own = None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            if own is not None and not self._in_process:
                with contextlib.suppress(Exception):
                    await own.aclose()
            if self.seq != saved:
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.to_thread(self._save, self.seq))

    @property
    def _in_process(self) -> bool:
        return urlsplit(self.hub.uri).scheme == "memory"

    @staticmethod
    def _summary(data: bytes, seq: int) -> dict[str, Any] | None:
        try:
            event = json.loads(data)
        except ValueError:
            return None
        if not isinstance(event, dict):
            return None
        summary = {k: event.get(k) for k in _FIELDS}
        summary["seq"] = seq
        summary["ts"] = event.get("ts")
        return summary
