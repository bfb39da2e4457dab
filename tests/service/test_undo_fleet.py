"""Undoing calls of runs driven by workers on the bus, from the platform: the same rules as local runs, with the
run's idempotency records (and the undo's own) on the bus, and an uncertain call resolved by undoing it."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stitchwork.agents.loop import idempotency_key
from stitchwork.config import MessagingConfig
from stitchwork.messaging._base import open_bus
from stitchwork.platform import Platform, open_worker
from stitchwork.security.approvals import ApprovalStatus
from stitchwork.service import Service
from stitchwork.workers.ledger import BusLedger
from stitchwork.workers.queue import enqueue_run, run_state
from stitchwork.workers.subjects import Subjects
from tests.service.undo_fixtures import AGENT_TOOLS, calendar, call, write_tools

TURNS = [
    call("create_event", {"calendar": "work", "title": "standup"}, "c1"),
    call("pay", {"account": "acme", "amount": 40}, "c2"),
    {"content": "done"},
]


@pytest.fixture
def tools_dir(tools_dir: Path) -> Path:
    write_tools(tools_dir)
    return tools_dir


async def _until(check: Any, what: str, timeout_s: float = 30.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        found = await check()
        if found:
            return found
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_worker_runs_calls_are_undone_from_the_platform_and_its_uncertain_call_resolved(
        make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the inline sandbox runs the calendar tools here, for the worker and the platform
    uri = f"memory://fleet-{uuid.uuid4().hex[:8]}"
    config = make_config(TURNS, sandbox="inline://", tools=AGENT_TOOLS)
    config = replace(config, messaging=MessagingConfig(bus=uri))
    subjects = Subjects(config.messaging.subject_prefix)
    client = await open_bus(uri)
    platform = Platform.open(config, role="server")
    service = Service(platform)
    worker = await open_worker(config, bus_uri=uri, name="w1")
    stop, stop_feed = asyncio.Event(), asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    feed = asyncio.create_task(service.ingest_fleet_audit(stop_feed))
    bus_ledger = BusLedger(platform.events.sync, subjects)  # type: ignore[union-attr]
    try:
        run_id = "run_" + uuid.uuid4().hex[:12]
        # c2 "was started by a worker that died": its intent is on the bus, so the next worker holds it for a human.
        bus_ledger.put(run_id, idempotency_key(run_id, "c2"), {
            "status": "started", "tool": "pay", "started_at": 1.0, "decision_seq": 10_000, "host": "elsewhere",
            "pid": 1, "side_effect": "external"})
        await enqueue_run(client, "tester", "plan and pay", subjects=subjects, run_id=run_id)

        async def waiting() -> bool:
            state = await run_state(client, run_id, subjects=subjects)
            return state is not None and state["status"] == "waiting_approval"

        await _until(waiting, "the uncertain call to be held")

        async def listed() -> dict[str, Any] | None:
            calls = {c["call"]: c for c in await service.run_calls(run_id)}
            return calls if {"c1", "c2"} <= set(calls) else None

        calls = await _until(listed, "the worker's events on the platform")
        assert calls["c1"]["state"] == "undoable" and calls["c2"]["state"] == "uncertain", calls
        held = calls["c2"]["approval_id"]
        assert platform.runs.fetch(run_id) is None  # not the platform's own run: its records are on the bus

        report = await service.undo(run_id, call="c2", by="operator:api")
        assert [(r["call"], r["status"]) for r in report["results"]] == [("c2", "ok")]
        assert (tmp_path / "ledger.log").read_text() == "refund acme 40\n"  # refunded, never paid
        assert platform.approvals.get(held).status is ApprovalStatus.DENIED  # resolved: not run again

        async def finished() -> bool:
            state = await run_state(client, run_id, subjects=subjects)
            return state is not None and state["status"] == "completed"

        await _until(finished, "the run to go on without the call")
        assert (tmp_path / "ledger.log").read_text() == "refund acme 40\n"

        undone = await service.undo(run_id, call="c1", by="operator:api")
        assert [(r["call"], r["status"]) for r in undone["results"]] == [("c1", "ok")] and calendar(tmp_path) == {}
        again = await service.undo(run_id, by="operator:api")
        assert {(r["call"], r["status"]) for r in again["results"]} == {("c1", "already_undone"),
                                                                      ("c2", "already_undone")}
        assert (tmp_path / "deletions.log").read_text() == "ev1\n"
        # The undos' own intents and outcomes are on the bus (fencing every other undoer), not in the platform's store.
        keys = [k for k in (f"undo:{calls[c]['seq']}:0" for c in ("c1", "c2"))]
        assert [(bus_ledger.get(run_id, k) or {}).get("status") for k in keys] == ["ok", "ok"]
        local = platform.gateway.context.idempotency
        assert local is not None and [await local.aget(run_id, k) for k in keys] == [None, None]
    finally:
        stop.set()
        stop_feed.set()
        await serving
        await asyncio.wait_for(feed, 10)
        await worker.aclose()
        await platform.aclose()
        await client.aclose()
