"""A sandbox never outlives its worker: SIGKILL the process that started sandboxes at random points of their start
(guard, staging, user namespace, bwrap or runsc setup, the program running, the write-back; a ``wasm://`` host
parked or mid-call) and check that no process of any sandbox survives, or starts afterwards.

The worker runs in a cgroup of the test's own (a ``pids`` hierarchy): every process it starts, sandboxes included,
is in that cgroup or below it whatever namespaces it enters, so after the kill the whole subtree must empty and
stay empty.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stitchwork.isolation import _cgroup
from stitchwork.isolation._base import SANDBOXES

SRC = str(Path(__file__).resolve().parents[2] / "src")
KILLS_PER_BACKEND = 6
SETTLE_S = 5.0  # how long the kernel may take to tear a killed sandbox down on a loaded machine
QUIET_S = 1.0  # and how long nothing may appear after that

WORKER = r"""
import asyncio, os, sys
with open(sys.argv[1], "w") as handle:  # join the test's cgroup before anything else
    handle.write("0\n")
from pathlib import Path
from stitchwork.isolation._base import Command, Limits, PythonCall, SandboxSpec, open_sandbox

backend, work = sys.argv[2], Path(sys.argv[3])
tool = work / "tool.py"
tool.write_text("import time\ndef nap(s):\n    time.sleep(s)\n    return s\n")


async def main():
    options = {"pool": 1} if backend == "wasm" else {}
    async with open_sandbox(f"{backend}://", **options) as sandbox:
        print("ready", flush=True)
        turn = 0
        while True:
            turn += 1
            workdir = work / f"w{turn}"
            workdir.mkdir()
            # Odd turns end by themselves at once; even ones would live 15 s: longer than the test waits.
            seconds = 0.05 if turn % 2 else 15
            if turn % 4 == 2 and sandbox.native_commands:
                script = f"(sleep {seconds}) & sleep {seconds}"
                spec = SandboxSpec(Command(("/bin/sh", "-c", script)), workdir=workdir)
            else:
                spec = SandboxSpec(PythonCall(tool, "nap", {"args": {"s": seconds}}), workdir=workdir)
            await sandbox.run(spec)
            print("ran", turn, flush=True)


asyncio.run(main())
"""


def usable(name: str) -> bool:
    try:
        return bool(SANDBOXES.load(f"{name}://").available()[0])
    except Exception:
        return False


@pytest.fixture
def test_cgroup() -> Iterator[Path]:
    """A fresh ``pids`` cgroup (v1 or v2) of this test's own, removed afterwards."""
    support = _cgroup.support()
    hierarchy = next((h for h in support.hierarchies if "pids" in h.controllers), None)
    if hierarchy is None:
        pytest.skip(f"no writable pids cgroup to follow the worker's processes in: {support.describe()}")
    path = hierarchy.base / f"death-{os.getpid()}-{random.randrange(1 << 30)}"
    path.mkdir()
    yield path
    for directory in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if directory.is_dir():
            _cgroup.SandboxCgroup(((hierarchy, directory),)).remove()
    _cgroup.SandboxCgroup(((hierarchy, path),)).remove()


def members(root: Path) -> set[int]:
    """Every process in ``root`` and all cgroups below it."""
    found: set[int] = set()
    for procs in [root / "cgroup.procs", *root.rglob("cgroup.procs")]:
        try:
            found.update(int(pid) for pid in procs.read_text().split())
        except (OSError, ValueError):
            continue
    return found


def describe(pids: set[int]) -> list[str]:
    out = []
    for pid in sorted(pids):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
            out.append(f"{pid}: {cmdline!r}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return out


@pytest.mark.parametrize("backend", ["bwrap", "gvisor", "wasm"])
def test_killing_the_worker_at_random_points_leaves_no_sandbox_behind(
    backend: str, test_cgroup: Path, tmp_path: Path
) -> None:
    if not usable(backend):
        pytest.skip(f"{backend}:// is not usable here")
    rng = random.Random(f"{backend}-{os.getpid()}")
    runs_seen = 0
    for attempt in range(KILLS_PER_BACKEND):
        cgroup = test_cgroup / f"worker-{attempt}"
        cgroup.mkdir()
        work = tmp_path / f"attempt-{attempt}"
        work.mkdir()
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(cgroup / "cgroup.procs"), backend, str(work)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": SRC}, text=True,
        )  # fmt: skip
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 1.2))  # somewhere in the first few sandboxes' start, run or end
        os.kill(worker.pid, signal.SIGKILL)
        runs_seen += sum(1 for line in worker.stdout if line.startswith("ran"))
        worker.wait()

        deadline = time.monotonic() + SETTLE_S
        while members(cgroup) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = members(cgroup)
        assert not left, f"attempt {attempt}: processes outlived the worker: {describe(left)}"
        quiet_until = time.monotonic() + QUIET_S
        while time.monotonic() < quiet_until:
            appeared = members(cgroup)
            assert not appeared, f"attempt {attempt}: processes started after the worker died: {describe(appeared)}"
            time.sleep(0.02)
    assert runs_seen >= 0  # kills land before, during and after completed runs alike
