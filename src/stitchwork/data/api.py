"""Data operations over an open platform (reports, export, compaction, retention) and their HTTP routes.

The platform process is DuckDB's single writer, so while ``stitchwork up`` runs these run in the server and the
CLI reaches them over HTTP (:class:`stitchwork.client.HttpClient`); otherwise the CLI opens the platform itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from stitchwork.data.reports import run_report
from stitchwork.errors import AuditError, ConfigError, StitchworkError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from stitchwork.platform import Platform
    from stitchwork.security.audit import VerifyReport
    from stitchwork.service import Service


def report(
    platform: Platform, name: str, since: float | None = None, until: float | None = None
) -> list[dict[str, Any]]:
    """Rows of a ready report (:mod:`stitchwork.data.reports`), after flushing the audit journal."""
    platform.audit.flush()
    rows = run_report(platform.store, name, since=since, until=until)
    return [platform.gateway.redactor.redact(r) for r in rows]


def export(platform: Platform, to: str, since: float | None = None) -> dict[str, Any]:
    """Appends new audit events to the Iceberg archive ``to`` (incremental)."""
    from stitchwork.data.iceberg import IcebergArchive

    platform.audit.flush()
    result = IcebergArchive(to).export(platform.store, since=since)
    return {"to": to, **asdict(result)}


def compact(platform: Platform, to: str, older_than_days: float | None = None, upto_seq: int | None = None
            ) -> dict[str, Any]:
    """Moves old audit events into the archive ``to``, leaving a signed checkpoint."""
    from stitchwork.data.iceberg import IcebergArchive
    from stitchwork.data.retention import compact_audit

    platform.audit.flush()
    older = None if older_than_days is None else older_than_days * 86400.0
    result = compact_audit(platform.store, IcebergArchive(to), platform.ca, older_than_s=older, upto_seq=upto_seq)
    return asdict(result)


def retain(platform: Platform, *, now: float | None = None) -> dict[str, int]:
    """Applies ``[data.retention]``: deletes old rows per table, expires agent memory, compacts the audit log into
    its Iceberg archive. Returns rows removed per table."""
    from stitchwork.data.retention import apply_retention, compact_audit, policies_from

    config = platform.config.data.retention
    if config.audit_days > 0 and not config.audit_archive:
        raise ConfigError("[data.retention] audit_days needs audit_archive (an iceberg+... URI)")
    now = time.time() if now is None else now
    removed = apply_retention(platform.store, policies_from(config), now=now)
    if config.memory_days > 0 and platform.memory is not None:
        removed["memory_items"] = platform.memory.expire(now - config.memory_days * 86400.0)
    if config.audit_days > 0:
        from stitchwork.data.iceberg import IcebergArchive

        platform.audit.flush()
        report = compact_audit(platform.store, IcebergArchive(config.audit_archive), platform.ca,
                               older_than_s=config.audit_days * 86400.0, now=now)
        removed["audit_events"] = report.deleted
    platform.audit.append("retention", decision="applied", data={"removed": removed})
    return removed


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


def verify(platform: Platform) -> VerifyReport:
    """``audit verify``: the live chain, or, once compacted, the archive up to the checkpoint and the live rest."""
    from stitchwork.data.retention import latest_checkpoint, verify_across

    try:
        platform.audit.flush()
    except AuditError:
        return platform.audit.verify()  # reports the failed copy
    if latest_checkpoint(platform.store) is None:
        return platform.audit.verify()
    return verify_across(platform.store, platform.ca)


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
