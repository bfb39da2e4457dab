"""Bus fixtures: ``memory://`` always; NATS from ``--bus=nats://...`` or a nats-server the tests start."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from stitchwork.messaging._base import Bus, open_bus
from tests.conftest import nats_available

__all__ = ["nats_available"]


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
