"""The gateway: the only path from an agent to a tool or a model.

One tool call::

    authenticate (run token) → validate arguments → taint check → authorize (Cedar) → approval
    → resolve secrets → execute in the tool's sandbox → redact + label output → audit → return

Every refusal on the way is audited and returned to the agent as a structured error; nothing raises out of
:meth:`Gateway.call_tool` for what an agent sends.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stitchwork.audit.log import AuditLog
from stitchwork.compute._base import Model, ModelTurn
from stitchwork.errors import (
    AuthError,
    PolicyDenied,
    SecretError,
    SecretNotGranted,
    StitchworkError,
    UnknownAgent,
)
from stitchwork.gateway.idempotency import IdempotencyLedger, ledger_get, ledger_put
from stitchwork.isolation._base import Limits, PythonCall, Sandbox, SandboxSpec, isolation_label, open_sandbox
from stitchwork.security.approvals import ApprovalStore
from stitchwork.security.identity.tokens import TokenClaims, TokenService
from stitchwork.security.policy import Decision, Effect, PolicyEngine, Request
from stitchwork.security.redact import Redactor
from stitchwork.security.taint import ArgumentTaint, Label, ProvenanceTracker
from stitchwork.security.vault import Vault
from stitchwork.tools.host import HostCall, HostHandler, HostResult
from stitchwork.tools.manifest import SideEffect, ToolManifest, ToolRegistry

if TYPE_CHECKING:
    from stitchwork.gateway.models import ModelGateway

SECRET_REF = re.compile(r"secret://([A-Za-z0-9_.-]{1,128})")


@dataclass
class RunContext:
    """What the gateway knows of one live run: its content with provenance, and its budget."""

    run_id: str
    agent: str
    workdir: Path
    tracker: ProvenanceTracker
    max_steps: int = 20
    steps: int = 0
    idempotent: dict[str, ToolOutcome] = field(default_factory=dict)
    _workdirs: dict[str, Path] = field(default_factory=dict)

    def tool_workdir(self, tool: str) -> Path:
        """The tool's own writable directory in this run (created once)."""
        if tool not in self._workdirs:
            path = self.workdir / tool
            path.mkdir(parents=True, exist_ok=True)
            self._workdirs[tool] = path
        return self._workdirs[tool]


@dataclass(frozen=True)
class ToolOutcome:
    """What the agent gets back for one tool call.

    ``status`` is ``ok``, ``error`` (the tool ran and failed), ``invalid`` (bad call), ``denied`` (policy or
    human said no), ``approval_required`` (paused for a human) or ``unauthenticated``.
    """

    status: str
    tool: str
    content: Any = None
    error: dict[str, Any] | None = None
    label: str = ""
    approval_id: str = ""
    policy_ids: tuple[str, ...] = ()
    audit_seq: int = 0

    def to_message_content(self) -> str:
        """The tool message the model sees (JSON)."""
        body: dict[str, Any] = {"status": self.status}
        if self.content is not None:
            body["result"] = self.content
        if self.error is not None:
            body["error"] = self.error
        if self.approval_id:
            body["approval_id"] = self.approval_id
        return json.dumps(body, ensure_ascii=False, default=str)


def _digest(value: Any) -> str:
    body = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "replace")
    return hashlib.sha256(body).hexdigest()


def _content_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


