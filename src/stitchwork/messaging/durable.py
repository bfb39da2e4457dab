"""Durable runs over the bus: a run queue shared by workers, checkpoints, idempotency records and run events.

Architecture (DuckDB allows one writer process, so workers cannot share the platform's database file):

* Each worker is a platform of its own (:class:`~stitchwork.platform.Platform` on ``<state>/workers/<name>``:
  its own DuckDB, audit chain, CA and tool work directories; the platform's vault file is shared read-only).
* What must survive a worker is on the bus, under a subject prefix (default ``sw``):

  ==========================  ======================================================================
  ``<p>runs.queue``           run jobs ``{run_id, agent, task, model}``; a work queue (group ``workers``)
  ``<p>runs.dead``            jobs given up after ``max_deliver`` attempts (dead letters)
  ``<p>state.<run_id>``       the run's checkpoint (the newest message is the current state)
  ``<p>idem.<digest>``        the outcome of a completed side-effecting call, by (run, idempotency key)
  ``<p>events.<run_id>``      the run's steps, in order, numbered by the stream
  ==========================  ======================================================================

A worker takes a job, loads the newest checkpoint, drives the run with the ordinary
:class:`~stitchwork.agents.loop.Runner` (checkpoints are published before the next step starts), and acknowledges
the job when the run finished or waits for a human. A worker killed mid-run never acknowledges: after
``ack_wait_s`` another worker gets the job, resumes from the checkpoint, and the gateway answers calls that
already completed from the idempotency records instead of running the tools again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stitchwork.agents.loop import Runner
from stitchwork.agents.runs import RunRecord, RunStatus, RunStore
from stitchwork.config import Config
from stitchwork.data._base import Store
from stitchwork.errors import BusError, RunError, StitchworkError
from stitchwork.messaging._base import Bus, Delivery, open_bus
from stitchwork.messaging.bridge import SyncBus
from stitchwork.platform import Platform


@dataclass(frozen=True)
class Subjects:
    """Subject names under one prefix (several installations can share a NATS server)."""

    prefix: str = "sw"

    @property
    def queue(self) -> str:
        return f"{self.prefix}runs.queue"

    @property
    def dead(self) -> str:
        return f"{self.prefix}runs.dead"

    def state(self, run_id: str) -> str:
        return f"{self.prefix}state.{run_id}"

    def idem(self, run_id: str, key: str) -> str:
        digest = hashlib.sha256(f"{run_id}\x00{key}".encode()).hexdigest()[:40]
        return f"{self.prefix}idem.{digest}"

    def events(self, run_id: str = "*") -> str:
        return f"{self.prefix}events.{run_id}"


def event_payload(record: RunRecord, kind: str, data: dict[str, Any], *, worker: str = "") -> dict[str, Any]:
    """One run event as published on ``<p>events.<run_id>``."""
    return {"run_id": record.id, "agent": record.agent, "kind": kind, "status": record.status.value,
            "steps": record.steps, "data": data, "worker": worker, "ts": time.time()}


class BusLedger:
    """The gateway's idempotency ledger on the bus (``<p>idem.<digest>``; the first record of a key wins)."""

    def __init__(self, bus: SyncBus, subjects: Subjects) -> None:
        self.bus = bus
        self.subjects = subjects

    def get(self, run_id: str, key: str) -> dict[str, Any] | None:
        found = self.bus.last(self.subjects.idem(run_id, key))
        if found is None:
            return None
        outcome: dict[str, Any] = json.loads(found.data)
        return outcome

    def put(self, run_id: str, key: str, outcome: dict[str, Any]) -> None:
        subject = self.subjects.idem(run_id, key)
        body = json.dumps(outcome, ensure_ascii=False, default=str).encode()
        self.bus.publish(subject, body, msg_id=subject)


