"""Durable idempotency: the outcome of a completed side-effecting tool call, kept under its idempotency key.

The gateway asks the ledger before it runs a side-effecting call that carries a key; a recorded outcome is
returned (and audited as ``replayed``) instead of running the tool again. Keys are scoped to the run:
``(run_id, key)``. The run loop's keys are ``<run_id>:<call_id>``, so a run resumed from a checkpoint by another
process or worker does not repeat a call that completed before the crash.

Intent before effect: before a side-effecting call runs, the gateway records a *started* record under its key
(``{"status": "started", ...}``, :data:`STARTED`), durable before the tool runs. A crash after the tool acted but
before its outcome was recorded leaves the started record alone: the next worker finds the call *uncertain* and
does not run it blindly again (:mod:`stitchwork.gateway.uncertain`: resumed with the tool's own key when its
manifest says ``idempotency = "key"``, else held for a human). The gateway hands the key to the tool
(``STITCHWORK_IDEMPOTENCY_KEY`` in its environment), so a tool that talks to an outside system can pass it on (as
HTTP ``Idempotency-Key``) or check it.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from stitchwork.data._base import Store
from stitchwork.errors import LedgerConflict

SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_records (
    run_id VARCHAR NOT NULL,
    key VARCHAR NOT NULL,
    outcome VARCHAR NOT NULL,
    created_at DOUBLE NOT NULL,
    PRIMARY KEY (run_id, key)
)
"""


STARTED = "started"
"""The ``status`` of an intent record: the call was about to run; no outcome was recorded yet."""


def is_started(record: dict[str, Any] | None) -> bool:
    """Whether a ledger record is an intent (the call started) rather than an outcome."""
    return record is not None and record.get("status") == STARTED


class IdempotencyLedger(Protocol):
    """Where completed side-effecting outcomes are kept: the port (the store, a bus for workers, memory).

    Contract (``tests/gateway/test_ledger_behaviour.py``): an unknown key is ``None``; a recorded outcome is
    returned as it was put (JSON: tuples come back as lists); the first *final* put of a key wins; a started
    record (``status == "started"``) is kept only until a final outcome replaces it, and never replaces anything;
    keys are scoped to their run; a record put is found by the next lookup, and by any ledger over the same
    backend after it; a started record is durable when its put returns. Every ledger refuses a started record on
    a key that already has one with :class:`~stitchwork.errors.BusConflict` (the bus: a compare-and-set) or its
    kind :class:`~stitchwork.errors.LedgerConflict` (the store: a unique claim): the caller was fenced out
    (another worker or process took the call over), and exactly one of two concurrent claimants wins.
    """

    async def aget(self, run_id: str, key: str) -> dict[str, Any] | None:
        """The recorded outcome (a :class:`~stitchwork.gateway.context.ToolOutcome` as a dict), or ``None``."""
        ...

    async def aput(self, run_id: str, key: str, outcome: dict[str, Any]) -> None:
        """Records an outcome, durable before the run's next lookup; a second put of the same key keeps the first.

        A ledger may return once the record is sent, if its :meth:`aget` first waits until the run's records sent
        so far are stored: the gateway looks up every side-effecting call before running it, so an outcome is
        still durable before the run's next side effect (the bus ledger of workers does this).
        """
        ...


def _encoded(outcome: dict[str, Any]) -> str:
    return json.dumps(outcome, ensure_ascii=False, default=str)


