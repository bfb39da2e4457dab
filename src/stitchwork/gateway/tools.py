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
    LabelOutput,
    Replay,
    Resolved,
    Secrets,
    Taint,
    Validate,
    refusal,
)
from stitchwork.isolation._base import PythonCall, SandboxSpec
from stitchwork.security.policy import Decision


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
                                                             "sandbox": sandbox_uri}, decision="error")
            return ToolOutcome("error", tool.name, error=exc.to_dict(), audit_seq=seq)
        elapsed = time.perf_counter() - started
        details = {"sandbox": sandbox_uri, "exit_code": result.exit_code, "killed": result.killed,
                   "duration_ms": round(elapsed * 1000, 3), "cpu_s": result.cpu_s, "max_rss_kb": result.max_rss_kb}
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
        """Runs one tool call through every stage. Never raises for what the agent sent."""
        try:
            claims = await self.authenticate(token, action=tool_name if isinstance(tool_name, str) else "?")
        except AuthError as exc:
            return ToolOutcome("unauthenticated", str(tool_name), error=exc.to_dict())
        call = await self.validate(claims, tool_name, arguments)
        if isinstance(call, ToolOutcome):
            return call
        if not idempotency_key:
            outcome = await self._checked(call, idempotency_key)
        else:
            async with self.replay.exclusive(call.run.run_id, idempotency_key):  # a retry waits for its original
                outcome = await self._checked(call, idempotency_key)
        if call.run.checkpoint is not None:
            await call.run.checkpoint(call.run, outcome)
        return outcome

    async def _checked(self, call: Checked, idempotency_key: str) -> ToolOutcome:
        if idempotency_key and (replayed := await self.replay.lookup(call, idempotency_key)) is not None:
            return replayed
        call.run.steps += 1
        tainted = self.taint(call)
        gate = await self.approve(call, tainted, await self.authorize(call, tainted))
        seq = await self.audit.decided(call, tainted, gate)
        if (stopped := refusal(call, gate, seq)) is not None:
            return stopped
        resolved = await self.secrets(call)
        if isinstance(resolved, ToolOutcome):
            return resolved
        if idempotency_key:
            resolved.env["STITCHWORK_IDEMPOTENCY_KEY"] = idempotency_key
        execute = self.host if call.tool.host else self.execute
        executed = await execute(call, resolved, gate.decision)
        if isinstance(executed, ToolOutcome):
            return executed
        labelled = self.label(call.run, call.tool, executed)
        seq = await self.audit.executed(call, executed, labelled, gate.decision)
        outcome = ToolOutcome(executed.status, call.tool.name, content=labelled.content, error=executed.error,
                              label=labelled.label, policy_ids=gate.decision.policy_ids, audit_seq=seq)
        if idempotency_key:
            await self.replay.record(call, idempotency_key, outcome)
        return outcome


__all__ = ["SandboxExecute", "ToolDoor"]
