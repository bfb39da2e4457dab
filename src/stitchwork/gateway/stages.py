"""The stages of the gateway's pipeline, each a small unit over the shared :class:`GatewayContext`.

A tool call passes them in order (:class:`~stitchwork.gateway.tools.ToolDoor` composes them)::

    Authenticate → Validate → (Replay) → Taint → Authorize → Approve → Secrets → execute → Label → Audit

Each stage takes what the previous ones produced and returns what the next ones need, or a :class:`ToolOutcome`
that ends the call (a refusal, already audited). Only the execute stage differs between the tool door (the tool's
sandbox) and the host-tool door (a registered handler); the model door uses :class:`Authenticate`,
:func:`policy_context` with :class:`Authorize`, :class:`Secrets` (provider keys) and :class:`Audit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from stitchwork.compute._keys import provider_keys
from stitchwork.errors import AuthError, PolicyDenied, SecretError, SecretNotGranted, StitchworkError, UnknownAgent
from stitchwork.gateway.context import GatewayContext, RunContext, ToolOutcome, content_text, digest
from stitchwork.gateway.idempotency import STARTED, is_started
from stitchwork.security.identity.tokens import TokenClaims
from stitchwork.security.policy import Decision, Effect, Request
from stitchwork.security.taint import OUTWARD_ROLES, ArgumentTaint, Label
from stitchwork.tools.manifest import SideEffect, ToolManifest

SECRET_REF = re.compile(r"secret://([A-Za-z0-9_.-]{1,128})")


def untainted() -> dict[str, Any]:
    """The ``taint`` record of a call that carries no run content (a model call, a message outside a run)."""
    return {"any": False, "target": False, "args": [], "sources": []}


def policy_context(
    *,
    side_effect: str,
    args: Mapping[str, Any],
    approved: bool = False,
    taint: Mapping[str, Any] | None = None,
    steps: int = 0,
    max_steps: int = 0,
    now: float | None = None,
) -> dict[str, Any]:
    """The Cedar context of one call, for every door (see :class:`~stitchwork.security.policy.Request`).

    Args:
        side_effect: The action's declared side effect (the engine takes it from the declaration anyway).
        args: The call's arguments (``context.args``).
        approved: Whether a human approved this exact call.
        taint: The taint record (:meth:`ArgumentTaint.context`); ``None``: :func:`untainted`.
        steps: The run's steps so far (``context.budget.steps``).
        max_steps: The run's step budget.
        now: The time of the call (default: now); ``context.time`` is its local hour and weekday.
    """
    when = time.time() if now is None else now
    local = time.localtime(when)
    return {
        "side_effect": side_effect,
        "approved": approved,
        "taint": taint if taint is not None else untainted(),
        "budget": {"steps": steps, "max_steps": max_steps},
        "time": {"unix": int(when), "hour": local.tm_hour, "weekday": local.tm_wday},
        "args": dict(args),
    }


# -- what the stages hand each other (plain slotted records: one of each is built per call) -------------------


@dataclass(slots=True)
class Checked:
    """A call that passed :class:`Validate`: a live run of the token's agent, a tool it is given, valid args."""

    claims: TokenClaims
    run: RunContext
    tool: ToolManifest
    args: dict[str, Any]
    who: dict[str, str]
    """The audit fields of the caller: ``agent``, ``run_id`` and ``tool`` (the name as called)."""


@dataclass(slots=True)
class Tainted:
    """What :class:`Taint` found: the arguments' taint and the call's target (the tool's target argument)."""

    taint: ArgumentTaint
    target: str
    record: dict[str, Any]
    """``taint.context(<the tool's target argument>)``: the taint record of the Cedar context and the audit event."""


@dataclass(slots=True)
class Gate:
    """The decision :class:`Approve` settled on, and the human approval it consumed, or now waits for (ASK)."""

    decision: Decision
    approval_id: str = ""


@dataclass(slots=True)
class Resolved:
    """The arguments with ``secret://`` references resolved, and the environment of the tool's sandbox."""

    args: dict[str, Any]
    env: dict[str, str]


@dataclass(slots=True)
class Executed:
    """What an execute stage reports for a tool that ran (ok, or failed in the tool).

    Attributes:
        status: ``ok`` or ``error``.
        value: The tool's result (not yet redacted); ``None`` on error.
        error: The error the agent sees (already redacted), or ``None``.
        details: The execute stage's own fields of the ``tool`` audit event (sandbox, exit code, duration...).
        labels: The provenance of ``value``; ``None``: the tool's own label, recorded only when there is content.
    """

    status: str
    value: Any
    error: dict[str, Any] | None
    details: dict[str, Any]
    labels: tuple[Label, ...] | None = None


