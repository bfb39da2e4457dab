"""Two racing requests for the same call on the bus leave one pending approval, never an orphan."""

from __future__ import annotations

import uuid
from typing import Any

from stitchwork.messaging._base import open_bus
from stitchwork.messaging.bridge import SyncBus
from stitchwork.security.approvals import Approval, ApprovalStatus
from stitchwork.workers.approvals import BusApprovalStore
from stitchwork.workers.subjects import Subjects

CALL: dict[str, Any] = {"run_id": "run_1", "agent": "a", "tool": "pay", "target": "", "arguments": {"x": 1},
                        "policy_ids": ("p",), "reason": "r"}


class Interleaved(BusApprovalStore):
    """Runs ``other``'s whole request at the moment this store has stored its approval (and not its pointer)."""

    other: BusApprovalStore | None = None
    theirs: Approval | None = None

    def _write(self, approval: Approval, seq: int) -> int:
        written = super()._write(approval, seq)
        if self.other is not None:
            other, self.other = self.other, None
            self.theirs = other.request(**CALL)
        return written


async def test_racing_requests_for_one_call_leave_one_pending_approval_and_no_orphan() -> None:
    bus = await open_bus(f"memory://race-{uuid.uuid4().hex[:8]}")
    subjects = Subjects("r" + uuid.uuid4().hex[:6])
    sync = SyncBus(bus.uri, bus=bus)
    first = Interleaved(sync, subjects)
    first.other = BusApprovalStore(sync, subjects)
    mine = first.request(**CALL)
    assert first.theirs is not None and mine.id == first.theirs.id  # both requesters wait on one approval
    pending = first.find(ApprovalStatus.PENDING)
    assert [a.id for a in pending] == [mine.id]
    withdrawn = [a for a in first.find(None) if a.id != mine.id]
    assert [(a.status, a.decided_by) for a in withdrawn] == [(ApprovalStatus.EXPIRED, "superseded")]
    decided = first.decide(mine.id, approve=True, by="ops")
    assert decided.status is ApprovalStatus.APPROVED
    assert first.consume("run_1", "a", "pay", {"x": 1}) is not None  # the decision reaches the call
    await bus.aclose()
