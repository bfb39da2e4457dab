"""One audit trail for the fleet: workers' events reach the platform's chain through the bus, in order, once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from stitchwork.audit.log import AuditLog
from stitchwork.data._base import open_store
from stitchwork.messaging._base import Bus, open_bus
from stitchwork.workers.auditfeed import AuditForwarder, AuditIngester, writer_token
from stitchwork.workers.subjects import Subjects
from tests.signing import Ed25519Signer


def audit_log(path: Path) -> AuditLog:
    path.mkdir(parents=True, exist_ok=True)
    return AuditLog(open_store(f"duckdb://{path / 'a.duckdb'}"), signer=Ed25519Signer(),
                    journal_path=path / "audit.journal", flush_ms=5)


@pytest.fixture
async def bus() -> AsyncIterator[Bus]:
    opened = await open_bus(f"memory://fleet-{uuid.uuid4().hex[:8]}")
    yield opened
    await opened.aclose()


def fleet_events(platform: AuditLog) -> list[Any]:
    return [e for e in platform.tail(100_000) if "origin" in e.data]


async def until(predicate: Any, timeout_s: float = 20.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


@contextlib.asynccontextmanager
async def ingesting(platform: AuditLog, bus: Bus, subjects: Subjects) -> AsyncIterator[AuditIngester]:
    ingester = AuditIngester(platform, bus, subjects, batch=16)
    stop = asyncio.Event()
    task = asyncio.create_task(ingester.run(stop))
    try:
        yield ingester
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_every_workers_events_reach_the_platform_in_order_and_verify(bus: Bus, tmp_path: Path) -> None:
    subjects = Subjects("fa")
    logs = {name: audit_log(tmp_path / name) for name in ("w.one", "w2")}
    feeds = [AuditForwarder(log, bus, subjects, writer=name) for name, log in logs.items()]
    for feed in feeds:
        await feed.start()
    platform = audit_log(tmp_path / "platform")
    try:
        async with ingesting(platform, bus, subjects):
            for i in range(30):
                for name, log in logs.items():
                    await log.aappend("tool", agent="a", run_id=f"run_{name}", tool="t", decision="ok",
                                      data={"i": i})
            await until(lambda: len(fleet_events(platform)) == 60)
        by_writer: dict[str, list[int]] = defaultdict(list)
        for event in fleet_events(platform):
            origin = event.data["origin"]
            by_writer[origin["writer"]].append(origin["seq"])
            assert origin["link"] == ("first" if origin["seq"] == 1 else "ok")
            assert event.data["i"] == origin["seq"] - 1
            assert event.run_id == {"w_one": "run_w.one", "w2": "run_w2"}[origin["writer"]]
        assert by_writer == {writer_token("w.one"): list(range(1, 31)), "w2": list(range(1, 31))}
        report = platform.verify()
        assert report.ok, report
    finally:
        for feed in feeds:
            await feed.aclose()
        for log in [*logs.values(), platform]:
            log.close()


async def test_events_wait_on_the_bus_while_the_platform_is_down_and_are_ingested_once(bus: Bus,
                                                                                        tmp_path: Path) -> None:
    subjects = Subjects("fb")
    worker = audit_log(tmp_path / "w")
    feed = AuditForwarder(worker, bus, subjects, writer="w")
    await feed.start()
    platform = audit_log(tmp_path / "platform")
    try:
        for i in range(10):  # the platform is down
            await worker.aappend("tool", run_id="r", data={"i": i})
        await feed.drain()
        async with ingesting(platform, bus, subjects):
            await until(lambda: len(fleet_events(platform)) == 10)
        for i in range(10, 15):  # down again
            await worker.aappend("tool", run_id="r", data={"i": i})
        await feed.drain()
        # The platform died after appending but before acknowledging: the stream delivers those events again.
        again = await bus.last(subjects.audit("w"))
        assert again is not None
        await bus.publish(subjects.audit("w"), again.data)
        async with ingesting(platform, bus, subjects):  # a new ingester learns what its chain already holds
            await until(lambda: len(fleet_events(platform)) >= 15)
            await asyncio.sleep(0.3)
        assert [e.data["i"] for e in fleet_events(platform)] == list(range(15))
        assert platform.verify().ok
    finally:
        await feed.aclose()
        worker.close()
        platform.close()


async def test_a_worker_killed_before_it_forwarded_sends_the_rest_when_it_comes_back(bus: Bus,
                                                                                     tmp_path: Path) -> None:
    subjects = Subjects("fc")
    worker = audit_log(tmp_path / "w")
    feed = AuditForwarder(worker, bus, subjects, writer="w")
    await feed.start()
    for i in range(3):
        await worker.aappend("tool", run_id="r", data={"i": i})
    await feed.drain()
    await feed.aclose()  # the forwarder is gone (the worker died) while its log goes on
    for i in range(3, 7):
        await worker.aappend("tool", run_id="r", data={"i": i})
    worker.close()
    worker = audit_log(tmp_path / "w")  # the worker comes back with its state directory
    feed = AuditForwarder(worker, bus, subjects, writer="w")
    await feed.start()
    platform = audit_log(tmp_path / "platform")
    try:
        async with ingesting(platform, bus, subjects):
            await until(lambda: len(fleet_events(platform)) == 7)
        assert [e.data["origin"]["seq"] for e in fleet_events(platform)] == list(range(1, 8))
        assert {e.data["origin"]["link"] for e in fleet_events(platform)[1:]} == {"ok"}
    finally:
        await feed.aclose()
        worker.close()
        platform.close()


async def test_a_missing_or_altered_event_of_a_worker_shows_as_a_gap(bus: Bus, tmp_path: Path) -> None:
    subjects = Subjects("fd")
    platform = audit_log(tmp_path / "platform")

    def sent(seq: int, prev: str, digest: str) -> bytes:
        return json.dumps({"writer": "w", "chain": "c", "seq": seq, "ts": 1.0, "kind": "tool", "agent": "",
                           "run_id": "r", "tool": "", "decision": "ok", "data": {}, "prev_hash": prev,
                           "hash": digest}).encode()

    await bus.publish(subjects.audit("w"), sent(1, "0" * 64, "h1"))
    await bus.publish(subjects.audit("w"), sent(2, "h1", "h2"))
    await bus.publish(subjects.audit("w"), sent(4, "h3", "h4"))  # event 3 never arrived
    await bus.publish(subjects.audit("w"), sent(5, "forged", "h5"))  # does not link to event 4
    await bus.publish(subjects.audit("w"), b"not json")
    await bus.publish(subjects.audit("w"), sent(3, "h2", "h3"))  # event 3 after all: kept, marked late
    await bus.publish(subjects.audit("w"), sent(3, "h2", "h3"))  # and once only
    try:
        async with ingesting(platform, bus, subjects):
            await until(lambda: len(platform.tail(100)) == 6)
            await asyncio.sleep(0.2)
        links = [(e.data["origin"]["seq"], e.data["origin"]["link"]) for e in fleet_events(platform)]
        assert links == [(1, "first"), (2, "ok"), (4, "gap"), (5, "gap"), (3, "late")]
        (bad,) = [e for e in platform.tail(100) if e.decision == "malformed"]
        assert bad.kind == "fleet"
    finally:
        platform.close()
