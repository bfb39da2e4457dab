"""The control plane's own routes: health, runs, approvals, the audit log, secrets, and agents' tool calls."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from stitchwork.errors import ApprovalError, StitchworkError
from stitchwork.service import Service


class RunIn(BaseModel):
    agent: str = Field(min_length=1, max_length=128)
    task: str = Field(min_length=1, max_length=100_000)
    model: str | None = None
    wait: bool = False


class DecisionIn(BaseModel):
    note: str = Field(default="", max_length=2000)


class QueryIn(BaseModel):
    sql: str = Field(min_length=1, max_length=100_000)


class SecretIn(BaseModel):
    value: str = Field(min_length=1, max_length=65_536)


def mount(app: FastAPI, service: Service) -> None:
    """Adds ``/healthz`` (no token), ``/v1/health``,
    ``/v1/runs``, ``/v1/approvals``, ``/v1/audit/{tail,query,verify}``, ``/v1/secrets``
    and ``/v1/agent/tools/{name}`` (run token)."""

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """Liveness, without a token (``PUBLIC_PATHS``): the process serves requests. Nothing else is said."""
        return {"status": "ok"}

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "agents": service.platform.agents.names(), "tools": sorted(t.name for t in
                                                                                        service.platform.tools)}

    @app.post("/v1/runs", status_code=201)
    async def start_run(body: RunIn) -> dict[str, Any]:
        if body.wait:
            return await service.run(body.agent, body.task, model=body.model)
        return service.start_background(body.agent, body.task, model=body.model)

    @app.get("/v1/runs")
    async def list_runs(limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        return service.list_runs(limit=min(max(limit, 1), 1000), status=status)

    @app.get("/v1/runs/{run_id}")
    async def get_run(run_id: str) -> dict[str, Any]:
        return service.get_run(run_id)

    @app.get("/v1/approvals")
    async def approvals(status: str = "pending") -> list[dict[str, Any]]:
        try:
            return service.approvals(status)
        except ValueError as exc:
            raise ApprovalError(f"unknown approval status {status!r}") from exc

    @app.post("/v1/approvals/{approval_id}/approve")
    async def approve(approval_id: str, body: DecisionIn | None = None) -> dict[str, Any]:
        return await service.decide(approval_id, approve=True, by="operator:api", note=(body.note if body else ""))

    @app.post("/v1/approvals/{approval_id}/deny")
    async def deny(approval_id: str, body: DecisionIn | None = None) -> dict[str, Any]:
        return await service.decide(approval_id, approve=False, by="operator:api", note=(body.note if body else ""))

    @app.get("/v1/audit/tail")
    async def audit_tail(n: int = 20) -> list[dict[str, Any]]:
        return service.audit_tail(min(max(n, 1), 10_000))

    @app.post("/v1/audit/query")
    async def audit_query(body: QueryIn) -> list[dict[str, Any]]:
        """One read-only SELECT over the audit-facing tables (README: the audit query); off the event loop."""
        return await asyncio.to_thread(service.audit_query, body.sql)

    @app.get("/v1/audit/verify")
    async def audit_verify() -> dict[str, Any]:
        return service.audit_verify()

    @app.get("/v1/secrets")
    async def secret_names() -> list[str]:
        return service.secret_names()

    @app.put("/v1/secrets/{name}", status_code=204)
    async def secret_set(name: str, body: SecretIn) -> Response:
        await service.secret_set(name, body.value, by="operator:api")
        return Response(status_code=204)

    @app.delete("/v1/secrets/{name}", status_code=204)
    async def secret_delete(name: str) -> Response:
        await service.secret_delete(name, by="operator:api")
        return Response(status_code=204)

    @app.get("/v1/agent/tools")
    async def agent_tools(request: Request) -> JSONResponse:
        """The tools the run token's agent is given, as OpenAI ``tools`` entries (for SDKs and adapters)."""
        gateway = service.platform.gateway
        try:
            claims = await gateway.authenticate(request.state.run_token or None, action="tools/list")
        except StitchworkError as exc:
            return JSONResponse(exc.to_dict(), status_code=401)
        given = gateway.context.agents.get(claims.agent, frozenset())
        return JSONResponse([t.openai_schema() for t in gateway.tools if t.name in given])

    @app.post("/v1/agent/tools/{name}")
    async def agent_tool_call(name: str, request: Request) -> JSONResponse:
        """A tool call from an agent holding a run token; the raw body is the arguments object."""
        outcome = await service.platform.gateway.call_tool(
            request.state.run_token or None, name, await request.body() or b"{}",
            idempotency_key=request.headers.get("idempotency-key", ""),
        )
        code = {"ok": 200, "error": 200, "invalid": 422, "denied": 403, "approval_required": 202,
                "unauthenticated": 401}.get(outcome.status, 200)
        body = {"status": outcome.status, "result": outcome.content, "error": outcome.error,
                "approval_id": outcome.approval_id or None, "label": outcome.label,
                "policy_ids": list(outcome.policy_ids)}
        return JSONResponse(body, status_code=code)
