"""Reliability with real processes on loopback: workers killed with SIGKILL, the NATS server restarted."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from stitchwork.messaging._base import open_bus
from stitchwork.messaging.bridge import SyncBus
from stitchwork.workers.approvals import BusApprovalStore
from stitchwork.workers.queue import enqueue_run, run_state, wait_for_run
from stitchwork.workers.subjects import Subjects
from tests.conftest import nats_available
from tests.workers.durable_fixtures import build, call, lines, spawn_worker, wait_until

pytestmark = pytest.mark.skipif(bool(nats_available()), reason=nats_available() or "nats available")


async def settled(client: Any, run_id: str, subjects: Subjects, timeout_s: float = 90) -> dict[str, Any]:
    """The run's state once it neither runs nor waits for a human."""
    for _ in range(int(timeout_s * 10)):
        state = await run_state(client, run_id, subjects=subjects) or {}
        if state.get("status") not in (None, "running", "waiting_approval"):
            return state
        await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id} did not settle")


async def all_events(client: Any, subjects: Subjects, run_id: str) -> list[dict[str, Any]]:
    """Every event of the run so far."""
    seen: list[dict[str, Any]] = []
    async with client.consume(subjects.events(run_id)) as events:
        while True:
            try:
                seen.append(json.loads((await events.next(2)).data))
            except TimeoutError:
                return seen


def _stop(*procs: object) -> None:
    for proc in procs:
        if proc.poll() is None:  # type: ignore[attr-defined]
            proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    for proc in procs:
        try:
            proc.wait(15)  # type: ignore[attr-defined]
        except Exception:
            proc.kill()  # type: ignore[attr-defined]
            proc.wait()  # type: ignore[attr-defined]


async def test_a_worker_killed_mid_run_is_replaced_and_no_side_effect_repeats(nats_url: str, tmp_path: Path) -> None:
    prefix = "k" + uuid.uuid4().hex[:8]  # the session's server, subjects of this test's own
    subjects = Subjects(prefix)
    # Turn 1 asks for two calls: a1 completes, the worker dies during a2 (before its effect), so the
    # checkpoint still lists both calls as pending. The new worker must answer a1 from the idempotency record.
    turns = [{"tool_calls": [call("c1", "a1"), call("c2", "a2", delay=1.5)]},
             {"tool_calls": [call("c3", "a3")]}, {"content": "done"}]
    build(tmp_path, turns, bus=nats_url)
    first = spawn_worker(tmp_path, nats_url, "first", prefix=prefix)
    second = None
    client = await open_bus(nats_url)
    try:
        await asyncio.to_thread(wait_until, lambda: "worker first on" in (tmp_path / "worker-first.log")
                                .read_text(errors="replace"), 60, "first worker up")
        run_id = await enqueue_run(client, "scribe", "write three lines", subjects=subjects)
        await asyncio.to_thread(wait_until, lambda: any(line.startswith("a2 ") for line in
                                                        lines(tmp_path / "starts.log")), 60, "a2 started")
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert lines(tmp_path / "effects.log") == ["a1"]
        second = spawn_worker(tmp_path, nats_url, "second", prefix=prefix)  # starts while ack_wait runs out
        # a2 started and never finished: it is uncertain, held for a human (never simply run again)
        held = await wait_for_run(client, run_id, subjects=subjects, timeout_s=90)
        assert held["status"] == "waiting_approval", held
        approvals = BusApprovalStore(SyncBus(nats_url), subjects)
        try:
            (approval,) = approvals.find()
            assert approval.policy_ids == ("uncertain",) and "may already have happened" in approval.reason
            assert approval.arguments["arguments"]["text"] == "a2"
            approvals.decide(approval.id, approve=True, by="test", note="a2 is not in effects.log: run it again")
        finally:
            approvals.bus.close()
        final = await settled(client, run_id, subjects)  # the decision queued the run to resume on any worker
        assert final["status"] == "completed" and final["result"] == "done"
        assert Counter(lines(tmp_path / "effects.log")) == {"a1": 1, "a2": 1, "a3": 1}
        starts = Counter(line.split()[0] for line in lines(tmp_path / "starts.log"))
        assert starts == {"a1": 1, "a2": 2, "a3": 1}  # a2 was cut short once; a1 was never run again
        async with client.consume(subjects.events(run_id)) as events:
            seen = []
            while not seen or seen[-1]["kind"] != "finished":
                seen.append(json.loads((await events.next(10)).data))
        claims = [e["worker"] for e in seen if e["kind"] == "claimed"]
        assert claims == ["first", "second", "second"]  # the second resumed it after the decision
    finally:
        await client.aclose()
        _stop(first, *([second] if second else []))


