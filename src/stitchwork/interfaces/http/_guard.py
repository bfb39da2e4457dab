"""What every request passes before any route sees it: a credential, then a bounded body.

:class:`RequestGuard` (plain ASGI, so nothing reads the body first) authenticates each HTTP request from its
headers alone: the operator token, or on the agents' paths (``/v1/agent/…``, ``/v1/chat/completions``,
``/v1/models``) a valid run token. Only then is the body read, and never past its limit (``Content-Length`` over the
limit is refused before a byte is read; a chunked body is cut off where it crosses it). A JSON body nested deeper
than ``max_json_depth`` gets 400 and one with ``NaN`` or ``Infinity`` (not JSON) gets 422, before any parser
recurses into it. The open paths (``/healthz``, ``/readyz``) pass untouched; the dashboard's paths (its own
sign-in: session cookie and CSRF) skip the token but not the body limit.

:class:`FailedAuthLog` audits failed authentications as one event per client address, reason and window, with a
count, so requests without a valid token cannot grow the signed log without bound.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers

from stitchwork.errors import AuthError

if TYPE_CHECKING:
    from stitchwork.audit.log import AuditLog
    from stitchwork.config import ServerConfig
    from stitchwork.service import Service

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/agent/chat/completions"})
"""Bodies here may be as large as ``max_model_body_bytes`` (long conversations)."""

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in ``body`` (brackets inside strings are not counted)."""
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return max(itertools.accumulate(1 if b in b"[{" else -1 for b in brackets))


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> float:
    raise _NonFinite(name)


def json_problem(body: bytes, max_depth: int) -> tuple[int, str, str] | None:
    """(status, code, message) when a JSON body is too deep or holds NaN/Infinity; None otherwise (also for bodies
    that are not JSON: their parser reports those)."""
    head = body.lstrip()[:1]
    if head not in (b"{", b"["):
        return None
    if body.count(b"[") + body.count(b"{") > max_depth and json_depth(body) > max_depth:
        return 400, "too_deep", f"the JSON body nests deeper than {max_depth} levels"
    if b"NaN" in body or b"Infinity" in body:
        try:
            json.loads(body, parse_constant=_refuse_constant)
        except _NonFinite as exc:
            return 422, "invalid_json", f"{exc} is not a JSON number (RFC 8259 has no NaN or Infinity)"
        except (ValueError, RecursionError):
            return None
    return None


@dataclass
class _Window:
    start: float
    first_ts: float
    last_ts: float
    count: int = 0
    paths: set[str] = field(default_factory=set)


