"""The undo door: a compensation (the undo call a manifest declares) through the gateway's stages.

``stitchwork undo RUN`` and ``POST /v1/runs/{id}/undo`` reverse a run's calls newest first
(:mod:`stitchwork.service.undo` picks them); each undo call comes here and takes the tool path:

    identity → validate → taint → authorize (Cedar: action ``undo``, then the undo tool's own action)
    → approve → (intent in the ledger) → secrets → execute → label → audit

* **Identity.** The run's agent is the principal. An agent asks with its run token (verified, for this run); an
  operator's request (the CLI, the operator API) is made in the agent's name and the operator is recorded (``by``).
* **Policy.** Two decisions, the stricter wins: the action ``Stitchwork::Action::"undo"`` (a ``write`` action;
  resource: the *original* tool's name; ``context.args``: ``tool`` (the undo tool), ``reverses`` (the original
  tool), ``reverses_side_effect``, ``by``) and the undo tool's own action with the undo call's arguments, as if
  the agent had called it. The undo's arguments carry no taint: they are not the agent's choice but the manifest's
  mapping of the recorded call (whose own taint was decided when it ran) and of its result.
* **Approval.** An ``ask`` holds the undo for a human (the approval's arguments are the undo call's, with
  ``reverses``); deciding it asks again here (:meth:`stitchwork.service.Service.decide`): approved, the approval
  is consumed (once) and the undo runs; denied, it is refused.
* **Once.** The intent is durable before the tool runs (a *started* record under ``undo:<seq>:<attempt>`` in the
  idempotency ledger: the bus's compare-and-set or the store's unique claim, so of two undoers exactly one runs it)
  and the outcome replaces it; a call already undone is not undone again. An undo found started and still running
  (here, or in a live process on this host) is answered ``undo_in_progress``; one whose process died is not re-run
  blindly: it is held for a human like an uncertain call. The ledger is the gateway's, or the bus's for a run
  driven by workers (``ledger=``).
* **Audit.** The decision and the tool's events carry ``reverses`` (the reversed call's ``tool`` event sequence
  number) and ``call``; every attempt ends with one ``undo`` event (decision: the outcome's status) that says
  which call it reversed. :mod:`stitchwork.service.undo` reads these to know what was undone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from stitchwork.errors import AuthError, BusConflict, StitchworkError
from stitchwork.gateway.context import RunContext, ToolOutcome
from stitchwork.gateway.idempotency import STARTED, IdempotencyLedger, is_started
from stitchwork.gateway.stages import Checked, Gate, Resolved, policy_context, refusal, untainted
from stitchwork.gateway.tools import ToolDoor
from stitchwork.gateway.uncertain import evidence_text
from stitchwork.security.identity.tokens import TokenClaims
from stitchwork.security.policy import Decision, Effect, ToolAction
from stitchwork.security.taint import ProvenanceTracker

UNDO_ACTION = "undo"
"""The Cedar action every undo call is authorized as (besides the undo tool's own action)."""

UNDO_TOOL_ACTION = ToolAction(UNDO_ACTION, "write", {
    "type": "object",
    "properties": {
        "tool": {"type": "string"}, "reverses": {"type": "string"}, "reverses_side_effect": {"type": "string"},
        "by": {"type": "string"}, "call": {"type": "string"},
    },
})
"""The ``undo`` action in the Cedar schema: a ``write`` action whose resource is the reversed tool's name."""

_RANK = {Effect.ALLOW: 0, Effect.ASK: 1, Effect.DENY: 2}

_RUNNING: set[tuple[str, str]] = set()
"""(run, ledger key) of the undos this process is running now (any door, any platform in it)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # exists (another user's) or not a pid at all
    return True


def in_progress(run_id: str, started: Mapping[str, Any]) -> bool:
    """Whether the undo that left this *started* record is running now: in this process, or in a live process on
    this host. One whose process is gone (or on another host, which cannot be asked) may have happened: it is held
    for a human instead (:meth:`UndoDoor._gate`)."""
    key = str(started.get("key") or "")
    if (run_id, key) in _RUNNING:
        return True
    pid = started.get("pid")
    if started.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    return _alive(pid)


def _busy(item: Reversal, started: Mapping[str, Any] | None, detail: str = "") -> ToolOutcome:
    """The answer to an undo of a call that another undo is reversing right now."""
    where = (f" (pid {started.get('pid')} on {started.get('host')}, since {started.get('started_at')})"
             if started else "")
    message = (f"call {item.call} ({item.tool}) is being undone right now by another undo{where}{detail}; it is not "
               "undone twice: ask again once that one finished")
    return ToolOutcome("error", item.undo_tool, error={"error": "undo_in_progress", "message": message})


@dataclass(frozen=True)
class Reversal:
    """One call to reverse, as its audit events recorded it.

    Attributes:
        seq: The sequence number of the reversed call's ``tool`` event (or of its decision, for an uncertain call).
        call: The call's id in its run (the run loop's tool-call id; the event's ``seq`` as text without one).
        tool: The reversed tool.
        side_effect: Its side-effect class.
        undo_tool: The tool that reverses it.
        undo_args: The undo call's arguments.
        attempt: How many undos of this call ran the undo tool and failed before: each such attempt used up its own
            ledger key, so a failed undo may be tried again, while one that died midway leaves its key *started*
            and is found there (an attempt refused before it ran uses no key).
    """

    seq: int
    call: str
    tool: str
    side_effect: str
    undo_tool: str
    undo_args: Mapping[str, Any]
    attempt: int = 0

    @property
    def key(self) -> str:
        """The undo's key in the idempotency ledger."""
        return f"undo:{self.seq}:{self.attempt}"

    def link(self, by: str) -> dict[str, Any]:
        """The fields every event of this undo carries."""
        return {"reverses": self.seq, "call": self.call, "reverses_tool": self.tool, "by": by}


def _stricter(a: Decision, b: Decision) -> Decision:
    """The stricter of two decisions (deny over ask over allow); of equal ones, both policy ids and reasons."""
    first, second = (a, b) if _RANK[a.effect] >= _RANK[b.effect] else (b, a)
    if first.effect is not second.effect:
        return first
    ids = tuple(dict.fromkeys((*first.policy_ids, *second.policy_ids)))
    reasons = tuple(dict.fromkeys((*first.reasons, *second.reasons)))
    return Decision(first.effect, ids, reasons, first.errors + second.errors)


class UndoDoor:
    """Runs undo calls through the stages of a :class:`ToolDoor` (its authorize, secrets, execute, label, audit).

    Args:
        door: The tool door whose stages undo calls take.
    """

    def __init__(self, door: ToolDoor) -> None:
        self.door = door
        self.context = door.context
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, run_id: str) -> asyncio.Lock:
        """One undo at a time per run in this process (the ledger fences other processes)."""
        return self._locks.setdefault(run_id, asyncio.Lock())

    async def undo(self, run: RunContext, item: Reversal, *, by: str, token: str | None = None,
                   ledger: IdempotencyLedger | None = None) -> ToolOutcome:
        """Reverses one call. Never raises for what the call or the caller holds: the outcome says what happened,
        and an ``undo`` event records it.

        Args:
            run: The run (live, or rebuilt from its checkpoint by the caller).
            item: The call to reverse.
            by: Who asked (``operator:cli``, ``operator:api``, ``agent:<name>``).
            token: The run token when the run's agent asks (verified; must be for this run); ``None`` for an
                operator.
            ledger: Where the run's records are and this undo's go (default: the gateway's; a run driven by
                workers: the bus's).
        """
        audit = self.door.audit
        who = {"agent": run.agent, "run_id": run.run_id, "tool": item.undo_tool}
        link = item.link(by)
        try:
            claims = await self._identity(run, token, by)
        except AuthError as exc:
            outcome = ToolOutcome("unauthenticated", item.undo_tool, error=exc.to_dict())
            return await self._finish(who, item, link, outcome)
        try:
            tool = self.context.tools.get(item.undo_tool)
            args = self.context.tools.parse_arguments(tool, dict(item.undo_args))
        except StitchworkError as exc:
            redactor = self.context.redactor
            seq = await audit.record("decision", who, {"error": exc.code, "reason": redactor.redact_text(str(exc)),
                                                       **link})
            outcome = ToolOutcome("invalid", item.undo_tool, error=redactor.redact(exc.to_dict()), audit_seq=seq)
            return await self._finish(who, item, link, outcome)
        call = Checked(claims, run, tool, args, who)
        ledger = ledger if ledger is not None else self.context.idempotency
        started = await ledger.aget(run.run_id, item.key) if ledger is not None else None
        if started is not None and not is_started(started):  # this attempt ended, its undo event was not written
            outcome = ToolOutcome(**{**started, "policy_ids": tuple(started.get("policy_ids", ()))})
            return await self._finish(who, item, {**link, "replayed": True, "key_used": True}, outcome)
        if started is not None and in_progress(run.run_id, {**started, "key": item.key}):
            return await self._finish(who, item, link, _busy(item, started))
        # The undo's arguments are not the agent's choice: the operator's manifest maps them from the recorded call
        # (whose own taint was decided when it ran) and its result. Checked as carrying no taint.
        tainted = self.door.taint(Checked(claims, replace(run, tracker=ProvenanceTracker()), tool, args, who))
        gate = await self._gate(call, tainted, item, by, started)
        seq = await audit.decided(call, tainted, gate, durable=True, extra=link)
        if (stopped := refusal(call, gate, seq)) is not None:
            return await self._finish(who, item, link, stopped)
        resolved = await self.door.secrets(call)
        if isinstance(resolved, ToolOutcome):
            return await self._finish(who, item, link, resolved)
        # From here the undo runs to its end and its outcome is recorded even if the caller goes away (a closed HTTP
        # connection): an interrupted undo would be left started, and held for a human.
        running = asyncio.ensure_future(self._run(call, item, link, resolved, gate, seq, started, ledger))
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await running
            raise

    async def _run(self, call: Checked, item: Reversal, link: Mapping[str, Any], resolved: Resolved, gate: Gate,
                   seq: int, started: Mapping[str, Any] | None, ledger: IdempotencyLedger | None) -> ToolOutcome:
        """Intent, execute, label, audit and record one authorized undo call (one at a time per call here)."""
        mine, who = (call.run.run_id, item.key), call.who
        if mine in _RUNNING:
            return await self._finish(who, item, link, _busy(item, None))
        _RUNNING.add(mine)
        try:
            return await self._claimed(call, item, link, resolved, gate, seq, started, ledger)
        finally:
            _RUNNING.discard(mine)

    async def _claimed(self, call: Checked, item: Reversal, link: Mapping[str, Any], resolved: Resolved, gate: Gate,
                       seq: int, started: Mapping[str, Any] | None, ledger: IdempotencyLedger | None) -> ToolOutcome:
        audit, run, tool, who = self.door.audit, call.run, call.tool, call.who
        if ledger is not None and started is None:
            try:
                await ledger.aput(run.run_id, item.key, {
                    "status": STARTED, "tool": tool.name, "started_at": time.time(), "decision_seq": seq,
                    "host": socket.gethostname(), "pid": os.getpid(), "side_effect": tool.side_effect.value,
                })
            except BusConflict as exc:  # the bus's compare-and-set or the store's unique claim: another undoer won
                other = await ledger.aget(run.run_id, item.key)
                if other is not None and not is_started(other):
                    message = (f"call {item.call} ({item.tool}) was undone meanwhile by another undo (its outcome: "
                               f"{other.get('status')}); it is not undone twice")
                    busy = ToolOutcome("error", tool.name, error={"error": "already_undone", "message": message})
                    return await self._finish(who, item, link, busy)
                return await self._finish(who, item, link, _busy(item, other, f": {exc}"))
        execute = self.door.host if tool.host else self.door.execute
        executed = await execute(call, resolved, gate.decision)
        if isinstance(executed, ToolOutcome):
            outcome = executed
        else:
            labelled = self.door.label(run, tool, executed)
            tool_seq = await audit.executed(call, executed, labelled, gate.decision, key=item.key, extra=link)
            outcome = ToolOutcome(executed.status, tool.name, content=labelled.content, error=executed.error,
                                  label=labelled.label, policy_ids=gate.decision.policy_ids, audit_seq=tool_seq)
        if ledger is not None:
            await ledger.aput(run.run_id, item.key, asdict(outcome))
        return await self._finish(who, item, {**link, "key_used": True}, outcome)

    async def _identity(self, run: RunContext, token: str | None, by: str) -> TokenClaims:
        if token is None:
            now = time.time()
            return TokenClaims(sub=by, agent=run.agent, aud=(), exp=now, iat=now, jti="", run_id=run.run_id)
        claims = await self.door.authenticate(token, action=UNDO_ACTION)
        if claims.run_id != run.run_id or claims.agent != run.agent:
            raise AuthError(f"the run token is for run {claims.run_id}, not {run.run_id}")
        return claims

    async def _decide(self, call: Checked, tainted: Any, item: Reversal, by: str, *, approved: bool) -> Decision:
        run = call.run
        context = policy_context(
            side_effect="write", approved=approved, taint=untainted(), steps=run.steps, max_steps=run.max_steps,
            args={"tool": item.undo_tool, "reverses": item.tool, "reverses_side_effect": item.side_effect, "by": by,
                  "call": item.call},
        )
        undo = await self.door.authorize.decide(run.agent, UNDO_ACTION, item.tool, context)
        own = await self.door.authorize(call, tainted, approved=approved)
        return _stricter(undo, own)

    async def _gate(self, call: Checked, tainted: Any, item: Reversal, by: str,
                    started: Mapping[str, Any] | None) -> Gate:
        """Policy, then a human where policy asks (or where an earlier attempt may already have happened)."""
        decision = await self._decide(call, tainted, item, by, approved=False)
        if decision.effect is Effect.DENY:
            return Gate(decision)
        if started is not None:  # began once, never finished: it may have happened; never simply run again
            reason = evidence_text(started).replace("this call", "this undo", 1)
            decision = Decision(Effect.ASK, (*decision.policy_ids, "uncertain"), (reason,), ())
        if decision.effect is not Effect.ASK:
            return Gate(decision)
        approvals = self.context.approvals
        run_id, agent, tool = call.run.run_id, call.run.agent, call.tool.name
        held = {"arguments": dict(call.args), "reverses": item.seq, "undo": True, "uncertain": started is not None}
        refused = approvals.denied(run_id, agent, tool, held)
        if refused is not None:
            return Gate(Decision(Effect.DENY, (*decision.policy_ids, f"approval:{refused.id}"),
                                 (f"a human {refused.status.value} approval {refused.id}",), ()))
        granted = approvals.consume(run_id, agent, tool, held)
        if granted is not None:
            again = await self._decide(call, tainted, item, by, approved=True)
            if again.effect is Effect.ASK:
                again = Decision(Effect.DENY, again.policy_ids, ("approval did not satisfy policy",), ())
            return Gate(again, granted.id)
        reason = "; ".join(decision.reasons)
        approval = approvals.request(
            run_id=run_id, agent=agent, tool=tool, target=tainted.target, arguments=held,
            policy_ids=decision.policy_ids, reason=f"undo of call {item.call} ({item.tool}, audit event "
                                                    f"#{item.seq}): {reason}",
        )
        return Gate(decision, approval.id)

    async def _finish(self, who: Mapping[str, str], item: Reversal, link: Mapping[str, Any],
                      outcome: ToolOutcome) -> ToolOutcome:
        """The ``undo`` event that closes every attempt; the outcome with its sequence number."""
        data = {**link, "undo_tool": item.undo_tool, "status": outcome.status, "audit_seq": outcome.audit_seq,
                "approval_id": outcome.approval_id, "error": outcome.error}
        seq = await self.door.audit.record("undo", who, data, decision=outcome.status)
        return ToolOutcome(outcome.status, outcome.tool, content=outcome.content, error=outcome.error,
                           label=outcome.label, approval_id=outcome.approval_id, policy_ids=outcome.policy_ids,
                           audit_seq=seq)


__all__ = ["UNDO_ACTION", "UNDO_TOOL_ACTION", "Reversal", "UndoDoor", "in_progress"]
