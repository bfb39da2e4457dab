"""Runs and their checkpoints: the record, the run store port and its database adapter.

A :class:`RunStore` keeps one checkpoint per run, replaced after each step: the run loop creates and saves runs,
the service gets and lists them. Two adapters implement it: :class:`DatabaseRunStore` (the ``runs`` table of the
platform's store) and :class:`~stitchwork.workers.runstore.BusRunStore` (checkpoints on the bus, fenced by a
compare-and-set; a worker's). Both encode a record as the same row (:func:`record_to_row`).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, ClassVar

from stitchwork.data._base import Store
from stitchwork.errors import RunError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id VARCHAR PRIMARY KEY,
    agent VARCHAR NOT NULL,
    task VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    steps INTEGER NOT NULL,
    messages VARCHAR NOT NULL,
    provenance VARCHAR NOT NULL,
    pending VARCHAR NOT NULL,
    result VARCHAR,
    error VARCHAR,
    created_at DOUBLE NOT NULL,
    updated_at DOUBLE NOT NULL
)
"""


DELTAS_SCHEMA = """
CREATE TABLE IF NOT EXISTS run_provenance (
    run_id VARCHAR NOT NULL,
    seq BIGINT NOT NULL,
    steps INTEGER NOT NULL,
    delta VARCHAR NOT NULL,
    written_at DOUBLE NOT NULL
)
"""
"""Incremental checkpoints (:meth:`RunStore.checkpoint`): what a run's provenance gained since the one before."""

PROVENANCE_KEYS = ("untrusted", "trusted", "confidential")
THROUGH = "deltas_through"
"""The provenance key naming the last incremental checkpoint a full one already holds (later ones are merged in)."""


def merge_provenance(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """A provenance snapshot with an incremental one appended, list by list."""
    merged = dict(base)
    for key in PROVENANCE_KEYS:
        if delta.get(key):
            merged[key] = [*base.get(key, ()), *delta[key]]
    return merged


class RunStatus(StrEnum):
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    COMPLETED = "completed"
    FAILED = "failed"
    BUDGET_EXHAUSTED = "budget_exhausted"
    """The run used its step budget (``max_steps``)."""
    DENIED = "denied"
    """A policy refused the run's model call (an allowlist, a token or cost budget): the run cannot go on."""
    TIMED_OUT = "timed_out"
    """The run used its time budget (``[agents] max_seconds``)."""

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.BUDGET_EXHAUSTED, RunStatus.DENIED,
                      RunStatus.TIMED_OUT})
"""The statuses a run ends in (retention deletes such runs once they are old)."""


@dataclass(frozen=True)
class RunRecord:
    """A run as checkpointed after each step."""

    id: str
    agent: str
    task: str
    model: str
    status: RunStatus = RunStatus.RUNNING
    steps: int = 0
    messages: tuple[dict[str, Any], ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, Any] = field(default_factory=dict)
    """Tool calls of the current turn not yet answered (``calls``) while the run waits for approval."""
    result: str | None = None
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_dict(self, *, messages: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "agent": self.agent, "task": self.task, "model": self.model, "status": self.status.value,
            "steps": self.steps, "result": self.result, "error": self.error, "created_at": self.created_at,
            "updated_at": self.updated_at, "pending_approvals": list(self.pending.get("approvals", [])),
        }
        if messages:
            out["messages"] = list(self.messages)
        return out


def new_run_id() -> str:
    """A fresh run id (``run_`` and 16 hex digits)."""
    return "run_" + uuid.uuid4().hex[:16]


def record_to_row(r: RunRecord) -> dict[str, Any]:
    """The ``runs`` row of a record (messages, provenance and pending as JSON text); a bus checkpoint's body too."""
    return {
        "id": r.id, "agent": r.agent, "task": r.task, "model": r.model, "status": r.status.value,
        "steps": r.steps, "messages": json.dumps(list(r.messages), ensure_ascii=False),
        "provenance": json.dumps(r.provenance, ensure_ascii=False), "pending": json.dumps(r.pending),
        "result": r.result, "error": r.error, "created_at": r.created_at, "updated_at": r.updated_at,
    }


