"""The process supervisor: one sandboxed program as one host process tree, started, bounded and read here.

Used by every backend whose sandbox is a host process: ``bwrap://`` and ``gvisor://`` through :func:`supervise`,
``wasm://``'s interpreter processes through :class:`Supervised`, the VM monitors of ``firecracker://`` and
``nanos://`` through :func:`run_with_timeout`. This is the one place where per-sandbox host confinement is put
around a program, so that every backend gets it the same way:

* **bound to this process** from before it executes anything: the command starts under the process guard
  (:mod:`._guard`), the init of a pid namespace that ends, with every process of the sandbox, when this process
  ends (also by SIGKILL). The guard gets its plan through a sealed memory file, never the command line;
* **one cgroup per sandbox** (:mod:`._cgroup`, v1 or v2), joined before the command executes: memory with swap
  off (``mem_mb``), a CPU quota (``cpus``), a process limit (``max_pids``); ``cpu_s`` is a budget of CPU time
  accumulated by all its processes, polled here and enforced by killing the sandbox;
* **a disk quota** (:class:`Stage`): the sandbox's writable space is one size-limited tmpfs (``disk_mb``) in the
  guard's private mount namespace; granted directories are copied in and written back afterwards with setuid
  and setgid bits stripped (:mod:`._stage`);
* **a user namespace** (:attr:`Confinement.userns`): the guard makes one mapping the sandbox uid to the same
  unprivileged host uid, for ``bwrap --userns``;
* ``timeout_s`` is wall-clock; output past ``max_output_bytes`` (stdout and stderr together) is dropped. Either
  ends the sandbox: its cgroup is killed and the guard told to stop (it kills its init, which takes the pid
  namespace with it, writes the staged directories back and reports).

``killed`` (exact reasons, in this order): ``"timeout"``, ``"output"`` or ``"cpu"`` when the supervisor ended the
sandbox (the CPU budget: accumulated CPU time of the whole sandbox); ``"memory"`` when the kernel killed a process
of the sandbox for memory (the cgroup's out-of-memory kills), or for a Python ``MemoryError``; ``"pids"`` when the
program failed after the cgroup refused a fork; ``"disk"`` when it failed with its writable space full;
``"cpu"`` for death by ``SIGXCPU`` (the per-process ``RLIMIT_CPU``); ``"signal"`` for other deaths by a fatal
signal; ``"memory"`` also for a failed program whose stderr ends with an out-of-memory message. Like a shell,
``exit_code`` reports a signal death as ``128 + signal``.

``duration_s`` is wall-clock. With a cgroup, ``cpu_s`` is the CPU time of every process of the sandbox (also
of a killed one) and ``max_rss_kb`` its peak memory (files in its tmpfs included); without one they come from
the runner (a Python call) or ``wait4()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stitchwork.errors import SandboxError
from stitchwork.isolation import _cgroup, _guard, _protocol
from stitchwork.isolation._base import Command, Limits, PythonCall, SandboxResult

#: ``PATH`` of a sandboxed program unless its spec sets one.
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
#: The guard's command line before its plan descriptor.
GUARD_ARGV = (os.path.realpath(sys.executable), "-I", "-S", "-B", str(Path(_guard.__file__).resolve()))
#: How long the guard may take to stop, write back and report after it was told to stop.
STOP_GRACE_S = 10.0
#: How often the supervisor reads a sandbox's cgroup for out-of-memory kills (and, at most, its CPU budget).
WATCH_S = 0.05
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
_DISK_FULL_MESSAGES = (b"No space left on device", b"Disk quota exceeded", b"File too large")


# -- what a program runs with -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """The sandbox's writable space: one tmpfs of ``size_bytes`` mounted by the guard at ``root`` (an empty host
    directory: the mount is private to the sandbox), laid out as the backend needs."""

    root: Path
    size_bytes: int
    uid: int
    gid: int
    copy: tuple[tuple[str, str], ...] = ()
    """``(host directory, name)``: copied into ``root/name`` (owned by ``uid:gid``) before the run."""
    commit: tuple[tuple[str, str], ...] = ()
    """``(host directory, name)``: ``root/name`` written back to the host directory after the run."""
    files: tuple[tuple[str, str, int], ...] = ()
    """``(host file, name, mode)``: copied to ``root/name``."""
    binds: tuple[tuple[str, str], ...] = ()
    """``(host path, name)``: bound read-only (``nosuid,nodev``) at ``root/name``."""
    scratch: tuple[str, ...] = ()
    """Empty world-writable (sticky) directories: ``/tmp``, ``/dev/shm``, a scratch ``/work``."""

    def path(self, name: str) -> str:
        """Where ``name`` is inside the stage (as the sandbox's command sees it)."""
        return str(self.root / name)

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root), "size": self.size_bytes, "uid": self.uid, "gid": self.gid,
            "copy": list(self.copy), "commit": list(self.commit), "files": list(self.files),
            "binds": list(self.binds), "scratch": list(self.scratch),
        }  # fmt: skip


