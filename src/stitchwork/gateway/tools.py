"""The tool door: one tool call through every stage, executed in the tool's sandbox.

A door turns its protocol's call into ``(token, tool, arguments)`` and gets a :class:`ToolOutcome` back:
:meth:`ToolDoor.call` is that whole API. The agent loop calls it in process (:meth:`Gateway.call_tool
<stitchwork.gateway.core.Gateway.call_tool>`); the MCP and A2A doors translate their requests into the same call.
Host-side tools (``host = ...`` in the manifest) take the same stages with another execute stage
(:class:`~stitchwork.gateway.host.HostExecute`).

Every refusal on the way is audited and returned to the agent as a structured outcome; nothing raises out of
:meth:`ToolDoor.call` for what an agent sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

from stitchwork.errors import AuthError, StitchworkError
from stitchwork.gateway.context import GatewayContext, ToolOutcome
from stitchwork.gateway.host import HostExecute
from stitchwork.gateway.stages import (
    Approve,
    Audit,
    Authenticate,
    Authorize,
    Checked,
    Execute,
    Executed,
    Gate,
    LabelOutput,
    Replay,
    Resolved,
    Secrets,
    Taint,
    Validate,
    refusal,
)
from stitchwork.gateway.uncertain import Uncertain
from stitchwork.isolation._base import PythonCall, SandboxSpec, isolation_label
from stitchwork.observability import METRICS, TRACING
from stitchwork.observability.tracing import NoSpan
from stitchwork.security.policy import Decision
from stitchwork.tools.manifest import undo_call


class SandboxExecute:
    """Step 6 of a sandboxed tool: its entry function in its sandbox, with its limits, egress and secrets."""

    def __init__(self, context: GatewayContext) -> None:
        self.context = context
        self.audit = Audit(context)

    async def __call__(self, call: Checked, resolved: Resolved, decision: Decision) -> Executed | ToolOutcome:
        tool, sandboxes = call.tool, self.context.sandboxes
        spec = SandboxSpec(
            program=PythonCall(tool.entry_file, tool.entry_function, {"args": resolved.args}),
            workdir=call.run.tool_workdir(tool.name),
            env=resolved.env,
            limits=tool.limits_over(sandboxes.limits),
            egress=tool.egress,
        )
        sandbox_uri = tool.sandbox or sandboxes.default
        started = time.perf_counter()
        try:
            result = await sandboxes.get(sandbox_uri).run(spec)
        except StitchworkError as exc:  # the sandbox could not run the tool
            seq = await self.audit.record("tool", call.who, {"error": exc.code, "reason": str(exc),
                                                             "sandbox": sandbox_uri,
                                                             "isolation": isolation_label(sandbox_uri)},
                                              decision="error")
            return ToolOutcome("error", tool.name, error=exc.to_dict(), audit_seq=seq)
        elapsed = time.perf_counter() - started
        METRICS.sandbox_seconds.observe(elapsed, sandbox_uri.split("?", 1)[0])
        if result.killed:
            METRICS.sandbox_kills.inc(sandbox_uri.split("?", 1)[0], str(result.killed))
        details = {"sandbox": sandbox_uri, "isolation": isolation_label(sandbox_uri),
                   "exit_code": result.exit_code, "killed": result.killed,
                   "duration_ms": round(elapsed * 1000, 3), "cpu_s": round(result.cpu_s, 4),  # orjson fast path
                   "max_rss_kb": result.max_rss_kb}
        if result.ok:
            return Executed("ok", result.value, None, details)
        reason = result.killed or "error"
        stderr = result.stderr.decode("utf-8", "replace")[-2000:]
        message = result.error or stderr or f"exit code {result.exit_code}"
        error = {"error": f"tool_{reason}", "message": self.context.redactor.redact_text(message)}
        return Executed("error", None, error, details)


class ToolDoor:
    """Tool calls through the stages: authenticate, validate, (replay), taint, authorize, approve, secrets,
    execute, label, audit.

    Args:
        context: The gateway's shared context.
        host: The execute stage of host-side tools (default: one without handlers).
        execute: The execute stage of sandboxed tools (default: :class:`SandboxExecute`).
    """

    def __init__(self, context: GatewayContext, *, host: HostExecute | None = None,
                 execute: Execute | None = None) -> None:
        self.context = context
        self.authenticate = Authenticate(context)
        self.validate = Validate(context)
        self.replay = Replay(context)
        self.taint = Taint()
        self.authorize = Authorize(context)
        self.approve = Approve(context, self.authorize)
        self.uncertain = Uncertain(context, self.authorize, self.approve)
        self.secrets = Secrets(context)
        self.execute: Execute = execute or SandboxExecute(context)
        self.host = host or HostExecute(context)
        self.label = LabelOutput(context)
        self.audit = Audit(context)

    async def call(
        self,
        token: str | None,
        tool_name: str,
        arguments: str | bytes | Mapping[str, Any] | None,
        *,
        idempotency_key: str = "",
    ) -> ToolOutcome:
        """Runs one tool call through every stage. Never raises for what the agent sent.

        Counted in ``stitchwork_tool_calls_total`` and traced as ``gateway.tool_call`` with one span per stage
        (:mod:`stitchwork.observability`; names, decisions and policy ids only, never argument values).
        """
        name = tool_name if isinstance(tool_name, str) else "?"
        with TRACING.span("gateway.tool_call", {"stitchwork.tool.name": name}) as span:
            outcome = await self._call(token, tool_name, arguments, idempotency_key, span)
            span.set_attributes({"stitchwork.status": outcome.status,
                                 "stitchwork.policy_ids": list(outcome.policy_ids)})
        METRICS.tool_calls.inc(name if outcome.status != "unauthenticated" else "?", outcome.status)
        return outcome

    async def _call(self, token: str | None, tool_name: str, arguments: str | bytes | Mapping[str, Any] | None,
                    idempotency_key: str, span: NoSpan | Any) -> ToolOutcome:
        try:
            with TRACING.span("gateway.authenticate"):
                claims = await self.authenticate(token, action=tool_name if isinstance(tool_name, str) else "?")
        except AuthError as exc:
            return ToolOutcome("unauthenticated", str(tool_name), error=exc.to_dict())
        span.set_attributes({"stitchwork.agent": claims.agent, "stitchwork.run_id": claims.run_id})
        with TRACING.span("gateway.validate"):
            call = await self.validate(claims, tool_name, arguments)
        if isinstance(call, ToolOutcome):
            return call
        span.set_attribute("stitchwork.side_effect", call.tool.side_effect.value)
        if not idempotency_key:
            outcome = await self._checked(call, idempotency_key, span)
        else:
            async with self.replay.exclusive(call.run.run_id, idempotency_key):  # a retry waits for its original
                outcome = await self._checked(call, idempotency_key, span)
        if call.run.checkpoint is not None:  # a session's run: its steps and provenance are checkpointed
            await call.run.checkpoint(call.run, outcome)
        return outcome

    async def _checked(self, call: Checked, idempotency_key: str, span: NoSpan | Any) -> ToolOutcome:
        started: dict[str, Any] | None = None
        if idempotency_key:
            found = await self.replay.lookup(call, idempotency_key)
            if isinstance(found, ToolOutcome):
                METRICS.tool_calls.inc(call.tool.name, "replayed")
                return found
            started = found
        call.run.steps += 1
        with TRACING.span("gateway.authorize") as stage:
            tainted = self.taint(call)
            decision = await self.authorize(call, tainted)
            stage.set_attributes({"stitchwork.decision": decision.effect.value,
                                  "stitchwork.policy_ids": list(decision.policy_ids),
                                  "stitchwork.tainted": bool(tainted.record.get("any"))})
        with TRACING.span("gateway.approve") as stage:
            if started is not None:  # it began once and never finished: settled, never simply run again
                settled = await self.uncertain(call, tainted, decision, started, idempotency_key)
                if isinstance(settled, ToolOutcome):
                    return settled
                gate = settled
            else:
                gate = await self.approve(call, tainted, decision)
            stage.set_attribute("stitchwork.decision", gate.decision.effect.value)
        for policy_id in gate.decision.policy_ids:
            METRICS.policy_decisions.inc(policy_id, gate.decision.effect.value)
        span.set_attribute("stitchwork.decision", gate.decision.effect.value)
        durable = self.replay.durable(call, idempotency_key)
        seq = await self.audit.decided(call, tainted, gate, durable=durable)
        if (stopped := refusal(call, gate, seq)) is not None:
            if stopped.status == "approval_required":
                METRICS.approvals_requested.inc(call.tool.name)
            return stopped
        with TRACING.span("gateway.secrets"):
            resolved = await self.secrets(call)
        if isinstance(resolved, ToolOutcome):
            return resolved
        if idempotency_key:
            resolved.env["STITCHWORK_IDEMPOTENCY_KEY"] = idempotency_key
            if started is None:
                await self.replay.start(call, idempotency_key, seq)
            elif isinstance(late := await self.replay.lookup(call, idempotency_key), ToolOutcome):
                return late  # the worker that started it finished after all (it had stalled): its outcome stands
        # A call that started runs to its end and its outcome is recorded even if the caller is cancelled (a
        # worker shutting down): an interrupted side effect would be uncertain, and held for a human.
        running = asyncio.ensure_future(self._run(call, resolved, gate, idempotency_key))
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await running
            raise

    async def _run(self, call: Checked, resolved: Resolved, gate: Gate, key: str) -> ToolOutcome:
        """Execute, label, audit and record one authorized call."""
        execute = self.host if call.tool.host else self.execute
        with TRACING.span("gateway.execute", {"stitchwork.host": bool(call.tool.host)}):
            executed = await execute(call, resolved, gate.decision)
        if isinstance(executed, ToolOutcome):
            await self.replay.record(call, key, executed)
            return executed
        labelled = self.label(call.run, call.tool, executed)
        undo, undo_error = None, ""
        if call.tool.undo and executed.status == "ok":
            undo_args, undo_error = undo_call(call.tool, call.args, labelled.content)
            if undo_args is not None:
                undo = {"tool": call.tool.undo, "args": undo_args}
        with TRACING.span("gateway.audit"):
            seq = await self.audit.executed(call, executed, labelled, gate.decision, key=key, undo=undo,
                                            extra={"undo_error": undo_error} if undo_error else None)
        outcome = ToolOutcome(executed.status, call.tool.name, content=labelled.content, error=executed.error,
                              label=labelled.label, policy_ids=gate.decision.policy_ids, audit_seq=seq)
        await self.replay.record(call, key, outcome)
        return outcome


__all__ = ["SandboxExecute", "ToolDoor"]
