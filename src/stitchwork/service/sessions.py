"""External runs ("sessions"): an operator opens a run for an agent and a task, and an agent that runs elsewhere
(LangGraph, the OpenAI Agents SDK, any MCP client) calls tools and models through the gateway with its run token.

A session is an ordinary run (a ``runs`` row whose model is ``external``) plus a ``sessions`` row: its expiry, the
id of its current token and when it was closed. The task is recorded as trusted (user) content in the run's
provenance; everything tools return is labelled by the gateway as for built-in runs, so taint, approvals, budgets
and audit are the same. After tool calls the run's steps and provenance are checkpointed (one write per session
within ``flush_s``, holding only the provenance added since the last one, and at once on close and shutdown:
:attr:`RunContext.checkpoint <stitchwork.gateway.context.RunContext.checkpoint>`), and a session that is not live
in this process (after ``stitchwork up`` restarts) is restored from them on its next call
(:attr:`GatewayContext.run_loader <stitchwork.gateway.context.GatewayContext.run_loader>`).

Tokens are the platform's short-lived run tokens (JWT-SVIDs) for that agent and run, living as long as the session:
:meth:`Sessions.renew` issues a new one (the previous one is revoked) and extends the expiry; :meth:`Sessions.close`
revokes the run, so every token of it is refused from then on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from stitchwork.agents.runs import THROUGH, RunRecord, RunStatus
from stitchwork.errors import ConfigError, RunError, StitchworkError
from stitchwork.gateway.context import RunContext, ToolOutcome
from stitchwork.platform import Platform
from stitchwork.security.taint import Label
from stitchwork.workers.events import EventHub

log = logging.getLogger(__name__)

EXTERNAL_MODEL = "external"
"""The ``model`` of a session's run record: the agent's model calls come through the model door from outside."""

SESSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS sessions (
    run_id VARCHAR PRIMARY KEY,
    agent VARCHAR NOT NULL,
    created_at DOUBLE NOT NULL,
    expires_at DOUBLE NOT NULL,
    jti VARCHAR NOT NULL,
    closed_at DOUBLE,
    closed_by VARCHAR
)
"""

DEFAULT_TTL_S = 3600


@dataclass(frozen=True)
class SessionInfo:
    """What an operator hands the external agent: its run, its token and where to call."""

    run_id: str
    agent: str
    token: str
    expires_at: float
    mcp_url: str = ""
    openai_base_url: str = ""

    def at(self, base_url: str) -> SessionInfo:
        """The same session with its URLs under ``base_url`` (the control plane as the caller reached it)."""
        base = base_url.rstrip("/")
        return replace(self, mcp_url=f"{base}/mcp", openai_base_url=f"{base}/v1")

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "agent": self.agent, "token": self.token, "mcp_url": self.mcp_url,
                "openai_base_url": self.openai_base_url, "expires_at": self.expires_at}


