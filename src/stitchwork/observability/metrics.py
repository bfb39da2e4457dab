"""Prometheus metrics of the platform, served at ``GET /metrics`` on the control plane (text format 0.0.4).

A small registry without dependencies: counters and histograms keyed by label values (an update is a dictionary
addition under a lock), gauges read from callbacks at scrape time (queue depth, audit lag).

================================================  =========  ========================================================
metric                                            type       labels
================================================  =========  ========================================================
``stitchwork_tool_calls_total``                   counter    tool, status (ok, error, denied, approval_required,
                                                             invalid, unauthenticated, replayed)
``stitchwork_policy_decisions_total``             counter    policy_id, effect (allow, deny, ask)
``stitchwork_approvals_requested_total``          counter    tool
``stitchwork_approvals_decided_total``            counter    outcome (approved, denied)
``stitchwork_approval_latency_seconds``           histogram  outcome: from request to a human's decision
``stitchwork_sandbox_seconds``                    histogram  sandbox: wall time of tool executions
``stitchwork_sandbox_kills_total``                counter    sandbox, reason (timeout, memory, cpu, output...)
``stitchwork_model_calls_total``                  counter    agent, model, status (ok, error, denied, rate_limited)
``stitchwork_model_tokens_total``                 counter    agent, model, kind (input, output)
``stitchwork_model_cost_usd_total``               counter    agent, model
``stitchwork_model_latency_seconds``              histogram  model
``stitchwork_queue_depth``                        gauge      queue: runs waiting for a worker (``runs``), pending
                                                             approvals (``approvals``)
``stitchwork_audit_lag_events``                   gauge      audit events journaled (durable) but not yet in the
                                                             store
================================================  =========  ========================================================
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
APPROVAL_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str]) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        self._arity = len(self.label_names)
        self._lock = threading.Lock()

    def _key(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        if len(labels) != self._arity:
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {labels}")
        return labels

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class Counter(_Metric):
    """A count that only goes up."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        if len(labels) != self._arity:
            self._key(labels)
        values = self.values
        with self._lock:
            values[labels] = values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self.values.get(tuple(labels), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self.values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]

    def reset(self) -> None:
        with self._lock:
            self.values.clear()


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[tuple[str, ...], list[float]] = {}
        """labels → [count per bucket..., +Inf count, sum]."""

    def observe(self, value: float, *labels: str) -> None:
        if len(labels) != self._arity:
            self._key(labels)
        index = bisect.bisect_left(self.buckets, value)  # the first bucket whose bound is >= value (+Inf: the last)
        with self._lock:
            series = self.series.get(labels)
            if series is None:
                series = self.series[labels] = [0.0] * (len(self.buckets) + 2)
            series[index] += 1
            series[-1] += value

    def count(self, *labels: str) -> int:
        series = self.series.get(tuple(labels))
        return int(sum(series[:-1])) if series else 0

    def lines(self) -> list[str]:
        out: list[str] = []
        with self._lock:
            items = sorted((k, list(v)) for k, v in self.series.items())
        for key, series in items:
            running = 0.0
            for bound, count in zip((*self.buckets, math.inf), series[:-1], strict=True):
                running += count
                le = 'le="' + _number(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {_number(running)}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(series[-1])}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {_number(running)}")
        return out

    def reset(self) -> None:
        with self._lock:
            self.series.clear()


class Gauge(_Metric):
    """A value read at scrape time from callbacks (each returns ``[(label values, value), ...]``)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.sources: list[Callable[[], Iterable[tuple[Sequence[str], float]]]] = []

    def source(self, read: Callable[[], Iterable[tuple[Sequence[str], float]]]) -> Callable[[], None]:
        """Adds a callback; returns a function that removes it."""
        self.sources.append(read)
        return lambda: self.sources.remove(read) if read in self.sources else None

    def lines(self) -> list[str]:
        totals: dict[tuple[str, ...], float] = {}
        for read in list(self.sources):
            try:
                samples = list(read())
            except Exception:
                continue
            for labels, value in samples:
                key = self._key(tuple(str(v) for v in labels))
                totals[key] = totals.get(key, 0.0) + float(value)
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in sorted(totals.items())]

    def reset(self) -> None:
        self.sources.clear()


class Metrics:
    """Every metric of the platform (see the module docstring)."""

    def __init__(self) -> None:
        self.tool_calls = Counter("stitchwork_tool_calls_total", "Tool calls through the gateway by outcome.",
                                  ("tool", "status"))
        self.policy_decisions = Counter("stitchwork_policy_decisions_total",
                                        "Cedar decisions by deciding policy id.", ("policy_id", "effect"))
        self.approvals_requested = Counter("stitchwork_approvals_requested_total",
                                           "Calls paused for a human approval.", ("tool",))
        self.approvals_decided = Counter("stitchwork_approvals_decided_total", "Approvals a human decided.",
                                         ("outcome",))
        self.approval_latency = Histogram("stitchwork_approval_latency_seconds",
                                          "Time from an approval's request to a human's decision.", ("outcome",),
                                          APPROVAL_BUCKETS)
        self.sandbox_seconds = Histogram("stitchwork_sandbox_seconds", "Wall time of tool executions.",
                                         ("sandbox",))
        self.sandbox_kills = Counter("stitchwork_sandbox_kills_total", "Tool executions a sandbox limit stopped.",
                                     ("sandbox", "reason"))
        self.model_calls = Counter("stitchwork_model_calls_total", "Model calls through the model gateway.",
                                   ("agent", "model", "status"))
        self.model_tokens = Counter("stitchwork_model_tokens_total", "Model tokens metered.",
                                    ("agent", "model", "kind"))
        self.model_cost = Counter("stitchwork_model_cost_usd_total", "Model spend in USD.", ("agent", "model"))
        self.model_latency = Histogram("stitchwork_model_latency_seconds", "Model call latency through the gateway.",
                                       ("model",))
        self.queue_depth = Gauge("stitchwork_queue_depth", "Work waiting: runs for a worker, pending approvals.",
                                 ("queue",))
        self.audit_lag = Gauge("stitchwork_audit_lag_events",
                               "Audit events journaled (durable) but not yet copied into the store.")
        self.all: tuple[_Metric, ...] = (
            self.tool_calls, self.policy_decisions, self.approvals_requested, self.approvals_decided,
            self.approval_latency, self.sandbox_seconds, self.sandbox_kills, self.model_calls, self.model_tokens,
            self.model_cost, self.model_latency, self.queue_depth, self.audit_lag,
        )

    def exposition(self) -> str:
        """Every metric in the Prometheus text format."""
        lines: list[str] = []
        for metric in self.all:
            lines += metric.header()
            lines += metric.lines()
        return "\n".join(lines) + "\n"

    def reset(self) -> None:
        """Clears every value and gauge source (tests)."""
        for metric in self.all:
            metric.reset()


METRICS = Metrics()
"""The process's metrics."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

__all__ = ["CONTENT_TYPE", "METRICS", "Counter", "Gauge", "Histogram", "Metrics"]
