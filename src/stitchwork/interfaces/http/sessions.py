"""Sessions over HTTP (operator token): open, renew, close and list external runs (:mod:`stitchwork.service.sessions`).

``POST /v1/sessions`` answers ``{run_id, agent, token, mcp_url, openai_base_url, expires_at}``; the URLs are the
control plane as the caller reached it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from stitchwork.service import Service


class SessionIn(BaseModel):
    agent: str = Field(min_length=1, max_length=128)
    task: str = Field(min_length=1, max_length=100_000)
    ttl_s: int | None = Field(default=None, ge=1)


class RenewIn(BaseModel):
    ttl_s: int | None = Field(default=None, ge=1)


def mount(app: FastAPI, service: Service) -> None:
    """Adds ``/v1/sessions`` (open, list), ``/v1/sessions/{run_id}`` (show, close), ``.../renew``, and
    ``GET /v1/approvals/{approval_id}``."""

    @app.post("/v1/sessions", status_code=201)
    async def open_session(body: SessionIn, request: Request) -> dict[str, Any]:
        info = await service.sessions.open(body.agent, body.task, ttl_s=body.ttl_s, by="operator:api")
        return info.at(str(request.base_url)).to_dict()

    @app.get("/v1/sessions")
    async def list_sessions(all: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        return service.sessions.find(include_closed=all, limit=min(max(limit, 1), 1000))

    @app.get("/v1/sessions/{run_id}")
    async def show_session(run_id: str) -> dict[str, Any]:
        return service.sessions.describe(run_id)

    @app.post("/v1/sessions/{run_id}/renew")
    async def renew_session(run_id: str, request: Request, body: RenewIn | None = None) -> dict[str, Any]:
        info = await service.sessions.renew(run_id, ttl_s=body.ttl_s if body else None, by="operator:api")
        return info.at(str(request.base_url)).to_dict()

    @app.get("/v1/approvals/{approval_id}")
    async def get_approval(approval_id: str) -> dict[str, Any]:
        """One approval (the SDK's ``wait_for_approval`` polls it)."""
        approval = service.platform.approvals.get(approval_id)
        result: dict[str, Any] = service.platform.gateway.redactor.redact(approval.to_dict())
        return result

    @app.delete("/v1/sessions/{run_id}")
    async def close_session(run_id: str) -> dict[str, Any]:
        return await service.sessions.close(run_id, by="operator:api")


__all__ = ["mount"]
