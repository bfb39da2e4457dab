"""Host-side tools: trusted platform code that runs in the gateway's process instead of a sandbox.

A manifest with ``host = "<handler name>"`` (and no ``entry``) declares one. Such a call takes the whole gateway
path (identity, argument validation, taint, Cedar policy, approval, audit) and only the *sandbox → run* step is
replaced: the gateway calls the Python handler registered under that name with :meth:`Gateway.register_host
<stitchwork.gateway.core.Gateway.register_host>`. The handler gets the caller's identity as the gateway verified it
from the run token (:attr:`HostCall.agent`, :attr:`HostCall.run_id`), never from the arguments, and the provenance
of the run so far (:attr:`HostCall.provenance`), so that what it stores can keep the labels of untrusted content.

A handler returns a :class:`HostResult`: a JSON value and, optionally, the provenance labels of that value (for
data read back from a store). The gateway adds the value to the run's content under those labels; without labels,
under ``tool:<name>`` with the manifest's ``trusted_output``. A handler refuses with
:class:`~stitchwork.errors.PolicyDenied` (the agent sees ``denied``) or any other
:class:`~stitchwork.errors.StitchworkError` (``error``); both are audited.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from stitchwork.security.taint import Label

__all__ = ["HostCall", "HostHandler", "HostResult"]


@dataclass(frozen=True)
class HostCall:
    """One call of a host-side tool, as the gateway hands it to the handler.

    Attributes:
        agent: The calling agent, from the verified run token.
        run_id: The run, from the verified run token.
        tool: The tool's name.
        arguments: The validated arguments (secret references already resolved).
        provenance: The untrusted and the confidential labels of everything the run has seen so far (empty: the
            run's content is all trusted and public).
    """

    agent: str
    run_id: str
    tool: str
    arguments: Mapping[str, Any]
    provenance: tuple[Label, ...] = ()


@dataclass(frozen=True)
class HostResult:
    """What a host-side tool returns.

    Attributes:
        value: A JSON-serialisable result.
        labels: Provenance of ``value``; empty means the tool's own label (``tool:<name>``).
    """

    value: Any
    labels: tuple[Label, ...] = ()


HostHandler = Callable[[HostCall], Awaitable[HostResult]]
"""An async function implementing one host-side tool."""
