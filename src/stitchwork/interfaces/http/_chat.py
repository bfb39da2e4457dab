"""``POST /v1/chat/completions``: one request body in, one answer (JSON, or an SSE stream) out, through the model door.

:func:`answer` is the whole route, shared by the FastAPI route (documented in the OpenAPI schema) and by
:class:`ChatRoute`, a plain ASGI middleware that serves the same paths without FastAPI's per-request machinery (the
``@app.middleware("http")`` wrapper's extra task and stream, request objects, routing). It sits inside the
application's error and body-size middleware, so a crash is still a 500 and an oversized body still a 413. The
control plane's authentication middleware lets these paths through untouched (the run token is the door's first
stage), so skipping it changes nothing that is checked.

Measured with ``bench/compute.py``: the gateway's CPU per model request, see docs/performance.md.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stitchwork.errors import (
    AuthError,
    ContextLengthExceeded,
    ModelNotFound,
    ModelRejected,
    ModelUnavailable,
    PolicyDenied,
    RateLimited,
    StitchworkError,
)
from stitchwork.gateway.models import ModelDoor

CHAT_PATHS = frozenset({"/v1/chat/completions", "/v1/agent/chat/completions"})
"""The paths :class:`ChatRoute` serves (``POST`` only; anything else goes on to the application)."""

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


def status_of(exc: StitchworkError) -> int:
    """The HTTP status of a refusal or failure in the OpenAI shape."""
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, RateLimited):
        return 429
    if isinstance(exc, PolicyDenied):
        return 403
    if isinstance(exc, ModelUnavailable):
        return 429 if exc.status == 429 else 503
    if isinstance(exc, ModelNotFound):
        return 404
    if isinstance(exc, ContextLengthExceeded):
        return 400
    if isinstance(exc, ModelRejected) and exc.status in {400, 404, 413, 422}:
        return exc.status
    return 400


def retry_headers(exc: StitchworkError) -> dict[str, str]:
    """``Retry-After`` (whole seconds, rounded up) for a rate limit or an unavailable model that says when."""
    retry = exc.retry_after_s if isinstance(exc, RateLimited | ModelUnavailable) else None
    if retry is not None and status_of(exc) in {429, 503}:
        return {"retry-after": str(max(1, math.ceil(retry)))}
    return {}


def error_body(exc: StitchworkError, door: ModelDoor) -> dict[str, Any]:
    """An error in the OpenAI shape (``{"error": {"message", "type", "code"}}``), secrets redacted."""
    error: dict[str, Any] = {"message": door.context.redactor.redact_text(str(exc)), "type": exc.code,
                             "code": exc.code, "param": None}
    if isinstance(exc, PolicyDenied):
        error["policy_ids"] = list(exc.policy_ids)
    return {"error": error}


Answer = tuple[int, Any, AsyncIterator[bytes] | None, dict[str, str]]
"""``(status, JSON body, None, headers)`` or ``(200, None, SSE stream, {})``."""


def _invalid(message: str) -> Answer:
    return 400, {"error": {"message": message, "type": "invalid_request_error", "code": "invalid_json"}}, None, {}


async def answer(door: ModelDoor, token: str | None, raw: bytes) -> Answer:
    """``(status, JSON body, None, headers)`` or ``(200, None, SSE stream, {})`` for one request body."""
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        return _invalid("body is not JSON")
    if not isinstance(body, dict):
        return _invalid("body must be an object")
    try:
        if not body.get("stream"):
            return 200, await door.chat(token, body), None, {}
        chunks = door.chat_stream(token, body)
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    except StitchworkError as exc:
        return status_of(exc), error_body(exc, door), None, retry_headers(exc)
    return 200, None, _sse(door, first, chunks), {}


async def _sse(door: ModelDoor, first: Any, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    if first is not None:
        yield b"data: " + orjson.dumps(first) + b"\n\n"
    try:
        async for chunk in chunks:
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    except StitchworkError as exc:
        error = {"error": {"message": door.context.redactor.redact_text(str(exc)), "type": exc.code}}
        yield b"data: " + json.dumps(error).encode() + b"\n\n"
        return
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    yield b"data: [DONE]\n\n"


def token_of(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The bearer token of raw ASGI headers (None without one)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return (token.strip() or None) if scheme.lower() == "bearer" else None
    return None


class ChatRoute:
    """ASGI middleware serving ``POST`` :data:`CHAT_PATHS` with :func:`answer`; everything else passes through.

    Args:
        app: The application inside.
        door: Returns the model door (looked up per request: the platform may swap it).
    """

    def __init__(self, app: ASGIApp, door: Callable[[], ModelDoor]) -> None:
        self.app = app
        self.door = door

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in CHAT_PATHS:
            await self.app(scope, receive, send)
            return
        raw = await _body(receive)
        if raw is None:
            return  # the client went away before sending its request
        door = self.door()
        status, content, stream, headers = await answer(door, token_of(scope["headers"]), raw)
        if stream is None:
            extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS + extra})
            await send({"type": "http.response.body", "body": orjson.dumps(content)})
            return
        await _stream(stream, receive, send)


async def _body(receive: Receive) -> bytes | None:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _stream(stream: AsyncIterator[bytes], receive: Receive, send: Send) -> None:
    """Sends the stream; a client that disconnects stops it (and with it the upstream request)."""

    async def pump() -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async for piece in stream:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def disconnected() -> None:
        message: Message = {"type": ""}
        while message["type"] != "http.disconnect":
            message = await receive()

    pumping, watching = asyncio.create_task(pump()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait((pumping, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pumping, watching):
            task.cancel()
        await asyncio.gather(pumping, watching, return_exceptions=True)
    if not pumping.cancelled() and (error := pumping.exception()) is not None:
        raise error


__all__ = ["CHAT_PATHS", "ChatRoute", "answer", "error_body", "retry_headers", "status_of", "token_of"]
