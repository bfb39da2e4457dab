"""Human approvals: a call that policy holds for a human waits here, durably, until approved, denied or expired."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from stitchwork.data._base import Store
from stitchwork.errors import ApprovalError

SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    id VARCHAR PRIMARY KEY,
    run_id VARCHAR NOT NULL,
    agent VARCHAR NOT NULL,
    tool VARCHAR NOT NULL,
    target VARCHAR NOT NULL,
    arguments VARCHAR NOT NULL,
    call_hash VARCHAR NOT NULL,
    policy_ids VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    created_at DOUBLE NOT NULL,
    expires_at DOUBLE NOT NULL,
    decided_at DOUBLE,
    decided_by VARCHAR,
    note VARCHAR
)
"""


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    USED = "used"


@dataclass(frozen=True)
class Approval:
    id: str
    run_id: str
    agent: str
    tool: str
    target: str
    arguments: dict[str, Any]
    call_hash: str
    policy_ids: tuple[str, ...]
    reason: str
    status: ApprovalStatus
    created_at: float
    expires_at: float
    decided_at: float | None = None
    decided_by: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "run_id": self.run_id, "agent": self.agent, "tool": self.tool, "target": self.target,
            "arguments": self.arguments, "policy_ids": list(self.policy_ids), "reason": self.reason,
            "status": self.status.value, "created_at": self.created_at, "expires_at": self.expires_at,
            "decided_at": self.decided_at, "decided_by": self.decided_by, "note": self.note,
        }


