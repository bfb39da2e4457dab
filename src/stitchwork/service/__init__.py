"""Operator operations over an open platform, shared by the HTTP API and the local CLI."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from typing import Any

import duckdb

from stitchwork.agents.runs import RunStatus
from stitchwork.audit.records import AuditEvent
from stitchwork.errors import ApprovalError, ConfigError, StitchworkError, StoreError
from stitchwork.platform import Platform
from stitchwork.security.approvals import ApprovalStatus
from stitchwork.security.vault import validate_secret_name
from stitchwork.service import audit as audit_ops
from stitchwork.service.sessions import Sessions

OPERATOR_TABLE = """
CREATE TABLE IF NOT EXISTS operator_tokens (
    id VARCHAR PRIMARY KEY, token_sha256 VARCHAR NOT NULL, created_at DOUBLE NOT NULL, revoked BOOLEAN NOT NULL
)
"""


def event_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "seq": event.seq, "ts": event.ts, "kind": event.kind, "agent": event.agent, "run_id": event.run_id,
        "tool": event.tool, "decision": event.decision, "data": event.data, "hash": event.hash,
    }


def read_only_sql(sql: str) -> str:
    """Accepts exactly one SELECT (or WITH … SELECT) statement; anything that could write is refused."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise StoreError(f"SQL does not parse: {exc}") from exc
    if len(statements) != 1:
        raise StoreError(f"give exactly one SQL statement, got {len(statements)}")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise StoreError(f"only SELECT queries are allowed here, got {statements[0].type.name}")
    return sql


