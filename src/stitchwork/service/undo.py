"""Undoing a run's calls: which calls can be reversed, which were, and running the compensations newest first.

What a call's reversal looks like is recorded when it runs: its ``tool`` audit event names the undo tool
(``undo``) and the undo call (``undo_call``: tool and arguments, from the manifest's ``[undo]`` mapping), or why
there is none (``undo_error``). An undo is one call through the gateway's undo door
(:mod:`stitchwork.gateway.undo`) and ends with an ``undo`` audit event whose ``reverses`` is the reversed call's
event. This module reads those events (the one audit trail, workers' runs included) to answer:

==================  =================================================================================================
state               meaning
==================  =================================================================================================
``undoable``        the call ran and declares an undo; not undone yet
``undo_failed``     the last undo of it failed, was denied or refused: still undoable (the attempt is reported)
``undo_waiting``    its undo waits for a human's approval (``stitchwork approvals``); approving it runs the undo
``undo_denied``     a human denied (or let expire) the approval of its undo: the call stays as it is
``undone``          an undo of it succeeded; it is never undone again
``uncertain``       the call may or may not have happened (its worker died); undoing it resolves it
``not_undoable``    no undo declared, its mapping found no value, or the call did not succeed (``reason`` says)
==================  =================================================================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stitchwork.agents.runs import RunRecord, record_from_row
from stitchwork.audit.records import AuditEvent
from stitchwork.errors import NothingToUndo, RunError, StitchworkError
from stitchwork.gateway.context import RunContext
from stitchwork.gateway.idempotency import IdempotencyLedger, is_started
from stitchwork.gateway.uncertain import UNCERTAIN_POLICY
from stitchwork.gateway.undo import Reversal
from stitchwork.messaging.bridge import SyncBus
from stitchwork.platform import Platform
from stitchwork.security.approvals import Approval, ApprovalStatus
from stitchwork.security.taint import ProvenanceTracker
from stitchwork.tools.manifest import undo_call
from stitchwork.workers.approvals import FederatedApprovals
from stitchwork.workers.events import EventHub
from stitchwork.workers.ledger import BusLedger
from stitchwork.workers.subjects import Subjects

UNDOABLE = frozenset({"undoable", "undo_failed", "undo_waiting", "undo_denied", "uncertain"})
"""The states in which ``stitchwork undo`` reverses a call (a denied one is refused again, and stops the older)."""


def is_undo_approval(approval: Approval) -> bool:
    """Whether an approval holds an undo (deciding it carries the undo out: :meth:`Service.decide`)."""
    return approval.arguments.get("undo") is True and isinstance(approval.arguments.get("reverses"), int)


@dataclass
class CallState:
    """One call of a run as far as undoing goes (a row of ``stitchwork runs show`` and ``audit reversible``)."""

    seq: int
    call: str
    tool: str
    side_effect: str
    state: str
    undo_tool: str = ""
    undo_args: dict[str, Any] | None = None
    reason: str = ""
    attempts: int = 0
    """Undos of it that did not succeed (refused, failed or waiting)."""
    key_index: int = 0
    """Undos of it that ran the undo tool and failed: the next attempt's ledger key (:class:`Reversal`)."""
    undo_seq: int = 0
    """The ``undo`` event of the last attempt (0: none)."""
    approval_id: str = ""
    """The approval the last attempt waits for, or the uncertain call's own."""
    held_by: str = ""
    """An uncertain call's own approval (denied with the note "undone" once an undo of it succeeds)."""
    last_error: dict[str, Any] | None = None
    key: str = field(default="", repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "call": self.call, "tool": self.tool, "side_effect": self.side_effect,
                "state": self.state, "undo_tool": self.undo_tool, "undo_args": self.undo_args, "reason": self.reason,
                "attempts": self.attempts, "undo_seq": self.undo_seq, "approval_id": self.approval_id,
                "last_error": self.last_error}


def _call_id(run_id: str, key: str, seq: int) -> str:
    prefix = f"{run_id}:"
    return key[len(prefix):] if key.startswith(prefix) else (key or str(seq))


