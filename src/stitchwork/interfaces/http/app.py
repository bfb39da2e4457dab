"""The control plane: HTTP + JSON API (OpenAPI at /openapi.json), loopback by default, a token on every endpoint.

Operators authenticate with an operator token (``Authorization: Bearer swo_...``). Agents that run outside the
platform call tools with their run token at ``POST /v1/agent/tools/{name}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from stitchwork.errors import (
    ApprovalError,
    AuthError,
    BusFull,
    ConfigError,
    InvalidArguments,
    NothingToUndo,
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
    health,
    mcp,
    memory,
    metrics,
    models,
    notifications,
    sessions,
    undo,
)
from stitchwork.interfaces.http._guard import FailedAuthLog, RequestGuard
from stitchwork.interfaces.http.models import RUN_TOKEN_PATHS
from stitchwork.service import Service, json_safe

log = logging.getLogger(__name__)

MOUNTS: tuple[Callable[[FastAPI, Service], None], ...] = (
    control.mount,  # health, runs, approvals, audit tail/query/verify, secrets, agents' tool calls
    models.mount,  # the model door: OpenAI-compatible chat completions and models; deployments
    audit.mount,  # audit reports, export, compaction; data retention (and its timer)
    events.mount,  # run events over WebSocket; the durable run queue and its dead letters
    memory.mount,  # operator access to agent memory
    dashboard.mount,  # the operator's web dashboard under /ui (its own sign-in: session cookie + CSRF)
    notifications.mount,  # pending approvals posted to [notifications] webhooks
    health.mount,  # /readyz: the open readiness probe, never audited (/healthz is in control)
    metrics.mount,  # Prometheus /metrics (operator or scrape token)
    mcp.mount,  # the MCP door at /mcp (Streamable HTTP, run token)
    sessions.mount,  # external runs: open, renew, close sessions (run tokens for agents outside the platform)
    a2a.mount,  # published agents over A2A (peer keys or run tokens; extra a2a)
    undo.mount,  # undo a run's calls through the gateway (operator token; /v1/agent/undo: run token)
)
"""Every route group of the control plane. A new group is one line here."""

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
"""Paths served without a token and never audited: the liveness probe says only that the server answers; the
readiness probe only whether the store, the audit log and the bus work."""

MCP_PATHS = frozenset({"/mcp"})
"""Paths that authenticate with a run token themselves (the MCP door)."""

STATUS = {
    AuthError: 401, UnknownAgent: 404, UnknownTool: 404, RunError: 404, SecretNotFound: 404, ApprovalError: 409,
    InvalidArguments: 422, ConfigError: 400, StoreError: 400, NothingToUndo: 409,
    BusFull: 503,  # a bounded stream of unfinished work is full: try again once some is done
}


def _status_for(exc: StitchworkError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


class SafeJSONResponse(JSONResponse):
    """JSON that cannot fail on a value: NaN and infinities become strings, bytes base64 (see ``json_safe``)."""

    def render(self, content: object) -> bytes:
        try:
            return super().render(content)
        except (TypeError, ValueError):
            return super().render(json_safe(content))


def _short(value: object, limit: int = 300) -> object:
    """A request value echoed in an error, cut to ``limit`` characters of JSON (bodies can be a megabyte)."""
    safe = json_safe(value)
    text = json.dumps(safe)
    return safe if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def create_app(service: Service, *, expiry_interval_s: float = 5.0) -> FastAPI:
    """Builds the API around an open :class:`Service`."""
    server = service.platform.config.server
    failures = FailedAuthLog(service.platform.audit, window_s=server.auth_failure_window_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def sessions_loop() -> None:
            while True:
                await asyncio.sleep(expiry_interval_s)
                with contextlib.suppress(StitchworkError):
                    await service.sessions.expire_due()

        async def failures_loop() -> None:
            while True:
                await asyncio.sleep(min(failures.window_s, 10.0))
                with contextlib.suppress(StitchworkError):
                    await failures.flush()

        try:  # before workers and runs use the streams: a new stream gets its retention from the start
            await asyncio.wait_for(service.bound_bus_streams(), 30.0)
        except (StitchworkError, TimeoutError) as exc:
            log.warning("bus streams are not limited: %s", exc)
        tasks = [asyncio.create_task(service.expire_on_time()),  # approvals: a deadline heap, not a listing
                 asyncio.create_task(service.finish_decided_undos()),  # approved before a stop, not yet run
                 asyncio.create_task(sessions_loop()), asyncio.create_task(failures_loop())]
        stop_fleet = asyncio.Event()
        fleet = asyncio.create_task(service.ingest_fleet_audit(stop_fleet))  # workers' audit events into this chain
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            stop_fleet.set()
            with contextlib.suppress(asyncio.CancelledError, StitchworkError, TimeoutError):
                await asyncio.wait_for(fleet, 10.0)
            with contextlib.suppress(StitchworkError):
                await failures.flush(everything=True)

    app = FastAPI(title="Stitchwork control plane", version="0.1.0", lifespan=lifespan,
                  default_response_class=SafeJSONResponse)
    app.state.failed_auth = failures

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: _short(v) if k == "input" else v for k, v in e.items() if k != "ctx"} for e in exc.errors()]
        return SafeJSONResponse({"error": "invalid_request", "message": "the request does not match its schema",
                                 "detail": json_safe(errors)}, status_code=422)

    @app.exception_handler(StitchworkError)
    async def on_error(request: Request, exc: StitchworkError) -> JSONResponse:
        return JSONResponse(service.platform.gateway.redactor.redact(exc.to_dict()), status_code=_status_for(exc))

    for mount in MOUNTS:
        mount(app, service)
    # Outermost (added last): every request is authenticated from its headers before any route or route-level
    # middleware (the chat route, the MCP door) reads its body. The MCP door authenticates and bounds its own.
    app.add_middleware(RequestGuard, service=service, server=server, failures=failures,
                       run_token_paths=RUN_TOKEN_PATHS, open_paths=PUBLIC_PATHS | MCP_PATHS,
                       self_authenticating=lambda path: (dashboard.owns(path) or path in metrics.PATHS
                                                         or path.startswith(a2a.PREFIX)))
    return app
