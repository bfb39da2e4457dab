"""Fixtures for the isolation suites: every sandbox backend this host supports, and tool files to run."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from stitchwork.isolation._base import Sandbox, open_sandbox

BACKENDS = ("inline", "bwrap")


def backend_available(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` can run here (and why not)."""
    if name == "bwrap":
        from stitchwork.isolation.bwrap import BwrapSandbox

        return BwrapSandbox.available()
    return True, ""


@pytest.fixture(params=BACKENDS)
async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    """Each supported backend in turn; unsupported ones are skipped with the backend's own reason."""
    name: str = request.param
    ok, reason = backend_available(name)
    if not ok:
        pytest.skip(f"{name}:// unavailable: {reason}")
    async with open_sandbox(f"{name}://") as opened:
        yield opened


@pytest.fixture
async def bwrap_sandbox() -> AsyncIterator[Sandbox]:
    """The bwrap backend (skipped with its reason where it cannot run)."""
    ok, reason = backend_available("bwrap")
    if not ok:
        pytest.skip(f"bwrap:// unavailable: {reason}")
    async with open_sandbox("bwrap://") as opened:
        yield opened


ToolFactory = Callable[[str], Path]


@pytest.fixture
def make_tool(tmp_path: Path) -> ToolFactory:
    """Writes Python source to a tool file outside any sandbox mount and returns its path."""
    tools = tmp_path / "tools"
    tools.mkdir()
    counter = iter(range(1_000_000))

    def make(source: str) -> Path:
        path = tools / f"tool_{next(counter)}.py"
        path.write_text(textwrap.dedent(source))
        return path

    return make


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty directory to mount as the sandbox's ``/work``."""
    path = tmp_path / "work"
    path.mkdir()
    return path
