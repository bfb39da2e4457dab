"""``[messaging.limits]`` applied to the streams of durable runs: each kind bounded, nothing unfinished removed."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from stitchwork.config import EventLimits, JobLimits, MessagingLimits, load_config
from stitchwork.errors import BusFull, ConfigError
from stitchwork.messaging._base import open_bus
from stitchwork.messaging.bridge import SyncBus
from stitchwork.messaging.bridge import _run_now as run_now
from stitchwork.messaging.memory import MemoryBus
from stitchwork.security.approvals import ApprovalStatus
from stitchwork.workers.approvals import BusApprovalStore
from stitchwork.workers.ledger import BusLedger
from stitchwork.workers.limits import apply_stream_limits
from stitchwork.workers.subjects import Subjects
from tests.plugins.buses import ManualClock


@pytest.fixture
def memory() -> Iterator[tuple[MemoryBus, SyncBus, ManualClock]]:
    bus = run_now(open_bus("memory://"))
    assert isinstance(bus, MemoryBus)
    bus.clock = clock = ManualClock()
    sync = SyncBus("memory://", bus=bus)
    yield bus, sync, clock
    sync.close()


async def test_every_kind_gets_its_limits_and_jobs_leave_the_queue_once_acknowledged(memory: Any) -> None:
    bus, sync, _clock = memory
    subjects = Subjects("p")
    limits = MessagingLimits(events=EventLimits(max_age_s=0, max_msgs=2), jobs=JobLimits(max_msgs=2))
    assert await apply_stream_limits(bus, subjects, limits) == []
    for i in range(3):
        sync.publish(subjects.events(f"run_{i}"), b"{}")
    assert [sync.last(subjects.events(f"run_{i}")) is not None for i in range(3)] == [False, True, True]
    sync.publish(subjects.queue, b"job-1")
    sync.publish(subjects.dead_letter("run_9"), b"dead")
    with pytest.raises(BusFull):
        sync.publish(subjects.queue, b"job-2")  # full of unfinished things: refused, nothing dropped

    async def take_one() -> None:
        async with bus.consume(subjects.queue, group="workers") as consumer:
            await (await consumer.next(5.0)).ack()

    await take_one()
    assert sync.last(subjects.queue) is None  # acknowledged: gone from the queue
    assert sync.last(subjects.dead_letter("run_9")) is not None  # a dead letter waits for a human
    sync.publish(subjects.queue, b"job-2")


def test_a_decided_approval_leaves_the_bus_after_its_ttl_and_a_pending_one_never_does(memory: Any) -> None:
    bus, sync, clock = memory
    subjects = Subjects("a" + uuid.uuid4().hex[:6])
    run_now(apply_stream_limits(bus, subjects, MessagingLimits()))
    approvals = BusApprovalStore(sync, subjects, timeout_s=60, ttl_s=3600, clock=clock)
    args: dict[str, Any] = {"to": "x@y.z"}
    pending = approvals.request(run_id="r1", agent="a", tool="send", target="t", arguments=args, policy_ids=(),
                                reason="r")
    decided = approvals.request(run_id="r2", agent="a", tool="send", target="t", arguments=args, policy_ids=(),
                                reason="r")
    approvals.decide(decided.id, approve=False, by="op")
    bus.clock.now += 3000
    assert approvals.get(decided.id).status is ApprovalStatus.DENIED  # within its TTL
    bus.clock.now += 601
    assert sync.last(subjects.approval(decided.id)) is None
    assert approvals.denied("r2", "a", "send", args) is None  # its call pointer went with it
    bus.clock.now += 10 * 86400
    assert sync.last(subjects.approval(pending.id)) is not None  # undecided: never removed by a limit


def test_a_completed_outcome_expires_and_a_started_record_stays(memory: Any) -> None:
    bus, sync, _clock = memory
    subjects = Subjects("i" + uuid.uuid4().hex[:6])
    run_now(apply_stream_limits(bus, subjects, MessagingLimits()))
    ledger = BusLedger(sync, subjects, ttl_s=600)
    ledger.put("r1", "k-started", {"status": "started"})
    ledger.put("r1", "k-done", {"status": "started"})
    ledger.put("r1", "k-done", {"status": "ok", "result": 1})
    assert ledger.get("r1", "k-done") == {"status": "ok", "result": 1}
    bus.clock.now += 601
    assert ledger.get("r1", "k-done") is None
    assert ledger.get("r1", "k-started") == {"status": "started"}  # the call may be running: kept


def test_limits_are_typed_config_with_environment_keys() -> None:
    config = load_config(environ={"STITCHWORK_MESSAGING__LIMITS__EVENTS__MAX_BYTES": "1048576",
                                  "STITCHWORK_MESSAGING__LIMITS__JOBS__MAX_MSGS": "500"})
    limits = config.messaging.limits
    assert limits.events.max_bytes == 1048576 and limits.events.max_age_s == 7 * 86400  # default age kept
    assert limits.jobs.max_msgs == 500 and limits.approvals.max_age_s == 7 * 86400
    for env, message in ((("JOBS", "MAX_AGE_S", "60"), "jobs] max_age_s: must be 0"),
                         (("AUDIT", "MAX_AGE_S", "60"), "audit] max_age_s: must be 0"),
                         (("EVENTS", "MAX_MSGS", "-1"), "must be >= 0"),
                         (("EVENTS", "MAX_MSGS", "many"), "expected int"),
                         (("TOPICS", "MAX_MSGS", "1"), "unknown key")):
        with pytest.raises(ConfigError, match=message):
            load_config(environ={f"STITCHWORK_MESSAGING__LIMITS__{env[0]}__{env[1]}": env[2]})


async def test_on_jetstream_a_new_installation_gets_work_queues_and_ttls(nats_url: str) -> None:
    from nats.js.api import DiscardPolicy, RetentionPolicy

    from stitchwork.messaging.nats import NatsBus

    bus = await NatsBus.connect(nats_url)
    subjects = Subjects("n" + uuid.uuid4().hex[:6])
    try:
        assert await apply_stream_limits(bus, subjects, MessagingLimits()) == []
        runs = (await bus.js.stream_info(subjects.queue.split(".")[0])).config
        assert runs.retention == RetentionPolicy.WORK_QUEUE and runs.discard == DiscardPolicy.NEW
        assert not runs.max_age
        apv = (await bus.js.stream_info(subjects.approval("x").split(".")[0])).config
        assert apv.allow_msg_ttl and apv.max_msgs_per_subject == 1 and not apv.max_age
        events = (await bus.js.stream_info(subjects.events("x").split(".")[0])).config
        assert events.max_age == 7 * 86400 and events.retention == RetentionPolicy.LIMITS
        limits = MessagingLimits(events=EventLimits(max_age_s=3600, max_bytes=1 << 20))
        assert await apply_stream_limits(bus, subjects, limits) == []  # a changed config updates the stream
        events = (await bus.js.stream_info(subjects.events("x").split(".")[0])).config
        assert (events.max_age, events.max_bytes) == (3600, 1 << 20)
    finally:
        await bus.aclose()


async def test_with_bus_memory_every_worker_and_the_platform_share_memory_and_grants(tmp_path: Any, root: str) -> None:
    from dataclasses import replace

    from stitchwork.memory.bus import BusMemory
    from stitchwork.platform import Platform, open_worker
    from stitchwork.security.taint import Label
    from tests.workers.durable_fixtures import build

    uri = "memory://shared-memory-" + root
    config = build(tmp_path, [{"content": "ok"}], bus=uri)
    config = config.replace(data=replace(config.data, memory="bus"))
    subjects = Subjects(root)
    first = await open_worker(config, bus_uri=uri, name="w1", subjects=subjects)
    second = await open_worker(config, bus_uri=uri, name="w2", subjects=subjects)
    server = Platform.open(config, role="server")
    try:
        memories = [first.platform.memory, second.platform.memory, server.memory]  # type: ignore[union-attr]
        assert all(isinstance(m, BusMemory) for m in memories)
        one, two, platform = memories
        assert one is not None and two is not None and platform is not None
        one.put("scribe", "draft", text="chapter two", labels=[Label("user", True)])
        item = two.get("scribe", "draft")
        assert item is not None and item.text == "chapter two"  # a run resumed on w2 reads what w1 wrote
        platform.grant("scribe", "cashier", mode="read", by="operator")
        assert two.get("cashier", "draft", owner="scribe") is not None  # and the grant given on the platform
    finally:
        await first.aclose()
        await second.aclose()
        await server.aclose()
    with pytest.raises(ConfigError, match="store or bus"):
        Platform.open(config.replace(data=replace(config.data, memory="redis")))
