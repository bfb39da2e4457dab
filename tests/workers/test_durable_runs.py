"""Durable runs: idempotency records in the gateway, workers over the bus (in process, on memory:// and NATS)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stitchwork.agents.runs import RunRecord, RunStatus, record_to_row
from stitchwork.messaging._base import open_bus
from stitchwork.platform import Platform, open_worker
from stitchwork.workers.deadletters import dead_letters
from stitchwork.workers.queue import enqueue_run, run_state, wait_for_run
from stitchwork.workers.subjects import Subjects
from tests.workers.durable_fixtures import build, call, lines


async def test_the_gateway_honours_an_idempotency_key_across_a_restart(tmp_path: Path) -> None:
    config = build(tmp_path, [{"content": "unused"}])
    platform = Platform.open(config)
    try:
        run = platform.gateway.open_run("run_a", "scribe", workdir=tmp_path / "w", max_steps=10)
        token = platform.tokens.issue("scribe", "run_a")
        first = await platform.gateway.call_tool(token, "append", {"text": "once"}, idempotency_key="k1")
        assert first.status == "ok" and run.steps == 1
    finally:
        await platform.aclose()
    platform = Platform.open(config)  # a new process would see the same: the record is in the store
    try:
        platform.gateway.open_run("run_a", "scribe", workdir=tmp_path / "w", max_steps=10)
        token = platform.tokens.issue("scribe", "run_a")
        again = await platform.gateway.call_tool(token, "append", {"text": "once"}, idempotency_key="k1")
        other = await platform.gateway.call_tool(token, "append", {"text": "twice"}, idempotency_key="k2")
        platform.audit.flush()
        replayed = [e for e in platform.audit.tail(100) if e.kind == "tool" and e.decision == "replayed"]
    finally:
        await platform.aclose()
    assert again.status == "ok" and again.content == first.content and again.audit_seq == first.audit_seq
    assert other.status == "ok"
    assert lines(tmp_path / "effects.log") == ["once", "twice"]
    assert [e.data["idempotency_key"] for e in replayed] == ["k1"]
    assert [line.split()[1] for line in lines(tmp_path / "starts.log")] == ["k1", "k2"]


async def test_a_worker_drives_queued_runs_and_publishes_their_events(bus_uri: str, tmp_path: Path, root: str) -> None:
    uri = "memory://durable-" + root if bus_uri.startswith("memory") else bus_uri
    turns = [{"tool_calls": [call("c1", "a"), call("c2", "b")]}, {"tool_calls": [call("c3", "c")]},
             {"content": "written"}]
    config = build(tmp_path, turns, bus=uri)
    config = config.replace(messaging=replace(config.messaging, checkpoints_kept=2))
    subjects = Subjects(root)
    client = await open_bus(uri)
    worker = await open_worker(config, bus_uri=uri, name="w1", subjects=subjects, concurrency=2)
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    try:
        ids = [await enqueue_run(client, "scribe", f"task {i}", subjects=subjects) for i in range(2)]
        finals = [await wait_for_run(client, run_id, subjects=subjects, timeout_s=60) for run_id in ids]
        assert [f["status"] for f in finals] == ["completed", "completed"]
        assert all(f["result"] == "written" and f["steps"] == 3 for f in finals)
        async with client.consume(subjects.events(ids[0])) as events:
            kinds = []
            while not kinds or kinds[-1] != "finished":
                kinds.append(json.loads((await events.next(10)).data)["kind"])
        assert kinds == ["claimed", "model", "tool", "tool", "model", "tool", "model", "finished"]
        assert sorted(lines(tmp_path / "effects.log")) == ["a", "a", "b", "b", "c", "c"]
        state = await run_state(client, ids[1], subjects=subjects)
        assert state is not None and state["status"] == RunStatus.COMPLETED.value
        # The bus keeps the newest two of a running run; a finished run's older ones go at once (it keeps its last).
        async with client.consume(subjects.state(ids[1])) as checkpoints:
            kept = []
            with contextlib.suppress(TimeoutError):
                while True:
                    kept.append(json.loads((await checkpoints.next(0.3)).data))
        assert len(kept) == 1 and kept[-1]["status"] == RunStatus.COMPLETED.value
    finally:
        stop.set()
        await serving
        await worker.aclose()
        await client.aclose()


async def test_a_job_for_an_unknown_agent_is_dead_lettered_at_once_not_retried(tmp_path: Path, root: str) -> None:
    uri = "memory://dead-" + root
    config = build(tmp_path, [{"content": "x"}], bus=uri)
    subjects = Subjects(root)
    client = await open_bus(uri)
    worker = await open_worker(config, bus_uri=uri, name="w1", subjects=subjects, max_deliver=3, ack_wait_s=5)
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    try:
        run_id = await enqueue_run(client, "nobody", "task", subjects=subjects)
        async with client.consume(subjects.dead_letter(run_id)) as dead:
            letter = json.loads((await dead.next(20)).data)
        assert letter["job"]["run_id"] == run_id and letter["attempts"] == 1 and letter["retryable"] is False
        assert "nobody" in letter["error"]
        assert [d["run_id"] for d in await dead_letters(client, subjects=subjects)] == [run_id]
    finally:
        stop.set()
        await serving
        await worker.aclose()
        await client.aclose()


async def test_a_resume_job_never_drives_a_running_run_and_comes_back_later(tmp_path: Path, root: str) -> None:
    # An approval decided (or expiring) while the run is still being driven elsewhere: a second drive could repeat
    # a side effect in flight, so the resume job waits for the run to stop running.
    uri = "memory://resume-" + root
    config = build(tmp_path, [{"content": "driven by the resume job"}], bus=uri)
    subjects = Subjects(root)
    client = await open_bus(uri)
    now = time.time()
    running = RunRecord(id="run_r1", agent="scribe", task="t", model="scripted://scribe.jsonl", created_at=now,
                        updated_at=now, messages=({"role": "user", "content": "t"},))

    async def checkpoint(record: RunRecord) -> None:
        await client.publish(subjects.state(record.id), json.dumps(record_to_row(record), default=str).encode())

    await checkpoint(running)
    worker = await open_worker(config, bus_uri=uri, name="w1", subjects=subjects, ack_wait_s=0.5)
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    try:
        async with client.consume(subjects.queue) as queue:
            await client.publish(subjects.queue, json.dumps({"run_id": "run_r1", "resume": "decision:apv_1"}).encode())
            first, again = [json.loads(d.data) for d in await _drain(queue, 2)]
            assert again["resume"] == first["resume"] and again["not_before"] > time.time() - 1  # put back
            await checkpoint(replace(running, status=RunStatus.COMPLETED, result="finished by its own job"))
            with pytest.raises(TimeoutError):  # once due, the resume job sees a finished run and is dropped
                await queue.next(2.0)
        state = await run_state(client, "run_r1", subjects=subjects)
        assert state is not None and state["result"] == "finished by its own job"
        async with client.consume(subjects.events("run_r1")) as events:
            with pytest.raises(TimeoutError):
                await events.next(0.2)  # never claimed, never driven
        assert lines(tmp_path / "effects.log") == []
    finally:
        stop.set()
        await serving
        await worker.aclose()
        await client.aclose()


async def _drain(consumer: Any, n: int) -> list[Any]:
    return [await consumer.next(10) for _ in range(n)]


@pytest.mark.parametrize("bus_uri", ["memory"], indirect=True)
async def test_enqueue_refuses_an_empty_task(bus_uri: str) -> None:
    client = await open_bus(bus_uri)
    try:
        with pytest.raises(Exception, match="non-empty task"):
            await enqueue_run(client, "scribe", "  ")
    finally:
        await client.aclose()
