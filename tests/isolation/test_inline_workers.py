"""The ``inline://`` double's worker threads: reused between calls, replaced when a timed-out call holds one."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stitchwork.isolation import inline
from stitchwork.isolation._base import Limits, PythonCall, SandboxSpec
from stitchwork.isolation.inline import InlineSandbox

ToolFactory = Callable[[str], Path]  # the make_tool fixture (tests/ is not a package)

TOOL = """
import threading
import time


def where(sleep=0.0, log=""):
    name = threading.current_thread().name
    if log:
        with open(log, "w") as file:
            file.write(name)
    if sleep:
        time.sleep(sleep)
    return name
"""


def where(tool: Path, **args: Any) -> PythonCall:
    return PythonCall(tool, "where", {"args": args})


async def test_thread_mode_reuses_an_idle_worker(make_tool: ToolFactory) -> None:
    tool = make_tool(TOOL)
    sandbox = InlineSandbox("inline://?mode=thread")
    await sandbox.run(SandboxSpec(where(tool)))  # at least one worker exists and is idle afterwards
    started = inline._POOL._started

    names = [(await sandbox.run(SandboxSpec(where(tool)))).value for _ in range(5)]

    assert threading.current_thread().name not in names and None not in names
    assert inline._POOL._started == started  # one call at a time: a waiting worker takes each, none is started


async def test_a_timed_out_call_holds_its_worker_and_the_next_call_gets_another(
    make_tool: ToolFactory, tmp_path: Path
) -> None:
    tool = make_tool(TOOL)
    sandbox = InlineSandbox("inline://?mode=thread")
    log = tmp_path / "stuck-worker"

    stuck = await sandbox.run(SandboxSpec(where(tool, sleep=1.0, log=str(log)), limits=Limits(timeout_s=0.1)))
    after = await sandbox.run(SandboxSpec(where(tool), limits=Limits(timeout_s=0.5)))

    assert stuck.killed == "timeout" and stuck.value is None
    assert after.ok and after.value not in (None, log.read_text()), after  # that worker still sleeps in the tool


async def test_auto_mode_sends_a_blocking_function_back_to_the_workers(make_tool: ToolFactory) -> None:
    tool = make_tool(TOOL)
    sandbox = InlineSandbox("inline://")
    main = threading.current_thread().name
    names: list[Any] = []
    for _ in range(50):  # three cheap calls in a row; a loaded machine may need a few more tries
        names.append((await sandbox.run(SandboxSpec(where(tool)))).value)
        if names[-1] == main:
            break
    assert names[-1] == main

    blocking = await sandbox.run(SandboxSpec(where(tool, sleep=0.05)))
    following = await sandbox.run(SandboxSpec(where(tool)))

    assert blocking.value == main  # it was already running in the loop
    assert following.value != main  # 50 ms of waiting in the loop: back to a worker thread


def test_a_forked_child_starts_its_own_worker() -> None:
    """Threads do not survive ``fork``: a child must not hand a call to a parent's idle worker (it would wait)."""
    idle = threading.Event()
    inline._POOL.submit(lambda: idle.set)  # delivered once its worker counts as idle
    assert idle.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        ok = False
        try:
            again = threading.Event()

            def child_job() -> Callable[[], None]:
                again.set()
                return lambda: None

            inline._POOL.submit(child_job)
            ok = again.wait(10)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
