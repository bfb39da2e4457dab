"""Operator access to agent memory: list, search, grant and revoke, and their HTTP routes.

Agents reach memory only through the gateway tools (:mod:`stitchwork.data.memory_tools`). Operators see every
agent's memory and decide who may read whose: a grant is a change of scope, so it is an operator action (CLI,
API), audited, and never a tool an agent could be talked into calling.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from stitchwork.data.memory import AgentMemory, MemoryItem
from stitchwork.errors import ConfigError, UnknownAgent

if TYPE_CHECKING:
    from fastapi import FastAPI

    from stitchwork.platform import Platform
    from stitchwork.service import Service

__all__ = ["GrantIn", "grant", "grants", "list_memory", "mount", "revoke", "search"]

_NAME = r"^[A-Za-z0-9_.*-]{1,128}$"


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


class GrantIn(BaseModel):
    owner: str = Field(pattern=_NAME)
    grantee: str = Field(pattern=_NAME)
    namespace: str = Field(default="*", pattern=_NAME)
    mode: Literal["read", "write"] = "read"


def mount(app: FastAPI, service: Service) -> None:
    """Adds ``/v1/memory`` (agents), ``/v1/memory/{agent}`` (items), ``/v1/memory/{agent}/search``,
    ``/v1/memory/grants`` (GET, POST) and ``/v1/memory/grants/revoke`` (POST); all need the operator token."""
    platform = service.platform

    @app.get("/v1/memory")
    async def memory_owners() -> list[dict[str, Any]]:
        return await asyncio.to_thread(list_memory, platform)

    @app.get("/v1/memory/grants")
    async def memory_grants(owner: str | None = None) -> list[dict[str, Any]]:
        return await asyncio.to_thread(grants, platform, owner)

    @app.post("/v1/memory/grants")
    async def memory_grant(body: GrantIn) -> dict[str, Any]:
        return await asyncio.to_thread(grant, platform, body.owner, body.grantee, namespace=body.namespace,
                                       mode=body.mode, by="operator:api")

    @app.post("/v1/memory/grants/revoke")
    async def memory_revoke(body: GrantIn) -> dict[str, Any]:
        return await asyncio.to_thread(revoke, platform, body.owner, body.grantee, namespace=body.namespace,
                                       mode=body.mode, by="operator:api")

    @app.get("/v1/memory/{agent}")
    async def memory_items(agent: str, namespace: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return await asyncio.to_thread(list_memory, platform, agent, namespace, min(max(limit, 1), 10_000))

    @app.get("/v1/memory/{agent}/search")
    async def memory_search(agent: str, q: str, limit: int = 10) -> list[dict[str, Any]]:
        return await asyncio.to_thread(search, platform, agent, q, min(max(limit, 1), 1000))
