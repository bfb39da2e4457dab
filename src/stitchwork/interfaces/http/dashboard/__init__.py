"""The operator's dashboard, served by `stitchwork up` at ``/ui/`` on the API's origin.

Server-rendered pages (Jinja2) that work without JavaScript: lists and forms are plain HTML, changes are form
POSTs answered with a redirect. One small script of our own (``static/dashboard.js``, no third-party code, no
build step) makes pages live: it listens on the WebSocket ``/ui/live`` and fetches the changed parts again.

Pages: runs (live, paginated; a run's conversation and gateway timeline), approvals (pending with their
provenance, decide with a note; history), audit (chain status and verify, search, the five reports with charts),
platform (policy packs and rule hits, sandbox backends, model deployments and budgets, memory grants, webhooks).
Sign-in, sessions and CSRF: :mod:`.sessions`; escaping and headers: :mod:`.render`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from stitchwork.errors import StitchworkError
from stitchwork.interfaces.http.dashboard.board import PREFIX, Dashboard, FormError
from stitchwork.interfaces.http.dashboard.render import HERE, SECURITY_HEADERS, page, safe_next
from stitchwork.interfaces.http.dashboard.sessions import (
    COOKIE,
    LOGIN_COOKIE,
    PATH,
    SessionStore,
    tokens_match,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from stitchwork.service import Service

__all__ = ["PREFIX", "Dashboard", "mount", "owns"]

log = logging.getLogger(__name__)

STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
SESSION_CHECK_S = 30.0


def owns(path: str) -> bool:
    """True for the paths the dashboard authenticates itself: ``/`` and everything under ``/ui``."""
    return path == "/" or path == PREFIX or path.startswith(PREFIX + "/")


def _address(conn: Request | WebSocket) -> str:
    return conn.client.host if conn.client else "?"


def mount(app: FastAPI, service: Service) -> None:
    """Adds the dashboard (``/ui/…``) when ``[dashboard] enabled``; ``/`` redirects to it."""
    if not service.platform.config.dashboard.enabled:
        return
    from stitchwork.interfaces.http.dashboard import pages

    board = Dashboard(service)
    app.state.dashboard = board
    _lifespan(app, board)

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=303)

    @app.get(PREFIX, include_in_schema=False)
    @app.get(PREFIX + "/", include_in_schema=False)
    async def home() -> Response:
        return RedirectResponse(f"{PREFIX}/runs", status_code=303)

    @app.get(PREFIX + "/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC:
            return Response("not found", status_code=404, media_type="text/plain")
        body = await asyncio.to_thread((HERE / "static" / name).read_bytes)
        return Response(body, media_type=STATIC[name], headers={
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache", "Cross-Origin-Resource-Policy":
            "same-origin"})

    @app.get(PREFIX + "/login", include_in_schema=False)
    async def login_form(request: Request, next: str = "") -> Response:
        if await board.session(request) is not None:
            return RedirectResponse(safe_next(next), status_code=303)
        return _login_page(board, request, next, "")

    @app.post(PREFIX + "/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        address = _address(request)
        try:
            fields = await board.form(request)
        except FormError as exc:
            return _login_page(board, request, "", str(exc), status=400)
        target = safe_next(fields.get("next", ""))
        presented = request.cookies.get(LOGIN_COOKIE, "")
        if not board.same_site(request) or not presented or not tokens_match(presented, fields.get("login", "")):
            return _login_page(board, request, target, "The sign-in form expired; try again.", status=403)
        if board.sessions.throttled(address):
            return _login_page(board, request, target, "Too many failed sign-ins from this address; wait a minute.",
                               status=429)
        token = fields.get("token", "").strip()
        token_id = await asyncio.to_thread(pages.operator_token_id, board, token) if token else None
        if token_id is None:
            board.sessions.failed(address)
            await board.platform.audit.aappend("auth", tool=PREFIX + "/login", decision="deny",
                                               data={"error": "operator_token", "reason": "dashboard sign-in",
                                                     "address": address})
            return _login_page(board, request, target, "That is not a valid operator token.", status=401)
        value, _ = await asyncio.to_thread(board.sessions.open, token_id)
        await board.platform.audit.aappend("auth", tool=PREFIX + "/login", decision="allow",
                                           data={"token_id": token_id, "address": address})
        response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
        board.cookie(response, COOKIE, value, max_age=board.config.session_ttl_s, conn=request)
        response.delete_cookie(LOGIN_COOKIE, path=PATH)
        return response

    @app.post(PREFIX + "/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        session = await board.session(request)
        if session is not None:
            try:
                fields = await board.form(request)
            except FormError:
                fields = {}
            if not board.same_site(request) or not SessionStore.csrf_ok(session, fields.get("csrf", "")):
                return pages.refused(board, session, "The sign-out form expired; reload the page and try again.")
            await asyncio.to_thread(board.sessions.close, request.cookies.get(COOKIE, ""))
        response = RedirectResponse(f"{PREFIX}/login", status_code=303, headers=SECURITY_HEADERS)
        response.delete_cookie(COOKIE, path=PATH)
        return response

    @app.websocket(PREFIX + "/live")
    async def live(websocket: WebSocket) -> None:
        session = await board.session(websocket)
        if session is None or not board.same_site(websocket) or board.feed is None:
            await websocket.close(code=4401, reason="sign in to the dashboard first")
            return
        await websocket.accept()
        queue = board.feed.subscribe()
        cookie = websocket.cookies.get(COOKIE, "")

        async def pump() -> None:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                while True:
                    try:
                        summary = await asyncio.wait_for(queue.get(), timeout=SESSION_CHECK_S)
                    except TimeoutError:
                        if await asyncio.to_thread(board.sessions.get, cookie) is None:
                            await websocket.close(code=4401, reason="the session ended")
                            return
                        continue
                    await websocket.send_text(json.dumps(summary, default=str))

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(pump)
                with contextlib.suppress(WebSocketDisconnect):
                    while True:
                        await websocket.receive_text()
                group.cancel_scope.cancel()
        finally:
            board.feed.unsubscribe(queue)

    pages.register(app, board)


def _login_page(board: Dashboard, request: Request, next_path: str, error: str, *, status: int = 200) -> Response:
    import secrets

    value = secrets.token_urlsafe(24)
    response = page("login.html", {"next": safe_next(next_path) if next_path else "", "error": error,
                                   "login_token": value, "session": None, "nav": ""}, status=status)
    board.cookie(response, LOGIN_COOKIE, value, max_age=3600, conn=request)
    return response


def _warm(board: Dashboard) -> None:
    """At start-up, off the event loop: derives what pages read from audit events not yet folded (all of them
    on a store that never ran the dashboard: seconds for millions) and probes the sandbox backends once."""
    from stitchwork.audit.activity import refresh_activity
    from stitchwork.audit.reports import refresh_facts
    from stitchwork.service.insights import sandbox_backends

    try:
        board.platform.audit.flush()
        refresh_activity(board.platform.store)
        refresh_facts(board.platform.store)
        sandbox_backends()
    except StitchworkError as exc:
        log.warning("dashboard warm-up: %s", exc)


def _lifespan(app: FastAPI, board: Dashboard) -> None:
    """Runs the live feed beside the app and stops it (and the dashboard's tasks) with it."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        follower = asyncio.create_task(board.feed.run()) if board.feed is not None else None
        board.spawn(asyncio.to_thread(_warm, board))
        try:
            async with inner(application) as state:
                yield state
        finally:
            for task in [follower, *board.tasks]:
                if task is not None:
                    task.cancel()
            await asyncio.gather(*[t for t in [follower, *board.tasks] if t is not None], return_exceptions=True)

    app.router.lifespan_context = lifespan