class BusRunStore(RunStore):
    """Run checkpoints on the bus only (``<p>state.<run_id>``), with this worker's latest copies in memory.

    :meth:`get` reads the newest checkpoint from the bus (another worker may have advanced the run); :meth:`save`
    returns only once the checkpoint is stored on the bus. Nothing goes to the worker's database: one autocommitted
    DuckDB ``UPDATE`` costs more than the JetStream publish.
    """

    def __init__(self, store: Store, bus: SyncBus, subjects: Subjects) -> None:
        self.store = store
        self.bus = bus
        self.subjects = subjects
        self._latest: dict[str, RunRecord] = {}

    def publish(self, record: RunRecord) -> None:
        body = json.dumps(self._row(record), ensure_ascii=False, default=str).encode()
        self.bus.publish(self.subjects.state(record.id), body)
        self._latest[record.id] = record

    def create(self, agent: str, task: str, model: str) -> RunRecord:
        now = time.time()
        return self.insert(RunRecord(id="run_" + uuid.uuid4().hex[:16], agent=agent, task=task, model=model,
                                     created_at=now, updated_at=now))

    def save(self, record: RunRecord) -> RunRecord:
        record = replace(record, updated_at=time.time())
        self.publish(record)
        return record

    def fetch(self, run_id: str) -> RunRecord | None:
        """The newest checkpoint on the bus, or ``None``."""
        found = self.bus.last(self.subjects.state(run_id))
        if found is None:
            return None
        record = self._record(json.loads(found.data))
        self._latest[run_id] = record
        return record

    def insert(self, record: RunRecord) -> RunRecord:
        """A new run, published."""
        self.publish(record)
        return record

    def get(self, run_id: str) -> RunRecord:
        record = self.fetch(run_id)
        if record is None:
            raise RunError(f"no run with id {run_id!r} on the bus")
        return record

    def list(self, *, status: RunStatus | None = None, limit: int = 50) -> list[RunRecord]:
        """Runs this worker has seen, newest first."""
        records = sorted(self._latest.values(), key=lambda r: r.created_at, reverse=True)
        return [r for r in records if status is None or r.status is status][:limit]


async def enqueue_run(bus: Bus, agent: str, task: str, *, model: str | None = None,
                      subjects: Subjects = Subjects(), run_id: str = "") -> str:
    """Puts a run on the queue for the workers; returns its id (a retry with the same ``run_id`` is a no-op)."""
    if not task.strip():
        raise RunError("a run needs a non-empty task")
    run_id = run_id or "run_" + uuid.uuid4().hex[:16]
    job = {"run_id": run_id, "agent": agent, "task": task, "model": model}
    await bus.publish(subjects.queue, json.dumps(job).encode(), msg_id=f"job:{run_id}")
    return run_id


async def run_state(bus: Bus, run_id: str, *, subjects: Subjects = Subjects()) -> dict[str, Any] | None:
    """The newest checkpoint of ``run_id`` as a run dict (``RunRecord.to_dict``), or ``None``."""
    found = await bus.last(subjects.state(run_id))
    if found is None:
        return None
    return RunStore._record(json.loads(found.data)).to_dict()


async def wait_for_run(bus: Bus, run_id: str, *, subjects: Subjects = Subjects(),
                       timeout_s: float = 300.0) -> dict[str, Any]:
    """Follows ``run_id``'s events until it finishes or waits for approval; returns its state then."""
    async with bus.consume(subjects.events(run_id)) as events:
        deadline = time.monotonic() + timeout_s
        while True:
            state = await run_state(bus, run_id, subjects=subjects)
            if state is not None and state["status"] != "running":
                return state
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunError(f"run {run_id} did not finish within {timeout_s:.0f}s")
            with contextlib.suppress(TimeoutError):
                await events.next(min(left, 1.0))


def worker_config(config: Config, name: str) -> Config:
    """The platform config of one worker: its own state dir (own database), the platform's vault."""
    state = config.state_dir / "workers" / name
    security = replace(config.security, vault=config.vault_uri)
    data = replace(config.data, store="") if config.data.store.startswith(("duckdb", "memory")) else config.data
    return config.replace(state_dir=state, security=security, data=data)


