"""One audit trail for the fleet: every worker's audit events reach the platform's one chain through the bus.

Each worker keeps its own hash-chained log (its state directory: durable before the gateway goes on) and is the
only writer of its own subject ``<p>audit.<writer>``. :class:`AuditForwarder` publishes each event there once it is
durable locally, in chain order, with message id ``audit:<writer>:<chain>:<seq>`` (a retried publish is stored
once). On start it reads the newest event on its subject (and its own note of what it sent, ``position``: the audit
stream is a work queue, so events the platform took are gone from it) and first sends whatever its log holds after
that, so a worker killed before it forwarded its last events sends them when it comes back (under the same name and
state directory); an event sent twice is stored once (message id) or recognised by the platform.

On the platform, :class:`AuditIngester` (started by ``stitchwork up``) is the single writer of the fleet's trail:
a durable work-queue consumer (group ``platform-audit``) reads the audit stream in order and appends each event to
the platform's own chain, with ``data.origin = {writer, chain, seq, hash, prev_hash, ts, link}``. While the platform
is down the events wait in the stream (nothing lost, order kept per writer); a redelivered event (the platform
died between its append and its acknowledgement) is recognised by its origin ``(writer, chain, seq)`` and skipped.
``link`` is ``ok`` when the event's ``prev_hash`` is the hash of the writer's previous event, ``first`` for the
first event seen of a chain, ``late`` for an event that arrived after a newer one of its writer (a redelivery;
it is kept, never dropped), and ``gap`` when events of the writer are missing before it (its stream was
trimmed, or it follows a ``late`` one): the platform's ``audit verify`` checks the platform's chain, and a query for
``data.origin.link != 'ok'`` finds every break in the workers' chains.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stitchwork.audit.log import AuditLog
from stitchwork.audit.records import AuditEvent
from stitchwork.errors import AuditError, StitchworkError
from stitchwork.messaging._base import Bus, Delivery
from stitchwork.workers.subjects import Subjects

log = logging.getLogger(__name__)

GROUP = "platform-audit"
"""The durable consumer the platform's ingester reads the fleet's audit stream with."""


def writer_token(name: str) -> str:
    """A worker name as one subject token (letters, digits, ``_`` and ``-``)."""
    token = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:100]
    return token or "worker"


def _body(writer: str, chain: str, event: AuditEvent) -> bytes:
    return json.dumps({
        "writer": writer, "chain": chain, "seq": event.seq, "ts": event.ts, "kind": event.kind,
        "agent": event.agent, "run_id": event.run_id, "tool": event.tool, "decision": event.decision,
        "data": event.data, "prev_hash": event.prev_hash, "hash": event.hash,
    }, ensure_ascii=False, default=str).encode()


class AuditForwarder:
    """A worker's side: its durable audit events, in order, on ``<p>audit.<writer>`` (see the module docstring).

    Args:
        audit: The worker's own audit log.
        bus: The worker's bus connection.
        subjects: Subject names.
        writer: The worker's name (one subject token: :func:`writer_token`).
        position: A file where it notes the newest event it sent (``{"chain", "seq"}``), read on start.
    """

    retry_s: float = 0.5

    def __init__(self, audit: AuditLog, bus: Bus, subjects: Subjects, *, writer: str,
                 position: Path | None = None) -> None:
        self.audit = audit
        self.position = position
        self._noted = 0
        self.bus = bus
        self.subjects = subjects
        self.writer = writer_token(writer)
        self.forwarded = 0
        """The sequence number of the newest event stored on the bus."""
        self.chain = ""
        """The hash of the log's first event: names this chain (a worker whose state was wiped starts another)."""
        self._queue: asyncio.Queue[list[AuditEvent]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listens to the log and starts sending: first what the bus does not have yet, then each new batch."""
        self._loop = asyncio.get_running_loop()
        self.audit.listen(self._on_durable)
        self._task = asyncio.create_task(self._pump())

    def _on_durable(self, events: list[AuditEvent]) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the next start catches up
                loop.call_soon_threadsafe(self._queue.put_nowait, events)

    async def _resume_point(self) -> None:
        first = await asyncio.to_thread(self.audit.after, 0, 1)
        self.chain = first[0].hash[:16] if first else ""
        found = await self.bus.last(self.subjects.audit(self.writer))
        notes = [json.loads(found.data)] if found is not None else []
        if self.position is not None:
            with contextlib.suppress(OSError, ValueError):
                notes.append(json.loads(self.position.read_text(encoding="utf-8")))
        for sent in notes:
            if isinstance(sent, dict) and sent.get("chain") == self.chain:
                self.forwarded = max(self.forwarded, int(sent.get("seq", 0)))
        self._noted = self.forwarded

    def _note(self) -> None:
        """Notes the newest event sent (after each batch: a crash before it only repeats that batch)."""
        if self.position is None or self.forwarded == self._noted:
            return
        try:
            partial = self.position.with_name(self.position.name + ".tmp")
            partial.write_text(json.dumps({"chain": self.chain, "seq": self.forwarded}), encoding="utf-8")
            os.replace(partial, self.position)
            self._noted = self.forwarded
        except OSError as exc:
            log.warning("audit forwarder %s: cannot note its position in %s: %s", self.writer, self.position, exc)

    async def _send(self, event: AuditEvent) -> None:
        if not self.chain:  # the log was empty at start: its first event names the chain
            self.chain = event.hash[:16] if event.seq == 1 else (await asyncio.to_thread(
                self.audit.after, 0, 1))[0].hash[:16]
        while True:
            try:
                await self.bus.publish(self.subjects.audit(self.writer), _body(self.writer, self.chain, event),
                                       msg_id=f"audit:{self.writer}:{self.chain}:{event.seq}")
                self.forwarded = event.seq
                return
            except StitchworkError as exc:  # the bus is away: keep the order, try again
                log.warning("audit forwarder %s: event %d waits for the bus: %s", self.writer, event.seq, exc)
                await asyncio.sleep(self.retry_s)

    async def _pump(self) -> None:
        while True:
            try:
                await self._resume_point()
                break
            except (StitchworkError, AuditError) as exc:
                log.warning("audit forwarder %s: cannot read where it left off: %s", self.writer, exc)
                await asyncio.sleep(self.retry_s)
        while True:  # catch up with the log (events of a previous life of this worker, and those since start)
            page = await asyncio.to_thread(self.audit.after, self.forwarded, 500)
            if not page:
                break
            for event in page:
                await self._send(event)
            self._note()
        while True:
            for event in await self._queue.get():
                if event.seq > self.forwarded:
                    await self._send(event)
            if self._queue.empty():
                await asyncio.to_thread(self._note)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Waits (up to ``timeout_s``) until every event durable so far is on the bus."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline and (not self._queue.empty() or self._behind()):
            await asyncio.sleep(0.02)

    def _behind(self) -> bool:
        tail = self.audit.tail(1)
        return bool(tail) and tail[-1].seq > self.forwarded

    async def aclose(self) -> None:
        with contextlib.suppress(StitchworkError, AuditError):
            await self.drain()
        self._note()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


@dataclass
class _Last:
    seq: int
    hash: str


class AuditIngester:
    """The platform's side: the single writer that appends every worker's events to the platform's chain.

    Args:
        audit: The platform's audit log.
        bus: A bus connection of the platform.
        subjects: Subject names.
        batch: Events appended together (one durable write).
    """

    remembered: int = 200_000
    """How many ingested ``(writer, chain, seq)`` are remembered to recognise a redelivery."""

    def __init__(self, audit: AuditLog, bus: Bus, subjects: Subjects, *, batch: int = 256,
                 ack_wait_s: float = 60.0) -> None:
        self.audit = audit
        self.bus = bus
        self.subjects = subjects
        self.batch = batch
        self.ack_wait_s = ack_wait_s
        self.ingested = 0
        self._last: dict[tuple[str, str], _Last] = {}
        self._seen: OrderedDict[tuple[str, str, int], None] = OrderedDict()
        """The newest ingested ``(writer, chain, seq)`` (bounded): a redelivered one is recognised here."""

    def recover(self, scan: int = 50_000) -> None:
        """Learns the newest event of each writer already in the platform's chain (the last ``scan`` events)."""
        for event in self.audit.tail(scan):
            origin = event.data.get("origin") if isinstance(event.data, Mapping) else None
            if isinstance(origin, Mapping) and "writer" in origin and "seq" in origin:
                key = (str(origin["writer"]), str(origin.get("chain", "")))
                self._remember((*key, int(origin["seq"])))
                last = self._last.get(key)
                if last is None or int(origin["seq"]) > last.seq:
                    self._last[key] = _Last(int(origin["seq"]), str(origin.get("hash", "")))

    def _remember(self, key: tuple[str, str, int]) -> None:
        self._seen[key] = None
        while len(self._seen) > self.remembered:
            self._seen.popitem(last=False)

    def _entry(self, sent: Mapping[str, Any], lasts: dict[tuple[str, str], _Last]) -> dict[str, Any] | None:
        """The platform's event for one forwarded event, or ``None`` for one already ingested."""
        writer, chain, seq = str(sent["writer"]), str(sent.get("chain", "")), int(sent["seq"])
        if (writer, chain, seq) in self._seen:
            return None
        last = lasts.get((writer, chain))
        if last is None:
            link = "first" if seq == 1 else "gap"
        elif seq <= last.seq:
            link = "late"  # arrived after a newer event of its writer (a redelivery): kept, never dropped
        else:
            link = "ok" if seq == last.seq + 1 and sent.get("prev_hash") == last.hash else "gap"
        if last is None or seq > last.seq:
            lasts[(writer, chain)] = _Last(seq, str(sent.get("hash", "")))
        self._remember((writer, chain, seq))
        data = dict(sent.get("data") or {})
        data["origin"] = {"writer": writer, "chain": chain, "seq": seq, "hash": sent.get("hash", ""),
                          "prev_hash": sent.get("prev_hash", ""), "ts": sent.get("ts"), "link": link}
        kind = str(sent.get("kind", ""))
        return {"kind": "worker_audit" if kind == "audit" else kind, "agent": str(sent.get("agent", "")),
                "run_id": str(sent.get("run_id", "")), "tool": str(sent.get("tool", "")),
                "decision": str(sent.get("decision", "")), "data": data}

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Ingests until ``stop`` is set or the task is cancelled."""
        await asyncio.to_thread(self.recover)
        stop = stop or asyncio.Event()
        consumer = self.bus.consume(self.subjects.audit("*"), group=GROUP, max_in_flight=self.batch,
                                    ack_wait_s=self.ack_wait_s)
        # One task iterates the consumer (a timed-out wait on the consumer itself could drop a fetched message
        # until its redelivery, out of order); the loop below waits on this queue instead.
        arrived: asyncio.Queue[Delivery] = asyncio.Queue()

        async def pump() -> None:
            async for delivery in consumer:
                arrived.put_nowait(delivery)

        pumping = asyncio.create_task(pump())
        try:
            while not stop.is_set():
                if pumping.done():
                    pumping.result()  # raises what stopped it
                    return
                try:
                    first = await asyncio.wait_for(arrived.get(), 0.5)
                except TimeoutError:
                    continue
                deliveries = [first]
                await asyncio.sleep(0.005)  # let a burst gather into one durable append
                while len(deliveries) < self.batch and not arrived.empty():
                    deliveries.append(arrived.get_nowait())
                await self._ingest(deliveries)
        finally:
            await consumer.aclose()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, StitchworkError):
                await asyncio.wait_for(pumping, 5.0)
            if not pumping.done():
                pumping.cancel()
            while not arrived.empty():  # fetched, not ingested: back to the stream at once
                with contextlib.suppress(StitchworkError):
                    await arrived.get_nowait().nak()

    async def _ingest(self, deliveries: list[Delivery]) -> None:
        entries = []
        lasts = dict(self._last)
        for delivery in deliveries:
            try:
                entry = self._entry(json.loads(delivery.data), lasts)
            except (ValueError, KeyError, TypeError) as exc:
                entry = {"kind": "fleet", "decision": "malformed",
                         "data": {"subject": delivery.subject, "seq": delivery.seq, "error": str(exc)}}
            if entry is not None:
                entries.append(entry)
        while entries:
            try:
                await self.audit.aappend_many(entries)  # durable before the stream lets go of them
                break
            except AuditError as exc:
                log.error("audit ingester: cannot append %d fleet events as one batch: %s", len(entries), exc)
            if await self._one_by_one(entries):
                break
            for delivery in deliveries:  # the log refuses everything: keep them, in order, and try again
                with contextlib.suppress(StitchworkError):
                    await delivery.progress()
            await asyncio.sleep(1.0)
        if entries:
            self.ingested += len(entries)
        self._last = lasts
        for delivery in deliveries:
            with contextlib.suppress(StitchworkError):
                await delivery.ack()


    async def _one_by_one(self, entries: list[dict[str, Any]]) -> bool:
        """Appends each entry alone; one the log refuses is recorded as a ``fleet``/``rejected`` event instead.
        ``False`` when the log refuses even that (it is closed or failed)."""
        for entry in entries:
            try:
                await self.audit.aappend(**entry)
            except AuditError as exc:
                try:
                    await self.audit.aappend("fleet", decision="rejected", run_id=str(entry.get("run_id", "")),
                                             data={"error": str(exc), "origin": entry.get("data", {}).get("origin")})
                except AuditError:
                    return False
        return True


__all__ = ["GROUP", "AuditForwarder", "AuditIngester", "writer_token"]
