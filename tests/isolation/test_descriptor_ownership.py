"""A sandbox closes each descriptor it owns exactly once.

Closing a number twice closes whatever this process opened under that number in between: another sandbox's pipe
or pidfd (seen as ``OSError: [Errno 9]`` in an unrelated gVisor run, after a wasm host failed to take its call and
was then discarded). These pin that the second close is a no-op for the number's new owner."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stitchwork.errors import SandboxError
from stitchwork.isolation import _process
from stitchwork.isolation._wasm_pool import Host


def _reopen(number: int) -> list[int]:
    """Opens descriptors until one gets ``number`` (the lowest free one is always taken next); returns them all."""
    opened: list[int] = []
    while not opened or opened[-1] < number:
        opened.append(os.open(os.devnull, os.O_RDONLY))
    assert number in opened
    return opened


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class _FakeSupervised:
    """What :class:`Host` uses of its supervised process: a status pipe, the process's stderr and ``abandon``."""

    def __init__(self, status_fd: int) -> None:
        self.status_fd = status_fd
        self.proc = subprocess.Popen([sys.executable, "-c", ""], stderr=subprocess.DEVNULL)
        self.proc.wait()
        self.proc.stderr = None
        self.abandoned = 0

    def abandon(self) -> None:
        self.abandoned += 1


@pytest.fixture
def status_pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        if _is_open(fd):
            os.close(fd)


def test_a_host_that_failed_its_call_and_is_then_discarded_closes_its_pipe_once(
    status_pipe: tuple[int, int],
) -> None:
    os.close(status_pipe[1])  # the host never answers: EOF on its status pipe
    ctl_r, ctl_w = os.pipe()
    host = Host(_FakeSupervised(status_pipe[0]), ctl_w, parked=True)  # type: ignore[arg-type]
    with pytest.raises(SandboxError, match="could not take its call"):
        host.send_call({"tool": "x"}, timeout_s=1.0)
    assert os.read(ctl_r, 100).startswith(b'{"tool"')  # the call was written before the pipe was closed
    assert not _is_open(ctl_w)
    reused = _reopen(ctl_w)  # this process now holds the control pipe's old number for something else
    try:
        host.discard()
        host.discard()
        assert all(_is_open(fd) for fd in reused), "discard closed a descriptor the host no longer owned"
        assert host.sup.abandoned == 2  # type: ignore[attr-defined]
    finally:
        for fd in reused:
            os.close(fd)
        os.close(ctl_r)


def test_discarding_a_parked_host_closes_its_control_pipe() -> None:
    ctl_r, ctl_w = os.pipe()
    status_r, status_w = os.pipe()
    host = Host(_FakeSupervised(status_r), ctl_w, parked=True)  # type: ignore[arg-type]
    host.discard()
    assert not _is_open(ctl_w)
    assert os.read(ctl_r, 1) == b""  # EOF: the write end is gone
    for fd in (ctl_r, status_r, status_w):
        os.close(fd)


def test_a_supervised_process_closes_its_status_pipe_once() -> None:
    status_r, status_w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", ""], stdin=subprocess.DEVNULL)
    proc.wait()
    sup = _process.Supervised(proc, None, status_r, graceful=False)
    sup._close()
    assert not _is_open(status_r)
    reused = _reopen(status_r)
    try:
        sup._close()
        sup.abandon()
        assert all(_is_open(fd) for fd in reused), "a second close took a descriptor the process no longer owned"
        assert sup._read_report() == {}
    finally:
        for fd in reused:
            os.close(fd)
        os.close(status_w)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
async def test_the_stdin_pipe_number_reused_by_a_socket_during_the_run_is_left_alone(tmp_path: Path) -> None:
    """The program's stdin pipe is closed as soon as all of it is written; the loop may hand its number to a new
    socket while the program still runs. Ending the run must not touch that socket (it raised RuntimeError)."""
    from stitchwork.isolation._base import Command, Limits, SandboxSpec, open_sandbox

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    workdir = tmp_path / "work"
    workdir.mkdir()
    async with open_sandbox("bwrap://") as sandbox:
        command = Command(("/bin/sh", "-c", "cat >/dev/null; sleep 1.5; echo done"), stdin=b"x" * 10)
        running = asyncio.ensure_future(sandbox.run(SandboxSpec(command, workdir=workdir, limits=Limits(timeout_s=60))))
        await asyncio.sleep(0.5)  # its stdin is written and closed by now; the program is still sleeping
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]  # lowest numbers first
        try:
            result = await running
        finally:
            for _, writer in connections:
                writer.close()
            server.close()
    assert result.exit_code == 0 and result.stdout.strip() == b"done", result