class FailedAuthLog:
    """Failed authentications, audited as one event per (client address, reason) and window.

    The first failure of a window is audited at once with ``count`` 1; later ones in the same window are counted,
    and the window's summary event (``count`` = those later ones, ``summary`` true) is written when the window ends
    (at the next failure after it, on :meth:`flush`, or at shutdown). Summed over events, ``count`` is the number of
    failures. More than ``max_sources`` open windows share one bucket per reason (address ``*``).
    """

    def __init__(self, audit: AuditLog, *, window_s: float = 60.0, max_sources: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.audit = audit
        self.window_s = max(window_s, 0.001)
        self.max_sources = max_sources
        self.clock = clock
        self._open: dict[tuple[str, str], _Window] = {}

    async def record(self, source: str, reason: str, path: str) -> None:
        """Counts one failure (audits it when it opens a window)."""
        now = self.clock()
        key = (source, reason)
        if key not in self._open and len(self._open) >= self.max_sources:
            key = ("*", reason)
        window = self._open.get(key)
        if window is not None and now - window.start >= self.window_s:
            del self._open[key]
            await self._summary(key, window)
            window = None
        if window is None:
            wall = time.time()
            self._open[key] = _Window(now, wall, wall)
            await self.audit.aappend("auth", tool=path[:200], decision="deny", data={
                "error": "unauthenticated", "reason": reason, "source": key[0], "count": 1,
                "window_s": self.window_s, "first_ts": wall, "last_ts": wall, "paths": [path[:200]],
                "summary": False})
            return
        window.count += 1
        window.last_ts = time.time()
        if len(window.paths) < 8:
            window.paths.add(path[:200])

    async def flush(self, *, everything: bool = False) -> int:
        """Writes the summaries of windows that have ended (all of them with ``everything``); returns how many."""
        now = self.clock()
        done = [k for k, w in self._open.items() if everything or now - w.start >= self.window_s]
        written = 0
        for key in done:
            window = self._open.pop(key)
            written += await self._summary(key, window)
        return written

    async def _summary(self, key: tuple[str, str], window: _Window) -> int:
        if window.count == 0:
            return 0
        paths = sorted(window.paths)
        await self.audit.aappend("auth", tool=paths[0] if paths else "", decision="deny", data={
            "error": "unauthenticated", "reason": key[1], "source": key[0], "count": window.count,
            "window_s": self.window_s, "first_ts": window.first_ts, "last_ts": window.last_ts, "paths": paths,
            "summary": True})
        return 1


def client_address(scope: Scope) -> str:
    """The peer's address (proxies' forwarding headers are not trusted)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def is_run_token_path(path: str, run_token_paths: frozenset[str]) -> bool:
    return path.startswith("/v1/agent/") or path in run_token_paths


class RequestGuard:
    """ASGI middleware: authenticate from the headers, then read a bounded, sane body (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, service: Service, server: ServerConfig, failures: FailedAuthLog,
                 run_token_paths: frozenset[str], open_paths: frozenset[str],
                 self_authenticating: Callable[[str], bool] = lambda path: False) -> None:
        self.app = app
        self.open_paths = open_paths
        self.self_authenticating = self_authenticating
        self.service = service
        self.server = server
        self.failures = failures
        self.run_token_paths = run_token_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = Headers(scope=scope)
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        token = credential.strip() if scheme.lower() == "bearer" else ""
        refusal: tuple[str, str] | None = None  # (code, message)
        if self.self_authenticating(path):
            reason = ""  # the dashboard signs operators in itself (its sign-in form is the credential)
        elif is_run_token_path(path, self.run_token_paths):
            scope.setdefault("state", {})["run_token"] = token
            refused = self._run_token_problem(token)
            reason = f"run token: {refused.code}" if refused else ""
            if refused:
                refusal = (refused.code, str(refused))
        else:
            reason = "" if token and self.service.check_operator_token(token) else (
                "invalid operator token" if token else "missing operator token")
            refusal = ("unauthenticated", "a valid operator token is required (Authorization: Bearer <token>)")
        if reason:
            await self.failures.record(client_address(scope), reason, path)
            code, text = refusal or ("unauthenticated", "a valid token is required")
            openai = path in MODEL_PATHS or path in ("/v1/models", "/v1/agent/models")
            if path.startswith(TOOL_PATH):  # the tool door's own answer shape (what agents and the SDK parse)
                await _send_json(send, 401, {"status": "unauthenticated", "result": None,
                                             "error": {"error": code, "message": text}, "approval_id": None,
                                             "label": "", "policy_ids": []})
            else:
                await _reply(send, 401, code, text, openai=openai)
            return
        limit = self.server.max_model_body_bytes if path in MODEL_PATHS else self.server.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _reply(send, 413, "too_large", f"the body is larger than {limit} bytes", openai=path in MODEL_PATHS)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _reply(send, 413, "too_large", f"the body is larger than {limit} bytes",
                             openai=path in MODEL_PATHS)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if (problem := json_problem(body, self.server.max_json_depth)) is not None:
            await _reply(send, problem[0], problem[1], problem[2], openai=path in MODEL_PATHS)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _run_token_problem(self, token: str) -> AuthError | None:
        context = self.service.platform.gateway.context
        try:
            context.tokens.verify(token or None, audience=context.audience)
        except AuthError as exc:
            return exc
        return None


TOOL_PATH = "/v1/agent/tools/"
"""Tool calls over HTTP: a refused token is answered in the tool door's shape (``status``, ``error``)."""


async def _reply(send: Send, status: int, code: str, message: str, *, openai: bool) -> None:
    payload: dict[str, Any] = ({"error": {"message": message, "type": code, "code": code}} if openai else
                               {"error": code, "message": message})
    await _send_json(send, status, payload)


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
