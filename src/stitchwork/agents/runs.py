"""Run records and checkpoints in the store."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from stitchwork.data._base import Store
from stitchwork.errors import RunError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id VARCHAR PRIMARY KEY,
    agent VARCHAR NOT NULL,
    task VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    steps INTEGER NOT NULL,
    messages VARCHAR NOT NULL,
    provenance VARCHAR NOT NULL,
    pending VARCHAR NOT NULL,
    result VARCHAR,
    error VARCHAR,
    created_at DOUBLE NOT NULL,
    updated_at DOUBLE NOT NULL
)
"""


class RunStatus(StrEnum):
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    COMPLETED = "completed"
    FAILED = "failed"
    BUDGET_EXHAUSTED = "budget_exhausted"

    @property
    def finished(self) -> bool:
        return self in {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.BUDGET_EXHAUSTED}


@dataclass(frozen=True)
class RunRecord:
    """A run as checkpointed after each step."""

    id: str
    agent: str
    task: str
    model: str
    status: RunStatus = RunStatus.RUNNING
    steps: int = 0
    messages: tuple[dict[str, Any], ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, Any] = field(default_factory=dict)
    """Tool calls of the current turn not yet answered (``calls``) while the run waits for approval."""
    result: str | None = None
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_dict(self, *, messages: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "agent": self.agent, "task": self.task, "model": self.model, "status": self.status.value,
            "steps": self.steps, "result": self.result, "error": self.error, "created_at": self.created_at,
            "updated_at": self.updated_at, "pending_approvals": list(self.pending.get("approvals", [])),
        }
        if messages:
            out["messages"] = list(self.messages)
        return out


class RunStore:
    """Persists run checkpoints (one row per run, replaced after each step)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.execute(SCHEMA)

    def create(self, agent: str, task: str, model: str) -> RunRecord:
        now = time.time()
        record = RunRecord(id="run_" + uuid.uuid4().hex[:16], agent=agent, task=task, model=model,
                           created_at=now, updated_at=now)
        self.store.append("runs", [self._row(record)])
        return record

    def save(self, record: RunRecord) -> RunRecord:
        record = replace(record, updated_at=time.time())
        row = self._row(record)
        sets = ", ".join(f"{k} = ?" for k in row if k != "id")
        values = [v for k, v in row.items() if k != "id"]
        self.store.execute(f"UPDATE runs SET {sets} WHERE id = ?", [*values, record.id])
        return record

    async def asave(self, record: RunRecord) -> RunRecord:
        """:meth:`save` for the run loop; a store on a network bus overrides it to wait without blocking."""
        return self.save(record)

    def get(self, run_id: str) -> RunRecord:
        rows = self.store.query("SELECT * FROM runs WHERE id = ?", [run_id])
        if not rows:
            raise RunError(f"no run with id {run_id!r}")
        return self._record(rows[0])

    def list(self, *, status: RunStatus | None = None, limit: int = 50) -> list[RunRecord]:
        if status is None:
            rows = self.store.query("SELECT * FROM runs ORDER BY created_at DESC LIMIT ?", [limit])
        else:
            rows = self.store.query(
                "SELECT * FROM runs WHERE status = ? ORDER BY created_at DESC LIMIT ?", [status.value, limit]
            )
        return [self._record(r) for r in rows]

    @staticmethod
    def _row(r: RunRecord) -> dict[str, Any]:
        return {
            "id": r.id, "agent": r.agent, "task": r.task, "model": r.model, "status": r.status.value,
            "steps": r.steps, "messages": json.dumps(list(r.messages), ensure_ascii=False),
            "provenance": json.dumps(r.provenance, ensure_ascii=False), "pending": json.dumps(r.pending),
            "result": r.result, "error": r.error, "created_at": r.created_at, "updated_at": r.updated_at,
        }

    @staticmethod
    def _record(row: Mapping[str, Any]) -> RunRecord:
        return RunRecord(
            id=row["id"], agent=row["agent"], task=row["task"], model=row["model"], status=RunStatus(row["status"]),
            steps=row["steps"], messages=tuple(json.loads(row["messages"])),
            provenance=json.loads(row["provenance"]), pending=json.loads(row["pending"]), result=row["result"],
            error=row["error"], created_at=row["created_at"], updated_at=row["updated_at"],
        )