class Worker:
    """Takes runs from the queue and drives them; ``concurrency`` runs at a time (backpressure)."""

    def __init__(self, config: Config, *, bus_uri: str, name: str = "", concurrency: int = 4,
                 ack_wait_s: float = 30.0, max_deliver: int = 5, subjects: Subjects = Subjects()) -> None:
        self.config = config
        self.bus_uri = bus_uri
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.concurrency = concurrency
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.subjects = subjects
        self.platform: Platform | None = None
        self.bus: Bus | None = None
        self.sync: SyncBus | None = None
        self.runs: BusRunStore | None = None
        self.handled = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: set[str] = set()
        """Runs this worker drives now: a job redelivered meanwhile (the bus missed our heartbeats) waits."""

    async def start(self) -> Worker:
        """Opens this worker's platform and connects to the bus."""
        self.bus = await open_bus(self.bus_uri)
        try:
            self.sync = SyncBus(self.bus_uri, bus=self.bus)
            platform = Platform.open(worker_config(self.config, self.name))
        except BaseException:
            await self.bus.aclose()
            raise
        self.platform = platform
        self.runs = BusRunStore(platform.store, self.sync, self.subjects)
        platform.gateway.idempotency = BusLedger(self.sync, self.subjects)
        platform.runs = self.runs
        platform.runner = Runner(platform.gateway, platform.agents, self.runs, state_dir=platform.config.state_dir,
                                 max_seconds=self.config.agents.max_seconds, on_event=self._on_event)
        return self

    def _on_event(self, record: RunRecord, kind: str, data: dict[str, Any]) -> None:
        if self.sync is not None:
            body = json.dumps(event_payload(record, kind, data, worker=self.name), default=str).encode()
            self.sync.publish(self.subjects.events(record.id), body)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serves the queue until ``stop`` is set (or the task is cancelled)."""
        if self.bus is None:
            await self.start()
        assert self.bus is not None
        stop = stop or asyncio.Event()
        consumer = self.bus.consume(self.subjects.queue, group="workers", max_in_flight=self.concurrency,
                                    ack_wait_s=self.ack_wait_s)

        async def pump() -> None:
            async for delivery in consumer:  # waits while `concurrency` jobs are unsettled
                task = asyncio.create_task(self._handle(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        pumping = asyncio.create_task(pump())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({pumping, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            await consumer.aclose()  # the pump sees it within a fetch timeout
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pumping, 5.0)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        if pumping.done() and not pumping.cancelled() and (exc := pumping.exception()) is not None:
            raise exc

    async def _heartbeat(self, delivery: Delivery) -> None:
        while True:
            await asyncio.sleep(max(0.1, self.ack_wait_s / 3))
            with contextlib.suppress(StitchworkError):
                await delivery.progress()

    async def _handle(self, delivery: Delivery) -> None:
        assert self.platform is not None and self.runs is not None and self.sync is not None
        try:
            job = json.loads(delivery.data)
            run_id = str(job["run_id"])
        except (ValueError, KeyError, TypeError):
            job, run_id = {}, ""
        if run_id and run_id in self._active:
            await delivery.nak(self.ack_wait_s)  # never two drives of one run in this process
            return
        self._active.add(run_id)
        beat = asyncio.create_task(self._heartbeat(delivery))
        try:
            if not run_id:
                raise RunError(f"malformed job on {self.subjects.queue}: {delivery.data[:200]!r}")
            record = await asyncio.to_thread(self.runs.fetch, run_id)
            if record is None:
                record = self._create(job)
            self._on_event(record, "claimed", {"worker": self.name, "attempt": delivery.attempt})
            await self.platform.runner.drive(run_id)
            await delivery.ack()
            self.handled += 1
        except (StitchworkError, ValueError, KeyError, TypeError) as exc:
            if self.max_deliver and delivery.attempt >= self.max_deliver:
                with contextlib.suppress(BusError):
                    self.sync.publish(self.subjects.dead, json.dumps({
                        "job": delivery.data.decode("utf-8", "replace"), "error": str(exc),
                        "attempts": delivery.attempt, "worker": self.name}).encode())
                await delivery.term()
            else:
                await delivery.nak(min(30.0, 0.5 * 2 ** (delivery.attempt - 1)))
        finally:
            beat.cancel()
            self._active.discard(run_id)

    def _create(self, job: dict[str, Any]) -> RunRecord:
        assert self.platform is not None and self.runs is not None
        agent = self.platform.agents.get(str(job["agent"]))
        model = job.get("model") or agent.model
        if not model:
            raise RunError(f"agent {agent.name!r} has no model")
        now = time.time()
        messages = ({"role": "system", "content": agent.system}, {"role": "user", "content": str(job["task"])})
        record = RunRecord(id=str(job["run_id"]), agent=agent.name, task=str(job["task"]), model=str(model),
                           messages=messages, created_at=now, updated_at=now)
        return self.runs.insert(record)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.platform is not None:
            await self.platform.aclose()
            self.platform = None
        if self.sync is not None:
            self.sync.close()
            self.sync = None
        if self.bus is not None:
            await self.bus.aclose()
            self.bus = None


def worker_state_dir(config: Config, name: str) -> Path:
    return config.state_dir / "workers" / name
