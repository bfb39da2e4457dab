"""Run checkpoints on the bus: a compare-and-set per checkpoint fences off a stalled worker."""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from stitchwork.agents.loop import idempotency_key
from stitchwork.agents.runs import RunRecord, RunStatus, RunStore, record_from_row, record_to_row
from stitchwork.errors import BusError
from stitchwork.messaging._base import EXPECTED_LAST_SUBJECT_SEQ, Bus, Delivery, ttl_header
from stitchwork.messaging.bridge import SyncBus
from stitchwork.workers.ledger import BusLedger
from stitchwork.workers.subjects import Subjects

log = logging.getLogger(__name__)


class BusRunStore(RunStore):
    """Run checkpoints on the bus only (``<p>state.<run_id>``), with this worker's latest copies in memory.

    :meth:`get` reads the newest checkpoint from the bus (another worker may have advanced the run); :meth:`save`
    returns only once the checkpoint is stored on the bus. Nothing goes to the worker's database: one autocommitted
    DuckDB ``UPDATE`` costs more than the JetStream publish. :meth:`list` lists the runs this worker has seen.
    """

    missing_suffix = " on the bus"

    def __init__(self, bus: SyncBus, subjects: Subjects, *, abus: Bus | None = None,
                 finished_ttl_s: float = 0.0) -> None:
        self.bus = bus
        self.subjects = subjects
        self.finished_ttl_s = finished_ttl_s
        """A finished run's last checkpoint is removed from the bus this long after it was stored, and its older
        ones at once (0: kept); a running or waiting run's never are (``[messaging.limits.state] max_age_s``)."""
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

    def _fence(self, record: RunRecord) -> tuple[dict[str, str], str]:
        """Headers and message id of a compare-and-set checkpoint (stored only over our last-known one).

        The message id is unique per write (a random prefix of this store, then a counter): as unique as a
        ``uuid4`` per write, without reading the system's random source at every checkpoint. A finished run's
        checkpoint carries the TTL of ``finished_ttl_s``; an unfinished one none (it must stay).
        """
        headers = {EXPECTED_LAST_SUBJECT_SEQ: str(self._seq.get(record.id, 0))}
        if record.status.finished:
            headers.update(ttl_header(self.finished_ttl_s))
        return headers, f"ckpt:{record.id}:{self._writer}{next(self._writes)}"

    def _aging(self, record: RunRecord) -> bool:
        return bool(self.finished_ttl_s) and record.status.finished

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
        row = record_to_row(replace(record, messages=()))
        del row["messages"]
        head = json.dumps(row, ensure_ascii=False, default=str)
        return (head[:-1] + ', "messages": "' + self._messages_escaped(record) + '"}').encode()

    def publish(self, record: RunRecord) -> None:
        """Stores a checkpoint over the one this worker last saw.

        Raises:
            BusConflict: another worker advanced the run since (this worker must abandon it).
        """
        headers, msg_id = self._fence(record)
        self._seq[record.id] = self.bus.publish(self.subjects.state(record.id), self._body(record), headers=headers,
                                                msg_id=msg_id)
        self._latest[record.id] = record
        if self._aging(record):
            self.bus.purge(self.subjects.state(record.id), keep=1)

    async def apublish(self, record: RunRecord) -> None:
        """:meth:`publish` on the worker's event loop; returns once the checkpoint is stored."""
        if self.abus is None:
            self.publish(record)
            return
        headers, msg_id = self._fence(record)
        self._seq[record.id] = await self.abus.publish(self.subjects.state(record.id), self._body(record),
                                                       headers=headers, msg_id=msg_id)
        self._latest[record.id] = record
        if self._aging(record):
            await self.abus.purge(self.subjects.state(record.id), keep=1)

    async def aseal(self, record: RunRecord) -> None:
        """Removes a finished run's checkpoints but its last (the one that ages out), if a worker stopped between
        storing that one and removing the others: otherwise, once it aged out, an older *running* checkpoint
        would be the run's newest again. Called before a redelivered job of a finished run is acknowledged."""
        if not self._aging(record):
            return
        subject = self.subjects.state(record.id)
        try:
            if self.abus is not None:
                await self.abus.purge(subject, keep=1)
            else:
                self.bus.purge(subject, keep=1)
        except BusError as exc:
            log.warning("run %s: its older checkpoints stay on the bus: %s", record.id, exc)

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
        record = record_from_row(json.loads(found.data))
        self._latest[run_id] = record
        return record

    def insert(self, record: RunRecord) -> RunRecord:
        """A new run, published."""
        self.publish(record)
        return record

    def list(self, *, status: RunStatus | None = None, limit: int = 50) -> list[RunRecord]:
        """Runs this worker has seen, newest first."""
        records = sorted(self._latest.values(), key=lambda r: r.created_at, reverse=True)
        return [r for r in records if status is None or r.status is status][:limit]