async def test_restarting_the_nats_server_mid_run_loses_nothing(tmp_path: Path) -> None:
    from stitchwork.messaging.server import NatsServer

    server = NatsServer(tmp_path / "nats", die_with_parent=True).start()
    turns = [{"tool_calls": [call("c1", "b1")]}, {"tool_calls": [call("c2", "b2", delay=0.5)]},
             {"tool_calls": [call("c3", "b3")]}, {"content": "done"}]
    build(tmp_path, turns, bus=server.url)
    worker = spawn_worker(tmp_path, server.url, "only", ack_wait_s=5.0)
    try:
        client = await open_bus(server.url)
        await asyncio.to_thread(wait_until, lambda: (tmp_path / "state" / "workers" / "only" / "stitchwork.duckdb")
                                .exists(), 60, "worker up")
        ids = [await enqueue_run(client, "scribe", f"job {i}") for i in range(3)]
        await client.aclose()
        await asyncio.to_thread(wait_until, lambda: any(line.startswith("b2 ") for line in
                                                        lines(tmp_path / "starts.log")), 60, "b2 started")
        server.stop()  # the worker is mid-run: its next checkpoint and events wait for the server
        await asyncio.sleep(0.3)
        server.start()
        client = await open_bus(server.url)
        finals = [await wait_for_run(client, run_id, timeout_s=90) for run_id in ids]
        assert [f["status"] for f in finals] == ["completed"] * 3
        assert Counter(lines(tmp_path / "effects.log")) == {"b1": 3, "b2": 3, "b3": 3}
        for run_id in ids:
            async with client.consume(Subjects().events(run_id)) as events:
                kinds = []
                while not kinds or kinds[-1] != "finished":
                    kinds.append(json.loads((await events.next(10)).data)["kind"])
            assert kinds.count("tool") == 3 and kinds.count("model") == 4
        await client.aclose()
    finally:
        _stop(worker)
        server.stop()


async def test_a_three_node_cluster_loses_a_node_mid_run_and_two_workers_finish_every_run(tmp_path: Path) -> None:
    from stitchwork.messaging.server import cluster

    nodes = cluster(tmp_path / "cluster")
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        node.wait_healthy(60)
    uri = "nats://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes) + "?replicas=3"
    turns = [{"tool_calls": [call("c1", "d1")]}, {"tool_calls": [call("c2", "d2", delay=0.5)]},
             {"tool_calls": [call("c3", "d3")]}, {"content": "done"}]
    build(tmp_path, turns, bus=uri)
    # ack_wait above the failover time (a few seconds): a worker that merely lost its node keeps its runs.
    workers = [spawn_worker(tmp_path, uri, f"w{i}", ack_wait_s=20.0) for i in range(2)]
    client = await open_bus(uri)
    try:
        for i in range(2):  # each worker prints this line just before it starts taking jobs
            await asyncio.to_thread(wait_until, lambda i=i: f"worker w{i} on" in (tmp_path / f"worker-w{i}.log")
                                    .read_text(errors="replace"), 60, f"worker {i} up")
        ids = [await enqueue_run(client, "scribe", f"job {i}") for i in range(4)]
        await asyncio.to_thread(wait_until, lambda: any(line.startswith("d2 ") for line in
                                                        lines(tmp_path / "starts.log")), 60, "d2 started")
        nodes[0].kill()
        finals = [await wait_for_run(client, run_id, timeout_s=90) for run_id in ids]
        assert [f["status"] for f in finals] == ["completed"] * 4, [(f["status"], f["error"]) for f in finals]
        assert Counter(lines(tmp_path / "effects.log")) == {"d1": 4, "d2": 4, "d3": 4}
        workers_seen = set()
        for run_id in ids:
            async with client.consume(Subjects().events(run_id)) as events:
                while True:  # creating a consumer waits for the meta leader the cluster elects after the kill
                    event = json.loads((await events.next(60)).data)
                    workers_seen.add(event["worker"])
                    if event["kind"] == "finished":
                        break
        assert workers_seen == {"w0", "w1"}  # the load was shared
    finally:
        await client.aclose()
        _stop(*workers)
        for node in nodes:
            node.stop()


