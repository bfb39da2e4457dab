"""Seeing inside a running platform: OpenTelemetry spans (:mod:`.tracing`) and Prometheus metrics (:mod:`.metrics`).

Both are process-wide, like the libraries they feed, and cost next to nothing when off: spans are a shared no-op
unless an OTLP endpoint is configured (and the SDK installed), and a metric update is a dictionary addition.
"""

from stitchwork.observability.metrics import METRICS, Metrics
from stitchwork.observability.tracing import TRACING, Tracing

__all__ = ["METRICS", "TRACING", "Metrics", "Tracing"]
