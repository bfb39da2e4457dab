"""Uncertain calls: a side-effecting call found *started* but not finished (its worker died while it ran).

No blind re-execution. Before a side-effecting call runs, its intent is durable: the decision is audited (awaited)
and the idempotency ledger holds a *started* record under the call's key. The outcome replaces that record once the
call returns. A run resumed after a crash that finds only the started record cannot know whether the effect
happened, so the call is **uncertain** and is settled here, never simply run again:

=====================  ==============================================================================================
side effect            what happens to an uncertain call
=====================  ==============================================================================================
``read``               never uncertain: reads keep no ledger record and may run again
``write``,             the manifest says ``idempotency = "key"``: run again with the *same*
``external``,          ``STITCHWORK_IDEMPOTENCY_KEY``; the tool (or the API behind it) de-duplicates. Audited as
``irreversible``       ``uncertain``/``resume``.
                       Otherwise the call is held for a human: an approval (policy id ``uncertain``) whose reason says
                       "this may already have happened" with the evidence (when it started, where, its decision
                       event). **Approve** runs it again (the approval also counts as the human approval policy may
                       ask for); **deny** (or expiry) records it as not run again; ``stitchwork undo RUN --call ID``
                       may reverse it first. Audited as ``uncertain``/``rerun`` or ``uncertain``/``skipped``.
=====================  ==============================================================================================

The agent sees the outcome either way: the tool's result after a re-run, or status ``uncertain`` with the human's
resolution. Policy still applies first: an uncertain call that policy now denies is denied.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from stitchwork.gateway.context import GatewayContext, ToolOutcome
from stitchwork.gateway.stages import Approve, Audit, Authorize, Checked, Gate, Tainted
from stitchwork.security.policy import Decision, Effect

UNCERTAIN_POLICY = "uncertain"
"""The policy id of an approval that holds an uncertain call for a human."""


def held_arguments(arguments: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The arguments an uncertain call's approval covers: the call's own, and its idempotency key (so the approval
    is not mistaken for, or consumed as, an ordinary policy approval of the same call)."""
    return {"arguments": dict(arguments), "idempotency_key": key, "uncertain": True}


def evidence_text(started: Mapping[str, Any]) -> str:
    """What is known of an uncertain call, in one sentence for the approval's reason."""
    when = started.get("started_at")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(when))) if isinstance(when, int | float) else "?"
    return (f"this call may already have happened: it started at {stamp} (host {started.get('host', '?')}, "
            f"pid {started.get('pid', '?')}, decision audit event #{started.get('decision_seq', '?')}) and its "
            "worker stopped before the outcome was recorded. Approve to run it again; deny to record it as not "
            "run again.")


class Uncertain:
    """The stage that settles an uncertain call (see the module docstring): a :class:`Gate` to go on with, or the
    outcome the agent gets instead (already audited and recorded in the ledger)."""

    def __init__(self, context: GatewayContext, authorize: Authorize, approve: Approve) -> None:
        self.context = context
        self.authorize = authorize
        self.approve = approve
        self.audit = Audit(context)

    async def __call__(self, call: Checked, tainted: Tainted, decision: Decision, started: Mapping[str, Any],
                       key: str) -> Gate | ToolOutcome:
        if decision.effect is Effect.DENY:
            return Gate(decision)
        evidence = {"idempotency_key": key, "started": dict(started), "side_effect": call.tool.side_effect.value}
        if call.tool.idempotency == "key":
            await self.audit.record("uncertain", call.who, {**evidence, "resolution": "resumed with the tool's own "
                                                            "idempotency key"}, decision="resume")
            return await self.approve(call, tainted, decision)
        approvals = self.context.approvals
        run_id, agent, tool = call.run.run_id, call.run.agent, call.tool.name
        held = held_arguments(call.args, key)
        refused = approvals.denied(run_id, agent, tool, held)
        if refused is not None:
            return await self._skipped(call, key, evidence, refused.id, refused.status.value,
                                       refused.decided_by or "", refused.note or "")
        granted = approvals.consume(run_id, agent, tool, held)
        if granted is not None:
            again = await self.authorize(call, tainted, approved=True)
            if again.effect is Effect.ASK:
                again = Decision(Effect.DENY, again.policy_ids, ("approval did not satisfy policy",), ())
            await self.audit.record("uncertain", call.who, {**evidence, "resolution": "run again: a human approved",
                                                            "approval_id": granted.id,
                                                            "decided_by": granted.decided_by},
                                    decision="rerun")
            return Gate(again, granted.id)
        reason = evidence_text(started)
        approval = approvals.request(run_id=run_id, agent=agent, tool=tool, target=tainted.target, arguments=held,
                                     policy_ids=(UNCERTAIN_POLICY,), reason=reason)
        return Gate(Decision(Effect.ASK, (UNCERTAIN_POLICY,), (reason,), ()), approval.id)

    async def _skipped(self, call: Checked, key: str, evidence: Mapping[str, Any], approval_id: str, status: str,
                       by: str, note: str) -> ToolOutcome:
        message = (f"this call may already have happened before a worker stopped; it was not run again "
                   f"(approval {approval_id} {status}{' by ' + by if by else ''}{': ' + note if note else ''})")
        seq = await self.audit.record("uncertain", call.who, {**evidence, "resolution": "not run again",
                                                              "approval_id": approval_id, "status": status,
                                                              "note": note}, decision="skipped")
        outcome = ToolOutcome("uncertain", call.tool.name, approval_id=approval_id, audit_seq=seq,
                              error={"error": "uncertain", "message": message, "approval_id": approval_id,
                                     "resolution": "not run again"})
        ledger = self.context.idempotency
        if ledger is not None:
            await ledger.aput(call.run.run_id, key, asdict(outcome))
        return outcome


__all__ = ["UNCERTAIN_POLICY", "Uncertain", "evidence_text", "held_arguments"]