async def test_a_stalled_worker_is_fenced_off_and_abandons_the_run_it_lost(nats_url: str, tmp_path: Path) -> None:
    # The worker that claims the run stalls (SIGSTOP) inside f1, past ack_wait; the other takes the job and
    # finishes the run; the stalled one wakes up, completes its in-flight call, and its checkpoint write (a
    # compare-and-set on the sequence it read) fails: it abandons the run without another tool call or write.
    prefix = "f" + uuid.uuid4().hex[:8]
    subjects = Subjects(prefix)
    turns = [{"tool_calls": [call("c1", "f1", delay=1.5)]}, {"tool_calls": [call("c2", "f2")]}, {"content": "done"}]
    build(tmp_path, turns, bus=nats_url)
    procs = {name: spawn_worker(tmp_path, nats_url, name, ack_wait_s=1.5, prefix=prefix) for name in ("a", "b")}
    client = await open_bus(nats_url)
    try:
        for name in procs:
            await asyncio.to_thread(wait_until, lambda name=name: f"worker {name} on" in (
                tmp_path / f"worker-{name}.log").read_text(errors="replace"), 60, f"worker {name} up")
        run_id = await enqueue_run(client, "scribe", "write two lines", subjects=subjects)
        async with client.consume(subjects.events(run_id)) as events:
            claim = json.loads((await events.next(30)).data)
        assert claim["kind"] == "claimed"
        stalled, other = claim["worker"], ({"a", "b"} - {claim["worker"]}).pop()
        await asyncio.to_thread(wait_until, lambda: any(line.startswith("f1 ") for line in
                                                        lines(tmp_path / "starts.log")), 60, "f1 started")
        procs[stalled].send_signal(signal.SIGSTOP)
        # The other worker finds f1 started and unfinished: uncertain, held for a human instead of run again.
        held = await wait_for_run(client, run_id, subjects=subjects, timeout_s=60)
        assert held["status"] == "waiting_approval", held
        procs[stalled].send_signal(signal.SIGCONT)
        seen = []
        async with client.consume(subjects.events(run_id)) as events:
            while not seen or (seen[-1]["kind"], seen[-1]["worker"]) != ("fenced", stalled):
                seen.append(json.loads((await events.next(20)).data))
        approvals = BusApprovalStore(SyncBus(nats_url), subjects)
        try:
            (approval,) = approvals.find()
            assert approval.policy_ids == ("uncertain",)
            approvals.decide(approval.id, approve=True, by="test")
        finally:
            approvals.bus.close()
        final = await settled(client, run_id, subjects)
        assert final["status"] == "completed" and final["result"] == "done"
        seen = await all_events(client, subjects, run_id)
        claims = [e["worker"] for e in seen if e["kind"] == "claimed"]
        assert claims[:2] == [stalled, other] and len(claims) == 3  # the decision resumed it on either worker
        assert [e["worker"] for e in seen if e["kind"] == "finished"] == claims[2:]
        assert [e["worker"] for e in seen if e["kind"] == "fenced"] == [stalled]
        # The stalled worker finished f1 and recorded its outcome before it was fenced: the resumed run replays
        # it, so f1 ran once although it was in flight when its worker stalled.
        assert Counter(line.split()[0] for line in lines(tmp_path / "starts.log")) == {"f1": 1, "f2": 1}
        assert Counter(lines(tmp_path / "effects.log")) == {"f1": 1, "f2": 1}
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGCONT)
        await client.aclose()
        _stop(*procs.values())


