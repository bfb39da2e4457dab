"""The dashboard's state for one app (sessions, the live feed, chain checks, background tasks) and form parsing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.websockets import WebSocket

from stitchwork.interfaces.http.dashboard.live import LiveFeed
from stitchwork.interfaces.http.dashboard.render import SECURITY_HEADERS, safe_next
from stitchwork.interfaces.http.dashboard.sessions import COOKIE, PATH, Session, SessionStore, same_origin
from stitchwork.workers.events import EventHub

if TYPE_CHECKING:
    from stitchwork.service import Service
    from stitchwork.service.notify import ApprovalNotifier

PREFIX = "/ui"
MAX_FORM_BYTES = 65_536


class FormError(Exception):
    """A POST body the dashboard does not accept (type, size, encoding)."""


class Dashboard:
    """The dashboard's state for one app: sessions, the live feed, the last chain check, background tasks."""

    def __init__(self, service: Service) -> None:
        from stitchwork.service.insights import ChainChecker

        self.service = service
        self.platform = service.platform
        self.config = service.platform.config.dashboard
        self.sessions = SessionStore(self.platform.store, self.config)
        hub = self.platform.events
        self.feed = LiveFeed(hub, self.platform.store, on_event=self._on_event) if isinstance(hub, EventHub) else None
        self.chain = ChainChecker()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.notifier: ApprovalNotifier | None = None
        """The approval notifier, when one runs (woken by the run events that announce an approval)."""

    def _on_event(self, summary: dict[str, Any]) -> None:
        if self.notifier is not None and summary.get("kind") == "waiting_approval":
            self.notifier.wake()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- requests ------------------------------------------------------------------------------------------

    async def session(self, conn: Request | WebSocket) -> Session | None:
        return await asyncio.to_thread(self.sessions.get, conn.cookies.get(COOKIE, ""))

    def same_site(self, conn: Request | WebSocket) -> bool:
        """False when the browser says the request comes from another site (see :func:`.sessions.same_origin`)."""
        return same_origin(conn, self.config.public_url)

    def secure(self, conn: Request | WebSocket) -> bool:
        return conn.url.scheme in {"https", "wss"} or self.config.public_url.startswith("https://")

    def cookie(self, response: Response, name: str, value: str, *, max_age: int, conn: Request) -> None:
        response.set_cookie(name, value, max_age=max_age, path=PATH, httponly=True, samesite="strict",
                            secure=self.secure(conn))

    @staticmethod
    async def form(request: Request) -> dict[str, str]:
        """The urlencoded form of a POST (first value of each field)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise FormError("send the form as application/x-www-form-urlencoded")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise FormError(f"the form is larger than {MAX_FORM_BYTES} bytes")
        try:
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormError(f"the form does not decode: {exc}") from exc
        return {k: v[0] for k, v in fields.items()}

    def to_login(self, request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{PREFIX}/login?next={quote(safe_next(target), safe='')}", status_code=303,
                                headers=SECURITY_HEADERS)
