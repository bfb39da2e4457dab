"""Operator access to agent memory: list, search, grant and revoke.

Agents reach memory only through the gateway tools (:mod:`stitchwork.memory.tools`). Operators see every
agent's memory and decide who may read whose: a grant is a change of scope, so it is an operator action (CLI,
API), audited, and never a tool an agent could be talked into calling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from stitchwork.errors import ConfigError, UnknownAgent
from stitchwork.memory.store import AgentMemory, MemoryItem

if TYPE_CHECKING:
    from stitchwork.platform import Platform

__all__ = ["grant", "grants", "list_memory", "revoke", "search"]


def _memory(platform: Platform) -> AgentMemory:
    if platform.memory is None:
        raise ConfigError("this platform was opened without agent memory")
    return platform.memory


def _row(item: MemoryItem, score: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "agent": item.agent, "namespace": item.namespace, "key": item.key, "text": item.text, "value": item.value,
        "labels": [str(lb) for lb in item.labels], "trusted": item.trusted, "updated_at": item.updated_at,
    }
    if score is not None:
        row["score"] = round(score, 4)
    return row


def list_memory(platform: Platform, agent: str | None = None, namespace: str | None = None,
                limit: int = 100) -> list[dict[str, Any]]:
    """Agents with memory (no ``agent``), or one agent's items, newest first; secrets redacted."""
    memory = _memory(platform)
    if agent is None:
        return memory.owners()
    rows = [_row(i) for i in memory.items(agent, namespace=namespace, limit=limit)]
    return [platform.gateway.redactor.redact(r) for r in rows]


def search(platform: Platform, agent: str, query: str, limit: int = 10) -> list[dict[str, Any]]:
    """Full-text search of one agent's memory (operator view)."""
    hits = _memory(platform).search(agent, query, limit=limit)
    return [platform.gateway.redactor.redact(_row(h.item, h.score)) for h in hits]


def grant(platform: Platform, owner: str, grantee: str, *, namespace: str = "*",
          mode: Literal["read", "write"] = "read", by: str) -> dict[str, Any]:
    """Lets ``grantee`` read (or write) ``owner``'s memory; audited. Agents still need a Cedar permit to read.

    Raises:
        UnknownAgent: ``owner`` or ``grantee`` (unless ``*``) is not a registered agent.
    """
    known = set(platform.agents.names())
    for name in (owner, *([] if grantee == "*" else [grantee])):
        if name not in known:
            raise UnknownAgent(f"unknown agent {name!r}; known: {', '.join(sorted(known)) or 'none'}")
    _memory(platform).grant(owner, grantee, namespace=namespace, mode=mode, by=by)
    return {"owner": owner, "grantee": grantee, "namespace": namespace, "mode": mode, "granted": True}


def revoke(platform: Platform, owner: str, grantee: str, *, namespace: str = "*",
           mode: Literal["read", "write"] = "read", by: str) -> dict[str, Any]:
    """Removes one grant; audited."""
    _memory(platform).revoke(owner, grantee, namespace=namespace, mode=mode, by=by)
    return {"owner": owner, "grantee": grantee, "namespace": namespace, "mode": mode, "granted": False}


def grants(platform: Platform, owner: str | None = None) -> list[dict[str, Any]]:
    """The grant rows (of one owner, or all)."""
    return _memory(platform).grants(owner)