class Undo:
    """Lists and reverses a run's calls (shared by the CLI and the HTTP API through :class:`~stitchwork.service.
    Service`)."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    # -- reading -----------------------------------------------------------------------------------------------

    def _record(self, run_id: str) -> RunRecord | None:
        """The platform's own run, or else a durable run's newest checkpoint on the fleet's bus."""
        try:
            found = self.platform.runs.fetch(run_id)
        except StitchworkError:
            found = None
        if found is not None:
            return found
        fleet = self._fleet(run_id)
        return fleet[1] if fleet is not None else None

    def _fleet(self, run_id: str) -> tuple[IdempotencyLedger, RunRecord | None] | None:
        """For a run driven by workers on the bus (not in the platform's own run store): the bus ledger where its
        calls' records are (and where its undos record theirs: the bus's compare-and-set fences other undoers),
        and its checkpoint if the bus still keeps it. ``None`` for the platform's own runs, or without a bus."""
        try:
            if self.platform.runs.fetch(run_id) is not None:
                return None
        except StitchworkError:
            pass
        bus = fleet_bus(self.platform)
        if bus is None:
            return None
        sync, subjects = bus
        kept = self.platform.config.messaging.limits.idempotency.max_age_s
        try:
            found = sync.last(subjects.state(run_id))
            record = record_from_row(json.loads(found.data)) if found is not None else None
        except (StitchworkError, ValueError, KeyError, TypeError):
            record = None
        return BusLedger(sync, subjects, ttl_s=kept), record

    def _ledger(self, run_id: str) -> IdempotencyLedger | None:
        fleet = self._fleet(run_id)
        return fleet[0] if fleet is not None else self.platform.gateway.context.idempotency

    async def calls(self, run_id: str) -> tuple[str, list[CallState]]:
        """The run's agent and its calls, oldest first.

        Raises:
            RunError: no run has this id (no checkpoint and no audit event).
        """
        events = self.platform.audit.for_run(run_id, ("tool", "undo"))
        record = self._record(run_id)
        if record is None and not events and not self.platform.audit.for_run(run_id):
            raise RunError(f"no run with id {run_id!r}")
        agent = record.agent if record is not None else next((e.agent for e in events), "")
        states = _states(run_id, events)
        states += await self._uncertain(run_id, {s.seq for s in states}, events)
        states += _undone_elsewhere({s.seq for s in states}, events)
        states.sort(key=lambda s: s.seq)
        self._decided(states)
        return agent or _agent_of(self.platform.audit.for_run(run_id)), states

    def _decided(self, states: list[CallState]) -> None:
        """An undo waiting for an approval that a human denied (or that expired) is ``undo_denied``."""
        for state in states:
            if state.state != "undo_waiting" or not state.approval_id:
                continue
            try:
                approval = self.platform.approvals.get(state.approval_id)
            except StitchworkError:
                continue
            if approval.status in (ApprovalStatus.DENIED, ApprovalStatus.EXPIRED):
                _denied(state, approval.id, f"{approval.status.value} by {approval.decided_by or 'the clock'}")

    async def _uncertain(self, run_id: str, known: set[int], events: Sequence[AuditEvent]) -> list[CallState]:
        """Calls held for a human as uncertain (their worker died while they ran): undoable from their arguments."""
        ledger = self._ledger(run_id)
        fleet = self.platform.audit.for_run(run_id, ("decision",)) if self._fleet(run_id) is not None else []
        out: list[CallState] = []
        for approval in self.platform.approvals.find(ApprovalStatus.PENDING):
            if approval.run_id != run_id or UNCERTAIN_POLICY not in approval.policy_ids:
                continue
            held = approval.arguments
            key = str(held.get("idempotency_key") or "")
            started = await ledger.aget(run_id, key) if ledger is not None and key else None
            if not is_started(started) or started is None:
                continue
            seq = int(started.get("decision_seq") or 0)
            if fleet:  # a worker's decision_seq counts in its own chain: the platform's copy of that event
                seq = _platform_seq(fleet, seq, approval.tool)
            if seq in known or not seq:
                continue
            state = CallState(seq, _call_id(run_id, key, seq), approval.tool, str(started.get("side_effect", "")),
                              "uncertain", approval_id=approval.id, held_by=approval.id, key=key)
            tools = self.platform.gateway.tools
            manifest = tools.get(approval.tool) if approval.tool in tools else None
            if manifest is None or not manifest.undo:
                state.state, state.reason = "not_undoable", "its manifest declares no undo"
            else:
                state.undo_tool = manifest.undo
                from_result = [f"undo.args.{n} = {v!r}" for n, v in manifest.undo_args.items()
                               if isinstance(v, str) and v.startswith("result")]
                args, error = undo_call(manifest, held.get("arguments") or {}, None)
                if from_result or args is None:
                    state.state = "not_undoable"
                    state.reason = (f"its result is unknown (the call is uncertain): "
                                    f"{from_result[0] + ' needs it' if from_result else error}")
                else:
                    state.undo_args = args
            _apply_attempts(state, [e for e in events if e.kind == "undo" and e.data.get("reverses") == seq])
            out.append(state)
        return out

    # -- undoing -----------------------------------------------------------------------------------------------

    async def undo(self, run_id: str, *, call: str | None = None, by: str, token: str | None = None
                   ) -> dict[str, Any]:
        """Reverses the run's undoable calls newest first (or only ``call``), stopping at the first that does not
        succeed (it failed, was denied, or waits for a human).

        Args:
            run_id: The run.
            call: A call id (the run loop's tool-call id), its idempotency key, or its event's sequence number.
            by: Who asks (recorded in every event).
            token: The run token when the run's agent asks.

        Returns:
            ``{"run_id", "results": [...], "undone", "failed", "waiting"}``: one result per call tried or already
            undone, newest first (``status``: ``ok``, ``already_undone``, ``error``, ``denied``, ``invalid``,
            ``approval_required``, ``unauthenticated``, ``not_attempted``).

        Raises:
            RunError: no such run, or ``call`` is not one of its calls.
            NothingToUndo: nothing in the run (or ``call``) can be undone.
        """
        door = self.platform.gateway.undo_door
        async with door.lock(run_id):
            agent, states = await self.calls(run_id)
            chosen = _choose(run_id, states, call)
            todo = [s for s in chosen if s.state in UNDOABLE]
            done = [s for s in chosen if s.state == "undone"]
            if not todo and not done:
                raise NothingToUndo(_nothing(run_id, chosen, call))
            run = self._run(run_id, agent)
            ledger = self._ledger(run_id)
            results: list[dict[str, Any]] = []
            stopped = False
            for state in sorted(todo + done, key=lambda s: s.seq, reverse=True):
                base = {"call": state.call, "seq": state.seq, "tool": state.tool, "undo_tool": state.undo_tool}
                if state.state == "undone":
                    results.append({**base, "status": "already_undone", "undo_seq": state.undo_seq})
                    continue
                if stopped:
                    results.append({**base, "status": "not_attempted"})
                    continue
                item = Reversal(state.seq, state.call, state.tool, state.side_effect, state.undo_tool,
                                dict(state.undo_args or {}), attempt=state.key_index)
                outcome = await door.undo(run, item, by=by, token=token, ledger=ledger)
                results.append({**base, "status": outcome.status, "undo_seq": outcome.audit_seq,
                                "result": outcome.content, "error": outcome.error,
                                "approval_id": outcome.approval_id or None,
                                "uncertain_approval": state.held_by or None})
                stopped = outcome.status != "ok"
        statuses = [r["status"] for r in results]
        return {"run_id": run_id, "results": results, "undone": statuses.count("ok"),
                "already_undone": statuses.count("already_undone"),
                "failed": sum(s in {"error", "denied", "invalid", "unauthenticated"} for s in statuses),
                "waiting": statuses.count("approval_required")}

    def _run(self, run_id: str, agent: str) -> RunContext:
        """The live run, or one rebuilt from its checkpoint (its provenance: undo arguments are taint-checked)."""
        context = self.platform.gateway.context
        live = context.live_run(run_id)
        if live is not None:
            return live
        record = self._record(run_id)
        trusted = context.trusted_sources
        tracker = (ProvenanceTracker.restore(record.provenance, trusted_sources=trusted)
                   if record is not None and record.provenance else ProvenanceTracker(trusted_sources=trusted))
        try:
            max_steps = self.platform.agents.get(agent).max_steps
        except StitchworkError:
            max_steps = 0
        workdir = self.platform.runner.state_dir / "runs" / run_id
        workdir.mkdir(parents=True, exist_ok=True)
        return RunContext(run_id, agent, workdir, tracker, max_steps=max_steps,
                          steps=record.steps if record is not None else 0)


