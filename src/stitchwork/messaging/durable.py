"""Durable runs over the bus: a run queue shared by workers, checkpoints, idempotency records and run events.

Architecture (DuckDB allows one writer process, so workers cannot share the platform's database file):

* Each worker is a platform of its own (:class:`~stitchwork.platform.Platform` on ``<state>/workers/<name>``:
  its own DuckDB, audit chain, CA and tool work directories; the platform's vault file is shared read-only).
* What must survive a worker is on the bus, under a subject prefix (default ``sw``):

  ==========================  ======================================================================
  ``<p>runs.queue``           run jobs ``{run_id, agent, task, model}``; a work queue (group ``workers``);
                              also resume jobs ``{run_id, resume}`` and timers (``not_before``: a job
                              that comes early is put back with the remaining delay)
  ``<p>runs.dead.<run_id>``   the run's dead letter (why, attempts, worker), or a note it was re-submitted
  ``<p>state.<run_id>``       the run's checkpoint (the newest message is the current state; the stream keeps
                              the newest ``[messaging] checkpoints_kept`` per run)
  ``<p>idem.<digest>``        the outcome of a completed side-effecting call, by (run, idempotency key)
  ``<p>events.<run_id>``      the run's steps, in order, numbered by the stream
  ``<p>apv.id.<id>``          approvals requested inside workers (:mod:`stitchwork.messaging.approvals`)
  ==========================  ======================================================================

A worker takes a job, loads the newest checkpoint, drives the run with the ordinary
:class:`~stitchwork.agents.loop.Runner` (checkpoints are published before the next step starts), and acknowledges
the job when the run finished or waits for a human. A worker killed mid-run never acknowledges: after
``ack_wait_s`` another worker gets the job, resumes from the checkpoint, and the gateway answers calls that
already completed from the idempotency records instead of running the tools again.

Fencing: every checkpoint is a compare-and-set on the sequence number of the checkpoint the worker last read or
wrote (``Nats-Expected-Last-Subject-Sequence``). A worker that stalled past ``ack_wait_s`` while another took the
run over fails its next write with :class:`~stitchwork.errors.BusConflict` and abandons the run (no acknowledgement,
no further call; a call it had in flight is covered only by its idempotency key).

Failures: a transient one (:data:`TRANSIENT`: the model or the bus unavailable; a worker shutting down mid-run puts
the job back at once) is retried from the checkpoint after a backoff (``nak`` with a delay, kept by the bus) up
to ``max_deliver`` attempts; a permanent one (an unknown agent, a bad model URI, ...) is not retried. Either way
the job is then dead-lettered and the run marked failed; ``stitchwork runs dead`` lists the letters and ``stitchwork
runs resubmit RUN`` queues the run again (:mod:`stitchwork.messaging.deadletters`). A run the model or a policy
ended (``failed``, ``budget_exhausted``, a denied call) is a finished run, not a failure of the job.

Approvals: requested inside a worker, they are stored on the bus, listed and decided on the platform (CLI and
HTTP API), and a decision or the expiry timer queues the run to resume on any worker
(:mod:`stitchwork.messaging.approvals`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stitchwork.agents.loop import Runner, idempotency_key
from stitchwork.agents.runs import RunRecord, RunStatus, RunStore
from stitchwork.config import Config
from stitchwork.data._base import Store
from stitchwork.errors import BusConflict, BusError, ModelUnavailable, RunError, StitchworkError
from stitchwork.messaging._base import EXPECTED_LAST_SUBJECT_SEQ, Bus, Delivery, open_bus
from stitchwork.messaging.approvals import BusApprovalStore, due_in
from stitchwork.messaging.bridge import SyncBus
from stitchwork.platform import Platform
from stitchwork.tools.manifest import SideEffect

log = logging.getLogger(__name__)


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

    def dead_letter(self, run_id: str = "*") -> str:
        """``<p>runs.dead.<run_id>``: the newest dead letter of a run (or a note that it was re-submitted)."""
        return f"{self.dead}.{run_id}"

    def approval(self, approval_id: str = "*") -> str:
        """``<p>apv.id.<approval_id>``: an approval's current state (pending, approved, denied, expired, used)."""
        return f"{self.prefix}apv.id.{approval_id}"

    def approval_call(self, digest: str) -> str:
        """``<p>apv.call.<digest>``: which approval is the newest for one exact call."""
        return f"{self.prefix}apv.call.{digest[:40]}"


