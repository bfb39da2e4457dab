"""The control plane: HTTP + JSON API (OpenAPI at /openapi.json), loopback by default, a token on every endpoint.

Operators authenticate with an operator token (``Authorization: Bearer swo_...``). Agents that run outside the
platform call tools with their run token at ``POST /v1/agent/tools/{name}``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

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
from stitchwork.interfaces.http import (
    a2a,
    audit,
    control,
    dashboard,
    events,
    mcp,
    memory,
    models,
    notifications,
    sessions,
)
from stitchwork.interfaces.http._auth import bearer
from stitchwork.interfaces.http.models import RUN_TOKEN_PATHS
from stitchwork.service import Service

MOUNTS: tuple[Callable[[FastAPI, Service], None], ...] = (
    control.mount,  # health, runs, approvals, audit tail/query/verify, secrets, agents' tool calls
    models.mount,  # the model door: OpenAI-compatible chat completions and models; deployments
    audit.mount,  # audit reports, export, compaction; data retention (and its timer)
    events.mount,  # run events over WebSocket; the durable run queue and its dead letters
    memory.mount,  # operator access to agent memory
    dashboard.mount,  # the operator's web dashboard under /ui (its own sign-in: session cookie + CSRF)
    notifications.mount,  # pending approvals posted to [notifications] webhooks
    mcp.mount,  # the MCP door at /mcp (Streamable HTTP, run token)
    sessions.mount,  # external runs: open, renew, close sessions (run tokens for agents outside the platform)
    a2a.mount,  # published agents over A2A (peer keys or run tokens; extra a2a)
)
"""Every route group of the control plane. A new group is one line here."""

PUBLIC_PATHS = frozenset({"/healthz"})
"""Paths served without a token: the liveness probe (containers, load balancers) says only that the server answers."""

MCP_PATHS = frozenset({"/mcp"})
"""Paths that authenticate with a run token themselves (the MCP door)."""

STATUS = {
    AuthError: 401, UnknownAgent: 404, UnknownTool: 404, RunError: 404, SecretNotFound: 404, ApprovalError: 409,
    InvalidArguments: 422, ConfigError: 400, StoreError: 400,
}


def _status_for(exc: StitchworkError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


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
        if request.url.path in PUBLIC_PATHS:
            return await call_next(request)
        token = bearer(request)
        if dashboard.owns(request.url.path):
            return await call_next(request)  # the dashboard signs operators in itself (session cookie + CSRF)
        if request.url.path.startswith("/v1/agent/") or request.url.path in RUN_TOKEN_PATHS | MCP_PATHS:
            request.state.run_token = token
            return await call_next(request)
        if request.url.path.startswith(a2a.PREFIX):  # the A2A door authenticates its peers itself
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

    for mount in MOUNTS:
        mount(app, service)
    return app
