"""Approvals expire on timers (a deadline heap), not by listing every approval on an interval: tested with a fake
clock that the test moves, never by waiting."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from stitchwork.agents.runs import RunStatus
from stitchwork.platform import Platform
from stitchwork.security.approvals import ApprovalStatus
from stitchwork.security.deadlines import Deadlines
from stitchwork.service import Service
from tests.gateway.test_gateway import APPROVAL_RUN, tool_results


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _until(check: Callable[[], bool], *, turns: int = 500) -> bool:
    """Lets the loop run (to_thread hops included) until ``check`` holds; a bounded number of short turns."""
    for _ in range(turns):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


@pytest.fixture
def opened(make_config: Any) -> Any:
    platform = Platform.open(make_config(APPROVAL_RUN, approval_timeout_s=60))
    clock = Clock(platform.approvals.clock())
    platform.approvals.clock = clock
    return platform, clock  # each test closes it on its own event loop


async def test_an_approval_expires_when_its_deadline_comes_and_not_before(opened: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    platform, clock = opened
    service = Service(platform)
    listings: list[object] = []
    find = platform.approvals.find
    monkeypatch.setattr(platform.approvals, "find", lambda *a: listings.append(a) or find(*a))
    asked: list[list[str] | None] = []
    expire = service.expire_and_resume

    async def by_id(approval_ids: list[str] | None = None, **kw: Any) -> list[str]:
        asked.append(approval_ids)
        return await expire(approval_ids, **kw)

    monkeypatch.setattr(service, "expire_and_resume", by_id)
    timers = Deadlines(clock)
    loop = asyncio.create_task(service.expire_on_time(timers))
    try:
        await _until(lambda: bool(listings))  # the one listing: pending approvals at start
        record = await platform.runner.start("tester", "Write then delete note n.txt")
        (approval_id,) = record.pending["approvals"]
        assert await _until(lambda: len(timers) == 1)  # its deadline was added when it was created
        clock.now += 59
        timers.poke()
        for _ in range(20):
            await asyncio.sleep(0)
        assert platform.approvals.get(approval_id).status is ApprovalStatus.PENDING
        clock.now += 2
        timers.poke()
        assert await _until(lambda: platform.runs.get(record.id).status is RunStatus.COMPLETED)
        assert platform.approvals.get(approval_id).status is ApprovalStatus.EXPIRED
        assert tool_results(platform.runs.get(record.id))["c2"]["status"] == "denied"
        assert len(listings) == 1 and asked == [[approval_id]]  # one listing at start; then by id, when due
        expired = [e for e in platform.audit.tail(50) if e.kind == "approval" and e.decision == "expired"]
        assert [e.data["approval_id"] for e in expired] == [approval_id]
    finally:
        loop.cancel()
        await platform.aclose()


async def test_a_read_that_expired_it_first_still_resumes_the_run(opened: Any) -> None:
    platform, clock = opened
    service = Service(platform)
    timers = Deadlines(clock)
    loop = asyncio.create_task(service.expire_on_time(timers))
    try:
        record = await platform.runner.start("tester", "Write then delete note n.txt")
        (approval_id,) = record.pending["approvals"]
        clock.now += 61
        assert platform.approvals.get(approval_id).status is ApprovalStatus.EXPIRED  # a listing got there first
        timers.poke()
        assert await _until(lambda: platform.runs.get(record.id).status is RunStatus.COMPLETED)
    finally:
        loop.cancel()
        await platform.aclose()


async def test_approvals_pending_at_start_are_loaded_and_a_decided_one_is_left_alone(opened: Any) -> None:
    platform, clock = opened
    service = Service(platform)
    first = await platform.runner.start("tester", "Write then delete note n.txt")
    second = await platform.runner.start("tester", "Write then delete note n.txt")
    (kept,) = first.pending["approvals"]
    (decided,) = second.pending["approvals"]
    timers = Deadlines(clock)
    loop = asyncio.create_task(service.expire_on_time(timers))
    try:
        assert await _until(lambda: len(timers) == 2)
        await service.decide(decided, approve=True, by="op")
        clock.now += 61
        timers.poke()
        assert await _until(lambda: platform.approvals.get(kept).status is ApprovalStatus.EXPIRED)
        assert platform.approvals.get(decided).status is not ApprovalStatus.EXPIRED
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        assert platform.approvals.watchers == []  # a stopped loop leaves no watcher behind
    finally:
        loop.cancel()
        await platform.aclose()
