"""Dashboard sign-in: the operator token is exchanged for a session cookie; every change carries a CSRF token.

- The cookie (``sw_session``) is ``HttpOnly``, ``SameSite=Strict``, limited to ``/ui``, and ``Secure`` when the
  request came over https (or ``[dashboard] public_url`` is https). It holds 256 random bits; the store keeps
  only their SHA-256, so a reader of the database cannot take over a session.
- A session ends at sign-out, after ``[dashboard] session_ttl_s`` however active, after ``idle_ttl_s`` unused,
  and as soon as the operator token it was opened with is revoked.
- Every POST carries the session's CSRF token (a hidden form field), compared in constant time; a request whose
  ``Origin`` (or ``Sec-Fetch-Site``) shows another site is refused as well. The sign-in form has its own
  double-submit token (cookie ``sw_login`` and field), so another site cannot sign a browser into its session.
- Failed sign-ins are audited (kind ``auth``) and slowed down: after ``MAX_FAILURES`` in ``FAILURE_WINDOW_S`` from
  one address, that address gets 429 until the window passes.
- Bearer tokens keep working for the API (``/v1``); the cookie is honoured only under ``/ui``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from stitchwork.config import DashboardConfig
    from stitchwork.data._base import Store

__all__ = ["COOKIE", "LOGIN_COOKIE", "Session", "SessionStore", "same_origin", "tokens_match"]

COOKIE = "sw_session"
LOGIN_COOKIE = "sw_login"
PATH = "/ui"
MAX_FAILURES = 5
FAILURE_WINDOW_S = 60.0
TOUCH_EVERY_S = 30.0
"""A session's last use is written at most this often (each write is a database update)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS dashboard_sessions (
    id_sha256 VARCHAR PRIMARY KEY, token_id VARCHAR NOT NULL, csrf VARCHAR NOT NULL, created_at DOUBLE NOT NULL,
    expires_at DOUBLE NOT NULL, last_seen DOUBLE NOT NULL
)
"""


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()


@dataclass(frozen=True)
class Session:
    """A signed-in operator's session (the cookie value itself is never kept)."""

    key: str
    token_id: str
    csrf: str
    created_at: float
    expires_at: float
    last_seen: float


def same_origin(conn: HTTPConnection, public_url: str = "") -> bool:
    """False when the browser says the request comes from another site (``Origin``, ``Sec-Fetch-Site``).

    The page's own origin is the request's ``Host``, or ``public_url``'s origin (a proxy in front may rewrite
    ``Host``)."""
    site = conn.headers.get("sec-fetch-site", "")
    if site and site not in {"same-origin", "none"}:
        return False
    origin = conn.headers.get("origin", "")
    if not origin:
        return True  # browsers send Origin on POST and WebSocket; non-browser clients need the CSRF token anyway
    host = conn.headers.get("host", "")
    allowed = {f"http://{host}", f"https://{host}"}
    if public_url:
        parts = urlsplit(public_url)
        allowed.add(f"{parts.scheme}://{parts.netloc}")
    return origin in allowed


class SessionStore:
    """Dashboard sessions in the platform's store (see the module docstring)."""

    def __init__(self, store: Store, config: DashboardConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self._now = clock
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}
        store.execute(SCHEMA)

    # -- sign-in throttle ----------------------------------------------------------------------------------

    def throttled(self, address: str) -> bool:
        """True while ``address`` has used up its failed sign-ins for the window."""
        with self._lock:
            recent = self._recent(address)
            return len(recent) >= MAX_FAILURES

    def failed(self, address: str) -> None:
        with self._lock:
            self._recent(address).append(self._now())
            if len(self._failures) > 10_000:  # many addresses: forget the quiet ones
                for key in [k for k, v in self._failures.items() if not v][:5_000]:
                    del self._failures[key]

    def _recent(self, address: str) -> deque[float]:
        recent = self._failures.setdefault(address, deque())
        cutoff = self._now() - FAILURE_WINDOW_S
        while recent and recent[0] < cutoff:
            recent.popleft()
        return recent

    # -- sessions ------------------------------------------------------------------------------------------

    def open(self, token_id: str) -> tuple[str, Session]:
        """A new session for the operator token ``token_id``; returns the cookie value and the session."""
        value = secrets.token_urlsafe(32)
        now = self._now()
        session = Session(_digest(value), token_id, secrets.token_urlsafe(32), now, now + self.config.session_ttl_s,
                          now)
        self.store.append("dashboard_sessions", [{
            "id_sha256": session.key, "token_id": token_id, "csrf": session.csrf, "created_at": now,
            "expires_at": session.expires_at, "last_seen": now}])
        self._sweep(now)
        return value, session

    def get(self, value: str) -> Session | None:
        """The live session of a cookie value, or None (unknown, expired, idle too long, token revoked)."""
        if not value or len(value) > 100:
            return None
        rows = self.store.query(
            "SELECT s.id_sha256, s.token_id, s.csrf, s.created_at, s.expires_at, s.last_seen FROM dashboard_sessions "
            "AS s JOIN operator_tokens AS t ON t.id = s.token_id WHERE s.id_sha256 = ? AND NOT t.revoked",
            [_digest(value)])
        if not rows:
            return None
        row = rows[0]
        now = self._now()
        if now >= row["expires_at"] or now - row["last_seen"] >= self.config.idle_ttl_s:
            self.close(value)
            return None
        if now - row["last_seen"] >= TOUCH_EVERY_S:
            self.store.execute("UPDATE dashboard_sessions SET last_seen = ? WHERE id_sha256 = ?",
                               [now, row["id_sha256"]])
        return Session(row["id_sha256"], row["token_id"], row["csrf"], row["created_at"], row["expires_at"], now)

    def close(self, value: str) -> None:
        """Ends the session of a cookie value (sign-out)."""
        self.store.execute("DELETE FROM dashboard_sessions WHERE id_sha256 = ?", [_digest(value)])

    def _sweep(self, now: float) -> None:
        self.store.execute("DELETE FROM dashboard_sessions WHERE expires_at <= ? OR last_seen <= ?",
                           [now, now - self.config.idle_ttl_s])

    @staticmethod
    def csrf_ok(session: Session, presented: str) -> bool:
        """True if ``presented`` is the session's CSRF token (constant-time)."""
        return tokens_match(session.csrf, presented)


def tokens_match(expected: str, presented: str) -> bool:
    """Constant-time comparison of two non-empty tokens."""
    return bool(expected) and bool(presented) and hmac.compare_digest(
        expected.encode("utf-8", "replace"), presented.encode("utf-8", "replace"))