class Gateway:
    """Authenticates, authorizes, sandboxes and audits every tool and model call."""

    def __init__(
        self,
        *,
        tokens: TokenService,
        policy: PolicyEngine,
        audit: AuditLog,
        approvals: ApprovalStore,
        vault: Vault,
        tools: ToolRegistry,
        agents: Mapping[str, Sequence[str]],
        default_sandbox: str,
        limits: Limits,
        trusted_sources: frozenset[str] = frozenset(),
        audience: str | None = None,
        idempotency: IdempotencyLedger | None = None,
        allow_inline: bool = False,
    ) -> None:
        self.tokens = tokens
        self.allow_inline = allow_inline
        """``[isolation] allow_inline``: whether ``inline://`` (no isolation) may run tools."""
        self.idempotency = idempotency
        """Durable outcomes of side-effecting calls by idempotency key (``None``: this process only)."""
        self.policy = policy
        self.audit = audit
        self.approvals = approvals
        self.vault = vault
        self.tools = tools
        self.agents = {name: frozenset(allowed) for name, allowed in agents.items()}
        self.default_sandbox = default_sandbox
        self.limits = limits
        self.trusted_sources = trusted_sources
        self.audience = audience
        self.runs: dict[str, RunContext] = {}
        self._sandboxes: dict[str, Sandbox] = {}
        self.redactor = Redactor({})
        self.models: ModelGateway | None = None
        """The model gateway (policy, provider keys, routing, metering); set by the platform."""
        self.host_handlers: dict[str, HostHandler] = {}
        """Host-side tool handlers by the name manifests give as ``host`` (:mod:`stitchwork.tools.host`)."""
        self.refresh_secrets()

    # -- set-up -----------------------------------------------------------------------------------------------

    def refresh_secrets(self) -> None:
        """Rebuilds the redactor from the vault (call after a secret changes)."""
        values: dict[str, str] = {}
        for name in self.vault.names():
            try:
                values[name] = self.vault.get(name)
            except SecretError:
                continue
        self.redactor = Redactor(values)

    def register_host(self, name: str, handler: HostHandler) -> None:
        """Registers the handler of the host-side tools whose manifest says ``host = name``."""
        self.host_handlers[name] = handler

    def sandbox(self, uri: str) -> Sandbox:
        if uri not in self._sandboxes:
            self._sandboxes[uri] = open_sandbox(uri, allow_inline=self.allow_inline)
        return self._sandboxes[uri]

    def open_run(
        self, run_id: str, agent: str, *, workdir: Path, max_steps: int, provenance: Mapping[str, Any] | None = None
    ) -> RunContext:
        """Registers a live run so its calls can be checked; ``provenance`` restores a checkpoint."""
        if agent not in self.agents:
            raise UnknownAgent(f"unknown agent {agent!r}; known: {', '.join(sorted(self.agents)) or 'none'}")
        tracker = (
            ProvenanceTracker.restore(provenance, trusted_sources=self.trusted_sources)
            if provenance
            else ProvenanceTracker(trusted_sources=self.trusted_sources)
        )
        workdir.mkdir(parents=True, exist_ok=True)
        run = RunContext(run_id, agent, workdir, tracker, max_steps=max_steps)
        self.runs[run_id] = run
        return run

    def close_run(self, run_id: str) -> None:
        self.runs.pop(run_id, None)

    async def aclose(self) -> None:
        if self.models is not None:
            await self.models.aclose()
        for sandbox in self._sandboxes.values():
            await sandbox.aclose()
        self._sandboxes.clear()

    # -- identity ---------------------------------------------------------------------------------------------

    async def authenticate(self, token: str | None, *, action: str) -> TokenClaims:
        """Verifies a run token; a refusal is audited and re-raised."""
        try:
            return self.tokens.verify(token, audience=self.audience)
        except AuthError as exc:
            await self.audit.aappend("auth", tool=action, decision="deny", data={"error": exc.code, "reason": str(exc)})
            raise

    # -- tools ------------------------------------------------------------------------------------------------

    async def call_tool(
        self,
        token: str | None,
        tool_name: str,
        arguments: str | bytes | Mapping[str, Any] | None,
        *,
        idempotency_key: str = "",
    ) -> ToolOutcome:
        """Runs one tool call through the whole gateway path. Never raises for what the agent sent."""
        try:
            claims = await self.authenticate(token, action=tool_name if isinstance(tool_name, str) else "?")
        except AuthError as exc:
            return ToolOutcome("unauthenticated", str(tool_name), error=exc.to_dict())
        agent, run_id = claims.agent, claims.run_id
        base = {"agent": agent, "run_id": run_id, "tool": str(tool_name)}
        try:
            if agent not in self.agents:
                raise UnknownAgent(f"agent {agent!r} is not registered")
            run = self.runs.get(run_id)
            if run is None or run.agent != agent:
                raise AuthError(f"run {run_id} is not active for agent {agent!r}")
            tool = self.tools.get(tool_name)
            if tool.name not in self.agents[agent]:
                raise PolicyDenied(f"agent {agent!r} is not given the tool {tool.name!r}", policy_ids=("agent-tools",))
            args = self.tools.parse_arguments(tool, arguments)
        except StitchworkError as exc:
            status = "denied" if isinstance(exc, PolicyDenied) else "invalid"
            ids = exc.policy_ids if isinstance(exc, PolicyDenied) else ()
            reason = self.redactor.redact_text(str(exc))
            event = await self.audit.aappend("decision", **base, decision="deny",
                                             data={"error": exc.code, "reason": reason})
            return ToolOutcome(status, str(tool_name), error=self.redactor.redact(exc.to_dict()),
                               policy_ids=ids, audit_seq=event.seq)

        if idempotency_key and idempotency_key in run.idempotent:
            return run.idempotent[idempotency_key]
        durable_key = bool(idempotency_key and self.idempotency is not None and tool.side_effect is not SideEffect.READ)
        if durable_key and self.idempotency is not None:
            recorded = await ledger_get(self.idempotency, run_id, idempotency_key)
            if recorded is not None:
                replayed = ToolOutcome(**{**recorded, "policy_ids": tuple(recorded.get("policy_ids", ()))})
                run.idempotent[idempotency_key] = replayed
                run.steps += 1
                if replayed.content is not None:
                    run.tracker.add(_content_text(replayed.content), Label(f"tool:{tool.name}", tool.trusted_output))
                await self.audit.aappend("tool", **base, decision="replayed",
                                         data={"idempotency_key": idempotency_key, "audit_seq": replayed.audit_seq})
                return replayed
        run.steps += 1
        taint = run.tracker.check(args)
        target = str(args.get(tool.target, "")) if tool.target else ""
        decision = await self._decide(run, tool, args, target, taint, approved=False)
        approval_id = ""
        if decision.effect is Effect.ASK:
            refused = self.approvals.denied(run_id, agent, tool.name, args)
            if refused is not None:
                decision = Decision(Effect.DENY, (*decision.policy_ids, f"approval:{refused.id}"),
                                    (f"a human {refused.status.value} approval {refused.id}",), ())
            elif (granted := self.approvals.consume(run_id, agent, tool.name, args)) is not None:
                approval_id = granted.id
                decision = await self._decide(run, tool, args, target, taint, approved=True)
                if decision.effect is Effect.ASK:
                    decision = Decision(Effect.DENY, decision.policy_ids, ("approval did not satisfy policy",), ())
        audit_args = self.redactor.redact(args)
        decision_data = {
            "effect": decision.effect.value, "policy_ids": list(decision.policy_ids),
            "reasons": list(decision.reasons), "target": self.redactor.redact_text(target),
            "taint": taint.context(tool.target), "side_effect": tool.side_effect.value, "jti": claims.jti,
            "arguments": audit_args, "approval_id": approval_id,
        }
        if decision.effect is Effect.ASK:
            approval = self.approvals.request(
                run_id=run_id, agent=agent, tool=tool.name, target=target, arguments=args,
                policy_ids=decision.policy_ids, reason="; ".join(decision.reasons),
            )
            decision_data["approval_id"] = approval.id
            event = await self.audit.aappend("approval", **base, decision="ask", data=decision_data)
            return ToolOutcome(
                "approval_required", tool.name, approval_id=approval.id, policy_ids=decision.policy_ids,
                error={"error": "approval_required", "message": "this call waits for a human approval",
                       "approval_id": approval.id, "policy_ids": list(decision.policy_ids)},
                audit_seq=event.seq,
            )
        if decision.effect is Effect.DENY:
            event = await self.audit.aappend("decision", **base, decision="deny", data=decision_data)
            denied = PolicyDenied(
                f"policy denied {tool.name}: {'; '.join(decision.reasons) or 'no policy permits it'}",
                policy_ids=decision.policy_ids,
            )
            return ToolOutcome("denied", tool.name, error=denied.to_dict(), policy_ids=decision.policy_ids,
                               audit_seq=event.seq)
        # Durable together with the execution event awaited below (the journal is written in chain order).
        self.audit.append_nowait("decision", **base, decision="allow", data=decision_data)

        try:
            resolved, env, used = self._resolve_secrets(tool, args)
        except SecretError as exc:
            event = await self.audit.aappend("secret", **base, decision="deny",
                                             data={"error": exc.code, "reason": str(exc)})
            return ToolOutcome("denied", tool.name, error=exc.to_dict(), audit_seq=event.seq)
        if used:
            self.audit.append_nowait("secret", **base, decision="allow", data={"secrets": sorted(used)})

        if idempotency_key:
            env["STITCHWORK_IDEMPOTENCY_KEY"] = idempotency_key
        outcome = await self._execute(run, tool, resolved, env, base, decision)
        if idempotency_key and outcome.status == "ok":
            run.idempotent[idempotency_key] = outcome
            if durable_key and self.idempotency is not None:
                await ledger_put(self.idempotency, run_id, idempotency_key, dataclasses.asdict(outcome))
        return outcome

    async def _decide(
        self, run: RunContext, tool: ToolManifest, args: Mapping[str, Any], target: str, taint: ArgumentTaint,
        *, approved: bool,
    ) -> Decision:
        now = time.time()
        local = time.localtime(now)
        context = {
            "side_effect": tool.side_effect.value,
            "approved": approved,
            "taint": taint.context(tool.target),
            "budget": {"steps": run.steps, "max_steps": run.max_steps},
            "time": {"unix": int(now), "hour": local.tm_hour, "weekday": local.tm_wday},
            "args": dict(args),
        }
        return await self.policy.adecide(Request(agent=run.agent, tool=tool.name, target=target, context=context))

    def _resolve_secrets(
        self, tool: ToolManifest, args: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, str], set[str]]:
        used: set[str] = set()

        def resolve(value: Any) -> Any:
            if isinstance(value, str):
                def sub(match: re.Match[str]) -> str:
                    name = match.group(1)
                    if name not in tool.secrets:
                        raise SecretNotGranted(
                            f"tool {tool.name!r} is not granted secret {name!r} (its manifest lists: "
                            f"{', '.join(tool.secrets) or 'none'})"
                        )
                    used.add(name)
                    return self.vault.get(name)
                return SECRET_REF.sub(sub, value)
            if isinstance(value, dict):
                return {k: resolve(v) for k, v in value.items()}
            if isinstance(value, list):
                return [resolve(v) for v in value]
            return value

        resolved = resolve(dict(args))
        env: dict[str, str] = {}
        for name in tool.secrets:
            env["STITCHWORK_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()] = self.vault.get(name)
            used.add(name)
        return resolved, env, used

    async def _execute(
        self, run: RunContext, tool: ToolManifest, args: dict[str, Any], env: dict[str, str],
        base: dict[str, str], decision: Decision,
    ) -> ToolOutcome:
        if tool.host:
            return await self._execute_host(run, tool, args, base, decision)
        workdir = run.tool_workdir(tool.name)
        spec = SandboxSpec(
            program=PythonCall(tool.entry_file, tool.entry_function, {"args": args}),
            workdir=workdir,
            env=env,
            limits=tool.limits_over(self.limits),
            egress=tool.egress,
        )
        sandbox_uri = tool.sandbox or self.default_sandbox
        started = time.perf_counter()
        try:
            result = await self.sandbox(sandbox_uri).run(spec)
        except StitchworkError as exc:
            event = await self.audit.aappend("tool", **base, decision="error",
                                             data={"error": exc.code, "reason": str(exc), "sandbox": sandbox_uri,
                                                   "isolation": isolation_label(sandbox_uri)})
            return ToolOutcome("error", tool.name, error=exc.to_dict(), audit_seq=event.seq)
        elapsed = time.perf_counter() - started
        if result.ok:
            content = self.redactor.redact(result.value)
            status, error = "ok", None
        else:
            reason = result.killed or "error"
            stderr = result.stderr.decode("utf-8", "replace")[-2000:]
            message = result.error or stderr or f"exit code {result.exit_code}"
            content = None
            status = "error"
            error = {"error": f"tool_{reason}", "message": self.redactor.redact_text(message)}
        label = Label(f"tool:{tool.name}", tool.trusted_output)
        if content is not None:
            label = run.tracker.add(_content_text(content), label)
        event = await self.audit.aappend(
            "tool", **base, decision=status,
            data={
                "sandbox": sandbox_uri, "isolation": isolation_label(sandbox_uri),
                "exit_code": result.exit_code, "killed": result.killed,
                "duration_ms": round(elapsed * 1000, 3), "cpu_s": result.cpu_s, "max_rss_kb": result.max_rss_kb,
                "output_sha256": _digest(content), "label": str(label), "undo": tool.undo,
                "side_effect": tool.side_effect.value, "policy_ids": list(decision.policy_ids),
                "error": error,
            },
        )
        return ToolOutcome(status, tool.name, content=content, error=error, label=str(label),
                           policy_ids=decision.policy_ids, audit_seq=event.seq)

    async def _execute_host(
        self, run: RunContext, tool: ToolManifest, args: dict[str, Any], base: dict[str, str], decision: Decision,
    ) -> ToolOutcome:
        """Step 6 for a host-side tool: the registered handler, called with the verified identity."""
        started = time.perf_counter()
        call = HostCall(run.agent, run.run_id, tool.name, args, run.tracker.untrusted_labels())
        try:
            handler = self.host_handlers.get(tool.host)
            if handler is None:
                raise StitchworkError(f"no handler is registered for host-side tool {tool.name!r} ({tool.host})")
            result = await handler(call)
            if not isinstance(result, HostResult) or not all(isinstance(lb, Label) for lb in result.labels):
                raise TypeError(f"the handler returned {type(result).__name__}, not a HostResult with Labels")
        except Exception as caught:  # a handler bug must not escape call_tool: it is audited as an error
            exc = caught if isinstance(caught, StitchworkError) else StitchworkError(
                f"host-side tool {tool.name!r} failed: {type(caught).__name__}: {caught}")
            status = "denied" if isinstance(exc, PolicyDenied) else "error"
            error = self.redactor.redact(exc.to_dict())
            event = await self.audit.aappend("tool", **base, decision="deny" if status == "denied" else "error",
                                             data={"host": tool.host, "error": exc.code,
                                                   "reason": self.redactor.redact_text(str(exc))})
            return ToolOutcome(status, tool.name, error=error, policy_ids=decision.policy_ids, audit_seq=event.seq)
        content = self.redactor.redact(result.value)
        labels = result.labels or (Label(f"tool:{tool.name}", tool.trusted_output),)
        # Untrusted parts must not be grounded by trusted ones: mixed content is recorded as untrusted only.
        untrusted = [lb for lb in labels if not lb.trusted]
        recorded = [run.tracker.add(_content_text(content), lb) for lb in (untrusted or labels)]
        label = ", ".join(str(lb) for lb in recorded)
        event = await self.audit.aappend(
            "tool", **base, decision="ok",
            data={
                "host": tool.host, "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                "output_sha256": _digest(content), "label": label, "undo": tool.undo,
                "side_effect": tool.side_effect.value, "policy_ids": list(decision.policy_ids), "error": None,
            },
        )
        return ToolOutcome("ok", tool.name, content=content, label=label, policy_ids=decision.policy_ids,
                           audit_seq=event.seq)

    # -- models -----------------------------------------------------------------------------------------------

    async def complete(
        self, token: str | None, model: Model, messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]],
    ) -> ModelTurn:
        """One model call through the gateway: authenticated, secrets redacted from the prompt, audited."""
        claims = await self.authenticate(token, action="model")
        safe_messages = self.redactor.redact_messages(claims.run_id, messages)  # only new messages are redacted
        if self.models is not None:
            return await self.models.complete(claims, model, safe_messages, tools)
        started = time.perf_counter()
        try:
            turn = await model.complete(safe_messages, tools)
        except StitchworkError as exc:
            await self.audit.aappend("model", agent=claims.agent, run_id=claims.run_id, decision="error",
                                     data={"model": model.uri, "error": exc.code, "reason": str(exc)})
            raise
        await self.audit.aappend(
            "model", agent=claims.agent, run_id=claims.run_id, decision="ok",
            data={
                "model": model.uri, "prompt_sha256": _digest(safe_messages),
                "completion_sha256": _digest(turn.as_message()),
                "prompt_tokens": turn.usage.prompt_tokens, "completion_tokens": turn.usage.completion_tokens,
                "tool_calls": [c.name for c in turn.tool_calls],
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            },
        )
        return turn

    def record_content(self, run_id: str, text: str, label: Label) -> Label:
        """Labels content that enters a run outside a tool call (the user's task, channel messages)."""
        return self.runs[run_id].tracker.add(text, label)


__all__ = ["Gateway", "RunContext", "ToolOutcome"]