def _platform_seq(decisions: Sequence[AuditEvent], seq: int, tool: str) -> int:
    """The platform's sequence number of a worker's decision event ``seq`` (forwarded with ``data.origin``), or
    ``seq`` itself if the platform has not ingested it yet."""
    for event in decisions:
        origin = event.data.get("origin")
        if event.tool == tool and isinstance(origin, Mapping) and origin.get("seq") == seq:
            return event.seq
    return seq


def fleet_bus(platform: Platform) -> tuple[SyncBus, Subjects] | None:
    """The bus of the platform's durable runs (workers'), if it has one: the server's event hub, or the bus a
    local platform reads approvals from."""
    events = platform.events
    if isinstance(events, EventHub):
        return events.sync, events.subjects
    approvals = platform.approvals
    if isinstance(approvals, FederatedApprovals):
        return approvals.remote.bus, approvals.remote.subjects
    return None


def recorded_states(platform: Platform, run_id: str) -> list[CallState]:
    """The run's executed calls and their undo states from the audit log alone (the dashboard's run page; without
    the uncertain calls pending a human, which :meth:`Undo.calls` adds)."""
    events = platform.audit.for_run(run_id, ("tool", "undo"))
    states = _states(run_id, events)
    states += _undone_elsewhere({s.seq for s in states}, events)
    return sorted(states, key=lambda s: s.seq)


def _agent_of(events: Sequence[AuditEvent]) -> str:
    return next((e.agent for e in events if e.agent), "")


