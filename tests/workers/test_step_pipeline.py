"""The worker's step traffic: checkpoint bodies built incrementally, run events published in the background."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stitchwork.agents.runs import RunRecord, record_to_row
from stitchwork.errors import BusError
from stitchwork.messaging._base import open_bus
from stitchwork.platform import open_worker
from stitchwork.workers.ledger import BusLedger
from stitchwork.workers.runstore import BusRunStore
from stitchwork.workers.subjects import Subjects
from tests.workers.durable_fixtures import build


def test_checkpoint_bodies_equal_the_plain_encoding_while_messages_grow_or_change() -> None:
    store = BusRunStore.__new__(BusRunStore)  # only the encoding is exercised: no store, no bus
    store._encoded = {}
    record = RunRecord(id="run_1", agent="a", task="t", model="m", messages=({"role": "user", "content": "é"},))
    for i in range(5):
        body = json.loads(store._body(record))
        assert body == json.loads(json.dumps(record_to_row(record), ensure_ascii=False, default=str))
        assert body["messages"] == json.dumps(list(record.messages), ensure_ascii=False)
        record = replace(record, messages=(*record.messages, {"role": "tool", "content": {"i": i}}))
    resumed = replace(record, messages=(*record.messages[:3], {"role": "user"}))  # a shared prefix, then new
    assert json.loads(store._body(resumed))["messages"] == json.dumps(list(resumed.messages), ensure_ascii=False)
    assert json.loads(store._body(replace(resumed, messages=())))["messages"] == "[]"


async def test_run_events_are_published_in_order_without_waiting_in_line(bus_uri: str, tmp_path: Path,
                                                                         root: str) -> None:
    uri = "memory://pipeline-" + root if bus_uri.startswith("memory") else bus_uri
    subjects = Subjects(root)
    worker = await open_worker(build(tmp_path, [{"content": "x"}], bus=uri), bus_uri=uri, name="w", subjects=subjects,
                               concurrency=1)
    client = await open_bus(uri)
    try:
        record = RunRecord(id="run_order", agent="scribe", task="t", model="m")
        for i in range(40):
            worker._on_event(record, "tick", {"i": i})
        await worker._flush_events(record.id)
        async with client.consume(subjects.events(record.id)) as events:
            seen = [json.loads((await events.next(10)).data)["data"]["i"] for _ in range(40)]
        assert seen == list(range(40))
    finally:
        await worker.aclose()
        await client.aclose()


async def test_a_lost_event_fails_the_flush_and_no_later_event_of_the_run_is_published(
        tmp_path: Path, root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = "memory://pipeline-lost-" + root
    subjects = Subjects(root)
    worker = await open_worker(build(tmp_path, [{"content": "x"}], bus=uri), bus_uri=uri, name="w", subjects=subjects,
                               concurrency=1)
    assert worker.bus is not None
    publish = worker.bus.publish

    async def flaky(subject: str, data: bytes, **options: Any) -> int:
        if json.loads(data)["data"].get("i") == 1:
            raise BusError("lost")
        seq: int = await publish(subject, data, **options)
        return seq

    monkeypatch.setattr(worker.bus, "publish", flaky)
    client = await open_bus(uri)
    try:
        record = RunRecord(id="run_lost", agent="scribe", task="t", model="m")
        for i in range(3):
            worker._on_event(record, "tick", {"i": i})
        with pytest.raises(BusError, match="lost"):
            await worker._flush_events(record.id)
        found = await client.last(subjects.events(record.id))
        assert found is not None and json.loads(found.data)["data"]["i"] == 0
    finally:
        await worker.aclose()
        await client.aclose()


async def test_the_bus_ledger_confirms_records_before_the_next_lookup_and_answers_early_lookups(
        bus_uri: str, root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = "memory://ledger-" + root if bus_uri.startswith("memory") else bus_uri
    subjects = Subjects(root)
    bus, other = await open_bus(uri), await open_bus(uri)
    ledger = BusLedger(None, subjects, abus=bus)  # type: ignore[arg-type,unused-ignore]  # no SyncBus needed
    try:
        await other.publish(subjects.idem("run_1", "run_1:c0"), json.dumps({"status": "ok", "n": 0}).encode())
        ledger.prefetch("run_1", ["run_1:c0", "run_1:c1"])
        assert await ledger.aget("run_1", "run_1:c0") == {"status": "ok", "n": 0}
        assert await ledger.aget("run_1", "run_1:c1") is None
        assert not ledger._reading

        ledger.prefetch("run_1", ["run_1:c2"])
        await ledger.aput("run_1", "run_1:c2", {"status": "ok", "n": 2})
        assert await ledger.aget("run_1", "run_1:c2") == {"status": "ok", "n": 2}  # not the early (empty) lookup
        found = await other.last(subjects.idem("run_1", "run_1:c2"))
        assert found is not None and json.loads(found.data)["n"] == 2

        async def refused(subject: str, data: bytes, **options: Any) -> int:
            raise BusError("refused")

        monkeypatch.setattr(bus, "publish", refused)
        await ledger.aput("run_1", "run_1:c3", {"status": "ok"})
        with pytest.raises(BusError, match="refused"):
            await ledger.aget("run_1", "run_1:c4")  # the run's next side effect waits for the lost record
        ledger.prefetch("run_2", ["run_2:c0"])
        await ledger.forget("run_2")
        assert not ledger._reading and not ledger._writing
    finally:
        await bus.aclose()
        await other.aclose()