def record_from_row(row: Mapping[str, Any]) -> RunRecord:
    """The record of a ``runs`` row (the inverse of :func:`record_to_row`)."""
    return RunRecord(
        id=row["id"], agent=row["agent"], task=row["task"], model=row["model"], status=RunStatus(row["status"]),
        steps=row["steps"], messages=tuple(json.loads(row["messages"])),
        provenance=json.loads(row["provenance"]), pending=json.loads(row["pending"]), result=row["result"],
        error=row["error"], created_at=row["created_at"], updated_at=row["updated_at"],
    )


class RunStore(ABC):
    """Where run checkpoints are kept: one per run, replaced after each step.

    Adapters implement :meth:`insert`, :meth:`save`, :meth:`fetch` and :meth:`list`; :meth:`create`, :meth:`get`
    and :meth:`asave` are built on them.
    """

    missing_suffix: ClassVar[str] = ""
    """Appended to the "no run with id" error of :meth:`get` (where the run was looked for)."""

    def create(self, agent: str, task: str, model: str) -> RunRecord:
        """A new run (``running``, a fresh id, created and updated now), stored."""
        now = time.time()
        return self.insert(RunRecord(id=new_run_id(), agent=agent, task=task, model=model, created_at=now,
                                     updated_at=now))

    @abstractmethod
    def insert(self, record: RunRecord) -> RunRecord:
        """Stores a new run as it is; returns it."""

    @abstractmethod
    def save(self, record: RunRecord) -> RunRecord:
        """Stores the run's new checkpoint with ``updated_at`` set to now; returns what was stored."""

    async def asave(self, record: RunRecord) -> RunRecord:
        """:meth:`save` for the run loop; a store on a network bus overrides it to wait without blocking."""
        return self.save(record)

    @abstractmethod
    def fetch(self, run_id: str) -> RunRecord | None:
        """The run's newest checkpoint, or ``None``."""

    def checkpoint(self, run_id: str, steps: int, delta: Mapping[str, Any]) -> None:
        """An incremental checkpoint: the run's step count now, and what its provenance gained since the last one
        (lists that only grow: ``ProvenanceTracker.snapshot_since``). Durable on return; :meth:`fetch` then returns
        the provenance with ``delta`` appended. This default rewrites the whole record; an adapter may store only
        the delta. A run that does not exist gets nothing.
        """
        record = self.fetch(run_id)
        if record is None:
            return
        self.save(replace(record, steps=steps, provenance=merge_provenance(record.provenance, delta)))

    def get(self, run_id: str) -> RunRecord:
        """The run's newest checkpoint.

        Raises:
            RunError: no run has this id.
        """
        record = self.fetch(run_id)
        if record is None:
            raise RunError(f"no run with id {run_id!r}{self.missing_suffix}")
        return record

    @abstractmethod
    def list(self, *, status: RunStatus | None = None, limit: int = 50) -> list[RunRecord]:
        """Runs, newest (by ``created_at``) first; only those in ``status`` when given; at most ``limit``."""


