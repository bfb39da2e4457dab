"""A worker: takes runs from the queue and drives them (see :mod:`stitchwork.workers`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from stitchwork.agents.definition import AgentRegistry
from stitchwork.agents.loop import Runner
from stitchwork.agents.runs import RunRecord, RunStatus
from stitchwork.config import Config
from stitchwork.errors import BusConflict, BusError, ModelUnavailable, RunError, StitchworkError
from stitchwork.messaging._base import Bus, Delivery
from stitchwork.workers.approvals import due_in
from stitchwork.workers.auditfeed import AuditForwarder
from stitchwork.workers.events import RunEventPublisher
from stitchwork.workers.runstore import BusRunStore
from stitchwork.workers.subjects import Subjects

log = logging.getLogger(__name__)


def worker_config(config: Config, name: str) -> Config:
    """The platform config of one worker: its own state dir (own database), the platform's vault."""
    state = config.state_dir / "workers" / name
    security = replace(config.security, vault=config.vault_uri)
    data = replace(config.data, store="") if config.data.store.startswith(("duckdb", "memory")) else config.data
    return config.replace(state_dir=state, security=security, data=data)


class WorkerPlatform(Protocol):
    """What a worker needs of its platform (:func:`stitchwork.platform.open_worker` assembles it)."""

    agents: AgentRegistry
    runner: Runner

    async def aclose(self) -> None: ...


