"""Subject names of durable runs under one prefix, and the shape of a run event."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from stitchwork.agents.runs import RunRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subjects:
    """Subject names under one prefix (several installations can share a NATS server)."""

    prefix: str = "sw"

    @property
    def queue(self) -> str:
        return f"{self.prefix}runs.queue"

    @property
    def dead(self) -> str:
        return f"{self.prefix}runs.dead"

    def state(self, run_id: str) -> str:
        return f"{self.prefix}state.{run_id}"

    def idem(self, run_id: str, key: str) -> str:
        digest = hashlib.sha256(f"{run_id}\x00{key}".encode()).hexdigest()[:40]
        return f"{self.prefix}idem.{digest}"

    def events(self, run_id: str = "*") -> str:
        return f"{self.prefix}events.{run_id}"

    def dead_letter(self, run_id: str = "*") -> str:
        """``<p>runs.dead.<run_id>``: the newest dead letter of a run (or a note that it was re-submitted)."""
        return f"{self.dead}.{run_id}"

    def audit(self, writer: str = "*") -> str:
        """``<p>audit.<writer>``: one worker's audit events, in its chain's order (the platform ingests them)."""
        return f"{self.prefix}audit.{writer}"

    def approval(self, approval_id: str = "*") -> str:
        """``<p>apv.id.<approval_id>``: an approval's current state (pending, approved, denied, expired, used)."""
        return f"{self.prefix}apv.id.{approval_id}"

    def meter(self, key: str = "*") -> str:
        """``<p>meter.<digest>``: the newest document of one model-use meter (budgets and rate limits)."""
        if key == "*":
            return f"{self.prefix}meter.*"
        return f"{self.prefix}meter.{hashlib.sha256(key.encode()).hexdigest()[:40]}"

    def approval_call(self, digest: str) -> str:
        """``<p>apv.call.<digest>``: which approval is the newest for one exact call."""
        return f"{self.prefix}apv.call.{digest[:40]}"


def event_payload(record: RunRecord, kind: str, data: dict[str, Any], *, worker: str = "") -> dict[str, Any]:
    """One run event as published on ``<p>events.<run_id>``."""
    return {"run_id": record.id, "agent": record.agent, "kind": kind, "status": record.status.value,
            "steps": record.steps, "data": data, "worker": worker, "ts": time.time()}
