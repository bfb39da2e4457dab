"""Without `stitchwork up`, the CLI's local client still lists and decides approvals that workers keep on the bus."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

from stitchwork.interfaces.cli.local import LocalClient
from stitchwork.messaging.bridge import SyncBus
from stitchwork.security.approvals import ApprovalStatus
from stitchwork.workers.approvals import BusApprovalStore
from stitchwork.workers.subjects import Subjects
from tests.workers.durable_fixtures import build


def test_local_client_lists_and_decides_bus_approvals(tmp_path: Path, nats_url: str) -> None:
    prefix = "l" + uuid.uuid4().hex[:8]
    config = build(tmp_path, [{"content": "done"}], bus=nats_url)
    config = config.replace(messaging=replace(config.messaging, subject_prefix=prefix))
    sync = SyncBus(nats_url)
    try:
        worker_side = BusApprovalStore(sync, Subjects(prefix))
        asked = worker_side.request(run_id="run_local1", agent="cashier", tool="pay", target="p1",
                                    arguments={"text": "p1", "delay": 0.0}, policy_ids=("pay-needs-approval",),
                                    reason="payments wait for a human")
        client = LocalClient(config)
        listed = {a["id"]: a for a in client.approvals("pending")}
        assert asked.id in listed
        assert listed[asked.id]["run_id"] == "run_local1"

        decided = client.decide(asked.id, True, "looks fine")
        assert decided["status"] == "approved"
        assert worker_side.get(asked.id).status is ApprovalStatus.APPROVED
        assert asked.id not in {a["id"] for a in client.approvals("pending")}
        assert worker_side.consume("run_local1", "cashier", "pay", {"text": "p1", "delay": 0.0}) is not None
    finally:
        sync.close()


def test_local_client_without_a_reachable_bus_lists_the_platform_approvals_only(tmp_path: Path) -> None:
    config = build(tmp_path, [{"content": "done"}], bus="nats://embedded")  # `up` is not running: no bus
    assert LocalClient(config).approvals("pending") == []
