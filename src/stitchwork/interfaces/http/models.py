"""HTTP routes of the model gateway: OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models`` for agents
(run token), also under ``/v1/agent/`` (so ``base_url=http://host:8470/v1/agent`` works too), and
``/v1/compute/deployments`` (operator token) with the router's health, cooldown and load, and usage per agent."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

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
from stitchwork.interfaces.http._auth import bearer
from stitchwork.service import Service

RUN_TOKEN_PATHS = frozenset({"/v1/chat/completions", "/v1/models"})
"""Paths outside ``/v1/agent/`` that authenticate with a run token (the control plane's middleware lets them by)."""


def _status(exc: StitchworkError) -> int:
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


def openai_error(exc: StitchworkError, models: ModelDoor) -> JSONResponse:
    """An error in the OpenAI shape (``{"error": {"message", "type", "code"}}``), secrets redacted; a rate limit
    carries ``Retry-After`` (whole seconds, rounded up)."""
    status = _status(exc)
    error: dict[str, Any] = {"message": models.context.redactor.redact_text(str(exc)), "type": exc.code,
                             "code": exc.code, "param": None}
    if isinstance(exc, PolicyDenied):
        error["policy_ids"] = list(exc.policy_ids)
    headers: dict[str, str] = {}
    retry = exc.retry_after_s if isinstance(exc, RateLimited | ModelUnavailable) else None
    if retry is not None and status in {429, 503}:
        headers["retry-after"] = str(max(1, math.ceil(retry)))
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def mount(app: FastAPI, service: Service) -> None:
    """Adds the model gateway's routes to the control plane."""

    def models() -> ModelDoor:
        return service.platform.gateway.models

    async def chat_completions(request: Request) -> Response:
        gateway = models()
        try:
            body = json.loads(await request.body() or b"{}")
        except (ValueError, RecursionError):
            return JSONResponse({"error": {"message": "body is not JSON", "type": "invalid_request_error",
                                           "code": "invalid_json"}}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": {"message": "body must be an object", "type": "invalid_request_error",
                                           "code": "invalid_json"}}, status_code=400)
        token = bearer(request) or None
        try:
            if not body.get("stream"):
                return JSONResponse(await gateway.chat(token, body))
            chunks = gateway.chat_stream(token, body)
            first = await anext(chunks)
        except StopAsyncIteration:
            first = None
        except StitchworkError as exc:
            return openai_error(exc, gateway)

        async def sse() -> AsyncIterator[bytes]:
            if first is not None:
                yield b"data: " + json.dumps(first).encode() + b"\n\n"
            try:
                async for chunk in chunks:
                    yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            except StitchworkError as exc:
                error = {"error": {"message": gateway.context.redactor.redact_text(str(exc)),
                                   "type": exc.code, "code": exc.code}}
                yield b"data: " + json.dumps(error).encode() + b"\n\n"
                return
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def list_models(request: Request) -> Response:
        gateway = models()
        try:
            claims = await gateway.authenticate(bearer(request) or None, action="model_list")
        except AuthError as exc:
            return openai_error(exc, gateway)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "stitchwork"}
                for name in gateway.models_for(claims.agent)]
        return JSONResponse({"object": "list", "data": data})

    for prefix in ("/v1", "/v1/agent"):
        app.add_api_route(prefix + "/chat/completions", chat_completions, methods=["POST"],
                          summary="OpenAI-compatible chat completions (run token)")
        app.add_api_route(prefix + "/models", list_models, methods=["GET"], summary="Models this agent may use")

    @app.get("/v1/compute/deployments")
    async def deployments() -> dict[str, Any]:
        """Router health, cooldown and load per deployment; usage and cost per agent."""
        gateway = models()
        return {
            "strategy": gateway.router.settings.strategy,
            "deployments": gateway.router.state(),
            "usage": {agent: {"prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens,
                              "cost_usd": round(m.cost_usd, 8), "calls": m.calls}
                      for agent, m in gateway.usage.items()},
        }


__all__ = ["RUN_TOKEN_PATHS", "mount"]