class StoreLedger(IdempotencyLedger):
    """The ledger in the platform's store (table ``idempotency_records``); durable once a put returns."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.execute(SCHEMA)

    def get(self, run_id: str, key: str) -> dict[str, Any] | None:
        rows = self.store.query("SELECT outcome FROM idempotency_records WHERE run_id = ? AND key = ?", [run_id, key])
        if not rows:
            return None
        outcome: dict[str, Any] = json.loads(rows[0]["outcome"])
        return outcome

    def put(self, run_id: str, key: str, outcome: dict[str, Any]) -> None:
        """Records ``outcome``; a *started* record is a unique claim on the key (see :meth:`claim`).

        Raises:
            LedgerConflict: ``outcome`` is a started record and the key already has a record.
        """
        if is_started(outcome):
            self.claim(run_id, key, outcome)
            return
        # ON CONFLICT keeps the first record on DuckDB; ClickHouse stores keep the newest row of a key instead, so
        # a recorded key is not written again (except a started record, which a final outcome replaces).
        existing = self.get(run_id, key)
        if existing is not None:
            if is_started(existing) and not is_started(outcome):
                self.store.execute(
                    "INSERT INTO idempotency_records (run_id, key, outcome, created_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (run_id, key) DO UPDATE SET outcome = excluded.outcome",
                    [run_id, key, _encoded(outcome), time.time()],
                )
            return
        self.store.execute(
            "INSERT INTO idempotency_records (run_id, key, outcome, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [run_id, key, _encoded(outcome), time.time()],
        )

    def claim(self, run_id: str, key: str, started: dict[str, Any]) -> None:
        """Stores a started record only on a key without any record, and only for one claimant.

        The key is the table's primary key: on DuckDB (and ``memory://``) the insert of a second claimant is dropped
        (``ON CONFLICT DO NOTHING``), and each claimant reads the key back: only the one whose record is stored won.
        On ClickHouse stores (no unique keys; the newest row of a key wins a merge) the read-back still refuses a
        claimant whose record was overwritten, but two inserts that interleave exactly between the other's insert
        and read-back can both pass: fence concurrent undoers there with the bus ledger.

        Raises:
            LedgerConflict: the key already had a record, or another claimant's record was stored.
        """
        text = _encoded(started)
        existing = self.get(run_id, key)
        if existing is not None:
            raise LedgerConflict(f"{key} of run {run_id} is already claimed ({existing.get('status')}): another "
                                 "process started it first")
        self.store.execute(
            "INSERT INTO idempotency_records (run_id, key, outcome, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [run_id, key, text, time.time()],
        )
        rows = self.store.query("SELECT outcome FROM idempotency_records WHERE run_id = ? AND key = ?", [run_id, key])
        if not rows or rows[0]["outcome"] != text:
            raise LedgerConflict(f"{key} of run {run_id} was claimed by another process at the same time")

    async def aget(self, run_id: str, key: str) -> dict[str, Any] | None:
        """:meth:`get` (a store lookup by primary key, answered in place)."""
        return self.get(run_id, key)

    async def aput(self, run_id: str, key: str, outcome: dict[str, Any]) -> None:
        """:meth:`put`."""
        self.put(run_id, key, outcome)


class MemoryLedger(IdempotencyLedger):
    """The ledger in this process's memory (a test double; outcomes are kept as JSON, like the real ledgers)."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], str] = {}

    def get(self, run_id: str, key: str) -> dict[str, Any] | None:
        found = self._records.get((run_id, key))
        if found is None:
            return None
        outcome: dict[str, Any] = json.loads(found)
        return outcome

    def put(self, run_id: str, key: str, outcome: dict[str, Any]) -> None:
        existing = self.get(run_id, key)
        if existing is not None and is_started(outcome):
            raise LedgerConflict(f"{key} of run {run_id} is already claimed ({existing.get('status')})")
        if is_started(existing) and not is_started(outcome):
            self._records[(run_id, key)] = _encoded(outcome)
        self._records.setdefault((run_id, key), _encoded(outcome))

    async def aget(self, run_id: str, key: str) -> dict[str, Any] | None:
        return self.get(run_id, key)

    async def aput(self, run_id: str, key: str, outcome: dict[str, Any]) -> None:
        self.put(run_id, key, outcome)


__all__ = ["STARTED", "IdempotencyLedger", "MemoryLedger", "StoreLedger", "is_started"]
