"""Fixtures for the isolation suites: every sandbox backend this host supports, and tool files to run."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from stitchwork.isolation._base import SANDBOXES, Sandbox, open_sandbox

BACKENDS = ("inline", "bwrap", "wasm", "gvisor")
#: Backends that isolate (the hostile-code suite runs on each of them).
ISOLATING = ("bwrap", "wasm", "gvisor")


def backend_available(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` can run here (and why not), as the backend itself says."""
    try:
        cls = SANDBOXES.load(f"{name}://")
    except Exception as exc:  # a missing extra: ConfigError naming it
        return False, str(exc)
    ok, reason = cls.available()
    return bool(ok), str(reason)


@pytest.fixture(scope="session")
def _shared_wasm() -> Iterator[Sandbox | None]:
    """One ``wasm://`` sandbox for the session: the module is loaded (and its pool warmed) once, not per test."""
    ok, _ = backend_available("wasm")
    if not ok:
        yield None
        return
    from stitchwork.isolation.wasm import WasmSandbox

    shared = WasmSandbox("wasm://")
    shared.prepare()
    yield shared
    shared._shutdown()


async def _open(name: str, request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    ok, reason = backend_available(name)
    if not ok:
        pytest.skip(f"{name}:// unavailable: {reason}")
    if name == "wasm":
        shared = request.getfixturevalue("_shared_wasm")
        assert shared is not None
        yield shared
        return
    async with open_sandbox(f"{name}://", allow_inline=name == "inline") as opened:  # the double: explicitly
        yield opened


@pytest.fixture(params=BACKENDS)
async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    """Each supported backend in turn; unsupported ones are skipped with the backend's own reason."""
    async for opened in _open(request.param, request):
        yield opened


@pytest.fixture(params=ISOLATING)
async def isolating_sandbox(request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    """Each supported backend that isolates (not the in-process double)."""
    async for opened in _open(request.param, request):
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