class Sessions:
    """Opens, renews, closes and restores sessions of one platform.

    Args:
        platform: The open platform (its store keeps the ``sessions`` table; its gateway gets the run loader).
        base_url: The control plane's URL, for the ``mcp_url`` and ``openai_base_url`` handed out (``""``: none).
        flush_s: How long a session's checkpoint may lag its last tool call (calls within it share one write).
            A crash of the process within that window loses those calls' provenance; the calls are audited.
    """

    def __init__(self, platform: Platform, *, base_url: str = "", flush_s: float = 0.05) -> None:
        self.platform = platform
        self.base_url = base_url.rstrip("/")
        platform.store.execute(SESSIONS_TABLE)
        platform.gateway.context.run_loader = self.load_run
        self.flush_s = flush_s
        self._records: dict[str, RunRecord] = {}
        self._marks: dict[str, tuple[int, int, int]] = {}  # where each live run's last checkpoint ended
        self._dirty: dict[str, RunContext] = {}
        self._flush_lock = threading.Lock()  # checkpoints are taken and written in order
        self._flusher: asyncio.Task[None] | None = None
        platform._closers = (self.flush, *platform._closers)  # the last checkpoints before the store closes

    # -- operator operations ------------------------------------------------------------------------------------

    async def open(self, agent: str, task: str, *, ttl_s: int | None = None, by: str = "operator") -> SessionInfo:
        """Opens a session: a run of ``agent`` on ``task`` and a token for it.

        Raises:
            UnknownAgent: no such agent.
            RunError: the task is empty.
            ConfigError: ``ttl_s`` is not between 1 and the token service's longest lifetime.
        """
        platform = self.platform
        spec = platform.agents.get(agent)
        if not isinstance(task, str) or not task.strip():
            raise RunError("a session needs a non-empty task")
        lifetime = self._lifetime(ttl_s)
        record = platform.runs.create(spec.name, task, EXTERNAL_MODEL)
        record = platform.runs.save(replace(record, messages=({"role": "user", "content": task},)))
        run = self._live(record)
        run.tracker.add(task, Label("user", True))
        record = platform.runs.save(replace(record, provenance=run.tracker.snapshot()))
        self._records[record.id] = record
        self._marks[record.id] = run.tracker.marks()
        token = platform.tokens.issue(spec.name, record.id, ttl_s=lifetime)
        claims = platform.tokens.verify(token, audience=platform.gateway.context.audience)
        now = time.time()
        platform.store.append("sessions", [{
            "run_id": record.id, "agent": spec.name, "created_at": now, "expires_at": claims.exp, "jti": claims.jti,
            "closed_at": None, "closed_by": None,
        }])
        self._emit(record, "session", {"state": "opened", "expires_at": claims.exp})
        await platform.audit.aappend("session", agent=spec.name, run_id=record.id, decision="opened",
                                     data={"by": by, "expires_at": claims.exp, "jti": claims.jti,
                                           "task_chars": len(task)})
        return self._info(record.id, spec.name, token, claims.exp)

    async def renew(self, run_id: str, *, ttl_s: int | None = None, by: str = "operator") -> SessionInfo:
        """A new token for an open session, valid ``ttl_s`` from now; the previous token is revoked.

        Raises:
            RunError: no open session has this id (never opened, closed, or expired).
        """
        row = self._open_row(run_id)
        lifetime = self._lifetime(ttl_s)
        tokens = self.platform.tokens
        token = tokens.issue(row["agent"], run_id, ttl_s=lifetime)
        claims = tokens.verify(token, audience=self.platform.gateway.context.audience)
        tokens.revoke(row["jti"], reason="session renewed")
        self.platform.store.execute("UPDATE sessions SET expires_at = ?, jti = ? WHERE run_id = ?",
                                    [claims.exp, claims.jti, run_id])
        await self.platform.audit.aappend("session", agent=row["agent"], run_id=run_id, decision="renewed",
                                          data={"by": by, "expires_at": claims.exp, "jti": claims.jti,
                                                "revoked_jti": row["jti"]})
        return self._info(run_id, row["agent"], token, claims.exp)

    async def close(self, run_id: str, *, by: str = "operator", reason: str = "closed") -> dict[str, Any]:
        """Closes a session: its run is revoked (every token refused) and finished as completed.

        Raises:
            RunError: no session has this id, or it is already closed.
        """
        row = self._row(run_id)
        if row is None:
            raise RunError(f"no session with run id {run_id!r}")
        if row["closed_at"] is not None:
            raise RunError(f"session {run_id} is already closed")
        platform = self.platform
        self.flush()
        platform.tokens.revoke_run(run_id, reason=f"session {reason}")
        now = time.time()
        platform.store.execute("UPDATE sessions SET closed_at = ?, closed_by = ? WHERE run_id = ?", [now, by, run_id])
        run = platform.gateway.context.runs.get(run_id)
        record = platform.runs.get(run_id)  # its incremental checkpoints merged in (and named by THROUGH)
        provenance = record.provenance
        if run is not None:  # the live tracker holds everything they hold, and what a failed checkpoint missed
            folded = {THROUGH: provenance[THROUGH]} if THROUGH in provenance else {}
            provenance = {**run.tracker.snapshot(), **folded}
        final = replace(record, status=RunStatus.COMPLETED, result=f"session {reason}",
                        steps=run.steps if run else record.steps, provenance=provenance)
        final = platform.runs.save(final)  # one full checkpoint: the incremental ones are folded in
        self._records.pop(run_id, None)
        self._marks.pop(run_id, None)
        platform.gateway.close_run(run_id)
        self._emit(final, "finished", {"status": final.status.value, "session": reason})
        await platform.audit.aappend("session", agent=row["agent"], run_id=run_id, decision=reason,
                                     data={"by": by, "steps": final.steps})
        return self.describe(run_id)

    def describe(self, run_id: str) -> dict[str, Any]:
        """The session's state (never its token)."""
        row = self._row(run_id)
        if row is None:
            raise RunError(f"no session with run id {run_id!r}")
        record = self.platform.runs.fetch(run_id)
        return {
            "run_id": run_id, "agent": row["agent"], "created_at": row["created_at"], "expires_at": row["expires_at"],
            "closed_at": row["closed_at"], "closed_by": row["closed_by"], "state": self._state(row),
            "steps": record.steps if record else 0, "status": record.status.value if record else "unknown",
        }

    def find(self, *, include_closed: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        """Sessions, newest first (open and expired ones; closed too with ``include_closed``)."""
        where = "" if include_closed else "WHERE closed_at IS NULL"
        rows = self.platform.store.query(f"SELECT run_id FROM sessions {where} ORDER BY created_at DESC LIMIT ?",
                                         [limit])
        return [self.describe(r["run_id"]) for r in rows]

    async def expire_due(self) -> list[str]:
        """Closes sessions whose token expired (reason ``expired``); returns their run ids."""
        rows = self.platform.store.query("SELECT run_id FROM sessions WHERE closed_at IS NULL AND expires_at < ?",
                                         [time.time() - self.platform.tokens.leeway_s])
        done: list[str] = []
        for row in rows:
            try:
                await self.close(row["run_id"], by="platform", reason="expired")
            except StitchworkError:
                continue
            done.append(row["run_id"])
        return done

    # -- the gateway's hooks ---------------------------------------------------------------------------------

    def load_run(self, run_id: str) -> RunContext | None:
        """The gateway's run loader: an open, unexpired session's run, restored from its checkpoint."""
        row = self._row(run_id)
        if row is None or row["closed_at"] is not None or row["expires_at"] < time.time():
            return None
        record = self.platform.runs.fetch(run_id)
        if record is None or record.status.finished:
            return None
        return self._live(record)

    async def checkpoint(self, run: RunContext, outcome: ToolOutcome | None = None) -> None:
        """After a tool call: publishes its ``tool`` run event and schedules the run's checkpoint (steps and
        provenance), written within ``flush_s`` together with every other call made meanwhile (one write per
        session, not one per call). :meth:`close` and the platform's shutdown write it at once."""
        record = self._records.get(run.run_id)
        if record is None:
            return
        self._dirty[run.run_id] = run
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())
        if outcome is not None:
            self._emit(replace(record, steps=run.steps), "tool", {
                "call": outcome.tool, "status": outcome.status, "policy_ids": list(outcome.policy_ids),
                "approval_id": outcome.approval_id or None})

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.flush_s)
        await asyncio.to_thread(self.flush)  # the store serialises its connection; the loop keeps serving

    def flush(self) -> None:
        """Writes the pending checkpoints now (a failure is logged: the calls themselves are audited, and the next
        checkpoint of that session carries what this one missed).

        Each is incremental: the step count and only the provenance added since the session's last checkpoint
        (:meth:`RunStore.checkpoint <stitchwork.agents.runs.RunStore.checkpoint>`), so its cost does not grow
        with the session."""
        with self._flush_lock:
            dirty, self._dirty = self._dirty, {}
            for run_id, run in dirty.items():
                marks = self._marks.get(run_id)
                if marks is None or run_id not in self._records:
                    continue
                delta, after = run.tracker.snapshot_since(marks)
                try:
                    self.platform.runs.checkpoint(run_id, run.steps, delta)
                except StitchworkError as exc:
                    log.error("session %s: checkpoint failed: %s", run_id, exc)
                    continue
                self._marks[run_id] = after

    def _emit(self, record: RunRecord, kind: str, data: dict[str, Any]) -> None:
        events = self.platform.events
        if isinstance(events, EventHub):
            events.on_event(record, kind, data)

    # -- helpers ------------------------------------------------------------------------------------------------

    def _live(self, record: RunRecord) -> RunContext:
        spec = self.platform.agents.get(record.agent)
        run = self.platform.gateway.open_run(
            record.id, record.agent, workdir=self.platform.config.state_dir / "runs" / record.id,
            max_steps=spec.max_steps, provenance=record.provenance or None,
        )
        run.steps = record.steps
        run.checkpoint = self.checkpoint
        self._records[record.id] = record
        self._marks[record.id] = run.tracker.marks()  # what was restored is stored already
        return run

    def _lifetime(self, ttl_s: int | None) -> int:
        longest = self.platform.tokens.max_ttl_s
        lifetime = min(DEFAULT_TTL_S, longest) if ttl_s is None else ttl_s
        if isinstance(lifetime, bool) or not isinstance(lifetime, int) or not 0 < lifetime <= longest:
            raise ConfigError(f"a session's ttl must be between 1 and {longest} seconds, got {ttl_s!r}")
        return lifetime

    def _row(self, run_id: str) -> dict[str, Any] | None:
        rows = self.platform.store.query("SELECT * FROM sessions WHERE run_id = ?", [run_id])
        return dict(rows[0]) if rows else None

    def _open_row(self, run_id: str) -> dict[str, Any]:
        row = self._row(run_id)
        if row is None:
            raise RunError(f"no session with run id {run_id!r}")
        state = self._state(row)
        if state != "open":
            raise RunError(f"session {run_id} is {state}; open a new session")
        return row

    @staticmethod
    def _state(row: dict[str, Any]) -> str:
        if row["closed_at"] is not None:
            return "closed"
        return "expired" if row["expires_at"] < time.time() else "open"

    def _info(self, run_id: str, agent: str, token: str, expires_at: float) -> SessionInfo:
        base = self.base_url
        return SessionInfo(run_id, agent, token, expires_at, mcp_url=f"{base}/mcp" if base else "",
                           openai_base_url=f"{base}/v1" if base else "")


__all__ = ["EXTERNAL_MODEL", "SessionInfo", "Sessions"]
