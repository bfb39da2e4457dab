"""Durable idempotency: the outcome of a completed side-effecting tool call, kept under its idempotency key.

The gateway asks the ledger before it runs a side-effecting call that carries a key; a recorded outcome is
returned (and audited as ``replayed``) instead of running the tool again. Keys are scoped to the run:
``(run_id, key)``. The run loop's keys are ``<run_id>:<call_id>``, so a run resumed from a checkpoint by another
process or worker does not repeat a call that completed before the crash.

One window remains, and no ledger can close it alone: a crash after the tool acted but before its outcome was
recorded. The gateway therefore also hands the key to the tool (``STITCHWORK_IDEMPOTENCY_KEY`` in its
environment), so a tool that talks to an outside system can pass it on (as HTTP ``Idempotency-Key``) or check it.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from stitchwork.data._base import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_records (
    run_id VARCHAR NOT NULL,
    key VARCHAR NOT NULL,
    outcome VARCHAR NOT NULL,
    created_at DOUBLE NOT NULL,
    PRIMARY KEY (run_id, key)
)
"""


class IdempotencyLedger(Protocol):
    """Where completed side-effecting outcomes are kept: the port (the store, a bus for workers, memory).

    Contract (``tests/gateway/test_ledger_behaviour.py``): an unknown key is ``None``; a recorded outcome is
    returned as it was put (JSON: tuples come back as lists); the first put of a key wins; keys are scoped to
    their run; an outcome put is found by the next lookup, and by any ledger over the same backend after it.
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
        # ON CONFLICT keeps the first record on DuckDB; ClickHouse stores keep the newest row of a key instead, so
        # a recorded key is not written again.
        if self.get(run_id, key) is not None:
            return
        self.store.execute(
            "INSERT INTO idempotency_records (run_id, key, outcome, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [run_id, key, _encoded(outcome), time.time()],
        )

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
        self._records.setdefault((run_id, key), _encoded(outcome))

    async def aget(self, run_id: str, key: str) -> dict[str, Any] | None:
        return self.get(run_id, key)

    async def aput(self, run_id: str, key: str, outcome: dict[str, Any]) -> None:
        self.put(run_id, key, outcome)


__all__ = ["IdempotencyLedger", "MemoryLedger", "StoreLedger"]
