"""inline:// commands never wait forever for asyncio's child watcher: a lost exit notice ends in a clean result."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stitchwork.isolation import inline
from stitchwork.isolation._base import Command, Limits, SandboxSpec, open_sandbox


async def test_a_lost_exit_notice_is_reaped_here_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(self: asyncio.subprocess.Process) -> int:
        await asyncio.Event().wait()
        return 0

    monkeypatch.setattr(asyncio.subprocess.Process, "wait", never)
    monkeypatch.setattr(inline, "_PIPE_GRACE_S", 0.1)
    async with open_sandbox("inline://", allow_inline=True) as sandbox:
        spec = SandboxSpec(Command(("/bin/sh", "-c", "echo hi; exit 3")), workdir=tmp_path,
                           limits=Limits(timeout_s=0.5))
        result = await asyncio.wait_for(sandbox.run(spec), 30)
    assert result.stdout == b"hi\n"
    assert result.exit_code == 3 and result.killed == "timeout"
