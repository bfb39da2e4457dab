"""Approval notifications beside the control plane: :class:`~stitchwork.service.notify.ApprovalNotifier` runs
while the app does (when ``[notifications] webhooks`` are configured) and is woken by the dashboard's live feed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from stitchwork.service.notify import ApprovalNotifier

if TYPE_CHECKING:
    from fastapi import FastAPI

    from stitchwork.service import Service


def base_url(service: Service) -> str:
    """Where operators open the dashboard: ``[dashboard] public_url``, else the configured bind address."""
    config = service.platform.config
    return config.dashboard.public_url or f"http://{config.server.host}:{config.server.port}"


def mount(app: FastAPI, service: Service) -> None:
    """Starts the notifier with the app when webhooks are configured."""
    config = service.platform.config.notifications
    if not config.webhooks:
        return
    notifier = ApprovalNotifier(service.platform, config, base_url=base_url(service))
    app.state.notifier = notifier
    board = getattr(app.state, "dashboard", None)
    if board is not None:
        board.notifier = notifier
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        task = asyncio.create_task(notifier.run())
        try:
            async with inner(application) as state:
                yield state
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    app.router.lifespan_context = lifespan


__all__ = ["base_url", "mount"]
