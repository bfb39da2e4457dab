"""Retention of finished runs' checkpoints and of model meters on the bus (``[messaging.limits.state|meters]``), over
every bus adapter: nothing unfinished is ever removed, a finished run's checkpoints and unneeded meters age out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stitchwork.agents.runs import RunRecord, RunStatus
from stitchwork.config import StateLimits, load_config
from stitchwork.errors import ConfigError
from stitchwork.gateway.meters import Delta, Windows
from stitchwork.gateway.models import meter_retention
from stitchwork.messaging._base import MESSAGE_TTL, Bus, open_bus, ttl_header
from stitchwork.messaging.bridge import SyncBus
from stitchwork.messaging.memory import MemoryBus
from stitchwork.platform import open_worker
from stitchwork.workers.meters import BusMeters
from stitchwork.workers.runstore import BusRunStore
from stitchwork.workers.subjects import Subjects
from tests.plugins.buses import ManualClock, expired
from tests.workers.durable_fixtures import build


def _store(bus: Bus, bus_uri: str, subjects: Subjects, ttl_s: float) -> BusRunStore:
    sync = SyncBus("memory://", bus=bus) if isinstance(bus, MemoryBus) else SyncBus(bus_uri)
    return BusRunStore(sync, subjects, abus=bus, finished_ttl_s=ttl_s)


def _record(run_id: str) -> RunRecord:
    return RunRecord(id=run_id, agent="a", task="t", model="m", messages=({"role": "user", "content": "hi"},))


async def test_a_finished_runs_checkpoints_age_out_and_unfinished_runs_stay(clocked: Bus, bus_uri: str) -> None:
    bus, subjects = clocked, Subjects("r" + uuid.uuid4().hex[:8])
    await bus.keep_last(subjects.state("*"), 8)  # as every worker does
    store = _store(bus, bus_uri, subjects, ttl_s=1)
    try:
        done, running, waiting = _record("done"), _record("running"), _record("waiting")
        for step in range(3):
            await store.asave(replace(done, steps=step))
            await store.asave(replace(running, steps=step))
        await store.asave(replace(waiting, status=RunStatus.WAITING_APPROVAL))
        await store.asave(replace(done, steps=3, status=RunStatus.COMPLETED))
        final = await bus.last(subjects.state("done"))
        assert final is not None and final.headers.get(MESSAGE_TTL) == "1s"
        unfinished = await bus.last(subjects.state("running"))
        assert unfinished is not None and MESSAGE_TTL not in unfinished.headers
        # Gone, and not replaced by an older running checkpoint (they were removed when the run finished).
        assert await expired(bus, subjects.state("done"), advance_s=1.5)
        assert await store.afetch("done") is None
        for run_id, status in (("running", RunStatus.RUNNING), ("waiting", RunStatus.WAITING_APPROVAL)):
            kept = await store.afetch(run_id)
            assert kept is not None and kept.status is status
    finally:
        store.bus.close()


async def test_zero_keeps_finished_runs(clocked: Bus, bus_uri: str) -> None:
    bus, subjects = clocked, Subjects("z" + uuid.uuid4().hex[:8])
    store = _store(bus, bus_uri, subjects, ttl_s=0)
    try:
        await store.asave(_record("r1"))
        await store.asave(replace(_record("r1"), status=RunStatus.FAILED))
        final = await bus.last(subjects.state("r1"))
        assert final is not None and MESSAGE_TTL not in final.headers
        if isinstance(bus, MemoryBus):
            assert isinstance(bus.clock, ManualClock)
            bus.clock.now += 10 * 365 * 86400
            assert (await store.afetch("r1")).status is RunStatus.FAILED  # type: ignore[union-attr]
    finally:
        store.bus.close()


async def test_sealing_removes_what_a_worker_left_when_it_died_after_the_last_checkpoint(clocked: Bus,
                                                                                        bus_uri: str) -> None:
    bus, subjects = clocked, Subjects("s" + uuid.uuid4().hex[:8])
    await bus.keep_last(subjects.state("*"), 8)
    store = _store(bus, bus_uri, subjects, ttl_s=1)
    try:
        for step in range(2):
            await store.asave(replace(_record("r1"), steps=step))
            await store.asave(replace(_record("r2"), steps=step))
        for run_id in ("r1", "r2"):  # the final checkpoint stored, then the worker was killed before its purge
            await bus.publish(subjects.state(run_id), b'{"not": "read"}', headers=ttl_header(1))
        finished = replace(_record("r1"), status=RunStatus.COMPLETED)
        await store.aseal(finished)
        await store.aseal(_record("r2"))  # not finished: nothing removed
        assert await expired(bus, subjects.state("r1"), advance_s=1.5)
        deadline = time.monotonic() + 5.0
        while (found := await bus.last(subjects.state("r2"))) is not None and found.data.startswith(b'{"not"'):
            assert time.monotonic() < deadline  # a real server removes it within about a second
            await asyncio.sleep(0.1)
        older = await store.afetch("r2")  # unsealed: the older running checkpoint is the newest again
        assert older is not None and older.status is RunStatus.RUNNING
    finally:
        store.bus.close()


async def test_meters_carry_the_ttl_their_budgets_allow(clocked: Bus) -> None:
    bus, subjects = clocked, Subjects("m" + uuid.uuid4().hex[:8])
    ttl = {"agent:short": 1.0, "agent:forever": 0.0}
    meters = BusMeters(subjects, abus=bus, retention=ttl.__getitem__)
    now = Windows.at(time.time())
    await meters.add(["agent:short", "agent:forever"], now, Delta(requests=1, tokens=5))
    await meters.add(["agent:short", "agent:forever"], now, Delta(tokens=5))
    short, forever = [await bus.last(subjects.meter(k)) for k in ("agent:short", "agent:forever")]
    assert short is not None and short.headers.get(MESSAGE_TTL) == "1s"
    assert forever is not None and MESSAGE_TTL not in forever.headers
    assert (await meters.read("agent:short", now)).tokens_minute == 10
    assert await expired(bus, subjects.meter("agent:short"), advance_s=1.5)
    assert (await meters.read("agent:forever", now)).tokens_total == 10


def test_meter_retention_never_cuts_a_budget_window() -> None:
    day = 86_400.0
    agents: dict[str, Any] = {"total": {"max_tokens": 10}, "monthly": {"max_cost_usd": 1.0, "period": "month"},
                              "daily": {"max_tokens": 5, "period": "day"}, "rate": {"rpm": 3},
                              "*": {"max_tokens": 1, "period": "day"}}
    keep = meter_retention(agents, {"gpt": {"tpm": 10}, "free": {}}, 60.0)
    assert keep("agent:total") == 0.0  # a total budget needs every call ever counted
    assert keep("agent:monthly") >= 31 * day and keep("agent:daily") >= day
    assert keep("agent:rate") == 120.0 and keep("model:gpt") == 120.0 and keep("model:free") == 60.0
    assert keep("agent:other") >= day  # falls back to "*"
    assert keep("other:x") == 0.0
    assert meter_retention({}, {}, 7 * day)("agent:any") == 7 * day
    assert meter_retention(agents, {}, 0.0)("agent:rate") == 0.0  # 0: keep every meter


def test_state_and_meter_limits_are_typed_config() -> None:
    config = load_config(environ={"STITCHWORK_MESSAGING__LIMITS__STATE__MAX_AGE_S": "3600",
                                  "STITCHWORK_MESSAGING__LIMITS__METERS__MAX_AGE_S": "0"})
    assert config.messaging.limits.state.max_age_s == 3600 and config.messaging.limits.meters.max_age_s == 0
    assert load_config(environ={}).messaging.limits.state.max_age_s == 7 * 86400
    for env in ("STATE__MAX_BYTES", "METERS__MAX_MSGS", "STATE__MAX_AGE_S"):
        with pytest.raises(ConfigError, match="limits"):
            load_config(environ={f"STITCHWORK_MESSAGING__LIMITS__{env}": "-1" if env.endswith("AGE_S") else "5"})


async def test_a_redelivered_job_of_a_finished_run_removes_what_its_dead_worker_left(tmp_path: Path) -> None:
    uri = f"memory://seal-{uuid.uuid4().hex[:8]}"
    config = build(tmp_path, [{"content": "done"}], bus=uri)
    limits = replace(config.messaging.limits, state=StateLimits(max_age_s=60))
    config = replace(config, messaging=replace(config.messaging, limits=limits))
    client = await open_bus(uri)
    assert isinstance(client, MemoryBus)
    client.clock = clock = ManualClock()
    subjects = Subjects(config.messaging.subject_prefix)
    worker = await open_worker(config, bus_uri=uri, name="w1", subjects=subjects)
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    try:
        running = BusRunStore(SyncBus(uri, bus=client), subjects, abus=client)  # the worker that died
        record = _record("r1")
        record = replace(record, agent="scribe")
        for step in range(2):
            await running.asave(replace(record, steps=step))
        # It stored the finished checkpoint (with its TTL) and was killed before removing the older ones.
        await client.publish(subjects.state("r1"), running._body(replace(record, status=RunStatus.COMPLETED)),
                             headers=ttl_header(60))
        await client.publish(subjects.queue, json.dumps({"run_id": "r1", "agent": "scribe", "task": "t"}).encode())

        async def kept() -> int:
            async with client.consume(subjects.state("r1")) as replay:
                count = 0
                with contextlib.suppress(TimeoutError):
                    while True:
                        await replay.next(0.05)
                        count += 1
            return count

        for _ in range(200):
            if await kept() == 1:
                break
            await asyncio.sleep(0.05)
        assert await kept() == 1
        clock.now += 61
        assert await client.last(subjects.state("r1")) is None  # not an older running checkpoint come back
    finally:
        stop.set()
        await serving
        await worker.aclose()
        await client.aclose()
