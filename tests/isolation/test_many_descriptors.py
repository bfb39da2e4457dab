"""A worker that already holds over 1,024 descriptors (a busy server) still starts and talks to wasm:// guests:
the pool waits on its pipes with poll, not select (which fails for descriptors numbered 1024 and above)."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.isolation.conftest import backend_available

from stitchwork.isolation._base import Limits, PythonCall, SandboxSpec, open_sandbox


@pytest.fixture
def many_descriptors() -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the descriptor limit is {hard}: cannot hold over 1,024 open")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1200)]
    try:
        yield max(held)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_wasm_guests_run_when_the_worker_holds_over_1024_descriptors(many_descriptors: int,
                                                                           tmp_path: Path) -> None:
    ok, reason = backend_available("wasm")
    if not ok:
        pytest.skip(f"wasm:// unavailable: {reason}")
    assert many_descriptors >= 1024
    tool = tmp_path / "tool.py"
    tool.write_text("def run(a, b):\n    return {'sum': a + b}\n")
    async with open_sandbox("wasm://") as sandbox:
        result = await sandbox.run(SandboxSpec(PythonCall(tool, "run", {"args": {"a": 2, "b": 3}}),
                                               workdir=tmp_path, limits=Limits(timeout_s=60)))
    assert result.ok, result
    assert result.value == {"sum": 5}
