"""Undo over HTTP: reverse a run's calls through the gateway (:mod:`stitchwork.service.undo`).

* ``GET /v1/runs/{run_id}/calls`` (operator token): the run's calls, which can be undone and which were.
* ``POST /v1/runs/{run_id}/undo`` (operator token), body optional ``{"call": ID}``: the compensations newest first.
* ``POST /v1/agent/undo`` (run token), body optional ``{"call": ID}``: the same for the token's own run, in the
  agent's name.

Answers: 200 with ``{run_id, ok, results, undone, already_undone, failed, waiting}`` (``ok``: every call tried was
undone or had been); 202 when an undo waits for a human's approval; 400 for a body that is not ``{}`` or
``{"call": "<id>"}``; 404 for an unknown run or call; 409 when nothing there can be undone (the message says why).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from stitchwork.errors import AuthError, ConfigError
from stitchwork.service import Service, json_safe

MAX_CALL_ID = 512


def call_of(body: bytes) -> str | None:
    """The ``call`` of an undo request body (``None``: every call of the run).

    Raises:
        ConfigError: the body is not empty, ``{}`` or ``{"call": "<id>" | <seq>}`` (answered 400).
    """
    if not body.strip():
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"the body must be JSON: {{\"call\": \"<call id>\"}} or empty ({exc})") from exc
    if not isinstance(value, dict):
        raise ConfigError("the body must be a JSON object: {\"call\": \"<call id>\"} or {}")
    if unknown := sorted(set(value) - {"call"}):
        raise ConfigError(f"unknown field(s) {', '.join(map(repr, unknown))}; the body is {{\"call\": \"<call id>\"}}")
    call = value.get("call")
    if call is None:
        return None
    if isinstance(call, bool) or not isinstance(call, str | int) or not str(call).strip():
        raise ConfigError("call must be a call id (text) or an audit event sequence number")
    if len(str(call)) > MAX_CALL_ID:
        raise ConfigError(f"call is longer than {MAX_CALL_ID} characters")
    return str(call)


def answer(report: dict[str, Any]) -> JSONResponse:
    """The HTTP answer of an undo report: 202 when one waits for approval, else 200."""
    ok = all(r["status"] in ("ok", "already_undone") for r in report["results"])
    return JSONResponse(json_safe({**report, "ok": ok}), status_code=202 if report["waiting"] else 200)


def mount(app: FastAPI, service: Service) -> None:
    """Adds ``GET /v1/runs/{run_id}/calls``, ``POST /v1/runs/{run_id}/undo`` and ``POST /v1/agent/undo``."""

    @app.get("/v1/runs/{run_id}/calls")
    async def run_calls(run_id: str) -> list[dict[str, Any]]:
        return await service.run_calls(run_id)

    @app.post("/v1/runs/{run_id}/undo")
    async def undo(run_id: str, request: Request) -> JSONResponse:
        call = call_of(await request.body())
        return answer(await service.undo(run_id, call=call, by="operator:api"))

    @app.post("/v1/agent/undo")
    async def agent_undo(request: Request) -> JSONResponse:
        """An agent reverses calls of its own run (its run token names the run)."""
        token = request.state.run_token or None
        try:
            claims = await service.platform.gateway.authenticate(token, action="undo")
        except AuthError as exc:
            return JSONResponse(exc.to_dict(), status_code=401)
        call = call_of(await request.body())
        return answer(await service.undo(claims.run_id, call=call, by=f"agent:{claims.agent}", token=token))


__all__ = ["call_of", "mount"]
