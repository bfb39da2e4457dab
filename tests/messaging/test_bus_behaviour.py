"""One behaviour suite for every bus adapter (``memory://``, ``nats://``); ``--bus=URI`` picks a real server."""

from __future__ import annotations

import asyncio

import pytest

from stitchwork.errors import BusConflict, BusError, ConfigError
from stitchwork.messaging._base import EXPECTED_LAST_SUBJECT_SEQ, Bus, Delivery, open_bus, subject_matches


async def drain(consumer: object, n: int, timeout: float = 5.0) -> list[Delivery]:
    got = []
    for _ in range(n):
        got.append(await consumer.next(timeout))  # type: ignore[attr-defined]
    return got


async def nothing_within(consumer: object, seconds: float) -> bool:
    try:
        await consumer.next(seconds)  # type: ignore[attr-defined]
    except TimeoutError:
        return True
    return False


async def test_publish_numbers_messages_and_last_reads_the_newest(bus: Bus, root: str) -> None:
    seqs = [await bus.publish(f"{root}.k.{i % 2}", f"v{i}".encode(), headers={"n": str(i)}) for i in range(4)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4 and seqs[-1] - seqs[0] == 3
    newest = await bus.last(f"{root}.k.0")
    assert newest is not None and newest.data == b"v2" and newest.seq == seqs[2] and newest.headers["n"] == "2"
    assert await bus.last(f"{root}.k.missing") is None


async def test_a_retried_publish_with_the_same_msg_id_is_stored_once(bus: Bus, root: str) -> None:
    first = await bus.publish(f"{root}.x", b"a", msg_id="once")
    again = await bus.publish(f"{root}.x", b"a", msg_id="once")
    other = await bus.publish(f"{root}.x", b"b", msg_id="twice")
    assert first == again and other == first + 1
    async with bus.consume(f"{root}.x") as replay:
        assert [d.data for d in await drain(replay, 2)] == [b"a", b"b"]


async def test_replay_starts_at_a_sequence_and_follows_new_messages(bus: Bus, root: str) -> None:
    for i in range(5):
        await bus.publish(f"{root}.ev.{i % 2}", str(i).encode())
    async with bus.consume(f"{root}.ev.*", start_seq=3) as replay:
        first = await drain(replay, 3)
        assert [d.data for d in first] == [b"2", b"3", b"4"]
        await bus.publish(f"{root}.ev.1", b"5")
        (later,) = await drain(replay, 1)
        assert later.data == b"5" and later.seq == first[-1].seq + 1
    async with bus.consume(f"{root}.ev.0") as only_even:
        assert [d.data for d in await drain(only_even, 3)] == [b"0", b"2", b"4"]


async def test_a_group_delivers_each_message_to_one_consumer(bus: Bus, root: str) -> None:
    for i in range(20):
        await bus.publish(f"{root}.jobs", str(i).encode())
    a = bus.consume(f"{root}.jobs", group="workers", max_in_flight=4)
    b = bus.consume(f"{root}.jobs", group="workers", max_in_flight=4)
    seen: list[bytes] = []

    async def work(consumer: object) -> None:
        while len(seen) < 20:
            try:
                delivery = await consumer.next(0.5)  # type: ignore[attr-defined]
            except TimeoutError:
                continue
            seen.append(delivery.data)
            await delivery.ack()
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(work(a), work(b)), 20)
    assert sorted(seen, key=int) == [str(i).encode() for i in range(20)]
    assert await nothing_within(a, 0.3)
    await a.aclose()
    await b.aclose()


async def test_a_compare_and_set_publish_fails_once_the_subject_has_moved_on(bus: Bus, root: str) -> None:
    subject = f"{root}.k.a"
    first = await bus.publish(subject, b"1", headers={EXPECTED_LAST_SUBJECT_SEQ: "0"}, msg_id=f"{root}-1")
    with pytest.raises(BusConflict):
        await bus.publish(subject, b"stale", headers={EXPECTED_LAST_SUBJECT_SEQ: "0"}, msg_id=f"{root}-2")
    second = await bus.publish(subject, b"2", headers={EXPECTED_LAST_SUBJECT_SEQ: str(first)}, msg_id=f"{root}-3")
    # The same publish retried (its acknowledgement was lost) is not a conflict: the first one is returned.
    retried = await bus.publish(subject, b"2", headers={EXPECTED_LAST_SUBJECT_SEQ: str(first)}, msg_id=f"{root}-3")
    assert retried == second > first
    with pytest.raises(BusConflict):
        await bus.publish(subject, b"late", headers={EXPECTED_LAST_SUBJECT_SEQ: str(first)}, msg_id=f"{root}-4")
    newest = await bus.last(subject)
    assert newest is not None and newest.data == b"2" and newest.seq == second


async def test_keep_last_drops_older_messages_of_each_subject_and_keeps_the_newest(bus: Bus, root: str) -> None:
    await bus.publish(f"{root}.s.a", b"a0")  # already there when the limit is set: trimmed too
    await bus.keep_last(f"{root}.s.*", 2)
    for i in range(1, 5):
        await bus.publish(f"{root}.s.a", f"a{i}".encode())
    await bus.publish(f"{root}.s.b", b"b0")
    newest = await bus.last(f"{root}.s.a")
    assert newest is not None and newest.data == b"a4"
    await bus.publish(f"{root}.s.a", b"a5", headers={EXPECTED_LAST_SUBJECT_SEQ: str(newest.seq)}, msg_id=f"{root}-c")
    async with bus.consume(f"{root}.s.*") as replay:
        assert [d.data for d in await drain(replay, 3)] == [b"a4", b"b0", b"a5"]
        assert await nothing_within(replay, 0.2)
    with pytest.raises(BusError, match="at least one"):
        await bus.keep_last(f"{root}.s.*", 0)


