"""HTTP routes of operator access to agent memory (:mod:`stitchwork.service.memory`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from stitchwork.service.memory import grant, grants, list_memory, revoke, search

if TYPE_CHECKING:
    from fastapi import FastAPI

    from stitchwork.service import Service

__all__ = ["GrantIn", "mount"]

_NAME = r"^[A-Za-z0-9_.*-]{1,128}$"


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
