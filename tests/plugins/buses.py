"""Bus fixtures: ``memory://`` always; NATS from ``--bus=nats://...`` or a nats-server the tests start."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from stitchwork.messaging._base import Bus, open_bus
from stitchwork.messaging.memory import MemoryBus
from tests.conftest import nats_available

__all__ = ["ManualClock", "expired", "nats_available"]


class ManualClock:
    """A clock for the memory bus's ages and TTLs that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def expired(bus: Bus, subject: str, *, advance_s: float) -> bool:
    """True once ``subject`` has no message: the memory bus's clock (see ``clocked``) is moved by ``advance_s``, a
    real server is polled for up to ``advance_s`` + 5 s."""
    if isinstance(bus, MemoryBus):
        assert isinstance(bus.clock, ManualClock)
        bus.clock.now += advance_s
        return await bus.last(subject) is None
    deadline = time.monotonic() + advance_s + 5.0
    while time.monotonic() < deadline:
        if await bus.last(subject) is None:
            return True
        await asyncio.sleep(0.1)
    return False


def _bus_params() -> list[str]:
    return ["memory", "nats"]


@pytest.fixture(params=_bus_params())
def bus_uri(request: pytest.FixtureRequest) -> str:
    given = str(request.config.getoption("--bus") or "")
    if given and not given.startswith(f"{request.param}://"):
        pytest.skip(f"--bus={given} selects another adapter")
    if request.param == "memory":
        return given or "memory://"
    url: str = request.getfixturevalue("nats_url")
    return url


@pytest.fixture
async def bus(bus_uri: str) -> AsyncIterator[Bus]:
    opened = await open_bus(bus_uri)
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
def root() -> str:
    """A stream name of this test's own (tests share one server)."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def clocked(bus: Bus) -> Bus:
    """``bus``, on a :class:`ManualClock` when it is the memory bus."""
    if isinstance(bus, MemoryBus):
        bus.clock = ManualClock()
    return bus
