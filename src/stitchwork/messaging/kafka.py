"""``kafka://host:port[,host:port...]``: a Kafka producer (aiokafka) for exports.

Kafka is an export target here, not the platform's bus: :mod:`stitchwork.workers.export` streams run events and
the audit log into it through a :class:`KafkaSink`.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from stitchwork.errors import BusError, ConfigError


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