class Worker:
    """Takes runs from the queue and drives them; ``concurrency`` runs at a time (backpressure).

    Built by :func:`stitchwork.platform.open_worker`, which opens the bus and assembles the worker's platform
    (bus run store, bus idempotency ledger, bus approvals, ordered run events). The worker owns both and closes
    them in :meth:`aclose`.
    """

    retry_base_s: float = 0.5
    """Backoff before the first retry of a transient failure; doubled per attempt up to ``retry_max_s``."""
    retry_max_s: float = 30.0

    def __init__(self, platform: WorkerPlatform, *, bus: Bus, runs: BusRunStore, events: RunEventPublisher,
                 name: str, concurrency: int = 4, ack_wait_s: float = 30.0, max_deliver: int = 5,
                 subjects: Subjects = Subjects(), audit_feed: AuditForwarder | None = None) -> None:
        self.platform: WorkerPlatform | None = platform
        self.bus: Bus | None = bus
        self.runs = runs
        self.events = events
        self.name = name
        self.concurrency = concurrency
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.subjects = subjects
        self.handled = 0
        self.audit_feed = audit_feed
        """Sends this worker's audit events to the platform's one trail (:mod:`stitchwork.workers.auditfeed`)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: set[str] = set()
        """Runs this worker drives now: a job redelivered meanwhile (the bus missed our heartbeats) waits."""

    async def keep_checkpoints(self, kept: int) -> None:
        """Has the bus keep only the newest ``kept`` checkpoints per run (0: all of them)."""
        if kept <= 0 or self.bus is None:
            return
        try:
            await self.bus.keep_last(self.subjects.state("*"), kept)
        except BusError as exc:  # the run still works; only old checkpoints are not dropped
            log.warning("worker %s: checkpoints are kept forever: %s", self.name, exc)

    def _on_event(self, record: RunRecord, kind: str, data: dict[str, Any]) -> None:
        """Publishes a run event of this worker (in order per run; see :class:`RunEventPublisher`)."""
        self.events(record, kind, data)

    async def _flush_events(self, run_id: str) -> None:
        await self.events.flush(run_id)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serves the queue until ``stop`` is set (or the task is cancelled)."""
        if self.bus is None:
            raise BusError(f"worker {self.name} is closed")
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
        assert self.platform is not None and self.runs is not None and self.bus is not None
        try:
            job = json.loads(delivery.data)
            run_id = str(job["run_id"])
        except (ValueError, KeyError, TypeError):
            job, run_id = {}, ""
        if (wait := due_in(job, time.time())) > 0:
            await delivery.nak(wait)  # a timer (approval expiry) that came back early, e.g. after a restart
            return
        if run_id and run_id in self._active:
            await delivery.nak(self.ack_wait_s)  # never two drives of one run in this process
            return
        self._active.add(run_id)
        beat = asyncio.create_task(self._heartbeat(delivery))
        try:
            if not run_id:
                raise RunError(f"malformed job on {self.subjects.queue}: {delivery.data[:200]!r}")
            record = await self.runs.afetch(run_id)
            # A resume job redelivered while its run is running: its earlier attempt was driving the run and died
            # (no other job drives it), so this attempt drives it on; a first delivery defers to the driver.
            took_over = record is not None and record.status is RunStatus.RUNNING and delivery.attempt > 1
            if job.get("resume") and not took_over and (record is None
                                                        or record.status is not RunStatus.WAITING_APPROVAL):
                await self._resume_later(delivery, job, record)
                return
            if record is None:
                record = await self._create(job)
            elif record.status.finished:
                await self.runs.aseal(record)  # a worker may have stopped between its last checkpoint and this
            self._on_event(record, "claimed", {"worker": self.name, "attempt": delivery.attempt})
            await self.platform.runner.drive(run_id, record=record)
            await self._flush_events(run_id)
            await delivery.ack()
            self.handled += 1
        except BusConflict:
            # Fenced: another worker advanced this run after we read it (we stalled past ack_wait). It owns the
            # job now; we stop without another write and leave the job to it.
            self._on_event(self._known(run_id), "fenced", {"worker": self.name, "attempt": delivery.attempt})
            delivery.abandon()
        except asyncio.CancelledError:
            with contextlib.suppress(StitchworkError):
                await asyncio.shield(delivery.nak())  # shutting down mid-run: back on the queue at once
            raise
        except (StitchworkError, ValueError, KeyError, TypeError) as exc:
            await self._failed(delivery, job, run_id, exc)
        finally:
            beat.cancel()
            self._active.discard(run_id)
            self.runs.forget(run_id)
            with contextlib.suppress(StitchworkError):
                await self._flush_events(run_id)  # already flushed unless the run failed
            if self.runs.ledger is not None:
                with contextlib.suppress(StitchworkError):
                    await self.runs.ledger.forget(run_id)  # records of calls that ran are stored even so

    async def _resume_later(self, delivery: Delivery, job: dict[str, Any], record: RunRecord | None) -> None:
        """A resume job (an approval decision or expiry timer) for a run that is not waiting for a human.

        A running run belongs to the job that drives it (a second drive could repeat a call in flight): the resume
        job is queued again for later (as a new message, so its attempts do not run out), and then resumes the run
        if it went on to wait. For a finished or unknown run there is nothing left to resume.
        """
        assert self.bus is not None
        if record is not None and record.status is RunStatus.RUNNING:
            later = {**job, "not_before": time.time() + self.ack_wait_s}
            await self.bus.publish(self.subjects.queue, json.dumps(later).encode(),
                                   msg_id=f"resume:{record.id}:{job['resume']}:{delivery.seq}")
        await delivery.ack()

    def _known(self, run_id: str) -> RunRecord:
        """This worker's latest copy of a run (for an event about it)."""
        known = self.runs.latest(run_id) if self.runs is not None else None
        return known or RunRecord(id=run_id, agent="", task="", model="")

    async def _failed(self, delivery: Delivery, job: dict[str, Any], run_id: str, exc: Exception) -> None:
        """A transient failure goes back on the queue with backoff, up to ``max_deliver`` attempts; then, or at
        once for a permanent failure, the job is dead-lettered on ``<p>runs.dead.<run_id>`` and the run fails."""
        retry = transient(exc)
        if retry and (not self.max_deliver or delivery.attempt < self.max_deliver):
            self._on_event(self._known(run_id), "retry", {"error": str(exc), "attempt": delivery.attempt})
            await delivery.nak(min(self.retry_max_s, self.retry_base_s * 2 ** (delivery.attempt - 1)))
            return
        why = (f"gave up after {delivery.attempt} attempts: {exc}" if retry
               else f"{type(exc).__name__}: {exc}")
        letter = {"run_id": run_id, "job": job or delivery.data.decode("utf-8", "replace"), "error": why,
                  "retryable": retry, "attempts": delivery.attempt, "worker": self.name, "ts": time.time()}
        try:
            assert self.bus is not None and self.runs is not None
            await self.bus.publish(self.subjects.dead_letter(run_id or f"job{delivery.seq}"),
                                   json.dumps(letter, default=str).encode(), msg_id=f"dead:{run_id}:{delivery.seq}:"
                                   f"{delivery.attempt}")
            record = await self.runs.afetch(run_id) if run_id else None
            if record is not None and not record.status.finished:
                record = await self.runs.asave(replace(record, status=RunStatus.FAILED, error=why))
                self._on_event(record, "finished", {"status": record.status.value, "error": why,
                                                    "dead_letter": True})
        except BusError:
            await delivery.nak(self.retry_max_s)  # the letter is not stored: keep the job
            return
        await delivery.term()

    async def _create(self, job: dict[str, Any]) -> RunRecord:
        assert self.platform is not None and self.runs is not None
        agent = self.platform.agents.get(str(job["agent"]))
        model = job.get("model") or agent.model
        if not model:
            raise RunError(f"agent {agent.name!r} has no model")
        now = time.time()
        messages = ({"role": "system", "content": agent.system}, {"role": "user", "content": str(job["task"])})
        record = RunRecord(id=str(job["run_id"]), agent=agent.name, task=str(job["task"]), model=str(model),
                           messages=messages, created_at=now, updated_at=now)
        await self.runs.apublish(record)
        return record

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.events.aclose()
        if self.audit_feed is not None:
            await self.audit_feed.aclose()
            self.audit_feed = None
        if self.platform is not None:
            await self.platform.aclose()
            self.platform = None
        if self.bus is not None:
            await self.bus.aclose()
            self.bus = None


TRANSIENT: tuple[type[StitchworkError], ...] = (ModelUnavailable, BusError)
"""Failures a run is retried for (from its checkpoint, with backoff): the model or the bus was unavailable."""


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying the run for (a lost compare-and-set is not: the run moved on)."""
    return isinstance(exc, TRANSIENT) and not isinstance(exc, BusConflict)


def worker_state_dir(config: Config, name: str) -> Path:
    return config.state_dir / "workers" / name
