"""Run events for clients: a WebSocket on the control plane, and the durable run queue over HTTP.

``GET /v1/events?run_id=RUN&after=SEQ`` (WebSocket; operator token as ``Authorization: Bearer`` or ``?token=``)
streams the events of one run (or, without ``run_id``, of all runs) in order, each with ``seq``, its number in the
event stream. A client that reconnects with ``after=<last seq it saw>`` gets every later event, none twice: the
events are replayed from the bus (JetStream when `stitchwork up` runs NATS). Numbers are increasing but not
contiguous for one run: the stream holds the events of every run.

``POST /v1/queue/runs`` puts a run on the queue for `stitchwork worker`; ``GET /v1/queue/runs/{id}`` reads its
newest checkpoint from the bus. ``GET /v1/queue/dead`` lists dead-lettered runs; ``POST
/v1/queue/dead/{id}/resubmit`` queues one again. ``/v1/approvals`` also lists and decides the approvals of durable
runs (:mod:`stitchwork.messaging.approvals`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlsplit

import anyio
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field

from stitchwork.agents.runs import RunRecord
from stitchwork.config import Config
from stitchwork.errors import BusError, ConfigError, RunError, StitchworkError
from stitchwork.messaging._base import Bus, check_subject, open_bus
from stitchwork.messaging.approvals import BusApprovalStore, FederatedApprovals
from stitchwork.messaging.bridge import SyncBus, _run_now
from stitchwork.messaging.deadletters import dead_letters, resubmit
from stitchwork.messaging.durable import Subjects, enqueue_run, event_payload, run_state
from stitchwork.messaging.embedded import bus_uri
from stitchwork.service import Service


class QueuedRunIn(BaseModel):
    agent: str = Field(min_length=1, max_length=128)
    task: str = Field(min_length=1, max_length=100_000)
    model: str | None = None


def resolve_events_uri(config: Config) -> str:
    """The bus the control plane publishes events to; an in-process bus when no real one is running."""
    try:
        return bus_uri(config)
    except ConfigError:
        return f"memory://stitchwork-{abs(hash(str(config.state_dir)))}"


class EventHub:
    """Publishes the platform's run events to the bus and serves them to WebSocket clients."""

    def __init__(self, uri: str, subjects: Subjects) -> None:
        self.uri = uri
        self.subjects = subjects
        self._memory: Bus | None = None
        if urlsplit(uri).scheme == "memory":
            self._memory = _run_now(open_bus(uri))
        self.sync = SyncBus(uri, bus=self._memory)
        self._bus: Bus | None = self._memory
        self._lock = asyncio.Lock()

    def publish(self, record: RunRecord, kind: str, data: dict[str, Any]) -> int:
        """Publishes one run event (blocking until stored); returns its sequence number."""
        body = json.dumps(event_payload(record, kind, data, worker="control-plane"), default=str).encode()
        return self.sync.publish(self.subjects.events(record.id), body)

    async def bus(self) -> Bus:
        """The bus connection of this event loop (opened on first use)."""
        async with self._lock:
            if self._bus is None:
                self._bus = await open_bus(self.uri)
            return self._bus

    async def stream(self, websocket: WebSocket, run_id: str, after: int) -> None:
        """Sends events after ``after`` until the client goes away."""
        subject = self.subjects.events(run_id or "*")
        check_subject(subject, wildcards=True)
        bus = await self.bus()
        consumer = bus.consume(subject, start_seq=after + 1)

        async def pump() -> None:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the client went away mid-send
                async for delivery in consumer:
                    event = json.loads(delivery.data)
                    event["seq"] = delivery.seq
                    await websocket.send_text(json.dumps(event, default=str))

        try:
            # An anyio task group: the server cancels the handler through anyio when the client goes away.
            async with anyio.create_task_group() as group:
                group.start_soon(pump)
                with contextlib.suppress(WebSocketDisconnect):
                    while True:
                        await websocket.receive_text()
                group.cancel_scope.cancel()
        finally:
            await consumer.aclose()


def mount(app: FastAPI, service: Service) -> None:
    """Adds the event WebSocket and the run-queue routes; publishes the platform's run events."""
    config = service.platform.config
    hub = EventHub(resolve_events_uri(config), Subjects(config.messaging.subject_prefix))
    app.state.events = hub
    runner = service.platform.runner
    previous = runner.on_event

    def on_event(record: RunRecord, kind: str, data: dict[str, Any]) -> None:
        if previous is not None:
            previous(record, kind, data)
        with contextlib.suppress(BusError):
            hub.publish(record, kind, data)

    runner.on_event = on_event
    # Approvals of durable runs (requested inside workers) are listed and decided here like the platform's own.
    bus_approvals = BusApprovalStore(hub.sync, hub.subjects, timeout_s=config.security.approval_timeout_s)
    service.platform.approvals = FederatedApprovals(service.platform.approvals, bus_approvals)

    @app.websocket("/v1/events")
    async def events(websocket: WebSocket, run_id: str = "", after: int = 0, token: str = "") -> None:
        scheme, _, bearer = websocket.headers.get("authorization", "").partition(" ")
        presented = token or (bearer.strip() if scheme.lower() == "bearer" else "")
        if not presented or not service.check_operator_token(presented):
            await service.platform.audit.aappend("auth", tool="/v1/events", decision="deny",
                                                 data={"error": "operator_token", "reason": "websocket"})
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
