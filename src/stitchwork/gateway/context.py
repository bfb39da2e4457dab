"""What every door of the gateway shares: one :class:`GatewayContext`, built once by the platform.

The tool door, the host-tool door and the model door (and later the MCP and A2A doors) read identity, policy,
approvals, secrets, audit, the idempotency ledger, the sandboxes and the live runs from here; none of them owns a
copy. Also here: the result of a tool call (:class:`ToolOutcome`), the state of one live run (:class:`RunContext`)
and :func:`digest`, the hash every audit event uses for prompts, completions and tool outputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stitchwork.audit.log import AuditLog
from stitchwork.errors import SecretError, UnknownAgent
from stitchwork.gateway.idempotency import IdempotencyLedger
from stitchwork.isolation._base import Limits, Sandbox, open_sandbox
from stitchwork.security.approvals import ApprovalStore
from stitchwork.security.identity.tokens import TokenService
from stitchwork.security.policy import PolicyEngine
from stitchwork.security.redact import Redactor
from stitchwork.security.taint import Label, ProvenanceTracker
from stitchwork.security.vault import Vault
from stitchwork.tools.manifest import ToolRegistry


def digest(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (sorted keys; a lone surrogate is replaced, never an error)."""
    body = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "replace")
    return hashlib.sha256(body).hexdigest()


def content_text(value: Any) -> str:
    """The text of a tool's output as the run's provenance records it (JSON unless it is a string)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


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
    checkpoint: Callable[[RunContext, ToolOutcome], Awaitable[None]] | None = None
    """Called after each of the run's tool calls with its outcome (a session run persists its steps and provenance
    and publishes a run event here)."""
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


class Sandboxes:
    """The sandboxes tool calls run in, by URI: opened on first use, closed with the gateway.

    Args:
        default: The URI of tools whose manifest names no sandbox.
        limits: The platform's resource limits (a manifest may override some per tool).
        bound: Sandboxes already open for some URIs (a harness's own adapter); used as they are, never closed here.
    """

    def __init__(self, default: str, limits: Limits, *, bound: Mapping[str, Sandbox] | None = None) -> None:
        self.default = default
        self.limits = limits
        self._bound = dict(bound or {})
        self._opened: dict[str, Sandbox] = {}

    def get(self, uri: str) -> Sandbox:
        """The sandbox for ``uri`` (opened now if it is the first call there)."""
        if uri in self._bound:
            return self._bound[uri]
        if uri not in self._opened:
            self._opened[uri] = open_sandbox(uri)
        return self._opened[uri]

    async def aclose(self) -> None:
        for sandbox in self._opened.values():
            await sandbox.aclose()
        self._opened.clear()


class GatewayContext:
    """Everything the gateway's doors and stages share, built once (by :meth:`Platform.open
    <stitchwork.platform.Platform.open>`).

    Args:
        tokens: Issues and verifies run tokens.
        policy: The Cedar engine of tool and model calls.
        audit: The hash-chained audit log.
        approvals: Human approvals.
        vault: Secrets; the redactor is built from it (:meth:`refresh_secrets`).
        tools: The tool manifests.
        agents: Each agent's tools by agent name.
        sandboxes: Where tool calls run.
        trusted_sources: Provenance sources the operator trusts.
        audience: The audience run tokens must carry (``None``: the token service's default).
        idempotency: Durable outcomes of side-effecting calls by idempotency key (``None``: this process only).
    """

    def __init__(
        self,
        *,
        tokens: TokenService,
        policy: PolicyEngine,
        audit: AuditLog,
        approvals: ApprovalStore,
        vault: Vault,
        tools: ToolRegistry,
        agents: Mapping[str, Collection[str]],
        sandboxes: Sandboxes,
        trusted_sources: frozenset[str] = frozenset(),
        audience: str | None = None,
        idempotency: IdempotencyLedger | None = None,
    ) -> None:
        self.tokens = tokens
        self.policy = policy
        self.audit = audit
        self.approvals = approvals
        self.vault = vault
        self.tools = tools
        self.agents = {name: frozenset(allowed) for name, allowed in agents.items()}
        self.sandboxes = sandboxes
        self.trusted_sources = trusted_sources
        self.audience = audience
        self.idempotency = idempotency
        self.runs: dict[str, RunContext] = {}
        """The live runs by id, each with its provenance (taint) and budget."""
        self.run_loader: Callable[[str], RunContext | None] | None = None
        """Restores a run that is not live in this process (an operator's session after a restart), or ``None``."""
        self.redactor = Redactor({})
        """Replaces every secret of the vault in text that leaves the gateway (rebuilt by :meth:`refresh_secrets`)."""
        self.refresh_secrets()

    def refresh_secrets(self) -> None:
        """Rebuilds the redactor from the vault (call after a secret changes)."""
        values: dict[str, str] = {}
        for name in self.vault.names():
            try:
                values[name] = self.vault.get(name)
            except SecretError:
                continue
        self.redactor = Redactor(values)

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

    def live_run(self, run_id: str) -> RunContext | None:
        """The live run ``run_id``, restored by :attr:`run_loader` when this process does not hold it."""
        run = self.runs.get(run_id)
        if run is None and self.run_loader is not None:
            run = self.run_loader(run_id)
        return run

    def record_content(self, run_id: str, text: str, label: Label) -> Label:
        """Labels content that enters a run outside a tool call (the user's task, channel messages)."""
        return self.runs[run_id].tracker.add(text, label)

    async def aclose(self) -> None:
        await self.sandboxes.aclose()


__all__ = ["GatewayContext", "RunContext", "Sandboxes", "ToolOutcome", "content_text", "digest"]
