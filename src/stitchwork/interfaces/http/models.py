"""HTTP routes of the model gateway: OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models`` for agents
(run token), also under ``/v1/agent/`` (so ``base_url=http://host:8470/v1/agent`` works too), and
``/v1/compute/deployments`` (operator token) with the router's health, cooldown and load, and usage per agent."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from stitchwork.errors import AuthError, StitchworkError
from stitchwork.gateway.models import ModelDoor
from stitchwork.interfaces.http._auth import bearer
from stitchwork.interfaces.http._chat import ChatRoute, answer, error_body, retry_headers, status_of
from stitchwork.service import Service

RUN_TOKEN_PATHS = frozenset({"/v1/chat/completions", "/v1/models"})
"""Paths outside ``/v1/agent/`` that authenticate with a run token (the control plane's middleware lets them by)."""


def openai_error(exc: StitchworkError, models: ModelDoor) -> JSONResponse:
    """An error in the OpenAI shape (``{"error": {"message", "type", "code"}}``), secrets redacted; a rate limit
    carries ``Retry-After`` (whole seconds, rounded up)."""
    return JSONResponse(error_body(exc, models), status_code=status_of(exc), headers=retry_headers(exc))


def mount(app: FastAPI, service: Service) -> None:
    """Adds the model gateway's routes to the control plane."""

    def models() -> ModelDoor:
        return service.platform.gateway.models

    async def chat_completions(request: Request) -> Response:
        status, content, stream, headers = await answer(models(), bearer(request) or None, await request.body())
        if stream is None:
            return JSONResponse(content, status_code=status, headers=headers)
        return StreamingResponse(stream, media_type="text/event-stream")

    async def list_models(request: Request) -> Response:
        gateway = models()
        try:
            claims = await gateway.authenticate(bearer(request) or None, action="model_list")
        except AuthError as exc:
            return openai_error(exc, gateway)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "stitchwork"}
                for name in gateway.models_for(claims.agent)]
        return JSONResponse({"object": "list", "data": data})

    app.add_middleware(ChatRoute, door=models)  # the same route without FastAPI's per-request cost (see _chat)
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