@dataclass(slots=True)
class Labelled:
    """The output the agent gets (secrets redacted) and the provenance label(s) it was recorded under."""

    content: Any
    label: str


class Execute(Protocol):
    """The execute stage: runs a checked, authorized call; an outcome it returns instead is already audited."""

    async def __call__(self, call: Checked, resolved: Resolved, decision: Decision) -> Executed | ToolOutcome:
        ...


# -- the stages ----------------------------------------------------------------------------------------------


class Audit:
    """Step 8 (and every refusal on the way): a call's events on the hash-chained audit log.

    Refusals and executions are awaited (durable before the agent hears of them); allowed decisions and secret
    uses are queued, durable together with the execution event that follows them (the journal is written in
    chain order).
    """

    def __init__(self, context: GatewayContext) -> None:
        self.context = context

    async def record(self, kind: str, who: Mapping[str, str], data: Mapping[str, Any], *,
                     decision: str = "deny") -> int:
        """Appends an event and waits until it is durable; returns its sequence number."""
        event = await self.context.audit.aappend(kind, **who, decision=decision, data=data)
        return event.seq

    def queue(self, kind: str, who: Mapping[str, str], data: Mapping[str, Any], *, decision: str = "allow") -> None:
        """Queues an event (durable with the next awaited one)."""
        self.context.audit.append_nowait(kind, **who, decision=decision, data=data)

    async def decided(self, call: Checked, tainted: Tainted, gate: Gate, *, durable: bool = False,
                      extra: Mapping[str, Any] | None = None) -> int:
        """The ``decision`` event of a tool call (``approval``/``ask`` when it waits for a human).

        Args:
            durable: Await an allowed decision too (the intent of a side-effecting call is durable before it runs).
            extra: More fields of the event (an undo call's link to the call it reverses).

        Returns:
            The event's sequence number; 0 for an allowed call not awaited (its event is queued).
        """
        redactor = self.context.redactor
        decision = gate.decision
        taint = tainted.record
        if taint.get("findings"):  # the only part that quotes argument values (a URL the agent built, say)
            taint = {**taint, "findings": redactor.redact(taint["findings"])}
        data = {
            "effect": decision.effect.value, "policy_ids": list(decision.policy_ids),
            "reasons": list(decision.reasons), "target": redactor.redact_text(tainted.target),
            "taint": taint, "provenance": tainted.taint.provenance(),
            "side_effect": call.tool.side_effect.value,
            "jti": call.claims.jti, "arguments": redactor.redact(call.args), "approval_id": gate.approval_id,
            **(extra or {}),
        }
        if decision.effect is Effect.ASK:
            return await self.record("approval", call.who, data, decision="ask")
        if decision.effect is Effect.DENY:
            return await self.record("decision", call.who, data)
        if durable:
            return await self.record("decision", call.who, data, decision="allow")
        self.queue("decision", call.who, data)
        return 0

    async def executed(self, call: Checked, executed: Executed, labelled: Labelled, decision: Decision, *,
                       key: str = "", undo: Mapping[str, Any] | None = None,
                       extra: Mapping[str, Any] | None = None) -> int:
        """The ``tool`` event of a call that ran; returns its sequence number.

        Args:
            key: The call's idempotency key (``<run>:<call id>`` from the run loop), recorded as ``call``.
            undo: The call that reverses this one (``{"tool", "args"}``), when its manifest declares one.
            extra: More fields of the event (``undo_error``; an undo call's link to the call it reverses).
        """
        tool = call.tool
        data = {
            **executed.details, "output_sha256": digest(labelled.content), "label": labelled.label,
            "undo": tool.undo, "side_effect": tool.side_effect.value, "policy_ids": list(decision.policy_ids),
            "error": executed.error,
        }
        if key:
            data["idempotency_key"] = key
        if undo is not None:
            data["undo_call"] = self.context.redactor.redact(dict(undo))
        if extra:
            data.update(extra)
        return await self.record("tool", call.who, data, decision=executed.status)


