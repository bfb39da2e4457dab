"""Run events for clients: a WebSocket on the control plane, and the durable run queue over HTTP.

``GET /v1/events?run_id=RUN&after=SEQ`` (WebSocket; operator token as ``Authorization: Bearer`` or ``?token=``)
streams the events of one run (or, without ``run_id``, of all runs) in order, each with ``seq``, its number in the
event stream. A client that reconnects with ``after=<last seq it saw>`` gets every later event, none twice: the
events are replayed from the bus (JetStream when `stitchwork up` runs NATS). Numbers are increasing but not
contiguous for one run: the stream holds the events of every run.

``POST /v1/queue/runs`` puts a run on the queue for `stitchwork worker`; ``GET /v1/queue/runs/{id}`` reads its
newest checkpoint from the bus. ``GET /v1/queue/dead`` lists dead-lettered runs; ``POST
/v1/queue/dead/{id}/resubmit`` queues one again. ``/v1/approvals`` also lists and decides the approvals of durable
runs (:mod:`stitchwork.workers.approvals`).
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import FastAPI, WebSocket
from pydantic import BaseModel, Field

from stitchwork.errors import BusError, ConfigError, RunError, StitchworkError
from stitchwork.interfaces.http._auth import bearer
from stitchwork.service import Service
from stitchwork.workers.deadletters import dead_letters, resubmit
from stitchwork.workers.events import EventHub
from stitchwork.workers.queue import enqueue_run, run_state


class QueuedRunIn(BaseModel):
    agent: str = Field(min_length=1, max_length=128)
    task: str = Field(min_length=1, max_length=100_000)
    model: str | None = None


def mount(app: FastAPI, service: Service) -> None:
    """Adds the event WebSocket and the run-queue routes; publishes the platform's run events."""
    hub = service.platform.events
    if not isinstance(hub, EventHub):
        raise ConfigError("the control plane needs a platform opened with role='server' (its run events hub)")
    app.state.events = hub

    @app.websocket("/v1/events")
    async def events(websocket: WebSocket, run_id: str = "", after: int = 0, token: str = "") -> None:
        presented = token or bearer(websocket)
        if not presented or not service.check_operator_token(presented):
            client = websocket.client
            await app.state.failed_auth.record(client.host if client else "unknown",
                                               "websocket: invalid operator token" if presented else
                                               "websocket: missing operator token", "/v1/events")
            await websocket.close(code=4401, reason="a valid operator token is required")
            return
        await websocket.accept()
        try:
            await hub.stream(websocket, run_id, max(after, 0))
        except BusError as exc:
            with contextlib.suppress(RuntimeError):
                await websocket.close(code=4400, reason=str(exc)[:120])

    @app.post("/v1/queue/runs", status_code=202)
    async def queue_run(body: QueuedRunIn) -> dict[str, Any]:
        service.platform.agents.get(body.agent)
        run_id = await enqueue_run(await hub.bus(), body.agent, body.task, model=body.model, subjects=hub.subjects)
        return {"id": run_id, "status": "queued"}

    @app.get("/v1/queue/dead")
    async def dead_runs() -> list[dict[str, Any]]:
        return await dead_letters(await hub.bus(), subjects=hub.subjects)

    @app.post("/v1/queue/dead/{run_id}/resubmit", status_code=202)
    async def resubmit_run(run_id: str) -> dict[str, Any]:
        await resubmit(await hub.bus(), run_id, subjects=hub.subjects, by="operator:api")
        return {"id": run_id, "status": "queued"}

    @app.get("/v1/queue/runs/{run_id}")
    async def queued_run(run_id: str) -> dict[str, Any]:
        try:
            state = await run_state(await hub.bus(), run_id, subjects=hub.subjects)
        except BusError as exc:
            raise RunError(f"no run with id {run_id!r}") from exc
        if state is None:
            raise RunError(f"no run with id {run_id!r} on the bus (queued runs appear once a worker takes them)")
        return state


__all__ = ["EventHub", "StitchworkError", "mount"]
