"""The process supervisor: one sandboxed program as one host process tree, started, bounded and read here.

Used by the backends whose sandbox is a host process (``bwrap://``, ``gvisor://``; the VM monitors of
``firecracker://`` and ``nanos://`` through :func:`run_with_timeout`). What it does for each program:

* spawning: :func:`supervise` starts the sandbox's command in its own session and process group with exactly the
  environment :func:`program_env` builds, feeds ``stdin`` and passes only the descriptors asked for;
* host-side confinement (:class:`Confinement`): today a ``pids`` cgroup per sandbox (:mod:`._cgroup`). This is the
  one place where per-sandbox host limits are added (a user namespace, memory and CPU cgroup controllers, a disk
  quota, ``no_new_privs``), so that every process backend gets them the same way;
* limits: :func:`rlimits` (applied by each backend's own mechanism: ``prlimit`` inside bwrap, OCI rlimits under
  gVisor); ``timeout_s`` is wall-clock: the process group is SIGKILLed, which takes a pid namespace with it;
  output past ``max_output_bytes`` (stdout and stderr together) is dropped and the sandbox killed;
* results: :func:`sandbox_result` turns an :class:`Outcome` into a :class:`~stitchwork.isolation.SandboxResult`
  by the rules below.

``killed``: ``"timeout"``/``"output"`` when the supervisor killed the sandbox; ``"memory"`` for a Python
``MemoryError`` (or a failed program whose stderr ends with an out-of-memory message such as ``Cannot allocate
memory``); ``"pids"`` when the program failed after the cgroup refused a fork; ``"cpu"`` for death by
``SIGXCPU``, or by ``SIGKILL`` with the CPU limit used up; ``"signal"`` for other deaths by a fatal signal.
Like a shell, ``exit_code`` reports a signal death as ``128 + signal``.

``duration_s`` is wall-clock. ``cpu_s`` and ``max_rss_kb`` of a Python call are measured by the runner itself;
otherwise they come from ``wait4()`` on the spawned process: ``cpu_s`` is then exact for programs that exit, but
misses the program's share when the sandbox is killed; ``max_rss_kb`` is reported as 0 when it does not exceed
this process's own peak RSS (``exec`` folds the spawning process's peak into the child's figure, so a smaller
value cannot be told apart from it).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stitchwork.errors import SandboxError
from stitchwork.isolation import _cgroup, _protocol
from stitchwork.isolation._base import Command, Limits, PythonCall, SandboxResult

#: ``PATH`` of a sandboxed program unless its spec sets one.
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_PIPE_GRACE_S = 1.0
_CHUNK = 65536
_FATAL_SIGNALS = frozenset(
    {
        signal.SIGSEGV,
        signal.SIGBUS,
        signal.SIGILL,
        signal.SIGFPE,
        signal.SIGABRT,
        signal.SIGKILL,
        signal.SIGSYS,
    }
)
_OUT_OF_MEMORY_MESSAGES = (
    b"MemoryError",
    b"Cannot allocate memory",
    b"std::bad_alloc",
    b"out of memory",
    b"failed to map segment",  # the dynamic loader, when RLIMIT_AS is below what the program needs to start
)


# -- what a program runs with -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Confinement:
    """Host-side confinement :func:`supervise` puts around one sandbox's process tree.

    Per-sandbox host limits belong here, so that every process backend gets them the same way and from one
    place: today a ``pids`` cgroup; later a user namespace, memory and CPU cgroup controllers, a disk quota and
    ``no_new_privs``.
    """

    pids_cgroup: bool = False
    """Run the process in its own ``pids`` cgroup allowing ``limits.max_pids + overhead_pids`` tasks (threads
    count), where this host has a writable hierarchy (:func:`~._cgroup.pids_cgroup`); it joins before it starts,
    through a one-line ``/bin/sh`` wrapper. Forks the cgroup refused are counted in :attr:`Outcome.refused_forks`."""
    overhead_pids: int = 0
    """Tasks of the sandbox's own machinery that count against the cgroup (bwrap's monitor process)."""


def program_env(extra: Mapping[str, str], *, home: str = "/work", check: bool = True) -> dict[str, str]:
    """The whole environment of a sandboxed program: ``extra`` over ``PATH``, ``HOME`` and ``LANG`` defaults.

    Raises:
        SandboxError: With ``check``, a name that is empty or holds ``=`` or NUL, or a value holding NUL.
    """
    env = {"PATH": DEFAULT_PATH, "HOME": home, "LANG": "C.UTF-8"}
    if not check:
        return {**env, **extra}
    for key, value in extra.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise SandboxError(f"invalid environment variable name or value: {key!r}")
        env[key] = value
    return env


def cpu_rlimit(limits: Limits) -> int:
    """``RLIMIT_CPU`` counts whole seconds: the limit rounded up, at least one."""
    return max(1, math.ceil(limits.cpu_s))


def rlimits(limits: Limits, *, fsize_mb: int, nofile: int) -> dict[str, int]:
    """The rlimits (soft = hard) a sandboxed program runs under, by name without ``RLIMIT_``, in a fixed order.

    ``mem_mb`` → ``AS``; ``cpu_s`` → ``CPU`` rounded up to whole seconds (the kernel SIGKILLs at the limit);
    ``max_pids`` → ``NPROC``; plus ``FSIZE`` (``fsize_mb``), ``NOFILE`` (``nofile``) and ``CORE=0``.
    """
    return {
        "AS": limits.mem_mb * 1024 * 1024,
        "CPU": cpu_rlimit(limits),
        "NPROC": limits.max_pids,
        "FSIZE": fsize_mb * 1024 * 1024,
        "NOFILE": nofile,
        "CORE": 0,
    }


# -- supervision --------------------------------------------------------------------------------------------


@dataclass
class Exit:
    """How the spawned process ended: its ``wait4()`` status and resource usage (None when reaped elsewhere)."""

    status: int
    rusage: resource.struct_rusage | None

    @property
    def code(self) -> int:
        """The shell-style exit code: ``128 + signal`` for a death by signal."""
        if os.WIFSIGNALED(self.status):
            return 128 + os.WTERMSIG(self.status)
        return os.WEXITSTATUS(self.status)


@dataclass
class Outcome:
    """What :func:`supervise` observed."""

    stdout: bytes
    stderr: bytes
    exit: Exit
    killed: str | None
    duration_s: float
    spawner_rss_kb: int
    refused_forks: int = 0


async def supervise(
    argv: list[str],
    *,
    env: dict[str, str],
    stdin: bytes,
    limits: Limits,
    pass_fds: tuple[int, ...] = (),
    confinement: Confinement = Confinement(),
    name: str = "bwrap",
) -> Outcome:
    """Runs ``argv`` in its own process group under ``confinement``, feeding ``stdin``, collecting capped output,
    enforcing the timeout.

    The exit status and resource usage come from ``wait4()``, driven by a pidfd in the event loop (or a worker
    thread where pidfds are not available).

    Args:
        argv: The sandbox's command line.
        env: Its whole environment.
        stdin: Written to its stdin, which is then closed.
        limits: ``timeout_s``, ``max_output_bytes`` and (with a cgroup) ``max_pids`` are enforced here.
        pass_fds: Descriptors the command inherits (bwrap's seccomp filter).
        confinement: Host-side confinement.
        name: What the command is, for the error message when it cannot start.

    Raises:
        SandboxError: The command cannot be started.
        OSError: The cgroup cannot be created.
    """
    pids = _cgroup.pids_cgroup() if confinement.pids_cgroup else None
    cgroup = pids.create(limits.max_pids + confinement.overhead_pids) if pids is not None else None
    try:
        if cgroup is not None:
            argv = _cgroup.join_argv(cgroup, argv)
        outcome = await _supervise(argv, env, stdin, pass_fds, limits, cgroup, name)
        if cgroup is not None:
            outcome.refused_forks = _cgroup.PidsCgroup.refused_forks(cgroup)
    finally:
        if cgroup is not None:
            _cgroup.remove_later(cgroup)
    return outcome


async def _supervise(
    argv: list[str],
    env: dict[str, str],
    stdin: bytes,
    pass_fds: tuple[int, ...],
    limits: Limits,
    cgroup: Path | None,
    name: str,
) -> Outcome:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            pass_fds=pass_fds,
            start_new_session=True,
        )
    except OSError as exc:
        raise SandboxError(f"cannot start {name}: {exc}") from exc
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    pid = proc.pid
    killed: list[str] = []
    budget = [limits.max_output_bytes]
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    eof: dict[int, asyncio.Future[None]] = {fd: loop.create_future() for fd in chunks}
    exited: asyncio.Future[Exit] = loop.create_future()
    pending_stdin = [memoryview(stdin)]
    in_fd, out_fd, err_fd = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
    pidfd = -1

    def kill(reason: str) -> None:
        if exited.done():
            return
        if not killed:
            killed.append(reason)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if cgroup is not None:
            _cgroup.PidsCgroup.remove(cgroup)  # belt and braces: anything that is still in the cgroup

    def on_readable(fd: int) -> None:
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and len(data) > budget[0]:
            data = data[: budget[0]]
            kill("output")
        if data:
            budget[0] -= len(data)
            chunks[fd].append(data)
        if not data or (budget[0] <= 0 and killed):
            loop.remove_reader(fd)
            if not eof[fd].done():
                eof[fd].set_result(None)

    def on_writable() -> None:
        view = pending_stdin[0]
        try:
            written = os.write(in_fd, view[:_CHUNK]) if view else 0
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the program does not read its stdin
            written, view = 0, memoryview(b"")
        pending_stdin[0] = view = view[written:]
        if not view:
            loop.remove_writer(in_fd)
            proc.stdin.close()  # type: ignore[union-attr]

    def record(status: int, usage: resource.struct_rusage | None) -> None:
        proc.returncode = os.waitstatus_to_exitcode(status)  # keeps Popen from ever waiting for this pid
        if not exited.done():
            exited.set_result(Exit(status, usage))

    def reap(options: int) -> bool:
        try:
            got, status, usage = os.wait4(pid, options)
        except ChildProcessError:  # already reaped by the other path
            record(0, None)
            return True
        if got == 0:
            return False
        record(status, usage)
        return True

    def on_exit() -> None:
        if reap(os.WNOHANG):
            loop.remove_reader(pidfd)

    for fd in chunks:
        os.set_blocking(fd, False)
        loop.add_reader(fd, on_readable, fd)
    os.set_blocking(in_fd, False)
    loop.add_writer(in_fd, on_writable)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd: a worker thread blocks in wait4 instead
        waiter = loop.run_in_executor(None, os.wait4, pid, 0)

        def waited(future: asyncio.Future[tuple[int, int, resource.struct_rusage]]) -> None:
            if not future.cancelled() and future.exception() is None:
                record(*future.result()[1:])

        waiter.add_done_callback(waited)
    else:
        loop.add_reader(pidfd, on_exit)
    timer = loop.call_later(limits.timeout_s, kill, "timeout")
    try:
        done = await exited
        with contextlib.suppress(TimeoutError):
            # Pipes reach EOF once every process in the pid namespace is gone, which is right after bwrap.
            await asyncio.wait_for(asyncio.gather(*eof.values()), _PIPE_GRACE_S)
    finally:
        timer.cancel()
        if not exited.done():  # cancelled: do not leave a sandbox behind
            kill("cancelled")
            reap(0)
        for fd in chunks:
            loop.remove_reader(fd)
        loop.remove_writer(in_fd)
        if pidfd != -1:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
    return Outcome(
        stdout=b"".join(chunks[out_fd]),
        stderr=b"".join(chunks[err_fd]),
        exit=done,
        killed=killed[0] if killed else None,
        duration_s=time.perf_counter() - start,
        spawner_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )


# -- results ------------------------------------------------------------------------------------------------


def sandbox_result(program: PythonCall | Command, outcome: Outcome, limits: Limits) -> SandboxResult:
    """The result of a supervised program (see the module docs for how ``killed`` is decided)."""
    code = outcome.exit.code
    stdout, stderr = outcome.stdout, outcome.stderr
    usage = outcome.exit.rusage
    cpu_s = usage.ru_utime + usage.ru_stime if usage is not None else 0.0
    # wait4()'s peak RSS is at least the spawning process's own (exec records the old mm's peak): only a
    # larger figure can be the sandbox's.
    max_rss_kb = usage.ru_maxrss if usage is not None and usage.ru_maxrss > outcome.spawner_rss_kb else 0
    value: Any = None
    error: str | None = None
    answer = _protocol.last_line_answer(stdout) if isinstance(program, PythonCall) and outcome.killed is None else None
    if answer is not None:
        value, error = answer.value, answer.error
        if answer.usage is not None:
            cpu_s = float(answer.usage.get("cpu_s", cpu_s))
            max_rss_kb = int(answer.usage.get("max_rss_kb", max_rss_kb))
    killed = outcome.killed
    signum = code - 128 if 128 < code < 128 + 65 else 0
    if killed is None:
        if _protocol.is_memory_error(error):
            killed = "memory"
        elif outcome.refused_forks and (code != 0 or error is not None):
            killed = "pids"
        elif signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_s >= 0.8 * cpu_rlimit(limits)):
            killed = "cpu"
        elif signum in _FATAL_SIGNALS and answer is None:
            killed = "signal"
        elif answer is None and code != 0 and _mentions_memory(stderr):
            killed = "memory"
    if isinstance(program, PythonCall) and answer is None:
        error = _why_no_answer(killed, code, limits)
    return SandboxResult(
        exit_code=code,
        stdout=stdout,
        stderr=stderr,
        value=value,
        error=error,
        killed=killed,
        truncated=killed == "output",
        duration_s=outcome.duration_s,
        cpu_s=cpu_s,
        max_rss_kb=max_rss_kb,
    )


def _mentions_memory(stderr: bytes) -> bool:
    """Whether a failed program said it ran out of memory (RLIMIT_AS makes allocations fail)."""
    tail = stderr[-4096:]
    return any(message in tail for message in _OUT_OF_MEMORY_MESSAGES)


def _why_no_answer(killed: str | None, code: int, limits: Limits) -> str:
    reasons = {
        "timeout": f"timed out after {limits.timeout_s:g} s",
        "output": f"output exceeded {limits.max_output_bytes} bytes",
        "cpu": f"CPU time limit of {limits.cpu_s:g} s exceeded",
        "pids": f"process limit of {limits.max_pids} reached",
        "memory": f"memory limit of {limits.mem_mb} MB exceeded",
        "cancelled": "cancelled",
    }
    if killed in reasons:
        return reasons[killed]
    if killed == "signal":
        return f"killed by signal {signal.Signals(code - 128).name}"
    return f"the tool process exited with code {code} without a result"


# -- VM monitors --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """What :func:`run_with_timeout` observed."""

    stdout: bytes
    stderr: bytes
    returncode: int | None
    killed: str | None
    """``"timeout"`` when the process group was killed at the deadline."""


async def run_with_timeout(
    argv: Sequence[str], timeout_s: float, *, stdin: int | None = asyncio.subprocess.DEVNULL
) -> Finished:
    """Runs ``argv`` in its own session to completion, or until ``timeout_s`` passes and its group is SIGKILLed.

    For VM monitors (``firecracker``, ``ops``), whose output is the guest console: it is collected whole.

    Raises:
        SandboxError: The command cannot be started.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True
        )
    except OSError as exc:
        raise SandboxError(f"cannot start {argv[0]}: {exc}") from exc
    killed = None
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        killed = "timeout"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = await proc.communicate()
    return Finished(stdout, stderr, proc.returncode, killed)