class Authenticate:
    """Step 1: the run token is verified (signature, expiry, audience, revocation); a refusal is audited."""

    def __init__(self, context: GatewayContext) -> None:
        self.context = context
        self.audit = Audit(context)

    async def __call__(self, token: str | None, *, action: str) -> TokenClaims:
        """The token's claims.

        Raises:
            AuthError: the token is missing, malformed, expired, revoked or for another audience (one ``auth``
                event is audited first).
        """
        try:
            return self.context.tokens.verify(token, audience=self.context.audience)
        except AuthError as exc:
            await self.audit.record("auth", {"tool": action}, {"error": exc.code, "reason": str(exc)})
            raise


class Validate:
    """Step 1b: the agent is known and its run live, the tool is given to it, the arguments match the schema.

    A refusal is ``denied`` (the tool is not given to the agent) or ``invalid`` (anything else), audited as a
    ``decision`` event with the error.
    """

    def __init__(self, context: GatewayContext) -> None:
        self.context = context
        self.audit = Audit(context)

    async def __call__(self, claims: TokenClaims, tool_name: str,
                       arguments: str | bytes | Mapping[str, Any] | None) -> Checked | ToolOutcome:
        context = self.context
        agent, run_id = claims.agent, claims.run_id
        who = {"agent": agent, "run_id": run_id, "tool": str(tool_name)}
        try:
            if agent not in context.agents:
                raise UnknownAgent(f"agent {agent!r} is not registered")
            run = context.live_run(run_id)
            if run is None or run.agent != agent:
                raise AuthError(f"run {run_id} is not active for agent {agent!r}")
            tool = context.tools.get(tool_name)
            if tool.name not in context.agents[agent]:
                raise PolicyDenied(f"agent {agent!r} is not given the tool {tool.name!r}", policy_ids=("agent-tools",))
            args = context.tools.parse_arguments(tool, arguments)
        except StitchworkError as exc:
            status = "denied" if isinstance(exc, PolicyDenied) else "invalid"
            ids = exc.policy_ids if isinstance(exc, PolicyDenied) else ()
            redactor = context.redactor
            reason = redactor.redact_text(str(exc))
            seq = await self.audit.record("decision", who, {"error": exc.code, "reason": reason})
            return ToolOutcome(status, str(tool_name), error=redactor.redact(exc.to_dict()), policy_ids=ids,
                               audit_seq=seq)
        return Checked(claims, run, tool, args, who)


