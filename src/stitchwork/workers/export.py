"""Exports to Kafka: run events from the bus and the audit log, resuming where an export stopped.

:func:`export_events` reads a bus subject through a durable group and produces each message to a topic (key = run
id), acknowledging it on the bus only after Kafka acknowledged it (``acks=all``), so an interrupted export resumes
where it stopped and loses nothing (a message may be produced twice after a crash: at-least-once).
:func:`export_audit` copies the audit log after a sequence number, in order, and returns the last number sent (the
caller keeps it, e.g. in the state dir).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from stitchwork.audit.log import AuditLog
from stitchwork.audit.records import EVENTS_TABLE
from stitchwork.data._base import Store
from stitchwork.errors import BusError
from stitchwork.messaging._base import Bus
from stitchwork.messaging.kafka import KafkaSink


async def export_events(bus: Bus, sink: KafkaSink, *, subject: str, topic: str, group: str = "kafka-export",
                        max_in_flight: int = 256, stop: asyncio.Event | None = None, idle_s: float = 0.0) -> int:
    """Copies bus messages on ``subject`` to Kafka ``topic`` until ``stop`` (or ``idle_s`` without messages).

    Returns:
        How many messages were exported.
    """
    exported = 0
    async with bus.consume(subject, group=group, max_in_flight=max_in_flight) as consumer:
        while stop is None or not stop.is_set():
            try:
                delivery = await consumer.next(idle_s or 1.0)
            except TimeoutError:
                if idle_s:
                    break
                continue
            try:
                event: dict[str, Any] = json.loads(delivery.data)
                key = str(event.get("run_id", "")).encode() or None
            except ValueError:
                key = None
            try:
                await sink.send(topic, delivery.data, key=key)
            except BusError:
                await delivery.nak(1.0)
                raise
            await delivery.ack()
            exported += 1
    return exported


async def export_audit(audit: AuditLog, store: Store, sink: KafkaSink, *, topic: str, after_seq: int = 0,
                       batch: int = 1000) -> int:
    """Sends audit events with ``seq > after_seq`` (from the platform's ``store``) to ``topic`` in order.

    Returns:
        The last ``seq`` sent (``after_seq`` if there was nothing new).
    """
    audit.flush()
    last = after_seq
    while True:
        rows = store.query(
            f"SELECT seq, ts, kind, agent, run_id, tool, decision, data, hash FROM {EVENTS_TABLE} "
            "WHERE seq > ? ORDER BY seq LIMIT ?", [last, batch])
        if not rows:
            return last
        records = [(str(r["run_id"] or "").encode() or None,
                    json.dumps({**r, "data": json.loads(r["data"])}, default=str).encode()) for r in rows]
        await sink.send_many(topic, records)
        last = int(rows[-1]["seq"])
