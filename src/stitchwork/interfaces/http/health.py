"""The readiness probe, open without a token and writing nothing to the audit log (``PUBLIC_PATHS``).

``GET /readyz``: 200 when the store answers, the audit log can take events and the bus is reachable; 503 with the
failing checks otherwise. It says no more than that (no agents, tools or versions: ``/v1/health`` with the operator
token does). The liveness probe ``/healthz`` is in :mod:`.control`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from stitchwork.errors import StitchworkError
from stitchwork.workers.events import EventHub

if TYPE_CHECKING:
    from fastapi import FastAPI

    from stitchwork.service import Service

CHECK_TIMEOUT_S = 2.0


async def _store(service: Service) -> str:
    rows = await asyncio.to_thread(service.platform.store.query, "SELECT 1 AS ok")
    return "" if rows and rows[0].get("ok") == 1 else "the store gave no answer"


async def _bus(service: Service) -> str:
    hub = service.platform.events
    if not isinstance(hub, EventHub):
        return ""
    bus = await hub.bus()
    await bus.last(hub.subjects.events("readyz"))
    return ""


def mount(app: FastAPI, service: Service) -> None:
    """Adds ``/readyz``."""

    @app.get("/readyz", summary="Readiness: store, audit log, bus (no token)")
    async def readyz() -> JSONResponse:
        checks: dict[str, str] = {}
        for name, probe in (("store", _store), ("bus", _bus)):
            try:
                problem = await asyncio.wait_for(probe(service), CHECK_TIMEOUT_S)
            except TimeoutError:
                problem = f"no answer within {CHECK_TIMEOUT_S:g} s"
            except (StitchworkError, OSError) as exc:
                problem = f"{type(exc).__name__}: {str(exc)[:200]}"
            checks[name] = problem or "ok"
        checks["audit"] = service.platform.audit.health() or "ok"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"ok": ok, "checks": checks}, status_code=200 if ok else 503)
