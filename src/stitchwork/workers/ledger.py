"""The gateway's idempotency ledger on the bus."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from stitchwork.gateway.idempotency import IdempotencyLedger, is_started
from stitchwork.messaging._base import EXPECTED_LAST_SUBJECT_SEQ, Bus, Delivery, ttl_header
from stitchwork.messaging.bridge import SyncBus
from stitchwork.workers.subjects import Subjects

log = logging.getLogger(__name__)


class BusLedger(IdempotencyLedger):
    """The gateway's idempotency ledger on the bus (``<p>idem.<digest>``; the newest record is the state).

    A started record and the final outcome are two messages with their own message ids (``<subject>:started``,
    ``<subject>``): the final one follows the started one and the bus drops a repeated final one, so the first
    final outcome is the newest message of the key. A started record is a compare-and-set on an empty key: on a
    key with any record it raises :class:`~stitchwork.errors.BusConflict` (the caller was fenced out: another
    worker took this call over), so two workers never both start one call.
    """

    def __init__(self, bus: SyncBus, subjects: Subjects, *, abus: Bus | None = None, ttl_s: float = 0.0) -> None:
        self.bus = bus
        self.subjects = subjects
        self.ttl_s = ttl_s
        """A completed call's outcome is removed from the bus this long after it was recorded (0: kept); a started
        record never is (``[messaging.limits.idempotency] max_age_s``)."""
        self.abus = abus
        """The worker's own connection, used by :meth:`aget`/:meth:`aput` on its event loop (no thread hop)."""
        self._writing: dict[str, list[asyncio.Task[int]]] = {}
        """run → records sent by :meth:`aput` and not yet confirmed (:meth:`settle` waits for them)."""
        self._reading: dict[tuple[str, str], asyncio.Task[Delivery | None]] = {}
        """(run, key) → a lookup started by :meth:`prefetch`, answered to the next :meth:`aget` of the key."""

    @staticmethod
    def _msg_id(subject: str, outcome: dict[str, Any]) -> str:
        # A started record's id is this attempt's own: the bus must not take another worker's intent for a retry.
        return f"{subject}:started:{uuid.uuid4().hex[:12]}" if is_started(outcome) else subject

    def get(self, run_id: str, key: str) -> dict[str, Any] | None:
        found = self.bus.last(self.subjects.idem(run_id, key))
        if found is None:
            return None
        outcome: dict[str, Any] = json.loads(found.data)
        return outcome

    def put(self, run_id: str, key: str, outcome: dict[str, Any]) -> None:
        subject = self.subjects.idem(run_id, key)
        body = json.dumps(outcome, ensure_ascii=False, default=str).encode()
        headers = {EXPECTED_LAST_SUBJECT_SEQ: "0"} if is_started(outcome) else ttl_header(self.ttl_s)
        self.bus.publish(subject, body, msg_id=self._msg_id(subject, outcome), headers=headers or None)

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
        if is_started(outcome):
            # Intent before effect: stored (confirmed) before the tool runs, and only on a key without a record
            # (compare-and-set): a worker that stalled while another took its run over, and acts on a stale
            # lookup, is fenced out here (BusConflict) before it can run the call a second time.
            await self.settle(run_id)
            await self.abus.publish(subject, body, msg_id=self._msg_id(subject, outcome),
                                    headers={EXPECTED_LAST_SUBJECT_SEQ: "0"})
            return
        sending = asyncio.get_running_loop().create_task(
            self.abus.publish(subject, body, msg_id=subject, headers=ttl_header(self.ttl_s) or None))
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