class Replay:
    """Idempotency: a call whose key already completed gets its recorded outcome instead of running again.

    Outcomes are kept for the run in memory, and for side-effecting tools in the durable ledger (when the
    context has one), so a run resumed by another process does not repeat a call that completed.
    """

    def __init__(self, context: GatewayContext) -> None:
        self.context = context
        self.audit = Audit(context)
        self._inflight: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def exclusive(self, run_id: str, key: str) -> AsyncIterator[None]:
        """One call per ``(run, key)`` at a time in this process: a retry sent while its original is still running
        (a client that timed out, a framework re-running a step) waits for it, then finds its recorded outcome."""
        lock, users = self._inflight.setdefault((run_id, key), (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                self._inflight.pop((run_id, key), None)

    def durable(self, call: Checked, key: str) -> bool:
        """Whether this call's outcome is kept in the durable ledger."""
        return bool(key and self.context.idempotency is not None and call.tool.side_effect is not SideEffect.READ)

    async def lookup(self, call: Checked, key: str) -> ToolOutcome | dict[str, Any] | None:
        """The recorded outcome for ``key`` (a durable one is counted as a step, labelled and audited
        ``replayed``); the started record of a call that began and never finished (it is *uncertain*: see
        :mod:`stitchwork.gateway.uncertain`); or ``None`` when the call must run."""
        run = call.run
        if key in run.idempotent:
            return run.idempotent[key]
        ledger = self.context.idempotency
        if ledger is None or not self.durable(call, key):
            return None
        recorded = await ledger.aget(run.run_id, key)
        if recorded is None:
            return None
        if is_started(recorded):
            return recorded
        replayed = ToolOutcome(**{**recorded, "policy_ids": tuple(recorded.get("policy_ids", ()))})
        run.idempotent[key] = replayed
        run.steps += 1
        if replayed.content is not None:
            run.tracker.add(content_text(replayed.content), output_label(call.tool))
        await self.audit.record("tool", call.who, {"idempotency_key": key, "audit_seq": replayed.audit_seq},
                                decision="replayed")
        return replayed

    async def start(self, call: Checked, key: str, decision_seq: int) -> None:
        """Intent before effect: the started record of a side-effecting call, durable before it runs."""
        ledger = self.context.idempotency
        if ledger is None or not self.durable(call, key):
            return
        await ledger.aput(call.run.run_id, key, {
            "status": STARTED, "tool": call.tool.name, "started_at": time.time(), "decision_seq": decision_seq,
            "host": socket.gethostname(), "pid": os.getpid(), "side_effect": call.tool.side_effect.value,
        })

    async def record(self, call: Checked, key: str, outcome: ToolOutcome) -> None:
        """Keeps the outcome of a call that ran under ``key``: a side-effecting call's outcome goes to the durable
        ledger whatever its status (the agent has seen it: a resumed run gets the same answer); in this process
        only successful ones are kept."""
        if not key:
            return
        if outcome.status == "ok":
            call.run.idempotent[key] = outcome
        ledger = self.context.idempotency
        if ledger is not None and self.durable(call, key):
            await ledger.aput(call.run.run_id, key, asdict(outcome))


class Taint:
    """Step 3: which arguments carry values derived from the run's untrusted content (the target and every
    destination argument of the manifest checked alike), which carry confidential content, and the call's target."""

    def __call__(self, call: Checked) -> Tainted:
        tool = call.tool
        target = str(call.args.get(tool.target, "")) if tool.target else tool.remote
        taint = call.run.tracker.check(call.args)
        roles = tool.destination_roles()
        outward = any(role in OUTWARD_ROLES and call.args.get(arg) not in (None, "", [], {})
                      for arg, role in roles.items())
        return Tainted(taint, target, taint.context(tool.target, roles, outward=outward))


class Authorize:
    """Step 2: Cedar decides ``principal=agent, action, resource=target`` over :func:`policy_context`."""

    def __init__(self, context: GatewayContext) -> None:
        self.context = context

    async def decide(self, agent: str, action: str, target: str, context: Mapping[str, Any]) -> Decision:
        """The decision for any door's call (the model door's ``model_call`` too)."""
        return await self.context.policy.adecide(Request(agent=agent, tool=action, target=target, context=context))

    async def __call__(self, call: Checked, tainted: Tainted, *, approved: bool = False) -> Decision:
        """The decision for a tool call."""
        tool, run = call.tool, call.run
        context = policy_context(
            side_effect=tool.side_effect.value, approved=approved, taint=tainted.record,
            steps=run.steps, max_steps=run.max_steps, args=call.args,
        )
        return await self.decide(run.agent, tool.name, tainted.target, context)


class Approve:
    """Step 4: a call policy sends to a human (ASK) is settled by the human's recorded answer, or waits.

    A denied or expired approval makes it a DENY; a granted one is consumed (one call per approval) and the call
    decided again as approved; without an answer an approval is requested and the decision stays ASK.
    """

    def __init__(self, context: GatewayContext, authorize: Authorize) -> None:
        self.context = context
        self.authorize = authorize

    async def __call__(self, call: Checked, tainted: Tainted, decision: Decision) -> Gate:
        if decision.effect is not Effect.ASK:
            return Gate(decision)
        approvals = self.context.approvals
        run_id, agent, tool = call.run.run_id, call.run.agent, call.tool.name
        refused = approvals.denied(run_id, agent, tool, call.args)
        if refused is not None:
            return Gate(Decision(Effect.DENY, (*decision.policy_ids, f"approval:{refused.id}"),
                                 (f"a human {refused.status.value} approval {refused.id}",), ()))
        granted = approvals.consume(run_id, agent, tool, call.args)
        if granted is not None:
            decision = await self.authorize(call, tainted, approved=True)
            if decision.effect is Effect.ASK:
                decision = Decision(Effect.DENY, decision.policy_ids, ("approval did not satisfy policy",), ())
            return Gate(decision, granted.id)
        reason = "; ".join(decision.reasons)
        if explained := tainted.taint.explain():
            reason = f"{reason}; where the values came from: {self.context.redactor.redact_text(explained)}"
        approval = approvals.request(
            run_id=run_id, agent=agent, tool=tool, target=tainted.target, arguments=call.args,
            policy_ids=decision.policy_ids, reason=reason,
        )
        return Gate(decision, approval.id)


def refusal(call: Checked, gate: Gate, seq: int) -> ToolOutcome | None:
    """The outcome of a call the gate stops (``approval_required`` or ``denied``), or ``None`` when it may run."""
    decision, tool = gate.decision, call.tool.name
    if decision.effect is Effect.ASK:
        return ToolOutcome(
            "approval_required", tool, approval_id=gate.approval_id, policy_ids=decision.policy_ids,
            error={"error": "approval_required", "message": "this call waits for a human approval",
                   "approval_id": gate.approval_id, "policy_ids": list(decision.policy_ids)},
            audit_seq=seq,
        )
    if decision.effect is Effect.DENY:
        denied = PolicyDenied(f"policy denied {tool}: {'; '.join(decision.reasons) or 'no policy permits it'}",
                              policy_ids=decision.policy_ids)
        return ToolOutcome("denied", tool, error=denied.to_dict(), policy_ids=decision.policy_ids, audit_seq=seq)
    return None


class Secrets:
    """Step 5: ``secret://name`` references resolve here, for the tool's sandbox only, if its manifest grants them.

    The granted secrets also go into the sandbox's environment (``STITCHWORK_SECRET_<NAME>``); the model door's
    provider keys resolve only inside :meth:`provider_keys`.
    """

    def __init__(self, context: GatewayContext) -> None:
        self.context = context
        self.audit = Audit(context)

    async def __call__(self, call: Checked) -> Resolved | ToolOutcome:
        try:
            args, env, used = self.resolve(call.tool, call.args)
        except SecretError as exc:
            seq = await self.audit.record("secret", call.who, {"error": exc.code, "reason": str(exc)})
            return ToolOutcome("denied", call.tool.name, error=exc.to_dict(), audit_seq=seq)
        if used:
            self.audit.queue("secret", call.who, {"secrets": sorted(used)})
        return Resolved(args, env)

    def resolve(self, tool: ToolManifest, args: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str], set[str]]:
        """The arguments with references resolved, the sandbox environment, and the secrets used.

        Raises:
            SecretNotGranted: an argument names a secret the manifest does not list.
            SecretError: the vault has no such secret.
        """
        vault = self.context.vault
        used: set[str] = set()

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in tool.secrets:
                raise SecretNotGranted(
                    f"tool {tool.name!r} is not granted secret {name!r} (its manifest lists: "
                    f"{', '.join(tool.secrets) or 'none'})"
                )
            used.add(name)
            return vault.get(name)

        def resolve(value: Any) -> Any:
            if isinstance(value, str):
                return SECRET_REF.sub(sub, value)
            if isinstance(value, dict):
                return {k: resolve(v) for k, v in value.items()}
            if isinstance(value, list):
                return [resolve(v) for v in value]
            return value

        resolved: dict[str, Any] = resolve(dict(args))
        env: dict[str, str] = {}
        for name in tool.secrets:
            env["STITCHWORK_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()] = vault.get(name)
            used.add(name)
        return resolved, env, used

    def provider_keys(self) -> AbstractContextManager[None]:
        """A block inside which model adapters resolve their ``secret://`` provider keys from the vault."""
        return provider_keys(self.context.vault.get)


class LabelOutput:
    """Step 7: the output is redacted and recorded in the run's provenance under its label(s).

    Without labels from the execute stage the content is the tool's (``tool:<name>``, trusted as its manifest
    says). With labels, untrusted parts must not be grounded by trusted ones: mixed content is recorded under its
    untrusted labels only.
    """

    def __init__(self, context: GatewayContext) -> None:
        self.context = context

    def __call__(self, run: RunContext, tool: ToolManifest, executed: Executed) -> Labelled:
        content = self.context.redactor.redact(executed.value) if executed.status == "ok" else None
        if executed.labels is None:
            label = output_label(tool)
            if content is not None:
                label = run.tracker.add(content_text(content), label)
            return Labelled(content, str(label))
        labels = executed.labels or (output_label(tool),)
        secrecy = "confidential" if tool.secret_output or any(lb.confidential for lb in labels) else ""
        untrusted = [lb for lb in labels if not lb.trusted]
        recorded = [run.tracker.add(content_text(content), Label(lb.source, lb.trusted, secrecy or lb.secrecy))
                    for lb in (untrusted or labels)]
        return Labelled(content, ", ".join(str(lb) for lb in recorded))


def output_label(tool: ToolManifest) -> Label:
    """The label of a tool's own output: ``tool:<name>``, trusted and confidential as its manifest says."""
    return Label(f"tool:{tool.name}", tool.trusted_output, "confidential" if tool.secret_output else "")


__all__ = [
    "SECRET_REF",
    "Approve",
    "Audit",
    "Authenticate",
    "Authorize",
    "Checked",
    "Execute",
    "Executed",
    "Gate",
    "LabelOutput",
    "Labelled",
    "Replay",
    "Resolved",
    "Secrets",
    "Taint",
    "Tainted",
    "Validate",
    "output_label",
    "policy_context",
    "refusal",
    "untainted",
]
