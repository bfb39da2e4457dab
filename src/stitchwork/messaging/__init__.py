"""Messaging layer: the bus port (``memory://``, ``nats://``), durable runs and workers, run events for clients,
signed agent-to-agent messages, Kafka export. See :mod:`stitchwork.messaging._base` and
:mod:`stitchwork.messaging.durable`."""

from stitchwork.messaging._base import BUSES, Bus, Consumer, Delivery, open_bus

__all__ = ["BUSES", "Bus", "Consumer", "Delivery", "open_bus"]
