"""HTTP routes of the audit operations (:mod:`stitchwork.service.audit`) and the retention timer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from stitchwork.errors import StitchworkError
from stitchwork.service.audit import compact, export, report, retain

if TYPE_CHECKING:
    from fastapi import FastAPI

    from stitchwork.platform import Platform
    from stitchwork.service import Service


def schedule_retention(app: FastAPI, platform: Platform) -> None:
    """Applies retention every ``[data.retention] interval_s`` while the app runs (nothing when it is 0)."""
    interval = platform.config.data.retention.interval_s
    if interval <= 0:
        return
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await asyncio.to_thread(retain, platform)
                except StitchworkError as exc:
                    logging.getLogger(__name__).warning("retention failed: %s", exc)

        task = asyncio.create_task(loop())
        try:
            async with inner(application) as state:
                yield state
        finally:
            task.cancel()

    app.router.lifespan_context = lifespan


class ExportIn(BaseModel):
    to: str = Field(min_length=9, max_length=4096)
    since: float | None = None


class CompactIn(BaseModel):
    to: str = Field(min_length=9, max_length=4096)
    older_than_days: float | None = Field(default=None, ge=0)
    upto_seq: int | None = Field(default=None, ge=1)


def mount(app: FastAPI, service: Service) -> None:
    """Adds ``/v1/audit/reports/{name}``, ``/v1/audit/export``, ``/v1/audit/compact`` and ``/v1/data/retention``."""
    platform = service.platform

    @app.get("/v1/audit/reports/{name}")
    async def audit_report(name: str, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        return await asyncio.to_thread(report, platform, name, since, until)

    @app.post("/v1/audit/export")
    async def audit_export(body: ExportIn) -> dict[str, Any]:
        return await asyncio.to_thread(export, platform, body.to, body.since)

    @app.post("/v1/audit/compact")
    async def audit_compact(body: CompactIn) -> dict[str, Any]:
        return await asyncio.to_thread(compact, platform, body.to, body.older_than_days, body.upto_seq)

    @app.post("/v1/data/retention")
    async def data_retention() -> dict[str, int]:
        return await asyncio.to_thread(retain, platform)

    schedule_retention(app, platform)
