"""Framework adapters: agents built with another framework, behind Stitchwork's gateway.

``langgraph``      LangGraph / LangChain: the session's tools as LangChain tools (each call through the tool door;
                   a call held for a human becomes a LangGraph ``interrupt()``), the chat model through the model
                   gateway (extra ``langgraph``)
``openai_agents``  the OpenAI Agents SDK: the session's MCP door as an ``MCPServerStreamableHttp``, the model through
                   the model gateway (extra ``openai-agents``)

Both take a *session*: anything with the run's ``token`` and ``openai_base_url`` (and ``mcp_url``), such as the
SDK's ``Stitchwork(url, operator_token).session(agent, task)`` or the JSON of ``stitchwork session open --json``
(:class:`SessionRef`). Nothing here is trusted by the gateway: an adapter only holds a run token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class SessionLike(Protocol):
    """What an adapter needs of a session: the run token and where the gateway's doors are."""

    @property
    def token(self) -> str: ...

    @property
    def openai_base_url(self) -> str: ...


@dataclass(frozen=True)
class SessionRef:
    """A session as ``stitchwork session open --json`` (or ``POST /v1/sessions``) prints it."""

    token: str
    openai_base_url: str
    mcp_url: str = ""
    run_id: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionRef:
        return cls(str(data["token"]), str(data["openai_base_url"]), str(data.get("mcp_url") or ""),
                   str(data.get("run_id") or ""))


def gateway_url(session: SessionLike) -> str:
    """The control plane's base URL (the model gateway's ``…/v1`` without ``/v1``)."""
    base = session.openai_base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def mcp_url(session: SessionLike) -> str:
    """The session's MCP door (``mcp_url``, else ``<gateway>/mcp``)."""
    return str(getattr(session, "mcp_url", "") or f"{gateway_url(session)}/mcp")


__all__ = ["SessionLike", "SessionRef", "gateway_url", "mcp_url"]