async def test_latest_gives_the_newest_message_of_each_matching_subject(bus: Bus, root: str) -> None:
    for subject, data in (("k.a", b"a1"), ("k.b", b"b1"), ("k.a", b"a2"), ("other.x", b"x")):
        await bus.publish(f"{root}.{subject}", data)
    found = await bus.latest(f"{root}.k.*")
    assert [(d.subject, d.data) for d in found] == [(f"{root}.k.a", b"a2"), (f"{root}.k.b", b"b1")]
    assert await bus.latest(f"{root}.none.*") == []


async def test_an_unacknowledged_message_comes_back_and_an_acknowledged_one_does_not(bus: Bus, root: str) -> None:
    await bus.publish(f"{root}.q", b"lost")
    await bus.publish(f"{root}.q", b"done")
    dying = bus.consume(f"{root}.q", group="g", ack_wait_s=0.5, max_in_flight=2)
    lost, done = await drain(dying, 2)
    await done.ack()
    await dying.aclose()  # "dies" holding `lost`
    survivor = bus.consume(f"{root}.q", group="g", ack_wait_s=0.5)
    (again,) = await drain(survivor, 1)
    assert again.data == b"lost" and again.seq == lost.seq and again.attempt >= 2
    await again.ack()
    assert await nothing_within(survivor, 0.8)
    await survivor.aclose()


async def test_nak_redelivers_and_term_gives_up(bus: Bus, root: str) -> None:
    await bus.publish(f"{root}.q", b"retry")
    await bus.publish(f"{root}.q", b"poison")
    consumer = bus.consume(f"{root}.q", group="g", ack_wait_s=5)
    retry, poison = await drain(consumer, 2)
    await poison.term()
    await retry.nak(0.2)
    (again,) = await drain(consumer, 1)
    assert again.data == b"retry" and again.attempt == 2
    await again.ack()
    assert await nothing_within(consumer, 0.5)
    await consumer.aclose()


async def test_progress_keeps_a_long_job_from_being_redelivered(bus: Bus, root: str) -> None:
    await bus.publish(f"{root}.q", b"long")
    worker = bus.consume(f"{root}.q", group="g", ack_wait_s=0.6)
    other = bus.consume(f"{root}.q", group="g", ack_wait_s=0.6)
    (job,) = await drain(worker, 1)
    for _ in range(4):
        await asyncio.sleep(0.3)
        await job.progress()
    assert await nothing_within(other, 0.2)
    await job.ack()
    await worker.aclose()
    await other.aclose()


async def test_max_in_flight_holds_back_until_a_delivery_is_settled(bus: Bus, root: str) -> None:
    for i in range(3):
        await bus.publish(f"{root}.q", str(i).encode())
    consumer = bus.consume(f"{root}.q", group="g", max_in_flight=2, ack_wait_s=30)
    first, _second = await drain(consumer, 2)
    assert await nothing_within(consumer, 0.5)
    await first.ack()
    (third,) = await drain(consumer, 1)
    assert third.data == b"2"
    await consumer.aclose()


async def test_a_slow_group_does_not_stall_another(bus: Bus, root: str) -> None:
    slow = bus.consume(f"{root}.ev", group="slow", max_in_flight=1, ack_wait_s=30)
    fast = bus.consume(f"{root}.ev", group="fast", max_in_flight=8)
    for i in range(50):
        await bus.publish(f"{root}.ev", str(i).encode())
    (held,) = await drain(slow, 1)  # never acknowledged while the fast group reads everything
    got = []
    for _ in range(50):
        delivery = await fast.next(5.0)
        got.append(delivery.data)
        await delivery.ack()
    assert got == [str(i).encode() for i in range(50)]
    assert held.data == b"0"
    await slow.aclose()
    await fast.aclose()


async def test_bad_subjects_are_refused(bus: Bus) -> None:
    for bad in ("", "single", "a..b", "a.b c", "*.x"):
        with pytest.raises(BusError):
            await bus.publish(bad, b"x")
    with pytest.raises(BusError):
        await bus.publish("a.*", b"x")
    with pytest.raises(BusError):
        await bus.last("a.>")


def test_subject_matching() -> None:
    assert subject_matches("a.*", "a.b") and not subject_matches("a.*", "a.b.c")
    assert subject_matches("a.>", "a.b.c") and not subject_matches("a.>", "a")
    assert subject_matches("a.b", "a.b") and not subject_matches("a.b", "a.c")


async def test_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="nats://"):
        await open_bus("nast://127.0.0.1:4222")


async def test_named_memory_buses_are_shared_in_process() -> None:
    one = await open_bus("memory://shared-test")
    two = await open_bus("memory://shared-test")
    await one.publish("s.x", b"hello")
    got = await two.last("s.x")
    assert got is not None and got.data == b"hello"
    await one.aclose()
    await two.publish("s.x", b"still open")
    await two.aclose()
    fresh = await open_bus("memory://shared-test")
    assert await fresh.last("s.x") is None
    await fresh.aclose()
