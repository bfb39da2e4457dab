"""The gateway: the only path from an agent to a tool or a model, one facade over several doors.

One tool call::

    authenticate (run token) → validate arguments → taint check → authorize (Cedar) → approval
    → resolve secrets → execute in the tool's sandbox → redact + label output → audit → return

The doors share one :class:`~stitchwork.gateway.context.GatewayContext` and the stages of
:mod:`stitchwork.gateway.stages`: the tool door (:mod:`~stitchwork.gateway.tools`), whose host-side tools run
through :mod:`~stitchwork.gateway.host`, and the model door (:mod:`~stitchwork.gateway.models`). Every refusal on
the way is audited and returned to the agent as a structured error; nothing raises out of
:meth:`Gateway.call_tool` for what an agent sends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stitchwork.audit.log import AuditLog
from stitchwork.compute._base import Model, ModelTurn
from stitchwork.gateway.context import GatewayContext, RunContext, ToolOutcome
from stitchwork.gateway.host import HostExecute
from stitchwork.gateway.idempotency import IdempotencyLedger
from stitchwork.gateway.models import ModelDoor
from stitchwork.gateway.tools import ToolDoor
from stitchwork.gateway.undo import UndoDoor
from stitchwork.security.approvals import ApprovalStore
from stitchwork.security.identity.tokens import TokenClaims, TokenService
from stitchwork.security.policy import PolicyEngine
from stitchwork.security.redact import Redactor
from stitchwork.security.taint import Label
from stitchwork.security.vault import Vault
from stitchwork.tools.host import HostHandler
from stitchwork.tools.manifest import ToolRegistry


class Gateway:
    """Authenticates, authorizes, sandboxes and audits every tool and model call.

    Args:
        context: What the doors share (built once by the platform).
        models: The model door (default: one without deployments, which still serves a direct model).
        host_handlers: Handlers of host-side tools by the name manifests give as ``host``.
    """

    def __init__(self, context: GatewayContext, *, models: ModelDoor | None = None,
                 host_handlers: Mapping[str, HostHandler] | None = None) -> None:
        self.context = context
        self.host = HostExecute(context, host_handlers)
        """The host-tool door's execute stage (:mod:`stitchwork.tools.host`)."""
        self.tool_door = ToolDoor(context, host=self.host)
        self.models = models if models is not None else ModelDoor(context)
        """The model door (policy, provider keys, routing, metering)."""
        self.undo_door = UndoDoor(self.tool_door)
        """Compensations (``stitchwork undo``) through the tool door's stages (:mod:`stitchwork.gateway.undo`)."""

    # -- the shared context -------------------------------------------------------------------------------------

    @property
    def tokens(self) -> TokenService:
        return self.context.tokens

    @property
    def policy(self) -> PolicyEngine:
        return self.context.policy

    @property
    def audit(self) -> AuditLog:
        return self.context.audit

    @property
    def approvals(self) -> ApprovalStore:
        return self.context.approvals

    @property
    def vault(self) -> Vault:
        return self.context.vault

    @property
    def tools(self) -> ToolRegistry:
        return self.context.tools

    @property
    def idempotency(self) -> IdempotencyLedger | None:
        return self.context.idempotency

    @property
    def redactor(self) -> Redactor:
        return self.context.redactor

    @property
    def runs(self) -> Mapping[str, RunContext]:
        """The live runs by id."""
        return self.context.runs

    @property
    def host_handlers(self) -> Mapping[str, HostHandler]:
        return self.host.handlers

    # -- set-up -----------------------------------------------------------------------------------------------

    def refresh_secrets(self) -> None:
        """Rebuilds the redactor from the vault (call after a secret changes)."""
        self.context.refresh_secrets()

    def register_host(self, name: str, handler: HostHandler) -> None:
        """Registers the handler of the host-side tools whose manifest says ``host = name``."""
        self.host.register(name, handler)

    def open_run(
        self, run_id: str, agent: str, *, workdir: Path, max_steps: int, provenance: Mapping[str, Any] | None = None
    ) -> RunContext:
        """Registers a live run so its calls can be checked; ``provenance`` restores a checkpoint."""
        return self.context.open_run(run_id, agent, workdir=workdir, max_steps=max_steps, provenance=provenance)

    def close_run(self, run_id: str) -> None:
        self.context.close_run(run_id)

    def record_content(self, run_id: str, text: str, label: Label) -> Label:
        """Labels content that enters a run outside a tool call (the user's task, channel messages)."""
        return self.context.record_content(run_id, text, label)

    async def aclose(self) -> None:
        await self.models.aclose()
        await self.context.aclose()

    # -- the doors ------------------------------------------------------------------------------------------------

    async def authenticate(self, token: str | None, *, action: str) -> TokenClaims:
        """Verifies a run token; a refusal is audited and re-raised."""
        return await self.tool_door.authenticate(token, action=action)

    async def call_tool(
        self,
        token: str | None,
        tool_name: str,
        arguments: str | bytes | Mapping[str, Any] | None,
        *,
        idempotency_key: str = "",
    ) -> ToolOutcome:
        """Runs one tool call through the whole gateway path. Never raises for what the agent sent."""
        return await self.tool_door.call(token, tool_name, arguments, idempotency_key=idempotency_key)

    # -- models -----------------------------------------------------------------------------------------------

    async def complete(
        self, token: str | None, model: Model, messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]],
    ) -> ModelTurn:
        """One model call through the model door: authenticated, secrets redacted, admitted, metered, audited."""
        return await self.models.complete(token, model, messages, tools)


__all__ = ["Gateway", "GatewayContext", "RunContext", "ToolOutcome"]