async def test_pending_approvals_survive_worker_and_nats_restarts_and_are_decided_on_the_platform(
        tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from stitchwork.interfaces.http.app import create_app
    from stitchwork.messaging.server import NatsServer
    from stitchwork.platform import Platform
    from stitchwork.service import Service

    server = NatsServer(tmp_path / "nats", die_with_parent=True).start()
    turns = [{"tool_calls": [call("c1", "p1", tool="pay")]}, {"content": "over"}]
    config = build(tmp_path, turns, bus=server.url)  # approvals wait an hour...
    # ...except those this worker asks for: its run's approval expires (a timer on the bus) after the restarts.
    short = spawn_worker(tmp_path, server.url, "short", env_extra={"STITCHWORK_SECURITY__APPROVAL_TIMEOUT_S": "7"})
    workers: list[object] = [short]
    client = await open_bus(server.url)
    try:
        expiring = await enqueue_run(client, "scribe", "pay, and nobody answers")
        assert (await wait_for_run(client, expiring, timeout_s=60))["status"] == "waiting_approval"
        _stop(short)
        workers.append(first := spawn_worker(tmp_path, server.url, "first"))
        approved_id = await enqueue_run(client, "scribe", "pay, and it is approved")
        assert (await wait_for_run(client, approved_id, timeout_s=60))["status"] == "waiting_approval"
        _stop(first)
        await client.aclose()
        server.stop()
        server.start()
        workers.append(spawn_worker(tmp_path, server.url, "after", ack_wait_s=5.0))  # starts meanwhile
        platform = Platform.open(config, role="server")
        service = Service(platform)
        token = service.create_operator_token()
        auth = {"Authorization": f"Bearer {token}"}
        with TestClient(create_app(service, expiry_interval_s=3600)) as api:  # the platform's HTTP API
            listed = api.get("/v1/approvals", headers=auth).json()
            chosen = next(a for a in listed if a["run_id"] == approved_id)
            assert approved_id in {a["run_id"] for a in listed} and len(listed) <= 2
            assert api.post(f"/v1/approvals/{chosen['id']}/approve", json={"note": "ok"}, headers=auth).json()[
                "status"] == "approved"
        client = await open_bus(server.url)
        approved = await wait_for_run(client, approved_id, timeout_s=60)
        while approved["status"] == "waiting_approval":  # until the new worker has taken the resume job
            await asyncio.sleep(0.1)
            approved = await wait_for_run(client, approved_id, timeout_s=60)
        assert approved["status"] == "completed" and lines(tmp_path / "effects.log") == ["p1"]
        # Nobody answered the other: its timer expires it to deny, and the run goes on without the call.
        async with client.consume(Subjects().events(expiring)) as events:
            kinds: list[tuple[str, str]] = []
            while not kinds or kinds[-1][0] != "finished":
                event = json.loads((await events.next(30)).data)
                kinds.append((event["kind"], event["data"].get("status", "")))
        assert ("tool", "denied") in kinds and kinds[-1] == ("finished", "completed"), kinds
        expired = await run_state(client, expiring)
        assert expired is not None and expired["result"] == "over"
        assert Counter(lines(tmp_path / "effects.log")) == {"p1": 1}
        platform.audit.flush()
        own = [e for e in platform.audit.tail(500) if "origin" not in e.data]
        assert [(e.run_id, e.decision) for e in own if e.kind == "approval"] == [(approved_id, "approved")]
        # The workers' own events of both runs (asked while the platform was not running) reach its chain.
        stop_feed = asyncio.Event()
        feed = asyncio.create_task(service.ingest_fleet_audit(stop_feed))
        want = {(expiring, "ask"), (approved_id, "ask")}
        for _ in range(300):
            fleet = [e for e in platform.audit.tail(2000) if "origin" in e.data]
            if {(e.run_id, e.decision) for e in fleet if e.kind == "approval"} == want and len(
                    {e.data["origin"]["writer"] for e in fleet}) == 3:
                break
            await asyncio.sleep(0.1)
        stop_feed.set()
        await asyncio.wait_for(feed, 10)
        assert {(e.run_id, e.decision) for e in fleet if e.kind == "approval"} == want
        assert {e.data["origin"]["writer"] for e in fleet} == {"short", "first", "after"}
        assert platform.audit.verify().ok
        await platform.aclose()
    finally:
        await client.aclose()
        _stop(*workers)
        server.stop()
