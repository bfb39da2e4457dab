"""The MCP door over Streamable HTTP at ``/mcp`` (:mod:`stitchwork.gateway.mcp`), authenticated by the run token.

Every request is authenticated before its body is read: without a valid bearer run token (missing, malformed,
expired, revoked, wrong audience) it is answered ``401`` with a JSON error and audited. Requests the MCP layer
refuses (malformed JSON-RPC, wrong content type, unknown protocol version) are audited too (``mcp`` events with the
status code). The server is stateless: each request carries its token, no MCP session outlives it, and both
protocol eras (the ``initialize`` handshake and 2026-07-28) are served.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI
from starlette.routing import Route

from stitchwork.errors import AuthError
from stitchwork.gateway.core import Gateway
from stitchwork.service import Service

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("stitchwork_mcp_caller", default=None)
"""The agent whose run token :class:`BearerGate` verified for the request being served (``None`` outside one)."""

MAX_BODY_BYTES = 8_000_000
"""Largest request body accepted at ``/mcp`` (a bigger one is answered 413 unread)."""


async def _json(send: Send, status: int, body: dict[str, Any],
                headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


def _bearer(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            text = value.decode("latin-1")
            return text[7:].strip() if text[:7].lower() == "bearer " else None
    return None


class BearerGate:
    """ASGI wrapper of the MCP app: the run token is verified before anything else; refusals are audited."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            claims = await self.gateway.authenticate(_bearer(scope), action="mcp")
        except AuthError as exc:
            await _json(send, 401, {"error": exc.code, "message": f"the MCP door needs a valid run token "
                                    f"(Authorization: Bearer <token from `stitchwork session open`>): {exc}"},
                        ((b"www-authenticate", b'Bearer realm="stitchwork"'),))
            return
        length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), b"0")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            await self._audit(claims.agent, claims.run_id, 413, scope)
            await _json(send, 413, {"error": "too_large", "message": f"request body over {MAX_BODY_BYTES} bytes"})
            return
        status = 0
        caller = CALLER.set(claims.agent)

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            CALLER.reset(caller)
        if status >= 400:
            await self._audit(claims.agent, claims.run_id, status, scope)

    async def _audit(self, agent: str, run_id: str, status: int, scope: Scope) -> None:
        await self.gateway.audit.aappend("mcp", agent=agent, run_id=run_id, tool="mcp", decision="error",
                                         data={"status": status, "method": scope.get("method", "")})


class McpFastPath:
    """ASGI middleware: ``/mcp`` goes straight to the door's gate (it authenticates the run token itself), without
    the control plane's other middleware; everything else passes through."""

    def __init__(self, app: ASGIApp, gate: ASGIApp) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") == "/mcp" and scope.get("method") in {"GET", "POST",
                                                                                              "DELETE"}:
            await self.gate(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _Endpoint:
    """A Starlette endpoint that is an ASGI app (a plain function endpoint would be taken as request → response)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _missing_extra(message: str) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await _json(send, 501, {"error": "mcp_unavailable", "message": message})

    return app


def _reset_sse_shutdown() -> None:
    """Clears sse-starlette's process-wide "server is shutting down" flag (set when any uvicorn server in this
    process stopped before): left set, every SSE response of the legacy MCP era would end at once, empty."""
    with contextlib.suppress(ImportError):
        from sse_starlette.sse import AppStatus

        AppStatus.should_exit = False


def mount(app: FastAPI, service: Service) -> None:
    """Adds ``/mcp`` (GET, POST, DELETE) and runs the MCP session manager in the app's lifespan."""
    platform = service.platform
    try:
        from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager

        from stitchwork.gateway.mcp import McpDoor, bearer_of, build_server
    except ImportError as exc:
        endpoint: ASGIApp = _missing_extra(f"the MCP door needs the mcp extra: pip install 'stitchwork[mcp]' ({exc})")
        app.router.routes.append(Route("/mcp", endpoint=_Endpoint(endpoint), methods=["GET", "POST", "DELETE"]))
        return
    door = McpDoor(platform.gateway, approval_wait_s=platform.config.mcp.approval_wait_s)
    server = build_server(door, bearer_of, input_schema=lambda name: door.input_schema(CALLER.get(), name))
    manager = StreamableHTTPSessionManager(app=server, stateless=True, json_response=False)
    previous = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        _reset_sse_shutdown()
        async with manager.run(), previous(application) as state:
            yield state

    app.router.lifespan_context = lifespan
    gate = BearerGate(StreamableHTTPASGIApp(manager), platform.gateway)
    app.router.routes.append(Route("/mcp", endpoint=_Endpoint(gate), methods=["GET", "POST", "DELETE"]))
    app.add_middleware(McpFastPath, gate=gate)  # outermost: /mcp skips the operator-token middleware and routing


__all__ = ["CALLER", "MAX_BODY_BYTES", "BearerGate", "McpFastPath", "mount"]