def event_payload(record: RunRecord, kind: str, data: dict[str, Any], *, worker: str = "") -> dict[str, Any]:
    """One run event as published on ``<p>events.<run_id>``."""
    return {"run_id": record.id, "agent": record.agent, "kind": kind, "status": record.status.value,
            "steps": record.steps, "data": data, "worker": worker, "ts": time.time()}


class BusLedger:
    """The gateway's idempotency ledger on the bus (``<p>idem.<digest>``; the first record of a key wins)."""

    def __init__(self, bus: SyncBus, subjects: Subjects, *, abus: Bus | None = None) -> None:
        self.bus = bus
        self.subjects = subjects
        self.abus = abus
        """The worker's own connection, used by :meth:`aget`/:meth:`aput` on its event loop (no thread hop)."""
        self._writing: dict[str, list[asyncio.Task[int]]] = {}
        """run → records sent by :meth:`aput` and not yet confirmed (:meth:`settle` waits for them)."""
        self._reading: dict[tuple[str, str], asyncio.Task[Delivery | None]] = {}
        """(run, key) → a lookup started by :meth:`prefetch`, answered to the next :meth:`aget` of the key."""

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

    async def aget(self, run_id: str, key: str) -> dict[str, Any] | None:
        """:meth:`get` on the worker's event loop, once the run's records sent so far are stored.

        The gateway looks up every side-effecting call before running it, so waiting here keeps the ledger's
        contract: an outcome is stored before the run's next side effect.
        """
        if self.abus is None:
            return self.get(run_id, key)
        await self.settle(run_id)
        early = self._reading.pop((run_id, key), None)
        found = await (early if early is not None else self.abus.last(self.subjects.idem(run_id, key)))
        if found is None:
            return None
        outcome: dict[str, Any] = json.loads(found.data)
        return outcome

    async def aput(self, run_id: str, key: str, outcome: dict[str, Any]) -> None:
        """:meth:`put` on the worker's event loop: sends the record and returns; it is confirmed stored before
        the run's next lookup (:meth:`aget`, so before its next side effect) or checkpoint (:meth:`settle`)."""
        if self.abus is None:
            self.put(run_id, key, outcome)
            return
        subject = self.subjects.idem(run_id, key)
        body = json.dumps(outcome, ensure_ascii=False, default=str).encode()
        if (early := self._reading.pop((run_id, key), None)) is not None:
            early.cancel()  # it may have read the bus before this record
        sending = asyncio.get_running_loop().create_task(self.abus.publish(subject, body, msg_id=subject))
        self._writing.setdefault(run_id, []).append(sending)

    def prefetch(self, run_id: str, keys: list[str]) -> None:
        """Starts the lookups of ``keys`` now (while the checkpoint naming their calls is being stored)."""
        if self.abus is None:
            return
        loop = asyncio.get_running_loop()
        for key in keys:
            if (run_id, key) not in self._reading:
                self._reading[(run_id, key)] = loop.create_task(self.abus.last(self.subjects.idem(run_id, key)))

    async def settle(self, run_id: str) -> None:
        """Waits until every record of ``run_id`` sent so far is stored (raises the first failure)."""
        sending = self._writing.pop(run_id, None)
        if sending:
            results = await asyncio.gather(*sending, return_exceptions=True)
            if failed := [r for r in results if isinstance(r, BaseException)]:
                raise failed[0]

    async def forget(self, run_id: str) -> None:
        """Drops the run's unused lookups and waits for its records sent so far (the run stopped here)."""
        for key in [k for k in self._reading if k[0] == run_id]:
            self._reading.pop(key).cancel()
        await self.settle(run_id)


