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
    """Where completed side-effecting outcomes are kept (the store, or a bus for workers)."""

    def get(self, run_id: str, key: str) -> dict[str, Any] | None:
        """The recorded outcome (a :class:`~stitchwork.gateway.core.ToolOutcome` as a dict), or ``None``."""

    def put(self, run_id: str, key: str, outcome: dict[str, Any]) -> None:
        """Records an outcome durably before returning; a second put of the same key keeps the first."""


class StoreLedger:
    """The ledger in the platform's store (table ``idempotency_records``)."""

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
        self.store.execute(
            "INSERT INTO idempotency_records (run_id, key, outcome, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [run_id, key, json.dumps(outcome, ensure_ascii=False, default=str), time.time()],
        )


async def ledger_get(ledger: IdempotencyLedger, run_id: str, key: str) -> dict[str, Any] | None:
    """``ledger.get``, awaited without blocking the event loop when the ledger offers ``aget`` (a bus ledger)."""
    aget = getattr(ledger, "aget", None)
    if aget is not None:
        found: dict[str, Any] | None = await aget(run_id, key)
        return found
    return ledger.get(run_id, key)


async def ledger_put(ledger: IdempotencyLedger, run_id: str, key: str, outcome: dict[str, Any]) -> None:
    """``ledger.put`` (durable once it returns), awaited without blocking when the ledger offers ``aput``.

    A ledger's ``aput`` may return once the record is sent, if its ``aget`` first waits until the run's records
    sent so far are stored: the gateway looks up every side-effecting call before running it, so an outcome is
    still durable before the run's next side effect (the bus ledger of workers does this).
    """
    aput = getattr(ledger, "aput", None)
    if aput is not None:
        await aput(run_id, key, outcome)
    else:
        ledger.put(run_id, key, outcome)


__all__ = ["IdempotencyLedger", "StoreLedger", "ledger_get", "ledger_put"]
