"""Approvals on the bus: requested inside workers, listed and decided on the platform, consumed by any worker.

A worker's own database is private to it, so the approvals of durable runs live on the bus instead
(:class:`BusApprovalStore`, the same interface and rules as :class:`~stitchwork.security.approvals.ApprovalStore`:
one exact call, single use, expiry means deny):

==============================  ==================================================================================
``<p>apv.id.<approval_id>``     the approval's current state; every change is a compare-and-set on the subject's
                                last sequence number, so two processes never both decide or consume one approval
``<p>apv.call.<digest>``        which approval is the newest for one exact call (run, agent, tool, arguments)
``<p>runs.queue``               a request also queues a *timer* job for its run (``not_before`` = the deadline):
                                when it comes due a worker resumes the run, whose call then expires to deny;
                                a decision queues a resume job at once
==============================  ==================================================================================

Timers are queue messages, so they survive restarts of workers, the platform and the NATS server; a timer that
comes back early (after a restart) is put back with the remaining delay. On the platform,
:class:`FederatedApprovals` shows the platform's own approvals and the bus's side by side, so ``stitchwork
approvals`` / ``approve ID`` (CLI and HTTP API) decide either kind; decisions are audited there as before.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from stitchwork.errors import ApprovalError, BusConflict
from stitchwork.messaging._base import EXPECTED_LAST_SUBJECT_SEQ, ttl_header
from stitchwork.messaging.bridge import SyncBus
from stitchwork.security.approvals import Approval, ApprovalStatus, ApprovalStore, call_hash

if TYPE_CHECKING:
    from stitchwork.workers.subjects import Subjects

_CAS_TRIES = 20


def _approval(data: Mapping[str, Any]) -> Approval:
    return Approval(
        id=data["id"], run_id=data["run_id"], agent=data["agent"], tool=data["tool"], target=data["target"],
        arguments=data["arguments"], call_hash=data["call_hash"], policy_ids=tuple(data["policy_ids"]),
        reason=data["reason"], status=ApprovalStatus(data["status"]), created_at=data["created_at"],
        expires_at=data["expires_at"], decided_at=data.get("decided_at"), decided_by=data.get("decided_by"),
        note=data.get("note"),
    )


def _body(approval: Approval) -> bytes:
    return json.dumps({**approval.to_dict(), "call_hash": approval.call_hash}, ensure_ascii=False,
                      default=str).encode()


class BusApprovalStore(ApprovalStore):
    """:class:`~stitchwork.security.approvals.ApprovalStore` over the bus (see the module docstring).

    Args:
        bus: a synchronous connection (the gateway calls the store synchronously).
        subjects: the installation's subject names.
        timeout_s: an approval not answered within this time expires to deny.
        clock: the time source (tests move it).
        ttl_s: a decided, expired or used approval is removed from the bus this long after (0: kept); a pending
            one never is (``[messaging.limits.approvals] max_age_s``).
    """

    def __init__(self, bus: SyncBus, subjects: Subjects, *, timeout_s: float = 3600,
                 clock: Callable[[], float] = time.time, ttl_s: float = 0.0) -> None:
        # The database-backed parent is not initialised: every method is replaced here.
        self.bus = bus
        self.subjects = subjects
        self.timeout_s = timeout_s
        self.clock = clock
        self.ttl_s = ttl_s
        self.watchers = []

    # -- reading -------------------------------------------------------------------------------------------

    def _read(self, approval_id: str) -> tuple[Approval, int] | None:
        found = self.bus.last(self.subjects.approval(approval_id))
        return (_approval(json.loads(found.data)), found.seq) if found is not None else None

    def _for_call(self, digest: str) -> tuple[Approval, int] | None:
        pointer = self.bus.last(self.subjects.approval_call(digest))
        return self._read(str(json.loads(pointer.data)["id"])) if pointer is not None else None

    def _write(self, approval: Approval, seq: int) -> int:
        """Stores ``approval`` only if ``seq`` is still the newest state (raises BusConflict otherwise)."""
        finished = {} if approval.status is ApprovalStatus.PENDING else ttl_header(self.ttl_s)
        return self.bus.publish(self.subjects.approval(approval.id), _body(approval),
                                headers={EXPECTED_LAST_SUBJECT_SEQ: str(seq), **finished},
                                msg_id=f"apv:{approval.id}:{seq}:{uuid.uuid4().hex[:8]}")

    def _fresh(self, approval: Approval, seq: int) -> Approval:
        """``approval``, expired first if it is pending past its deadline (another process may do it first)."""
        for _ in range(_CAS_TRIES):
            if approval.status is not ApprovalStatus.PENDING or approval.expires_at > self.clock():
                return approval
            expired = replace(approval, status=ApprovalStatus.EXPIRED, decided_at=self.clock(), decided_by="timeout")
            try:
                self._write(expired, seq)
                return expired
            except BusConflict:
                read = self._read(approval.id)
                if read is None:
                    return approval
                approval, seq = read
        return approval

    def get(self, approval_id: str) -> Approval:
        read = self._read(approval_id)
        if read is None:
            raise ApprovalError(f"no approval with id {approval_id!r}")
        return self._fresh(*read)

    def find(self, status: ApprovalStatus | None = ApprovalStatus.PENDING) -> list[Approval]:
        found: list[Approval] = []
        for delivery in self.bus.latest(self.subjects.approval()):
            approval = self._fresh(_approval(json.loads(delivery.data)), delivery.seq)
            if status is None or approval.status is status:
                found.append(approval)
        return sorted(found, key=lambda a: a.created_at)

    def expire(self, approval_ids: list[str]) -> list[str]:
        """Expires those of ``approval_ids`` that are pending and past their deadline; returns the ids this call
        expired (one read per id, no listing)."""
        expired = []
        for approval_id in approval_ids:
            read = self._read(approval_id)
            if read is None or read[0].status is not ApprovalStatus.PENDING or read[0].expires_at > self.clock():
                continue
            fresh = self._fresh(*read)
            if fresh.status is ApprovalStatus.EXPIRED and fresh.decided_by == "timeout":
                expired.append(approval_id)
        return expired

    def expire_due(self) -> list[str]:
        """Expires pending approvals past their deadline; returns their ids."""
        now = self.clock()
        expired = []
        for delivery in self.bus.latest(self.subjects.approval()):
            approval = _approval(json.loads(delivery.data))
            due = approval.status is ApprovalStatus.PENDING and approval.expires_at <= now
            if due and self._fresh(approval, delivery.seq).status is ApprovalStatus.EXPIRED:
                expired.append(approval.id)
        return expired

    def denied(self, run_id: str, agent: str, tool: str, arguments: Mapping[str, Any]) -> Approval | None:
        read = self._for_call(call_hash(run_id, agent, tool, arguments))
        if read is None:
            return None
        approval = self._fresh(*read)
        return approval if approval.status in (ApprovalStatus.DENIED, ApprovalStatus.EXPIRED) else None

    # -- changing ------------------------------------------------------------------------------------------

    def request(
        self, *, run_id: str, agent: str, tool: str, target: str, arguments: Mapping[str, Any],
        policy_ids: tuple[str, ...], reason: str,
    ) -> Approval:
        """Returns the open approval for this exact call, creating it (and its expiry timer) if there is none."""
        digest = call_hash(run_id, agent, tool, arguments)
        for _ in range(_CAS_TRIES):
            pointer = self.bus.last(self.subjects.approval_call(digest))
            if pointer is not None:
                read = self._read(str(json.loads(pointer.data)["id"]))
                if read is not None and (current := self._fresh(*read)).status is ApprovalStatus.PENDING:
                    return current
            now = self.clock()
            approval = Approval(
                id="apv_" + uuid.uuid4().hex[:12], run_id=run_id, agent=agent, tool=tool, target=target,
                arguments=json.loads(json.dumps(dict(arguments), sort_keys=True, ensure_ascii=False)),
                call_hash=digest, policy_ids=tuple(policy_ids), reason=reason, status=ApprovalStatus.PENDING,
                created_at=now, expires_at=now + self.timeout_s,
            )
            # The timer first: a crash before the approval is stored leaves only a harmless early resume. The
            # approval is stored before the pointer to it, so a pointer never names an approval that is not there
            # (a racing request reads it, instead of creating a second one and orphaning the first).
            self._queue(run_id, f"expiry:{approval.id}", not_before=approval.expires_at)
            seq = self._write(approval, 0)
            try:
                # The pointer outlives the approval's deadline by the decided approvals' TTL (0: kept).
                until = ttl_header(self.timeout_s + self.ttl_s) if self.ttl_s else {}
                self.bus.publish(self.subjects.approval_call(digest), json.dumps({"id": approval.id}).encode(),
                                 headers={EXPECTED_LAST_SUBJECT_SEQ: str(pointer.seq if pointer else 0), **until},
                                 msg_id=f"apvcall:{approval.id}")
            except BusConflict:
                # Another request for the same call won: ours is withdrawn (never pending without a pointer).
                withdrawn = replace(approval, status=ApprovalStatus.EXPIRED, decided_at=self.clock(),
                                    decided_by="superseded", note="a concurrent request for the same call won")
                with contextlib.suppress(BusConflict):
                    self._write(withdrawn, seq)
                continue
            return self._created(approval)
        raise ApprovalError(f"could not record an approval for {tool} in run {run_id}: too much contention")

    def decide(self, approval_id: str, *, approve: bool, by: str, note: str = "") -> Approval:
        """Approves or denies a pending approval and queues its run to resume.

        Raises:
            ApprovalError: unknown id, or already decided or expired.
        """
        for _ in range(_CAS_TRIES):
            read = self._read(approval_id)
            if read is None:
                raise ApprovalError(f"no approval with id {approval_id!r}")
            current = self._fresh(*read)
            if current.status is not ApprovalStatus.PENDING:
                raise ApprovalError(f"approval {approval_id} is already {current.status.value}")
            status = ApprovalStatus.APPROVED if approve else ApprovalStatus.DENIED
            decided = replace(current, status=status, decided_at=self.clock(), decided_by=by, note=note)
            try:
                self._write(decided, read[1])
            except BusConflict:
                continue
            self._queue(decided.run_id, f"decision:{approval_id}")
            return decided
        raise ApprovalError(f"approval {approval_id} changed under us too often; try again")

    def consume(self, run_id: str, agent: str, tool: str, arguments: Mapping[str, Any]) -> Approval | None:
        """If this exact call was approved, marks the approval used (one call, one worker) and returns it."""
        digest = call_hash(run_id, agent, tool, arguments)
        for _ in range(_CAS_TRIES):
            read = self._for_call(digest)
            if read is None or read[0].status is not ApprovalStatus.APPROVED:
                return None
            approval, seq = read
            try:
                self._write(replace(approval, status=ApprovalStatus.USED), seq)
            except BusConflict:
                continue  # someone changed it: read again (a second consumer then sees USED)
            return approval
        return None

    def _queue(self, run_id: str, why: str, *, not_before: float = 0.0) -> None:
        job: dict[str, Any] = {"run_id": run_id, "resume": why}
        if not_before:
            job["not_before"] = not_before
        self.bus.publish(self.subjects.queue, json.dumps(job).encode(), msg_id=f"resume:{run_id}:{why}")


class FederatedApprovals(ApprovalStore):
    """The platform's own approvals (its database) and those of durable runs (the bus), as one store.

    Reads merge both; a decision goes to whichever holds the id. New requests (the platform's in-process runs)
    stay in the platform's store.
    """

    def __init__(self, local: ApprovalStore, bus: BusApprovalStore) -> None:
        # Delegates everything; the parent's database set-up already ran for ``local``.
        self.local = local
        self.remote = bus
        self.store = local.store
        self.timeout_s = local.timeout_s
        self.clock = local.clock

    def _holder(self, approval_id: str) -> ApprovalStore:
        try:
            self.local.get(approval_id)
        except ApprovalError:
            return self.remote
        return self.local

    def request(
        self, *, run_id: str, agent: str, tool: str, target: str, arguments: Mapping[str, Any],
        policy_ids: tuple[str, ...], reason: str,
    ) -> Approval:
        return self.local.request(run_id=run_id, agent=agent, tool=tool, target=target, arguments=arguments,
                                  policy_ids=policy_ids, reason=reason)

    def get(self, approval_id: str) -> Approval:
        return self._holder(approval_id).get(approval_id)

    def find(self, status: ApprovalStatus | None = ApprovalStatus.PENDING) -> list[Approval]:
        both = self.local.find(status) + self.remote.find(status)
        return sorted(both, key=lambda a: a.created_at)

    def decide(self, approval_id: str, *, approve: bool, by: str, note: str = "") -> Approval:
        return self._holder(approval_id).decide(approval_id, approve=approve, by=by, note=note)

    def consume(self, run_id: str, agent: str, tool: str, arguments: Mapping[str, Any]) -> Approval | None:
        return self.local.consume(run_id, agent, tool, arguments)

    def denied(self, run_id: str, agent: str, tool: str, arguments: Mapping[str, Any]) -> Approval | None:
        return self.local.denied(run_id, agent, tool, arguments)

    def expire_due(self) -> list[str]:
        return self.local.expire_due() + self.remote.expire_due()

    def watch(self, callback: Callable[[Approval], None]) -> None:
        self.local.watch(callback)
        self.remote.watch(callback)

    def unwatch(self, callback: Callable[[Approval], None]) -> None:
        self.local.unwatch(callback)
        self.remote.unwatch(callback)

    def expire(self, approval_ids: list[str]) -> list[str]:
        local = self.local.expire(approval_ids)
        rest = [i for i in approval_ids if i not in local]
        return local + self.remote.expire([i for i in rest if _is_bus_id(self.local, i)])


def _is_bus_id(local: ApprovalStore, approval_id: str) -> bool:
    try:
        local.get(approval_id)
    except ApprovalError:
        return True
    return False


def due_in(job: Mapping[str, Any], now: float) -> float:
    """Seconds until a timer job (``not_before``) comes due; 0 for an ordinary job."""
    try:
        return max(0.0, float(job.get("not_before") or 0.0) - now)
    except (TypeError, ValueError):
        return 0.0


__all__ = ["BusApprovalStore", "FederatedApprovals", "due_in"]