def _states(run_id: str, events: Sequence[AuditEvent]) -> list[CallState]:
    """The state of each executed call of the run, from its ``tool`` event and the ``undo`` events after it."""
    undos: dict[int, list[AuditEvent]] = {}
    for event in events:
        if event.kind == "undo" and isinstance(event.data.get("reverses"), int):
            undos.setdefault(event.data["reverses"], []).append(event)
    out: list[CallState] = []
    for event in events:
        data = event.data
        if event.kind != "tool" or "reverses" in data or event.decision not in ("ok", "error"):
            continue
        key = str(data.get("idempotency_key") or "")
        state = CallState(event.seq, _call_id(run_id, key, event.seq), event.tool, str(data.get("side_effect", "")),
                          "undoable", undo_tool=str(data.get("undo") or ""), key=key)
        planned = data.get("undo_call")
        if event.decision != "ok":
            state.state, state.reason = "not_undoable", "the call failed"
        elif not state.undo_tool:
            state.state = "not_undoable"
            state.reason = ("a read changes nothing" if state.side_effect == "read"
                            else "its manifest declares no undo")
        elif not isinstance(planned, Mapping):
            state.state = "not_undoable"
            state.reason = str(data.get("undo_error") or "no undo call was recorded")
        else:
            state.undo_args = dict(planned.get("args") or {})
        if state.state == "undoable":
            _apply_attempts(state, undos.get(event.seq, []))
        out.append(state)
    return out


def _undone_elsewhere(known: set[int], events: Sequence[AuditEvent]) -> list[CallState]:
    """Calls undone that have no ``tool`` event of their own: uncertain calls resolved by undoing them."""
    out: dict[int, CallState] = {}
    for event in events:
        seq = event.data.get("reverses")
        if event.kind != "undo" or event.decision != "ok" or not isinstance(seq, int) or seq in known or seq in out:
            continue
        out[seq] = CallState(seq, str(event.data.get("call") or seq), str(event.data.get("reverses_tool") or ""),
                             "", "undone", undo_tool=str(event.data.get("undo_tool") or ""), undo_seq=event.seq,
                             reason="an uncertain call, resolved by undoing it")
    return list(out.values())


def _apply_attempts(state: CallState, attempts: Sequence[AuditEvent]) -> None:
    """The state after the undo attempts recorded for the call (oldest first)."""
    if not attempts:
        return
    last = attempts[-1]
    state.undo_seq = last.seq
    if any(a.decision == "ok" for a in attempts):
        state.state = "undone"
        state.undo_seq = next(a.seq for a in attempts if a.decision == "ok")
        return
    state.attempts = len(attempts)
    state.key_index = sum(1 for a in attempts if a.data.get("key_used") is True)
    error = last.data.get("error")
    state.last_error = error if isinstance(error, dict) else None
    if last.decision == "approval_required":
        state.state, state.approval_id = "undo_waiting", str(last.data.get("approval_id") or "")
    elif last.decision == "denied" and (human := _human_denial(state.last_error)):
        _denied(state, human, "denied")
    else:
        state.state = "undo_failed"


def _human_denial(error: Mapping[str, Any] | None) -> str:
    """The approval a refused undo names in its policy ids (``approval:<id>``: a human said no), or ""."""
    ids = (error or {}).get("policy_ids") or ()
    return next((str(p)[len("approval:"):] for p in ids if str(p).startswith("approval:")), "")


def _denied(state: CallState, approval_id: str, how: str) -> None:
    state.state, state.approval_id = "undo_denied", approval_id
    state.reason = f"its undo's approval {approval_id} was {how}: the call stays as it is"


def _choose(run_id: str, states: list[CallState], call: str | None) -> list[CallState]:
    if call is None:
        return states
    wanted = str(call).strip()
    for state in states:
        if wanted in (state.call, str(state.seq), state.key):
            return [state]
    raise RunError(f"run {run_id} has no call {wanted!r}; its calls: "
                   f"{', '.join(s.call for s in states) or 'none'}")


def _nothing(run_id: str, chosen: list[CallState], call: str | None) -> str:
    if call is not None and chosen:
        state = chosen[0]
        return f"call {state.call} ({state.tool}) of run {run_id} cannot be undone: {state.reason}"
    if not chosen:
        return f"run {run_id} made no tool calls: nothing to undo"
    reasons = "; ".join(f"{s.call} ({s.tool}): {s.reason}" for s in chosen[-10:])
    return f"run {run_id} has no call that can be undone: {reasons}"


def describe(states: Sequence[CallState]) -> list[dict[str, Any]]:
    """The rows of ``runs show`` and ``audit reversible`` (JSON-safe)."""
    return [json.loads(json.dumps(s.to_dict(), default=str)) for s in states]


__all__ = ["UNDOABLE", "CallState", "Undo", "describe", "recorded_states"]
