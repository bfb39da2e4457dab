"""The control plane: HTTP + JSON API (OpenAPI at /openapi.json), loopback by default, a token on every endpoint.

Operators authenticate with an operator token (``Authorization: Bearer swo_...``). Agents that run outside the
platform call tools with their run token at ``POST /v1/agent/tools/{name}``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from stitchwork.compute.http import RUN_TOKEN_PATHS
from stitchwork.compute.http import mount as _mount_compute
from stitchwork.data.api import mount as _mount_data
from stitchwork.data.memory_api import mount as _mount_memory
from stitchwork.errors import (
    ApprovalError,
    AuthError,
    ConfigError,
    InvalidArguments,
    RunError,
    SecretNotFound,
    StitchworkError,
    StoreError,
    UnknownAgent,
    UnknownTool,
)
from stitchwork.messaging.web import mount as _mount_messaging
from stitchwork.service import Service

STATUS = {
    AuthError: 401, UnknownAgent: 404, UnknownTool: 404, RunError: 404, SecretNotFound: 404, ApprovalError: 409,
    InvalidArguments: 422, ConfigError: 400, StoreError: 400,
}


def _status_for(exc: StitchworkError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


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


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def create_app(service: Service, *, expiry_interval_s: float = 5.0) -> FastAPI:
    """Builds the API around an open :class:`Service`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def expire_loop() -> None:
            while True:
                await asyncio.sleep(expiry_interval_s)
                with contextlib.suppress(StitchworkError):
                    await service.expire_and_resume()

        task = asyncio.create_task(expire_loop())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="Stitchwork control plane", version="0.1.0", lifespan=lifespan)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        token = _bearer(request)
        if request.url.path.startswith("/v1/agent/") or request.url.path in RUN_TOKEN_PATHS:
            request.state.run_token = token
            return await call_next(request)
        if not token or not service.check_operator_token(token):
            await service.platform.audit.aappend(
                "auth", tool=request.url.path, decision="deny",
                data={"error": "operator_token", "reason": "missing or invalid operator token"},
            )
            return JSONResponse({"error": "unauthenticated", "message": "a valid operator token is required "
                                 "(Authorization: Bearer <token>)"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(StitchworkError)
    async def on_error(request: Request, exc: StitchworkError) -> JSONResponse:
        return JSONResponse(service.platform.gateway.redactor.redact(exc.to_dict()), status_code=_status_for(exc))

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
    async def list_runs(limit: int = 50) -> list[dict[str, Any]]:
        return service.list_runs(limit=min(max(limit, 1), 1000))

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
        return service.audit_query(body.sql)

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

    # Layer routes mount here, one line each: ``mount(app, service)``.
    _mount_compute(app, service)
    _mount_data(app, service)
    _mount_messaging(app, service)
    _mount_memory(app, service)
    return app