class BusRunStore(RunStore):
    """Run checkpoints on the bus only (``<p>state.<run_id>``), with this worker's latest copies in memory.

    :meth:`get` reads the newest checkpoint from the bus (another worker may have advanced the run); :meth:`save`
    returns only once the checkpoint is stored on the bus. Nothing goes to the worker's database: one autocommitted
    DuckDB ``UPDATE`` costs more than the JetStream publish.
    """

    def __init__(self, store: Store, bus: SyncBus, subjects: Subjects, *, abus: Bus | None = None) -> None:
        self.store = store
        self.bus = bus
        self.subjects = subjects
        self.abus = abus
        """The worker's own connection: :meth:`asave` and :meth:`afetch` wait on it without blocking the loop."""
        self._latest: dict[str, RunRecord] = {}
        self._encoded: dict[str, tuple[tuple[dict[str, Any], ...], list[str]]] = {}
        self._seq: dict[str, int] = {}
        """run → sequence number of the checkpoint this worker last read or wrote: its fencing token."""
        self._writer = uuid.uuid4().hex[:16]
        self._writes = itertools.count()
        self.ledger: BusLedger | None = None
        """The worker's idempotency ledger: a checkpoint waits for its records, and starts the next lookups."""
        self.side_effecting: Callable[[str], bool] = lambda tool: True
        """Whether a tool's calls are looked up in the ledger (set by the worker from its tool registry)."""

    def _fence(self, run_id: str) -> tuple[dict[str, str], str]:
        """Headers and message id of a compare-and-set checkpoint (stored only over our last-known one).

        The message id is unique per write (a random prefix of this store, then a counter): as unique as a
        ``uuid4`` per write, without reading the system's random source at every checkpoint.
        """
        return ({EXPECTED_LAST_SUBJECT_SEQ: str(self._seq.get(run_id, 0))},
                f"ckpt:{run_id}:{self._writer}{next(self._writes)}")

    def _messages_escaped(self, record: RunRecord) -> str:
        """``json.dumps(json.dumps(list(record.messages)))`` without its quotes, encoding only new messages.

        The checkpoint holds the messages as a JSON string (the ``runs`` row), itself inside the JSON body, so
        each message is encoded, then escaped. A run's messages only grow (checkpointed messages are never changed
        in place), so the escaped encodings of the messages the previous checkpoint held (the same objects) are
        reused: a checkpoint costs O(new messages) instead of O(all messages), and the string is the same.
        """
        messages = record.messages
        seen, parts = self._encoded.get(record.id, ((), []))
        keep = 0
        for old, new in zip(seen, messages, strict=False):
            if old is not new:
                break
            keep += 1
        parts = parts[:keep] + [json.dumps(json.dumps(m, ensure_ascii=False), ensure_ascii=False)[1:-1]
                                for m in messages[keep:]]
        self._encoded[record.id] = (messages, parts)
        return "[" + ", ".join(parts) + "]"

    def _body(self, record: RunRecord) -> bytes:
        """The checkpoint: the ``runs`` row of ``record`` as JSON (``messages`` placed last)."""
        row = self._row(replace(record, messages=()))
        del row["messages"]
        head = json.dumps(row, ensure_ascii=False, default=str)
        return (head[:-1] + ', "messages": "' + self._messages_escaped(record) + '"}').encode()

    def publish(self, record: RunRecord) -> None:
        """Stores a checkpoint over the one this worker last saw.

        Raises:
            BusConflict: another worker advanced the run since (this worker must abandon it).
        """
        headers, msg_id = self._fence(record.id)
        self._seq[record.id] = self.bus.publish(self.subjects.state(record.id), self._body(record), headers=headers,
                                                msg_id=msg_id)
        self._latest[record.id] = record

    async def apublish(self, record: RunRecord) -> None:
        """:meth:`publish` on the worker's event loop; returns once the checkpoint is stored."""
        if self.abus is None:
            self.publish(record)
            return
        headers, msg_id = self._fence(record.id)
        self._seq[record.id] = await self.abus.publish(self.subjects.state(record.id), self._body(record),
                                                       headers=headers, msg_id=msg_id)
        self._latest[record.id] = record

    async def asave(self, record: RunRecord) -> RunRecord:
        """Stores the checkpoint, and the run's idempotency records sent meanwhile, before returning.

        A checkpoint naming calls to run next also starts their idempotency lookups, answered while it is stored.
        """
        record = replace(record, updated_at=time.time())
        calls = record.pending.get("calls") or ()
        if self.ledger is not None and calls and record.status is RunStatus.RUNNING:
            self.ledger.prefetch(record.id, [idempotency_key(record.id, str(c["id"])) for c in calls
                                             if self.side_effecting(str(c.get("name", "")))])
        await self.apublish(record)
        if self.ledger is not None:
            await self.ledger.settle(record.id)
        return record

    async def afetch(self, run_id: str) -> RunRecord | None:
        """:meth:`fetch` on the worker's event loop."""
        if self.abus is None:
            return self.fetch(run_id)
        return self._adopt(run_id, await self.abus.last(self.subjects.state(run_id)))

    def latest(self, run_id: str) -> RunRecord | None:
        """This worker's newest copy of a run (no bus round trip), if it has one."""
        return self._latest.get(run_id)

    def forget(self, run_id: str) -> None:
        """Drops the cached message encodings of a run this worker no longer drives."""
        self._encoded.pop(run_id, None)
        self._seq.pop(run_id, None)

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
        return self._adopt(run_id, self.bus.last(self.subjects.state(run_id)))

    def _adopt(self, run_id: str, found: Delivery | None) -> RunRecord | None:
        """Takes ``found`` (the newest checkpoint message, if any) as this worker's copy and fencing point."""
        self._seq[run_id] = found.seq if found is not None else 0
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

    retry_base_s: float = 0.5
    """Backoff before the first retry of a transient failure; doubled per attempt up to ``retry_max_s``."""
    retry_max_s: float = 30.0

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
        self._event_tail: dict[str, asyncio.Task[None]] = {}
        """The newest event publish of each run: each waits for the one before, so events stay in order."""

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
        kept = self.config.messaging.checkpoints_kept
        if kept > 0:
            try:
                await self.bus.keep_last(self.subjects.state("*"), kept)
            except BusError as exc:  # the run still works; only old checkpoints are not dropped
                log.warning("worker %s: checkpoints are kept forever: %s", self.name, exc)
        self.runs = BusRunStore(platform.store, self.sync, self.subjects, abus=self.bus)
        platform.gateway.idempotency = self.runs.ledger = BusLedger(self.sync, self.subjects, abus=self.bus)
        tools = platform.gateway.tools
        self.runs.side_effecting = lambda name: name in tools and tools.get(name).side_effect is not SideEffect.READ
        platform.runs = self.runs
        platform.runner = Runner(platform.gateway, platform.agents, self.runs, state_dir=platform.config.state_dir,
                                 max_seconds=self.config.agents.max_seconds, on_event=self._on_event)
        platform.runner.reraise = TRANSIENT  # retried from the checkpoint, not a failed run
        approvals = BusApprovalStore(self.sync, self.subjects, timeout_s=self.config.security.approval_timeout_s)
        platform.approvals = platform.gateway.approvals = approvals
        return self

    def _on_event(self, record: RunRecord, kind: str, data: dict[str, Any]) -> None:
        """Publishes a run event without waiting for it (the run loop goes on to its checkpoint meanwhile).

        Events of one run are published in order, each after the one before is stored; :meth:`_flush_events`
        waits for the last (the job is acknowledged only once all its events are on the bus).
        """
        body = json.dumps(event_payload(record, kind, data, worker=self.name), default=str).encode()
        subject = self.subjects.events(record.id)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the worker's loop: wait for the bus in this thread
            if self.sync is not None:
                self.sync.publish(subject, body)
            return
        previous = self._event_tail.get(record.id)
        self._event_tail[record.id] = loop.create_task(self._publish_event(previous, subject, body))

    async def _publish_event(self, previous: asyncio.Task[None] | None, subject: str, body: bytes) -> None:
        if previous is not None:
            await previous  # a lost event fails every later one of the run: no gaps out of order
        if self.bus is None:
            raise BusError(f"worker {self.name} is closed; event on {subject} not published")
        await self.bus.publish(subject, body)

    async def _flush_events(self, run_id: str) -> None:
        """Waits until every event of ``run_id`` published so far is stored (raises the first failure)."""
        tail = self._event_tail.pop(run_id, None)
        if tail is not None:
            await tail

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
            if job.get("resume") and (record is None or record.status is not RunStatus.WAITING_APPROVAL):
                await self._resume_later(delivery, job, record)
                return
            if record is None:
                record = await self._create(job)
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
        if self._event_tail:
            await asyncio.gather(*self._event_tail.values(), return_exceptions=True)
            self._event_tail.clear()
        if self.platform is not None:
            await self.platform.aclose()
            self.platform = None
        if self.sync is not None:
            self.sync.close()
            self.sync = None
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