class Service:
    """What operators do: start runs, decide approvals, read the audit log, manage secrets."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.platform.store.execute(OPERATOR_TABLE)
        self._tasks: set[asyncio.Task[Any]] = set()
        server = platform.config.server
        self.sessions = Sessions(platform, base_url=f"http://{server.host}:{server.port}")
        """External runs: agents outside the platform calling through the gateway (:mod:`.sessions`)."""

    # operator tokens ---------------------------------------------------------------------------------------
    def has_operator_token(self) -> bool:
        return bool(self.platform.store.query("SELECT id FROM operator_tokens WHERE NOT revoked LIMIT 1"))

    def create_operator_token(self) -> str:
        token = "swo_" + secrets.token_urlsafe(32)
        self.platform.store.append("operator_tokens", [{
            "id": secrets.token_hex(6), "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
            "created_at": time.time(), "revoked": False,
        }])
        return token

    def check_operator_token(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
        rows = self.platform.store.query("SELECT token_sha256 FROM operator_tokens WHERE NOT revoked")
        return any(hmac.compare_digest(digest, r["token_sha256"]) for r in rows)

    # runs ---------------------------------------------------------------------------------------------------
    async def run(self, agent: str, task: str, *, model: str | None = None) -> dict[str, Any]:
        record = await self.platform.runner.start(agent, task, model=model)
        return record.to_dict()

    def start_background(self, agent: str, task: str, *, model: str | None = None) -> dict[str, Any]:
        record = self.platform.runner.create(agent, task, model=model)
        self._spawn(self.platform.runner.drive(record.id))
        return record.to_dict()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self.platform.runs.get(run_id).to_dict()

    def list_runs(self, limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        """The newest runs (without their messages), only those in ``status`` when given.

        Raises:
            ConfigError: ``status`` is not a run status.
        """
        try:
            chosen = RunStatus(status) if status and status != "all" else None
        except ValueError as exc:
            raise ConfigError(f"unknown run status {status!r}; one of: "
                           f"{', '.join(s.value for s in RunStatus)}, all") from exc
        return [r.to_dict(messages=False) for r in self.platform.runs.list(status=chosen, limit=limit)]

    # approvals ----------------------------------------------------------------------------------------------
    def approvals(self, status: str | None = "pending") -> list[dict[str, Any]]:
        chosen = ApprovalStatus(status) if status and status != "all" else None
        return [self.platform.gateway.redactor.redact(a.to_dict()) for a in self.platform.approvals.find(chosen)]

    async def decide(self, approval_id: str, *, approve: bool, by: str, note: str = "",
                     resume: bool = True) -> dict[str, Any]:
        approval = self.platform.approvals.decide(approval_id, approve=approve, by=by, note=note)
        await self.platform.audit.aappend(
            "approval", agent=approval.agent, run_id=approval.run_id, tool=approval.tool,
            decision=approval.status.value,
            data={"approval_id": approval.id, "by": by, "note": note,
                  "latency_s": round((approval.decided_at or 0) - approval.created_at, 3)},
        )
        result: dict[str, Any] = self.platform.gateway.redactor.redact(approval.to_dict())
        if resume:
            await self.resume_if_ready(approval.run_id)
        return result

    async def resume_if_ready(self, run_id: str) -> None:
        """Resumes a run whose pending approvals have all been decided."""
        try:
            record = self.platform.runs.get(run_id)
        except StitchworkError:
            return
        if record.status is not RunStatus.WAITING_APPROVAL:
            return
        waiting = record.pending.get("approvals", [])
        try:
            still = [a for a in waiting if self.platform.approvals.get(a).status is ApprovalStatus.PENDING]
        except ApprovalError:
            still = []
        if not still:
            await self.platform.runner.drive(run_id)

    async def expire_and_resume(self) -> list[str]:
        """Expires overdue approvals (expiry means deny) and resumes the runs waiting on them."""
        expired = self.platform.approvals.expire_due()
        for approval_id in expired:
            approval = self.platform.approvals.get(approval_id)
            await self.platform.audit.aappend("approval", agent=approval.agent, run_id=approval.run_id,
                                              tool=approval.tool, decision="expired",
                                              data={"approval_id": approval_id})
            await self.resume_if_ready(approval.run_id)
        await self.sessions.expire_due()
        return expired

    # audit --------------------------------------------------------------------------------------------------
    def audit_tail(self, n: int = 20) -> list[dict[str, Any]]:
        return [event_dict(e) for e in self.platform.audit.tail(n)]

    def audit_query(self, sql: str) -> list[dict[str, Any]]:
        self.platform.audit.flush()
        rows = self.platform.store.query(read_only_sql(sql))
        return [self.platform.gateway.redactor.redact(r) for r in rows]

    def audit_verify(self) -> dict[str, Any]:
        report = audit_ops.verify(self.platform)
        return {"ok": report.ok, "events": report.events, "first_bad_seq": report.first_bad_seq,
                "reason": report.reason, "head_seq": report.head_seq, "head_signed": report.head_signed}

    def audit_report(self, name: str, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        return audit_ops.report(self.platform, name, since, until)

    def audit_export(self, to: str, since: float | None = None) -> dict[str, Any]:
        return audit_ops.export(self.platform, to, since)

    def audit_compact(self, to: str, older_than_days: float | None = None, upto_seq: int | None = None
                      ) -> dict[str, Any]:
        return audit_ops.compact(self.platform, to, older_than_days, upto_seq)

    def data_retention(self) -> dict[str, int]:
        return audit_ops.retain(self.platform)

    # secrets ------------------------------------------------------------------------------------------------
    async def secret_set(self, name: str, value: str, *, by: str) -> None:
        validate_secret_name(name)
        self.platform.vault.set(name, value)
        self.platform.gateway.refresh_secrets()
        await self.platform.audit.aappend("secret", decision="set", data={"name": name, "by": by})

    def secret_names(self) -> list[str]:
        return self.platform.vault.names()

    async def secret_delete(self, name: str, *, by: str) -> None:
        self.platform.vault.delete(name)
        self.platform.gateway.refresh_secrets()
        await self.platform.audit.aappend("secret", decision="deleted", data={"name": name, "by": by})