class DatabaseRunStore(RunStore):
    """Run checkpoints in the ``runs`` table of the platform's store (one row per run, replaced after each step).

    An incremental checkpoint (:meth:`checkpoint`) appends one ``run_provenance`` row holding the run's step count
    and only what its provenance gained: one statement whose cost does not grow with the run. :meth:`fetch` and
    :meth:`list` merge those rows into the record; a full :meth:`save` of a fetched record (which names the last
    row it holds in ``provenance["deltas_through"]``) folds them in, and deletes them.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        store.execute(SCHEMA)
        store.execute(DELTAS_SCHEMA)
        self._delta_seq: dict[str, int] = {}
        self._lock = threading.Lock()  # checkpoints of one run are numbered in order

    def insert(self, record: RunRecord) -> RunRecord:
        self.store.append("runs", [record_to_row(record)])
        return record

    def save(self, record: RunRecord) -> RunRecord:
        record = replace(record, updated_at=time.time())
        row = record_to_row(record)
        sets = ", ".join(f"{k} = ?" for k in row if k != "id")
        values = [v for k, v in row.items() if k != "id"]
        self.store.execute(f"UPDATE runs SET {sets} WHERE id = ?", [*values, record.id])
        through = record.provenance.get(THROUGH)
        if isinstance(through, int) and through > 0:  # folded in: fetch skips them from now on anyway
            self.store.execute("DELETE FROM run_provenance WHERE run_id = ? AND seq <= ?", [record.id, through])
        return record

    def checkpoint(self, run_id: str, steps: int, delta: Mapping[str, Any]) -> None:
        # One row, one statement: the step count and the time are merged from it as well (``runs`` is not touched).
        with self._lock:
            seq = self._last_delta(run_id) + 1
            self.store.append("run_provenance", [{
                "run_id": run_id, "seq": seq, "steps": steps,
                "delta": json.dumps({k: delta.get(k, []) for k in PROVENANCE_KEYS}, ensure_ascii=False),
                "written_at": time.time()}])
            self._delta_seq[run_id] = seq

    def fetch(self, run_id: str) -> RunRecord | None:
        rows = self.store.query("SELECT * FROM runs WHERE id = ?", [run_id])
        return self._merged([record_from_row(rows[0])])[0] if rows else None

    def _last_delta(self, run_id: str) -> int:
        """The number of the run's newest incremental checkpoint (0: none), stored or already folded in."""
        last = self._delta_seq.get(run_id)
        if last is None:
            rows = self.store.query("SELECT max(seq) AS seq FROM run_provenance WHERE run_id = ?", [run_id])
            stored = rows[0]["seq"] if rows and rows[0]["seq"] is not None else 0
            record = self.store.query("SELECT provenance FROM runs WHERE id = ?", [run_id])
            folded = json.loads(record[0]["provenance"]).get(THROUGH, 0) if record else 0
            last = max(int(stored), folded if isinstance(folded, int) else 0)
        return last

    def _merged(self, records: list[RunRecord]) -> list[RunRecord]:
        """The records with their incremental checkpoints merged in (those a full save has not folded in)."""
        if not records:
            return records
        marks = ", ".join("?" for _ in records)
        rows = self.store.query(f"SELECT run_id, seq, steps, delta, written_at FROM run_provenance "
                                f"WHERE run_id IN ({marks}) ORDER BY run_id, seq", [r.id for r in records])
        if not rows:
            return records
        deltas: dict[str, list[Mapping[str, Any]]] = {}
        for row in rows:
            deltas.setdefault(row["run_id"], []).append(row)
        out = []
        for record in records:
            through = record.provenance.get(THROUGH, 0)
            through = through if isinstance(through, int) else 0
            steps, provenance, last, updated = record.steps, record.provenance, through, record.updated_at
            for delta in deltas.get(record.id, ()):
                if delta["seq"] <= through:
                    continue
                provenance = merge_provenance(provenance, json.loads(delta["delta"]))
                steps, last = max(steps, int(delta["steps"])), int(delta["seq"])
                updated = max(updated, float(delta["written_at"]))
            if last != through:
                record = replace(record, steps=steps, provenance={**provenance, THROUGH: last}, updated_at=updated)
            out.append(record)
        return out

    def list(self, *, status: RunStatus | None = None, limit: int = 50) -> list[RunRecord]:
        if status is None:
            rows = self.store.query("SELECT * FROM runs ORDER BY created_at DESC LIMIT ?", [limit])
        else:
            rows = self.store.query(
                "SELECT * FROM runs WHERE status = ? ORDER BY created_at DESC LIMIT ?", [status.value, limit]
            )
        return self._merged([record_from_row(r) for r in rows])
