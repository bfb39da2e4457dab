"""Durable runs that fail or wait: transient failures retried then dead-lettered and re-submitted, permanent ones
not retried, approvals requested in a worker and decided on the platform, approval expiry on a bus timer."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from stitchwork.config import Config
from stitchwork.errors import ApprovalError, RunError
from stitchwork.messaging._base import Bus, open_bus
from stitchwork.messaging.bridge import SyncBus
from stitchwork.platform import Platform, open_worker
from stitchwork.service import Service
from stitchwork.workers.approvals import BusApprovalStore, FederatedApprovals
from stitchwork.workers.deadletters import dead_letters, resubmit
from stitchwork.workers.queue import enqueue_run, run_state, wait_for_run
from stitchwork.workers.subjects import Subjects
from stitchwork.workers.worker import Worker
from tests.fakes.openai_server import Backend, FakeOpenAIServer, Fault
from tests.workers.durable_fixtures import build, call, lines


def _uri(bus_uri: str, root: str) -> str:
    return "memory://rec-" + root if bus_uri.startswith("memory") else bus_uri


@asynccontextmanager
async def workers(config: Config, uri: str, subjects: Subjects, *names: str, **options: Any
                  ) -> AsyncIterator[list[Worker]]:
    started = [await open_worker(config, bus_uri=uri, name=n, subjects=subjects, **options) for n in names]
    for worker in started:
        worker.retry_base_s = 0.05
    stop = asyncio.Event()
    serving = [asyncio.create_task(w.run(stop)) for w in started]
    try:
        yield started
    finally:
        stop.set()
        await asyncio.gather(*serving, return_exceptions=True)
        for worker in started:
            await worker.aclose()


async def events_of(bus: Bus, subjects: Subjects, run_id: str, until: str = "finished") -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async with bus.consume(subjects.events(run_id)) as events:
        while not seen or seen[-1]["kind"] != until:
            seen.append(json.loads((await events.next(10)).data))
    return seen


async def test_a_transient_failure_is_retried_with_backoff_then_dead_lettered_and_resubmitted(
        bus_uri: str, tmp_path: Path, root: str) -> None:
    uri, subjects = _uri(bus_uri, root), Subjects(root)
    model = FakeOpenAIServer(Backend(turns=[{"content": "answered"}]))
    await model.start()
    model.inject(Fault("status", status=503), times=10_000)  # the model is down for every attempt
    config = build(tmp_path, [], bus=uri, model=model.uri())
    client = await open_bus(uri)
    try:
        async with workers(config, uri, subjects, "w1", max_deliver=3):
            run_id = await enqueue_run(client, "scribe", "ask the model", subjects=subjects)
            seen = await events_of(client, subjects, run_id)
            final = await run_state(client, run_id, subjects=subjects)
            assert final is not None and final["status"] == "failed"
            assert "gave up after 3 attempts" in final["error"] and "503" in final["error"]
            assert [e["data"]["attempt"] for e in seen if e["kind"] == "retry"] == [1, 2]
            assert [e["data"]["attempt"] for e in seen if e["kind"] == "claimed"] == [1, 2, 3]
            letters = await dead_letters(client, subjects=subjects)
            assert [(d["run_id"], d["retryable"], d["attempts"]) for d in letters] == [(run_id, True, 3)]

            model.faults.clear()  # the model is back: the operator re-submits the run
            await resubmit(client, run_id, subjects=subjects)
            with pytest.raises(RunError, match="re-submitted"):
                await resubmit(client, run_id, subjects=subjects)
            again = await wait_for_run(client, run_id, subjects=subjects, timeout_s=30)
            assert again["status"] == "completed" and again["result"] == "answered"
            assert await dead_letters(client, subjects=subjects) == []
    finally:
        await client.aclose()
        await model.stop()


async def test_a_permanent_failure_is_not_retried(tmp_path: Path, root: str) -> None:
    uri, subjects = "memory://perm-" + root, Subjects(root)
    config = build(tmp_path, [], bus=uri, model="scripted://no-such-file.jsonl")
    client = await open_bus(uri)
    try:
        async with workers(config, uri, subjects, "w1", max_deliver=5):
            run_id = await enqueue_run(client, "scribe", "task", subjects=subjects)
            seen = await events_of(client, subjects, run_id)
            assert [e["kind"] for e in seen] == ["claimed", "finished"]
            letters = await dead_letters(client, subjects=subjects)
            assert [(d["run_id"], d["retryable"], d["attempts"]) for d in letters] == [(run_id, False, 1)]
            final = await run_state(client, run_id, subjects=subjects)
            assert final is not None and final["status"] == "failed" and "no-such-file" in final["error"]
    finally:
        await client.aclose()


async def test_an_approval_requested_in_a_worker_is_decided_on_the_platform_and_runs_once(
        bus_uri: str, tmp_path: Path, root: str) -> None:
    uri, subjects = _uri(bus_uri, root), Subjects(root)
    turns = [{"tool_calls": [call("c1", "p1", tool="pay")]}, {"content": "paid"}]
    config = build(tmp_path, turns, bus=uri)
    client = await open_bus(uri)
    platform = Platform.open(config)
    sync = SyncBus(uri, bus=client)
    platform.approvals = FederatedApprovals(platform.approvals, BusApprovalStore(sync, subjects))
    service = Service(platform)
    try:
        async with workers(config, uri, subjects, "w1", "w2"):
            run_id = await enqueue_run(client, "scribe", "pay p1", subjects=subjects)
            waiting = await wait_for_run(client, run_id, subjects=subjects, timeout_s=30)
            assert waiting["status"] == "waiting_approval" and lines(tmp_path / "effects.log") == []
            listed = await asyncio.to_thread(service.approvals)
            assert [(a["id"], a["run_id"], a["tool"]) for a in listed] == [(waiting["pending_approvals"][0], run_id,
                                                                            "pay")]
            decided = await service.decide(listed[0]["id"], approve=True, by="operator:test")
            assert decided["status"] == "approved"
            with pytest.raises(ApprovalError, match=r"already (approved|used)"):
                await service.decide(listed[0]["id"], approve=False, by="operator:test")
            seen = await events_of(client, subjects, run_id)
            final = await run_state(client, run_id, subjects=subjects)
            assert final is not None and final["status"] == "completed" and final["result"] == "paid"
            assert lines(tmp_path / "effects.log") == ["p1"]
            assert [e["data"]["status"] for e in seen if e["kind"] == "tool"] == ["approval_required", "ok"]
            assert (await asyncio.to_thread(service.approvals, "used"))[0]["id"] == listed[0]["id"]
            platform.audit.flush()
            decisions = [e for e in platform.audit.tail(50) if e.kind == "approval"]
            assert [(e.run_id, e.decision, e.data["by"]) for e in decisions] == [(run_id, "approved",
                                                                                  "operator:test")]
    finally:
        await platform.aclose()
        sync.close()
        await client.aclose()


async def test_an_unanswered_approval_expires_on_a_bus_timer_and_the_call_is_denied(tmp_path: Path,
                                                                                    root: str) -> None:
    uri, subjects = "memory://exp-" + root, Subjects(root)
    turns = [{"tool_calls": [call("c1", "p1", tool="pay")]}, {"content": "not paid"}]
    config = build(tmp_path, turns, bus=uri, approval_timeout_s=1)
    client = await open_bus(uri)
    try:
        async with workers(config, uri, subjects, "w1"):
            run_id = await enqueue_run(client, "scribe", "pay p1", subjects=subjects)
            seen = await events_of(client, subjects, run_id)  # nobody answers: the timer resumes the run
            final = await run_state(client, run_id, subjects=subjects)
            assert final is not None and final["status"] == "completed" and final["result"] == "not paid"
            assert [e["data"]["status"] for e in seen if e["kind"] == "tool"] == ["approval_required", "denied"]
            assert Counter(e["kind"] for e in seen)["claimed"] == 2
            assert lines(tmp_path / "effects.log") == []
            store = BusApprovalStore(SyncBus(uri, bus=client), subjects)
            assert [a.status.value for a in store.find(None)] == ["expired"]
    finally:
        await client.aclose()


async def test_a_worker_shutting_down_mid_run_puts_the_job_back_at_once(tmp_path: Path, root: str) -> None:
    uri, subjects = "memory://stop-" + root, Subjects(root)
    turns = [{"tool_calls": [call("c1", "s1", delay=1.0)]}, {"tool_calls": [call("c2", "s2")]}, {"content": "ok"}]
    config = build(tmp_path, turns, bus=uri)
    client = await open_bus(uri)
    # ack_wait is an hour: only the shutting-down worker's nak can hand the job on while the test runs.
    first = await open_worker(config, bus_uri=uri, name="first", subjects=subjects, ack_wait_s=3600)
    stop = asyncio.Event()
    serving = asyncio.create_task(first.run(stop))
    try:
        run_id = await enqueue_run(client, "scribe", "two lines", subjects=subjects)
        while not any(line.startswith("s1 ") for line in lines(tmp_path / "starts.log")):
            await asyncio.sleep(0.02)
        stop.set()
        await first.aclose()  # cancels the run in flight
        await asyncio.gather(serving, return_exceptions=True)
        async with workers(config, uri, subjects, "second", ack_wait_s=3600):
            final = await wait_for_run(client, run_id, subjects=subjects, timeout_s=30)
        assert final["status"] == "completed" and final["result"] == "ok"
        seen = await events_of(client, subjects, run_id)
        assert [e["worker"] for e in seen if e["kind"] == "claimed"] == ["first", "second"]
    finally:
        await client.aclose()
