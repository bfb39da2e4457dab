"""``kafka://host:port[,host:port...]``: stream run events and audit events into an existing Kafka (aiokafka).

Kafka is an export target here, not the platform's bus: :func:`export_events` reads a bus subject through a
durable group and produces each message to a topic (key = run id), acknowledging it on the bus only after Kafka
acknowledged it (``acks=all``), so an interrupted export resumes where it stopped and loses nothing (a message may
be produced twice after a crash: at-least-once). :func:`export_audit` copies the audit log after a sequence
number, in order, and returns the last number sent (the caller keeps it, e.g. in the state dir).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from stitchwork.data._base import Store
from stitchwork.errors import BusError, ConfigError
from stitchwork.messaging._base import Bus
from stitchwork.security.audit import AuditLog


def _bootstrap(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme != "kafka" or not parts.netloc:
        raise ConfigError(f"kafka URI {uri!r} must look like kafka://host:port[,host:port]")
    return parts.netloc


class KafkaSink:
    """A producer with ``acks=all``: :meth:`send` returns once the broker stored the record."""

    def __init__(self, uri: str, producer: AIOKafkaProducer) -> None:
        self.uri = uri
        self.producer = producer

    @classmethod
    async def connect(cls, uri: str, *, client_id: str = "stitchwork", timeout_s: float = 30.0) -> KafkaSink:
        """Connects to the brokers in ``uri``.

        Raises:
            BusError: no broker answered within ``timeout_s``.
        """
        producer = AIOKafkaProducer(bootstrap_servers=_bootstrap(uri), client_id=client_id, acks="all",
                                    request_timeout_ms=int(timeout_s * 1000), linger_ms=5)
        try:
            await asyncio.wait_for(producer.start(), timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            await producer.stop()
            raise BusError(f"cannot connect to Kafka at {uri}: {exc!r}") from exc
        return cls(uri, producer)

    async def send(self, topic: str, value: bytes, *, key: bytes | None = None) -> int:
        """Produces one record; returns its offset."""
        try:
            metadata = await self.producer.send_and_wait(topic, value, key=key)
        except KafkaError as exc:
            raise BusError(f"Kafka refused a record for {topic}: {exc!r}") from exc
        return int(metadata.offset)

    async def send_many(self, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
        """Produces records in order, waiting once for all of them."""
        try:
            futures = [await self.producer.send(topic, value, key=key) for key, value in records]
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise BusError(f"Kafka refused records for {topic}: {exc!r}") from exc

    async def aclose(self) -> None:
        await self.producer.stop()


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
    from stitchwork.security.audit import EVENTS_TABLE

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
