"""Model-use meters on the bus: shared by every worker and the server of one bus (budgets and rate limits).

Each meter is one document on ``<p>meter.<digest of key>`` (see :func:`stitchwork.gateway.meters.fold`), updated by
compare-and-set: read the newest, add, publish with the expected last sequence; a writer that lost the race reads
again. The stream keeps only the newest document of each meter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from stitchwork.errors import BusConflict, BusError
from stitchwork.gateway.meters import Delta, MeterStore, Reading, Windows, fold, reading_of
from stitchwork.messaging._base import EXPECTED_LAST_SUBJECT_SEQ, Bus, Delivery, ttl_header
from stitchwork.messaging.bridge import SyncBus
from stitchwork.workers.subjects import Subjects

MAX_ATTEMPTS = 64


class BusMeters(MeterStore):
    """Meters as compare-and-set documents on the bus.

    Args:
        subjects: Subject names.
        abus: An async bus on the caller's event loop (a worker's own connection).
        sync: A synchronous bus (the server's run-events connection), used from a thread.
        retention: Per key, how long its document outlives its last update (0: forever; see
            :func:`stitchwork.gateway.models.meter_retention`): each update carries it as the message's TTL, so a
            meter no budget window needs any more leaves the bus. None keeps every meter.
    """

    def __init__(self, subjects: Subjects, *, abus: Bus | None = None, sync: SyncBus | None = None,
                 retention: Callable[[str], float] | None = None) -> None:
        if abus is None and sync is None:
            raise BusError("BusMeters needs a bus")
        self.subjects = subjects
        self.retention = retention
        self.abus = abus
        self.sync = sync
        self._bounded = False

    async def _last(self, subject: str) -> Delivery | None:
        if self.abus is not None:
            return await self.abus.last(subject)
        assert self.sync is not None
        return await asyncio.to_thread(self.sync.last, subject)

    async def _publish(self, subject: str, body: bytes, expected: int, ttl_s: float) -> None:
        headers = {EXPECTED_LAST_SUBJECT_SEQ: str(expected), **ttl_header(ttl_s)}
        if self.abus is not None:
            await self.abus.publish(subject, body, headers=headers)
            return
        assert self.sync is not None
        await asyncio.to_thread(self.sync.publish, subject, body, headers=headers)

    async def _bound(self) -> None:
        if self._bounded or self.abus is None:
            return
        self._bounded = True
        with contextlib.suppress(BusError):  # an adapter that cannot limit history still counts correctly
            await self.abus.keep_last(self.subjects.meter("_"), 1)

    @staticmethod
    def _doc(found: Delivery | None) -> dict[str, Any] | None:
        if found is None:
            return None
        try:
            doc = json.loads(found.data)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    async def read(self, key: str, windows: Windows) -> Reading:
        return reading_of(self._doc(await self._last(self.subjects.meter(key))), windows)

    async def add(self, keys: Sequence[str], windows: Windows, delta: Delta) -> None:
        await self.add_many([(key, windows, delta) for key in keys])

    async def add_many(self, additions: Sequence[tuple[str, Windows, Delta]]) -> None:
        """One compare-and-set per key, with every addition to that key folded in, in order."""
        await self._bound()
        per_key: dict[str, list[tuple[Windows, Delta]]] = {}
        for key, windows, delta in additions:
            per_key.setdefault(key, []).append((windows, delta))
        for key, changes in per_key.items():
            subject = self.subjects.meter(key)
            ttl_s = self.retention(key) if self.retention is not None else 0.0
            for _ in range(MAX_ATTEMPTS):
                found = await self._last(subject)
                doc = self._doc(found)
                for windows, delta in changes:
                    doc = fold(doc, windows, delta)
                try:
                    await self._publish(subject, json.dumps(doc).encode(), found.seq if found is not None else 0,
                                        ttl_s)
                    break
                except BusConflict:
                    continue
            else:
                raise BusConflict(f"meter {key}: {MAX_ATTEMPTS} writers in a row won the race")


__all__ = ["BusMeters"]
