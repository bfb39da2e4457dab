"""Stream limits (:meth:`Bus.limit`) over every bus adapter: age, size and count bounds, work queues, TTLs, and
never dropping an unfinished message."""

from __future__ import annotations

import asyncio
import logging

import pytest

from stitchwork.errors import BusError, BusFull
from stitchwork.messaging._base import Bus, StreamLimits, parse_ttl, ttl_header
from stitchwork.messaging.memory import MemoryBus
from tests.plugins.buses import ManualClock, expired


async def _present(bus: Bus, subjects: list[str]) -> list[str]:
    return [s for s in subjects if await bus.last(s) is not None]


async def _settles_to(bus: Bus, subjects: list[str], expected: list[str], within_s: float = 10.0) -> list[str]:
    """What is present once it equals ``expected``, or after ``within_s``: a NATS ``term`` is not confirmed by the
    server (unlike ``ack``), so the message it removes from a work queue goes a moment later."""
    deadline = asyncio.get_running_loop().time() + within_s
    while (present := await _present(bus, subjects)) != expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return present


async def test_max_msgs_drops_the_oldest_messages(bus: Bus, root: str) -> None:
    await bus.limit(f"{root}.x", StreamLimits(max_msgs=3))
    subjects = [f"{root}.k.{i}" for i in range(5)]
    for subject in subjects:
        await bus.publish(subject, b"v")
    assert await _present(bus, subjects) == subjects[2:]


async def test_max_bytes_drops_the_oldest_messages(bus: Bus, root: str) -> None:
    await bus.limit(f"{root}.x", StreamLimits(max_bytes=1000))
    subjects = [f"{root}.k.{i}" for i in range(4)]
    for subject in subjects:
        await bus.publish(subject, b"v" * 400)
    kept = await _present(bus, subjects)
    assert kept == subjects[-len(kept):] and 1 <= len(kept) <= 2 and subjects[0] not in kept


async def test_a_changed_limit_applies_to_an_existing_stream(bus: Bus, root: str) -> None:
    subjects = [f"{root}.k.{i}" for i in range(4)]
    for subject in subjects:
        await bus.publish(subject, b"v")
    await bus.limit(f"{root}.x", StreamLimits(max_msgs=10))
    assert await _present(bus, subjects) == subjects
    await bus.limit(f"{root}.x", StreamLimits(max_msgs=2))  # tightened: the oldest go at once
    assert await _present(bus, subjects) == subjects[2:]


async def test_discard_new_refuses_instead_of_dropping_and_still_replaces_a_kept_subject(bus: Bus, root: str) -> None:
    await bus.limit(f"{root}.x", StreamLimits(max_msgs=2, discard_new=True))
    await bus.keep_last(f"{root}.x", 1)
    await bus.publish(f"{root}.a", b"pending")
    await bus.publish(f"{root}.b", b"pending")
    with pytest.raises(BusFull, match="full"):
        await bus.publish(f"{root}.c", b"new")
    assert await _present(bus, [f"{root}.a", f"{root}.b", f"{root}.c"]) == [f"{root}.a", f"{root}.b"]
    await bus.publish(f"{root}.a", b"decided")  # replaces a's one kept message: no growth, taken
    newest = await bus.last(f"{root}.a")
    assert newest is not None and newest.data == b"decided"


async def test_a_work_queue_drops_acknowledged_messages_and_keeps_the_rest(bus: Bus, root: str) -> None:
    await bus.limit(f"{root}.x", StreamLimits(work_queue=True, max_msgs=3, discard_new=True))
    jobs = [f"{root}.q.{name}" for name in ("a", "b", "c")]
    for subject in jobs:
        await bus.publish(subject, b"job")
    with pytest.raises(BusFull):
        await bus.publish(f"{root}.q.d", b"job")  # three unfinished jobs: the fourth waits, none is dropped
    async with bus.consume(f"{root}.q.*", group="w", ack_wait_s=30) as consumer:
        first, second, third = [await consumer.next(5.0) for _ in range(3)]
        await first.ack()
        await second.term()
        await third.nak(60)  # not done: stays
    assert await _settles_to(bus, jobs, [third.subject]) == [third.subject]
    await bus.publish(f"{root}.q.d", b"job")  # room again
    assert await _present(bus, [*jobs, f"{root}.q.d"]) == [third.subject, f"{root}.q.d"]


async def test_an_unacknowledged_job_outlives_any_amount_of_traffic_on_a_work_queue(bus: Bus, root: str) -> None:
    await bus.limit(f"{root}.x", StreamLimits(work_queue=True))
    await bus.publish(f"{root}.q.held", b"job")
    async with bus.consume(f"{root}.q.*", group="w", ack_wait_s=30) as consumer:
        held = await consumer.next(5.0)
        for i in range(5):
            await bus.publish(f"{root}.q.n{i}", b"job")
            await (await consumer.next(5.0)).ack()
    assert await bus.last(held.subject) is not None
    assert await _present(bus, [f"{root}.q.n{i}" for i in range(5)]) == []