@dataclass(frozen=True)
class Confinement:
    """Host-side confinement :func:`supervise` puts around one sandbox's process tree (see the module docs)."""

    cgroup: bool = True
    """A cgroup for the sandbox (where :func:`~._cgroup.support` offers one) with the run's limits."""
    overhead_pids: int = 0
    """Tasks of the sandbox's own machinery that count against ``max_pids`` (bwrap's monitor process)."""
    stage: Stage | None = None
    userns: tuple[int, int] | None = None
    """``(uid, gid)``: the guard creates a user namespace mapping them to the same host ids and puts its
    descriptor number where the command line says ``{userns}``."""
    rlimits: Mapping[str, int] = field(default_factory=dict)
    """Applied to the command itself (``NOFILE``: 256, ...), before it executes."""
    mount_proc: bool = False
    """Give the sandbox's pid namespace its own ``/proc`` (``runsc`` needs it)."""


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


def rlimits(limits: Limits, *, fsize_mb: int, nofile: int, nproc: bool = True) -> dict[str, int]:
    """The rlimits (soft = hard) a sandboxed program runs under, by name without ``RLIMIT_``, in a fixed order.

    ``mem_mb`` → ``AS`` (per process; the cgroup bounds the sandbox); ``cpu_s`` → ``CPU`` rounded up to whole
    seconds (the kernel SIGKILLs at the limit), one more where a cgroup keeps the exact budget (``nproc`` off:
    the supervisor's figure comes first, this is the backstop); ``max_pids`` → ``NPROC`` (only where no cgroup
    counts processes); plus ``FSIZE`` (``fsize_mb``), ``NOFILE`` (``nofile``) and ``CORE=0``.
    """
    values = {"AS": limits.mem_mb * 1024 * 1024, "CPU": cpu_rlimit(limits) + (0 if nproc else 1)}
    if nproc:
        values["NPROC"] = limits.max_pids
    values.update({"FSIZE": fsize_mb * 1024 * 1024, "NOFILE": nofile, "CORE": 0})
    return values