def call_hash(run_id: str, agent: str, tool: str, arguments: Mapping[str, Any]) -> str:
    """Identifies one exact call: an approval covers these arguments and nothing else."""
    body = json.dumps([run_id, agent, tool, arguments], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


class ApprovalStore:
    """Approvals persisted in the store; pending ones survive restarts and expire to deny."""

    def __init__(self, store: Store, *, timeout_s: float = 3600, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.clock = clock
        self.watchers: list[Callable[[Approval], None]] = []
        store.execute(SCHEMA)

    def watch(self, callback: Callable[[Approval], None]) -> None:
        """Calls ``callback`` with every approval this store creates from now on (the expiry timers)."""
        self.watchers.append(callback)

    def unwatch(self, callback: Callable[[Approval], None]) -> None:
        """Stops calling ``callback`` (it is not an error if it was not watching)."""
        if callback in self.watchers:
            self.watchers.remove(callback)

    def _created(self, approval: Approval) -> Approval:
        for callback in self.watchers:
            callback(approval)
        return approval

    def _row(self, row: Mapping[str, Any]) -> Approval:
        return Approval(
            id=row["id"], run_id=row["run_id"], agent=row["agent"], tool=row["tool"], target=row["target"],
            arguments=json.loads(row["arguments"]), call_hash=row["call_hash"],
            policy_ids=tuple(json.loads(row["policy_ids"])), reason=row["reason"],
            status=ApprovalStatus(row["status"]), created_at=row["created_at"], expires_at=row["expires_at"],
            decided_at=row["decided_at"], decided_by=row["decided_by"], note=row["note"],
        )

    def request(
        self, *, run_id: str, agent: str, tool: str, target: str, arguments: Mapping[str, Any],
        policy_ids: tuple[str, ...], reason: str,
    ) -> Approval:
        """Returns the open approval for this exact call, creating it if there is none."""
        digest = call_hash(run_id, agent, tool, arguments)
        self.expire_due()
        existing = self.store.query(
            "SELECT * FROM approvals WHERE call_hash = ? AND status = 'pending' ORDER BY created_at LIMIT 1", [digest]
        )
        if existing:
            return self._row(existing[0])
        now = self.clock()
        row = {
            "id": "apv_" + uuid.uuid4().hex[:12], "run_id": run_id, "agent": agent, "tool": tool, "target": target,
            "arguments": json.dumps(arguments, sort_keys=True, ensure_ascii=False), "call_hash": digest,
            "policy_ids": json.dumps(list(policy_ids)), "reason": reason, "status": ApprovalStatus.PENDING.value,
            "created_at": now, "expires_at": now + self.timeout_s, "decided_at": None, "decided_by": None,
            "note": None,
        }
        self.store.append("approvals", [row])
        return self._created(self._row(row))

    def get(self, approval_id: str) -> Approval:
        self.expire_due()
        rows = self.store.query("SELECT * FROM approvals WHERE id = ?", [approval_id])
        if not rows:
            raise ApprovalError(f"no approval with id {approval_id!r}")
        return self._row(rows[0])

    def find(self, status: ApprovalStatus | None = ApprovalStatus.PENDING) -> list[Approval]:
        self.expire_due()
        if status is None:
            rows = self.store.query("SELECT * FROM approvals ORDER BY created_at")
        else:
            rows = self.store.query("SELECT * FROM approvals WHERE status = ? ORDER BY created_at", [status.value])
        return [self._row(r) for r in rows]

    def decide(self, approval_id: str, *, approve: bool, by: str, note: str = "") -> Approval:
        """Approves or denies a pending approval.

        Raises:
            ApprovalError: unknown id, or already decided or expired.
        """
        current = self.get(approval_id)
        if current.status is not ApprovalStatus.PENDING:
            raise ApprovalError(f"approval {approval_id} is already {current.status.value}")
        status = ApprovalStatus.APPROVED if approve else ApprovalStatus.DENIED
        self.store.execute(
            "UPDATE approvals SET status = ?, decided_at = ?, decided_by = ?, note = ? WHERE id = ? AND status = ?",
            [status.value, self.clock(), by, note, approval_id, ApprovalStatus.PENDING.value],
        )
        return self.get(approval_id)

    def consume(self, run_id: str, agent: str, tool: str, arguments: Mapping[str, Any]) -> Approval | None:
        """If this exact call was approved, marks the approval used (one call per approval) and returns it."""
        digest = call_hash(run_id, agent, tool, arguments)
        rows = self.store.query(
            "SELECT * FROM approvals WHERE call_hash = ? AND status = 'approved' ORDER BY decided_at LIMIT 1",
            [digest],
        )
        if not rows:
            return None
        self.store.execute("UPDATE approvals SET status = 'used' WHERE id = ?", [rows[0]["id"]])
        return self._row(rows[0])

    def denied(self, run_id: str, agent: str, tool: str, arguments: Mapping[str, Any]) -> Approval | None:
        """The denied or expired approval for this exact call, if a human (or the clock) said no."""
        digest = call_hash(run_id, agent, tool, arguments)
        self.expire_due()
        rows = self.store.query(
            "SELECT * FROM approvals WHERE call_hash = ? AND status IN ('denied', 'expired') "
            "ORDER BY created_at DESC LIMIT 1",
            [digest],
        )
        return self._row(rows[0]) if rows else None

    def expire(self, approval_ids: list[str]) -> list[str]:
        """Expires those of ``approval_ids`` that are pending and past their deadline; returns their ids."""
        if not approval_ids:
            return []
        now = self.clock()
        marks = ", ".join("?" * len(approval_ids))
        rows = self.store.query(f"SELECT id FROM approvals WHERE id IN ({marks}) AND status = 'pending' "
                                "AND expires_at <= ?", [*approval_ids, now])
        due = [r["id"] for r in rows]
        if due:
            marks = ", ".join("?" * len(due))
            self.store.execute(
                f"UPDATE approvals SET status = 'expired', decided_at = ?, decided_by = 'timeout' "
                f"WHERE id IN ({marks}) AND status = 'pending'", [now, *due])
        return due

    def expire_due(self) -> list[str]:
        """Expires pending approvals past their deadline (expiry means deny); returns their ids."""
        now = self.clock()
        rows = self.store.query(
            "SELECT id FROM approvals WHERE status = 'pending' AND expires_at <= ?", [now]
        )
        if rows:
            self.store.execute(
                "UPDATE approvals SET status = 'expired', decided_at = ?, decided_by = 'timeout' "
                "WHERE status = 'pending' AND expires_at <= ?",
                [now, now],
            )
        return [r["id"] for r in rows]