async def test_a_ttl_removes_a_finished_record_and_leaves_the_unfinished_one(clocked: Bus, root: str) -> None:
    bus = clocked
    await bus.limit(f"{root}.x", StreamLimits(discard_new=True))
    await bus.publish(f"{root}.done", b"finished", headers=ttl_header(1))
    await bus.publish(f"{root}.open", b"pending")
    assert await expired(bus, f"{root}.done", advance_s=1.5)
    assert await bus.last(f"{root}.open") is not None


async def test_max_age_on_the_memory_bus_follows_its_clock() -> None:
    bus = MemoryBus()
    bus.clock = clock = ManualClock()
    await bus.limit("s.x", StreamLimits(max_age_s=60))
    await bus.publish("s.old", b"1")
    clock.now += 30
    await bus.publish("s.new", b"2")
    clock.now += 31
    assert await bus.last("s.old") is None and await bus.last("s.new") is not None
    async with bus.consume("s.>") as replay:
        assert (await replay.next(1.0)).subject == "s.new"


async def test_max_age_is_set_and_updated_on_a_jetstream_stream(nats_url: str, root: str) -> None:
    from stitchwork.messaging.nats import NatsBus

    bus = await NatsBus.connect(nats_url)
    try:
        await bus.publish(f"{root}.a", b"1")  # exists before its limits
        await bus.limit(f"{root}.x", StreamLimits(max_age_s=3600, max_bytes=10_000))
        info = await bus.js.stream_info(root)
        assert (info.config.max_age, info.config.max_bytes, info.config.allow_msg_ttl) == (3600, 10_000, True)
        await bus.limit(f"{root}.x", StreamLimits(max_age_s=60))
        info = await bus.js.stream_info(root)
        assert (info.config.max_age, info.config.max_bytes) == (60, -1)
    finally:
        await bus.aclose()


async def test_an_existing_stream_keeps_its_retention_and_says_so(bus: Bus, root: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    await bus.publish(f"{root}.q.a", b"job")  # created as an ordinary stream
    with caplog.at_level(logging.WARNING):
        await bus.limit(f"{root}.x", StreamLimits(work_queue=True, max_msgs=5, discard_new=True))
    assert f"stream {root} keeps its limits retention" in caplog.text
    async with bus.consume(f"{root}.q.*", group="w") as consumer:
        await (await consumer.next(5.0)).ack()
    assert await bus.last(f"{root}.q.a") is not None  # acknowledged but kept: not a work queue
    for i in range(4):
        await bus.publish(f"{root}.q.n{i}", b"job")
    with pytest.raises(BusFull):  # the other limits did apply
        await bus.publish(f"{root}.q.more", b"job")


@pytest.mark.parametrize("limits", [
    {"max_age_s": -1}, {"max_msgs": -5}, {"max_bytes": "lots"}, {"max_msgs": True},
    {"max_age_s": 60, "discard_new": True}, {"max_age_s": 60, "work_queue": True},
])
def test_bad_limits_are_refused(limits: dict[str, object]) -> None:
    with pytest.raises(BusError):
        StreamLimits(**limits)  # type: ignore[arg-type]


def test_ttl_headers_are_whole_seconds() -> None:
    assert ttl_header(0) == {} and ttl_header(0.2) == {"Nats-TTL": "1s"} and ttl_header(90.5) == {"Nats-TTL": "91s"}
    assert parse_ttl("90s") == 90 and parse_ttl("90") == 90
    for bad in ("", "soon", "0s", "1.5s", "-3s", "nan"):
        with pytest.raises(BusError):
            parse_ttl(bad)


async def test_purge_removes_a_subjects_older_messages_and_only_that_subjects(bus: Bus, root: str) -> None:
    for i in range(4):
        await bus.publish(f"{root}.a", f"a{i}".encode())
    await bus.publish(f"{root}.b", b"b0")
    await bus.purge(f"{root}.a", keep=1)
    assert (await bus.last(f"{root}.a")).data == b"a3"  # type: ignore[union-attr]
    async with bus.consume(f"{root}.>") as replay:
        seen = [(await replay.next(5.0)).data for _ in range(2)]
    assert seen == [b"a3", b"b0"]
    await bus.purge(f"{root}.a")
    assert await bus.last(f"{root}.a") is None and await bus.last(f"{root}.b") is not None
    with pytest.raises(BusError):
        await bus.purge(f"{root}.a", keep=-1)