def cgroup_support() -> _cgroup.Support:
    """The cgroups this process can give sandboxes (see :func:`~._cgroup.support`)."""
    return _cgroup.support()


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
    """What the supervisor observed."""

    stdout: bytes
    stderr: bytes
    exit: Exit
    killed: str | None
    duration_s: float
    spawner_rss_kb: int
    refused_forks: int = 0
    stats: _cgroup.Stats | None = None
    report: dict[str, Any] = field(default_factory=dict)
    """The guard's (or interpreter host's) status line: ``code``, ``disk``, ``commit``, ``error``, ..."""

    @property
    def code(self) -> int:
        """The command's exit code (as the guard relayed it; else the spawned process's own)."""
        code = self.report.get("code")
        return int(code) if isinstance(code, int) else self.exit.code

    @property
    def disk_full(self) -> bool:
        disk = self.report.get("disk")
        return isinstance(disk, dict) and bool(disk.get("full"))


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    import fcntl

    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class Supervised:
    """A started sandbox process (the guard, or a ``wasm://`` interpreter host) with its cgroup and status pipe.

    Args:
        proc: The process, started with stdin, stdout and stderr pipes in its own session.
        cgroup: The sandbox's cgroup (removed when the run ends).
        status_fd: Read end of the pipe the process reports its status line on (closed here).
        graceful: Stop by SIGTERM, then SIGKILL after ``grace_s`` (the guard and the wasm host write back on
            SIGTERM); otherwise SIGKILL the process group at once.
        inside: The process itself is in ``cgroup`` (a wasm host): stopping must not kill the cgroup, or it could not
            write back.
        prestarted: See :attr:`prestarted`.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        cgroup: _cgroup.SandboxCgroup | None,
        status_fd: int,
        *,
        graceful: bool,
        inside: bool = False,
        grace_s: float = STOP_GRACE_S,
        prestarted: bool = False,
    ) -> None:
        self.proc = proc
        self.prestarted = prestarted
        """Started ahead of its call (a wasm host): CPU, peak memory and OOM kills count from :meth:`run`."""
        self.cgroup = cgroup
        self.status_fd = status_fd
        self.graceful = graceful
        self.inside = inside
        self.grace_s = grace_s
        self.cleanups: list[Callable[[], None]] = []
        """Run once the process is done with (e.g. removing its host-side mount point)."""

    def stop(self) -> None:
        """Ends the sandbox now (its processes are SIGKILLed; the guard still reports)."""
        if self.cgroup is not None and not (self.inside and self.graceful):
            self.cgroup.kill(rounds=3)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.graceful:
                os.kill(self.proc.pid, signal.SIGTERM)
            else:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def abandon(self) -> None:
        """Kills the process group and removes the cgroup (a process that was never used)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.proc.pid, 0)
        self.proc.returncode = -9
        self._close()

    def _close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        status_fd, self.status_fd = self.status_fd, -1  # closed once: the number may be reused at once
        if status_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(status_fd)
        if self.cgroup is not None:
            _cgroup.remove_later(self.cgroup)
            self.cgroup = None
        cleanups, self.cleanups = self.cleanups, []
        for cleanup in cleanups:
            with contextlib.suppress(OSError):
                cleanup()

    def _read_report(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        if self.status_fd < 0:  # already closed: nothing more will come
            return report
        os.set_blocking(self.status_fd, False)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(self.status_fd, _CHUNK):
                data += chunk
        for message in _guard.read_frames(data):
            report.update(message)
        return report

    async def run(self, stdin: bytes, limits: Limits, *, on_killed: Callable[[str], None] | None = None) -> Outcome:
        """Feeds ``stdin``, collects capped output, enforces the timeout and the CPU budget; waits for the end.

        The exit status and resource usage come from ``wait4()``, driven by a pidfd in the event loop.
        """
        try:
            return await _run(self, stdin, limits, on_killed)
        finally:
            self._close()


async def _run(sup: Supervised, stdin: bytes, limits: Limits, on_killed: Callable[[str], None] | None) -> Outcome:
    loop = asyncio.get_running_loop()
    proc = sup.proc
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    pid = proc.pid
    killed: list[str] = []
    budget = [limits.max_output_bytes]
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    eof: dict[int, asyncio.Future[None]] = {fd: loop.create_future() for fd in chunks}
    exited: asyncio.Future[Exit] = loop.create_future()
    pending_stdin = [memoryview(stdin)]
    in_fd, out_fd, err_fd = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
    timers: list[asyncio.TimerHandle] = []

    def kill(reason: str) -> None:
        if exited.done():
            return
        if not killed:
            killed.append(reason)
            if on_killed is not None:
                on_killed(reason)
            sup.stop()
            if sup.graceful:
                timers.append(loop.call_later(sup.grace_s, force))

    def force() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if sup.cgroup is not None:
            sup.cgroup.kill(rounds=3)

    def watch() -> None:
        """The CPU budget and out-of-memory kills, from the cgroup: either ends the whole sandbox."""
        assert sup.cgroup is not None
        if sup.cgroup.oom_kills() > base.oom_kills:  # the kernel killed a process of it for memory
            kill("memory")
            return
        used = sup.cgroup.cpu_s() - base.cpu_s
        if used >= limits.cpu_s:
            kill("cpu")
            return
        # The sandbox cannot use more than `cpus` cores: the budget cannot run out before this.
        wait = min(WATCH_S, max(0.005, (limits.cpu_s - used) / max(limits.cpus, 0.01)))
        timers.append(loop.call_later(wait, watch))

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

    pidfd = os.pidfd_open(pid)

    def on_exit() -> None:
        if reap(os.WNOHANG):
            loop.remove_reader(pidfd)

    for fd in chunks:
        os.set_blocking(fd, False)
        loop.add_reader(fd, on_readable, fd)
    os.set_blocking(in_fd, False)
    loop.add_writer(in_fd, on_writable)
    loop.add_reader(pidfd, on_exit)
    timers.append(loop.call_later(limits.timeout_s, kill, "timeout"))
    base = _cgroup.Stats()
    if sup.cgroup is not None and sup.cgroup.dirs:
        if sup.prestarted:  # its own start-up is not the call's
            base = sup.cgroup.stats()
            sup.cgroup.reset_peak()
        timers.append(loop.call_later(0.0, watch))
    started = time.perf_counter()
    try:
        done = await exited
        with contextlib.suppress(TimeoutError):
            # Pipes reach EOF once every process of the sandbox is gone, which is right after the guard.
            await asyncio.wait_for(asyncio.gather(*eof.values()), _PIPE_GRACE_S)
    finally:
        for timer in timers:
            timer.cancel()
        if not exited.done():  # cancelled: do not leave a sandbox behind
            if not killed:
                killed.append("cancelled")
            force()
            sup.stop()
            reap(0)
        for fd in chunks:
            loop.remove_reader(fd)
        if proc.stdin is not None and not proc.stdin.closed:
            # Closed once all stdin was written: its number may belong to someone else by now (a socket
            # transport of this loop, which remove_writer would refuse with a RuntimeError).
            loop.remove_writer(in_fd)
        loop.remove_reader(pidfd)
        os.close(pidfd)
    stats = None
    if sup.cgroup is not None and sup.cgroup.dirs:
        now = sup.cgroup.stats()
        stats = _cgroup.Stats(now.cpu_s - base.cpu_s, now.memory_peak_bytes, now.oom_kills - base.oom_kills,
                              now.refused_forks - base.refused_forks)  # fmt: skip
    return Outcome(
        stdout=b"".join(chunks[out_fd]),
        stderr=b"".join(chunks[err_fd]),
        exit=done,
        killed=killed[0] if killed else None,
        duration_s=time.perf_counter() - started,
        spawner_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        refused_forks=stats.refused_forks if stats is not None else 0,
        stats=stats,
        report=sup._read_report(),
    )


def spawn_planned(
    argv: Sequence[str],
    plan: Mapping[str, Any],
    *,
    limits: Limits,
    cgroup: bool = True,
    overhead_pids: int = 0,
    env: Mapping[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    name: str = "the sandbox",
    inside: bool = False,
    grace_s: float = STOP_GRACE_S,
    prestarted: bool = False,
) -> Supervised:
    """Starts ``argv + [plan descriptor]`` in its own session, with a cgroup (where offered) holding ``limits``.

    ``plan`` (plain data: :mod:`marshal` carries it) is completed with ``ppid``, ``status_fd`` and ``cgroups`` (the
    ``cgroup.procs`` files to join) and handed over in a sealed memory file, never on the command line. The
    process reports on ``status_fd`` in frames (:func:`._guard.write_frame`).

    Raises:
        SandboxError: The process cannot be started or the cgroup cannot be created.
    """
    group = None
    if cgroup and _cgroup.support().hierarchies:
        try:
            group = _cgroup.support().create(limits, overhead_pids=overhead_pids)
        except OSError as exc:
            raise SandboxError(f"cannot create the cgroup of {name}: {exc}") from exc
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    full = {**plan, "ppid": os.getpid(), "status_fd": status_w,
            "cgroups": [str(p) for p in group.procs] if group is not None else []}  # fmt: skip
    plan_fd = -1
    try:
        plan_fd = _memfd("stitchwork-plan", marshal.dumps(full))
        proc = subprocess.Popen(
            [*argv, str(plan_fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else {"PATH": DEFAULT_PATH},
            pass_fds=(plan_fd, status_w, *pass_fds),
            start_new_session=True,
        )
    except OSError as exc:
        os.close(status_r)
        if group is not None:
            group.remove()
        raise SandboxError(f"cannot start {name}: {exc}") from exc
    finally:
        os.close(status_w)
        if plan_fd != -1:
            os.close(plan_fd)
    return Supervised(proc, group, status_r, graceful=True, inside=inside, grace_s=grace_s, prestarted=prestarted)


def spawn_guarded(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    limits: Limits,
    pass_fds: tuple[int, ...] = (),
    confinement: Confinement = Confinement(),
    name: str = "the sandbox",
) -> Supervised:
    """Starts ``argv`` under the process guard with ``confinement`` (see the module docs).

    Raises:
        SandboxError: The guard cannot be started or the cgroup cannot be created.
    """
    plan = {
        "argv": list(argv),
        "env": dict(env),
        "keep_fds": list(pass_fds),
        "stage": confinement.stage.to_json() if confinement.stage is not None else None,
        "userns": {"uid": confinement.userns[0], "gid": confinement.userns[1]} if confinement.userns else None,
        "rlimits": dict(confinement.rlimits),
        "mount_proc": confinement.mount_proc,
    }
    return spawn_planned(GUARD_ARGV, plan, limits=limits, cgroup=confinement.cgroup,
                         overhead_pids=confinement.overhead_pids, pass_fds=pass_fds, name=name)  # fmt: skip


async def supervise(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdin: bytes,
    limits: Limits,
    pass_fds: tuple[int, ...] = (),
    confinement: Confinement = Confinement(),
    name: str = "the sandbox",
) -> Outcome:
    """Runs ``argv`` under the guard and ``confinement``, feeding ``stdin``, collecting capped output, enforcing
    the timeout and the CPU budget.

    Raises:
        SandboxError: The sandbox cannot be started or set up (the guard's or the command's own error), or its
            staged directories could not be written back.
    """
    sup = spawn_guarded(argv, env=env, limits=limits, pass_fds=pass_fds, confinement=confinement, name=name)
    outcome = await sup.run(stdin, limits)
    check_report(outcome, name)
    return outcome


def check_report(outcome: Outcome, name: str) -> None:
    """Raises :class:`SandboxError` when the guard or the command's start failed, or the write-back did.

    Raises:
        SandboxError: As above.
    """
    report = outcome.report
    if "exec_error" in report and outcome.killed is None:
        raise SandboxError(f"cannot start {name}: {report['exec_error']}")
    error = report.get("error")
    if error:  # the set-up or the write-back failed: the host's side of the sandbox, not the program
        raise SandboxError(f"{name}: {error}")
    if outcome.killed is None and outcome.exit.code == _guard.SETUP_FAILED and not report:
        text = outcome.stderr.decode(errors="replace").strip()[-2000:]
        raise SandboxError(f"{name}: the process guard failed: {text or 'no report'}")


# -- results ------------------------------------------------------------------------------------------------


def sandbox_result(program: PythonCall | Command, outcome: Outcome, limits: Limits) -> SandboxResult:
    """The result of a supervised program (see the module docs for how ``killed`` is decided)."""
    code = outcome.code
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
    stats = outcome.stats
    if stats is not None:
        cpu_s = max(stats.cpu_s, 0.0)
        max_rss_kb = stats.memory_peak_bytes // 1024 or max_rss_kb
    failed = code != 0 or error is not None or (isinstance(program, PythonCall) and answer is None)
    killed = outcome.killed
    signum = code - 128 if 128 < code < 128 + 65 else 0
    if killed is None:
        if (stats is not None and stats.oom_kills) or _protocol.is_memory_error(error):
            killed = "memory"
        elif outcome.refused_forks and failed:
            killed = "pids"
        elif outcome.disk_full and failed:
            killed = "disk"
        elif signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_s >= 0.8 * cpu_rlimit(limits)):
            killed = "cpu"
        elif signum in _FATAL_SIGNALS and answer is None:
            killed = "signal"
        elif answer is None and code != 0 and _mentions(stderr, _OUT_OF_MEMORY_MESSAGES):
            killed = "memory"
    if (isinstance(program, PythonCall) and answer is None) or (killed is not None and error is None):
        error = why_stopped(killed, code, limits)
    elif killed in ("disk", "pids", "memory") and error is not None and killed not in error.lower():
        error = f"{why_stopped(killed, code, limits)}: {error}"
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


def _mentions(stderr: bytes, messages: tuple[bytes, ...]) -> bool:
    """Whether a failed program's last output names one of ``messages``."""
    tail = stderr[-4096:]
    return any(message in tail for message in messages)


def why_stopped(killed: str | None, code: int, limits: Limits) -> str:
    """The error text of a result that ``killed`` names (or of a runner that gave no answer)."""
    reasons = {
        "timeout": f"timed out after {limits.timeout_s:g} s",
        "output": f"output exceeded {limits.max_output_bytes} bytes",
        "cpu": f"CPU time limit of {limits.cpu_s:g} s exceeded",
        "pids": f"process limit of {limits.max_pids} reached",
        "memory": f"memory limit of {limits.mem_mb} MB exceeded",
        "disk": f"disk quota of {limits.disk_mb} MB exceeded",
        "cancelled": "cancelled",
    }
    if killed in reasons:
        return reasons[killed]
    if killed == "signal" and 128 < code < 128 + 65:
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
    """Runs ``argv`` under the process guard to completion, or until ``timeout_s`` passes and it is killed.

    For VM monitors (``firecracker``, ``ops``), whose output is the guest console: it is collected whole (up to
    64 MiB). The monitor gets this process's environment.

    Raises:
        SandboxError: The command cannot be started.
    """
    del stdin  # the guard gives the monitor an empty stdin
    limits = Limits(timeout_s=timeout_s, max_output_bytes=64 << 20)
    sup = spawn_guarded(argv, env=dict(os.environ), limits=limits, confinement=Confinement(cgroup=False),
                        name=os.path.basename(argv[0]))  # fmt: skip
    outcome = await sup.run(b"", limits)
    check_report(outcome, os.path.basename(argv[0]))
    return Finished(outcome.stdout, outcome.stderr, outcome.code, outcome.killed)
