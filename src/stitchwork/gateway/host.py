"""The host-tool door: trusted platform code (agent memory...) behind the same stages as every tool.

A host-side tool (:mod:`stitchwork.tools.host`) is called like any tool and passes identity, validation, taint,
policy, approval, secrets, labelling and audit; only the execute stage differs: :class:`HostExecute` calls the
Python handler registered for the manifest's ``host`` name, with the identity the gateway verified.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from stitchwork.errors import PolicyDenied, StitchworkError
from stitchwork.gateway.context import GatewayContext, ToolOutcome
from stitchwork.gateway.stages import Audit, Checked, Executed, Resolved
from stitchwork.security.policy import Decision
from stitchwork.security.taint import Label
from stitchwork.tools.host import HostCall, HostHandler, HostResult


class HostExecute:
    """Step 6 of a host-side tool: the handler registered under its manifest's ``host`` name.

    Args:
        context: The gateway's shared context.
        handlers: Handlers by the name manifests give as ``host``.
    """

    def __init__(self, context: GatewayContext, handlers: Mapping[str, HostHandler] | None = None) -> None:
        self.context = context
        self.handlers: dict[str, HostHandler] = dict(handlers or {})
        self.audit = Audit(context)

    def register(self, name: str, handler: HostHandler) -> None:
        """Registers the handler of the host-side tools whose manifest says ``host = name``."""
        self.handlers[name] = handler

    async def __call__(self, call: Checked, resolved: Resolved, decision: Decision) -> Executed | ToolOutcome:
        tool, run = call.tool, call.run
        started = time.perf_counter()
        request = HostCall(run.agent, run.run_id, tool.name, resolved.args, run.tracker.memory_labels())
        try:
            handler = self.handlers.get(tool.host)
            if handler is None:
                raise StitchworkError(f"no handler is registered for host-side tool {tool.name!r} ({tool.host})")
            result = await handler(request)
            if not isinstance(result, HostResult) or not all(isinstance(lb, Label) for lb in result.labels):
                raise TypeError(f"the handler returned {type(result).__name__}, not a HostResult with Labels")
        except Exception as caught:  # a handler bug must not escape the door: it is audited as an error
            exc = caught if isinstance(caught, StitchworkError) else StitchworkError(
                f"host-side tool {tool.name!r} failed: {type(caught).__name__}: {caught}")
            status = "denied" if isinstance(exc, PolicyDenied) else "error"
            redactor = self.context.redactor
            seq = await self.audit.record("tool", call.who, {"host": tool.host, "error": exc.code,
                                                             "reason": redactor.redact_text(str(exc))},
                                          decision="deny" if status == "denied" else "error")
            return ToolOutcome(status, tool.name, error=redactor.redact(exc.to_dict()),
                               policy_ids=decision.policy_ids, audit_seq=seq)
        details = {"host": tool.host, "duration_ms": round((time.perf_counter() - started) * 1000, 3)}
        return Executed("ok", result.value, None, details, labels=tuple(result.labels))


__all__ = ["HostExecute"]
