"""Operator operations over an open platform, shared by the HTTP API and the local CLI."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import decimal
import hashlib
import hmac
import logging
import math
import secrets
import time
import uuid
from typing import Any

from stitchwork.agents.runs import RunStatus
from stitchwork.audit.records import AuditEvent
from stitchwork.errors import ApprovalError, ConfigError, StitchworkError
from stitchwork.observability import METRICS
from stitchwork.platform import Platform
from stitchwork.security.approvals import Approval as ApprovalRecord
from stitchwork.security.approvals import ApprovalStatus
from stitchwork.security.deadlines import Deadlines
from stitchwork.security.vault import validate_secret_name
from stitchwork.service import audit as audit_ops
from stitchwork.service.sessions import Sessions
from stitchwork.service.undo import Undo, describe, is_undo_approval

log = logging.getLogger(__name__)

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


AUDIT_QUERY_TABLES = (
    "audit_events", "audit_heads", "audit_checkpoints", "audit_facts", "audit_denials", "audit_rollup", "runs",
    "approvals",
)
"""The tables the audit query may read (a read-only snapshot of them). Not: operator tokens, revoked run tokens,
idempotency records, agent memory, or anything outside the store (the CA key, the vault, other files)."""


def json_safe(value: Any) -> Any:
    """A value as plain JSON: BLOBs as base64 text, NaN and infinities as the strings ``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``, times as ISO 8601, intervals as seconds, decimals as numbers, lone surrogates as U+FFFD."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (from JSON "\ud800") cannot be sent
            return value.encode("utf-8", "replace").decode("utf-8")
        return value
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return json_safe(float(value)) if value != value.to_integral_value() else int(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


def _expired_by_clock(approvals: Any, approval_id: str) -> bool:
    try:
        approval = approvals.get(approval_id)
    except ApprovalError:
        return False
    return bool(approval.status is ApprovalStatus.EXPIRED and approval.decided_by == "timeout")


class Service:
    """What operators do: start runs, decide approvals, read the audit log, manage secrets."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.platform.store.execute(OPERATOR_TABLE)
        self._tasks: set[asyncio.Task[Any]] = set()
        server = platform.config.server
        self.sessions = Sessions(platform, base_url=f"http://{server.host}:{server.port}")
        """External runs: agents outside the platform calling through the gateway (:mod:`.sessions`)."""
        self.reversals = Undo(platform)
        """Undoing runs' calls through the gateway (:mod:`.undo`)."""

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

    async def run_calls(self, run_id: str) -> list[dict[str, Any]]:
        """The run's calls and whether each can be undone, or was (``stitchwork runs show``, ``audit reversible``).

        Raises:
            RunError: no such run.
        """
        _, states = await self.reversals.calls(run_id)
        return [self.platform.gateway.redactor.redact(row) for row in describe(states)]

    async def undo(self, run_id: str, *, call: str | None = None, by: str, token: str | None = None
                   ) -> dict[str, Any]:
        """Reverses the run's calls newest first, or one (:meth:`.undo.Undo.undo`); an uncertain call undone is
        resolved: its approval is denied ("undone"), so it is never run again.

        Raises:
            RunError: no such run or call. NothingToUndo: nothing there can be undone.
        """
        report = await self.reversals.undo(run_id, call=call, by=by, token=token)
        for result in report["results"]:
            if result["status"] == "ok" and result.get("uncertain_approval"):
                with contextlib.suppress(ApprovalError):  # decided meanwhile: the human's answer stands
                    await self.decide(result["uncertain_approval"], approve=False, by=by,
                                      note=f"undone (undo event #{result['undo_seq']})")
        redacted: dict[str, Any] = self.platform.gateway.redactor.redact(json_safe(report))
        return redacted

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
        outcome = approval.status.value
        METRICS.approvals_decided.inc(outcome)
        METRICS.approval_latency.observe(max((approval.decided_at or 0) - approval.created_at, 0.0), outcome)
        result: dict[str, Any] = self.platform.gateway.redactor.redact(approval.to_dict())
        if is_undo_approval(approval):
            result["undo"] = await self._decided_undo(approval, by)
        if resume:
            await self.resume_if_ready(approval.run_id)
        return result

    async def _decided_undo(self, approval: ApprovalRecord, by: str) -> dict[str, Any]:
        """Carries out the decision of an undo's approval at once: approved, the undo runs (through the gateway,
        consuming the approval: once, even if asked again meanwhile; the ledger's claim fences another process);
        denied, the attempt is refused and audited, and the call stays as it is (state ``undo_denied``)."""
        reverses = str(approval.arguments.get("reverses"))
        try:
            return await self.undo(approval.run_id, call=reverses, by=by)
        except StitchworkError as exc:  # e.g. undone meanwhile, or the run is gone: the decision stands
            log.warning("approval %s: its undo of call %s of run %s was not carried out: %s", approval.id, reverses,
                        approval.run_id, exc)
            failed: dict[str, Any] = self.platform.gateway.redactor.redact(exc.to_dict())
            await self.platform.audit.aappend(
                "undo", agent=approval.agent, run_id=approval.run_id, tool=approval.tool, decision="error",
                data={"reverses": approval.arguments.get("reverses"), "approval_id": approval.id, "by": by,
                      "error": failed, "not_carried_out": True})
            return failed

    async def finish_decided_undos(self) -> list[str]:
        """Carries out undos approved but not yet run (the platform stopped between the decision and the undo);
        `stitchwork up` calls this at start. Returns the approval ids it acted on."""
        try:
            approved = await asyncio.to_thread(self.platform.approvals.find, ApprovalStatus.APPROVED)
        except StitchworkError as exc:
            log.warning("approved undos: cannot list approvals: %s", exc)
            return []
        done = []
        for approval in approved:
            if is_undo_approval(approval):
                await self._decided_undo(approval, approval.decided_by or "operator")
                done.append(approval.id)
        return done

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

    async def expire_and_resume(self, approval_ids: list[str] | None = None, *, sessions: bool = True) -> list[str]:
        """Expires overdue approvals (expiry means deny) and resumes the runs waiting on them: those of
        ``approval_ids`` that are due, or (``None``) every due one; then, with ``sessions``, expired sessions."""
        approvals = self.platform.approvals
        if approval_ids is None:
            expired = approvals.expire_due()
        else:  # those that came due; one a read already expired on the way (lazily, unaudited) counts too
            expired = approvals.expire(approval_ids)
            expired += [i for i in approval_ids if i not in expired and _expired_by_clock(approvals, i)]
        for approval_id in expired:
            approval = self.platform.approvals.get(approval_id)
            await self.platform.audit.aappend("approval", agent=approval.agent, run_id=approval.run_id,
                                              tool=approval.tool, decision="expired",
                                              data={"approval_id": approval_id})
            await self.resume_if_ready(approval.run_id)
        if sessions:
            await self.sessions.expire_due()
        return expired

    async def expire_on_time(self, timers: Deadlines | None = None) -> None:
        """Expires each approval when its deadline comes (`stitchwork up`): a deadline heap filled with the pending
        approvals found at start and each one created since (woken when one is added), not a periodic listing.
        Approvals created by workers after this started expire through their run's timer job on the bus (see
        :mod:`stitchwork.workers.approvals`) and when next read here. Runs until cancelled."""
        approvals = self.platform.approvals
        timers = Deadlines(clock=approvals.clock) if timers is None else timers

        def created(approval: ApprovalRecord) -> None:
            timers.add(approval.id, approval.expires_at)

        approvals.watch(created)
        try:
            await self._expire_on_time(approvals, timers)
        finally:
            approvals.unwatch(created)

    async def _expire_on_time(self, approvals: Any, timers: Deadlines) -> None:
        try:
            for approval in await asyncio.to_thread(approvals.find, ApprovalStatus.PENDING):
                timers.add(approval.id, approval.expires_at)
        except StitchworkError as exc:  # those expire when next read (and bus ones through their run's timer)
            log.warning("approval expiry: cannot list the pending approvals at start: %s", exc)
        while True:
            due = timers.pop_due()
            if due:
                try:
                    await self.expire_and_resume(due, sessions=False)
                except StitchworkError as exc:  # e.g. the bus is away: try these again shortly
                    log.warning("approval expiry: %s; trying again", exc)
                    for approval_id in due:
                        timers.add(approval_id, timers.clock() + 5.0)
            await timers.wait()

    async def bound_bus_streams(self) -> list[str]:
        """Applies ``[messaging.limits]`` to the bus's streams (`stitchwork up`, at start); returns the kinds the
        bus could not limit (logged). Nothing to do without a bus of durable runs."""
        from stitchwork.messaging._base import open_bus
        from stitchwork.workers.events import EventHub
        from stitchwork.workers.limits import apply_stream_limits
        from stitchwork.workers.subjects import Subjects

        hub = self.platform.events
        if not isinstance(hub, EventHub):
            return []
        own = hub.memory is None
        bus = await open_bus(hub.uri) if own else await hub.bus()
        try:
            config = self.platform.config.messaging
            return await apply_stream_limits(bus, Subjects(config.subject_prefix), config.limits)
        finally:
            if own:
                await bus.aclose()

    async def ingest_fleet_audit(self, stop: asyncio.Event | None = None, *, retry_s: float = 2.0) -> None:
        """Appends every worker's audit events to this platform's chain until ``stop`` is set (``stitchwork up``;
        see :mod:`stitchwork.workers.auditfeed`). A bus that is away is tried again; nothing is lost meanwhile."""
        from stitchwork.workers.auditfeed import AuditIngester
        from stitchwork.workers.events import EventHub
        from stitchwork.workers.subjects import Subjects

        hub = self.platform.events
        if not isinstance(hub, EventHub) or not self.platform.config.messaging.fleet_audit:
            return
        from stitchwork.messaging._base import open_bus

        while True:
            try:
                # Its own connection (closed here, in this event loop); a memory:// bus is the hub's own object.
                own = hub.memory is None
                bus = await open_bus(hub.uri) if own else await hub.bus()
                try:
                    ingester = AuditIngester(self.platform.audit, bus,
                                             Subjects(self.platform.config.messaging.subject_prefix))
                    await ingester.run(stop)
                    return
                finally:
                    if own:
                        await bus.aclose()
            except StitchworkError as exc:
                log.warning("fleet audit: %s; trying again in %.0f s", exc, retry_s)
                if stop is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), retry_s)
                    if stop.is_set():
                        return
                else:
                    await asyncio.sleep(retry_s)

    # audit --------------------------------------------------------------------------------------------------
    def audit_tail(self, n: int = 20) -> list[dict[str, Any]]:
        return [event_dict(e) for e in self.platform.audit.tail(n)]

    def audit_query(self, sql: str) -> list[dict[str, Any]]:
        """One read-only SELECT over :data:`AUDIT_QUERY_TABLES` (see ``Store.query_readonly``), secrets redacted.

        Raises:
            QueryRefused: The query could write, reach outside those tables, returned too many rows or ran too long.
        """
        self.platform.audit.flush()
        data = self.platform.config.data
        rows = self.platform.store.query_readonly(sql, tables=AUDIT_QUERY_TABLES,
                                                  max_rows=max(data.audit_query_max_rows, 1),
                                                  timeout_s=max(data.audit_query_timeout_s, 0.01))
        redact = self.platform.gateway.redactor.redact
        return [json_safe(redact(r)) for r in rows]

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
