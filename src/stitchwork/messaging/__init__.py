"""Messaging layer: the bus port (``memory://``, ``nats://``; :mod:`stitchwork.messaging._base`), the embedded
NATS server, a blocking bridge for threads, and the Kafka producer used by exports."""

from stitchwork.messaging._base import BUSES, Bus, Consumer, Delivery, open_bus

__all__ = ["BUSES", "Bus", "Consumer", "Delivery", "open_bus"]
