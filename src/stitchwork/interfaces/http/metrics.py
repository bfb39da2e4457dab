"""``GET /metrics``: the platform's Prometheus metrics (:mod:`stitchwork.observability.metrics`).

Authentication: the operator token, or the scrape token ``[observability] metrics_token``
(``STITCHWORK_OBSERVABILITY__METRICS_TOKEN``), which opens ``/metrics`` and nothing else. Metrics carry names,
counts and timings only (agents, tools, models, policy ids), never arguments, prompts or secrets.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from stitchwork.interfaces.http._auth import bearer
from stitchwork.observability.metrics import CONTENT_TYPE, METRICS
from stitchwork.service import Service

PATHS = frozenset({"/metrics"})
"""Paths that check their own token (the control plane's middleware lets them by)."""


def mount(app: FastAPI, service: Service) -> None:
    """Adds ``GET /metrics`` (unless ``[observability] metrics = false``)."""
    config = service.platform.config.observability
    if not config.metrics:
        return

    @app.get("/metrics", include_in_schema=True, summary="Prometheus metrics (operator or scrape token)")
    async def metrics(request: Request) -> Response:
        token = bearer(request)
        scrape = config.metrics_token
        allowed = bool(token) and ((bool(scrape) and hmac.compare_digest(token.encode(), scrape.encode()))
                                   or service.check_operator_token(token))
        if not allowed:
            await service.platform.audit.aappend(
                "auth", tool="/metrics", decision="deny",
                data={"error": "metrics_token", "reason": "missing or invalid operator or scrape token"})
            return JSONResponse({"error": "unauthenticated", "message": "GET /metrics needs the operator token or "
                                 "the scrape token (Authorization: Bearer <token>)"}, status_code=401)
        return Response(METRICS.exposition(), media_type=CONTENT_TYPE)


__all__ = ["PATHS", "mount"]
