"""The interpreter hosts of one ``wasm://`` sandbox: a warm pool of parked ones, cold ones on demand, one shutdown.

Each guest runs in a process of its own (:mod:`stitchwork.isolation._wasm_host`), started with a cgroup of its own
through the process supervisor (:func:`~stitchwork.isolation._process.spawn_planned`). CPython's start-up inside
the module costs ~60 ms, so the pool keeps ``size`` hosts whose runner is already waiting for its request (it
printed the ready marker); a background thread (the filler) starts a replacement for each one taken. A host
serves exactly one call. Every host this pool starts, parked or cold, is tracked so that
:meth:`HostPool.close` (also run at exit) ends them all; each also ends by itself when this process does.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import select
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from stitchwork.config import Limits
from stitchwork.errors import SandboxError
from stitchwork.isolation import _guard, _process, _rootfs, _runner

log = logging.getLogger("stitchwork.isolation.wasm")


def _readable(fd: int, timeout_s: float) -> bool:
    """Whether ``fd`` has data (or EOF) within ``timeout_s``: ``poll``, which, unlike ``select``, works for
    descriptors numbered above 1023 (a busy server holds that many)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(max(0.0, timeout_s) * 1000))

#: A parked interpreter must print its ready marker within this (generous: a loaded machine).
START_DEADLINE_S = 120.0
#: A host has at least this long to set up a call (write the tool, copy the work directory in) before it counts
#: as failed: set-up is not the program's time, so a short ``timeout_s`` on a loaded machine is a timeout of the
#: program, not a failure to start it.
SETUP_DEADLINE_S = 60.0
#: How long a stopped host may take to stop its guest, write back and report before it is SIGKILLed.
STOP_GRACE_S = 2.0
#: The host's command line before its plan descriptor. This process's own interpreter as it was started, not its
#: resolved path: a virtual environment's ``python`` is a link to the base interpreter, and only through the link
#: does the host find the environment's site-packages (wasmtime).
HOST_ARGV = (sys.executable, "-B", "-m", "stitchwork.isolation._wasm_host")
#: The runner's WASI entry point (:func:`._runner.wasi_main`), imported rather than run as a script: measured ~4x
#: faster from request to result (2-4 ms vs 10-14 ms).
RUNNER_ARGV = (
    "python", "-I", "-S", "-B", "-c",
    f"import sys; sys.path.append({str(Path(_runner.SANDBOX_PATH).parent)!r}); import _runner; "
    "sys.exit(_runner.wasi_main())",
)  # fmt: skip
#: ``argv[0]`` names a :class:`~stitchwork.isolation.Command` may use (the interpreter is the only program).
PYTHON_NAMES = frozenset({"python", "python3", "python3.11"})
# Commands start in /work (WASI has no initial working directory to set): this shim changes there first, then
# runs ``-c CODE``, ``-m MODULE`` or a script path the way the interpreter itself would.
_COMMAND_SHIM = """\
import os as _os, sys as _sys
_os.chdir('/work')
_mode, _target, _rest = _sys.argv[1], _sys.argv[2], _sys.argv[3:]
if _mode == '-c':
    _sys.argv = ['-c', *_rest]
    _code = compile(_target, '<string>', 'exec')
    del _os, _sys, _mode, _rest
    exec(_code, {'__name__': '__main__', '__builtins__': __builtins__})
else:
    import runpy as _runpy
    _sys.argv = [_target, *_rest]
    if _mode == '-m':
        _runpy.run_module(_target, run_name='__main__', alter_sys=True)
    else:
        _runpy.run_path(_target, run_name='__main__')
"""


_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the stitchwork package


@dataclasses.dataclass(eq=False)
class Host:
    """One interpreter host process, before or during its call."""

    sup: _process.Supervised
    ctl: int
    """Write end of its control pipe (the call goes there)."""
    parked: bool

    def send_call(self, call: dict[str, Any], timeout_s: float) -> None:
        """Hands the host its call and waits for it to be set up (tool written, work directory copied in).

        Raises:
            SandboxError: The host failed to set up (its error) or did not answer in time.
        """
        data = (json.dumps(call) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.ctl, data) :]
        except OSError as exc:  # the host is gone: its report says why
            raise SandboxError(f"wasm://: the interpreter host ended before its call: {self._error()}") from exc
        finally:
            self._close_ctl()
        message = _read_frame(self.sup.status_fd, max(timeout_s, SETUP_DEADLINE_S))
        if not message.get("ready"):
            error = message.get("error") or self._error() or "no answer"
            raise SandboxError(f"wasm://: the interpreter host could not take its call: {error}")

    def _error(self) -> str:
        stderr = self.sup.proc.stderr
        with contextlib.suppress(OSError, ValueError):
            if stderr is not None and _readable(stderr.fileno(), 0):
                return os.read(stderr.fileno(), 4096).decode(errors="replace").strip()
        return ""

    def discard(self) -> None:
        """Ends a host that will not serve a call."""
        self._close_ctl()
        self.sup.abandon()

    def _close_ctl(self) -> None:
        """Closes the control pipe once: a second ``close`` of the same number would close whatever descriptor
        this process opened under that number since (another sandbox's pipe or pidfd)."""
        ctl, self.ctl = self.ctl, -1
        if ctl >= 0:
            with contextlib.suppress(OSError):
                os.close(ctl)


def _read_frame(fd: int, timeout_s: float) -> dict[str, Any]:
    """One status frame from ``fd`` (empty when none comes within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while True:
        frames = _guard.read_frames(data)
        if frames:
            return frames[0]
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not _readable(fd, remaining):
            return {}
        chunk = os.read(fd, 4096 if len(data) >= 4 else 4 - len(data))
        if not chunk:
            return {}
        data += chunk


class HostPool:
    """Starts, parks and stops the interpreter hosts of one sandbox.

    Args:
        cache: Compiled-module cache directory (None: the default).
        size: Parked hosts to keep ready (0: every call starts cold).
        limits: Limits of a parked host until its call sets the call's own.
        overhead_mb: Memory of the host process itself (Python, wasmtime, the compiled code) on top of ``mem_mb``.
        nofile: Descriptors the host may hold (the guest's open files among them).
    """

    def __init__(self, *, cache: Path | None, size: int, limits: Limits, overhead_mb: int, nofile: int) -> None:
        self.cache = cache
        self.size = size
        self.limits = limits
        self.overhead_mb = overhead_mb
        self.nofile = nofile
        self._parked: deque[Host] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._filler: threading.Thread | None = None
        self._live: set[Host] = set()
        atexit.register(self.close)

    def outer(self, limits: Limits) -> Limits:
        """The cgroup's limits for a call's ``limits``: room for the host process itself."""
        return dataclasses.replace(limits, mem_mb=limits.mem_mb + self.overhead_mb)

    def start_filling(self) -> None:
        """Starts the filler thread (once)."""
        with self._cond:
            if self.size and self._filler is None and not self._closed:
                self._filler = threading.Thread(target=self._fill, name="stitchwork-wasm-pool", daemon=True)
                self._filler.start()

    def spawn(
        self,
        argv: tuple[str, ...],
        limits: Limits,
        *,
        parked: bool,
        env: dict[str, str] | None = None,
        mounts: tuple[tuple[Path, str, bool], ...] = (),
    ) -> Host:
        """Starts a host running ``argv`` in the guest.

        Raises:
            SandboxError: It cannot be started.
        """
        ctl_r, ctl_w = os.pipe2(os.O_CLOEXEC)
        root = _rootfs.Layout(0, uid=os.getuid(), gid=os.getgid()).root  # an empty mount point for its tmpfs
        plan = {
            "ctl_fd": ctl_r,
            "argv": list(argv),
            "env": dict(env or {}),
            "mounts": [[str(s), t, w] for s, t, w in mounts],
            "mem_mb": limits.mem_mb,
            "nofile": self.nofile,
            "cache": str(self.cache) if self.cache else None,
            "stage": {"root": str(root), "size": limits.disk_mb * 1024 * 1024},
            "parked": parked,
        }
        try:
            sup = _process.spawn_planned(
                HOST_ARGV, plan, limits=self.outer(limits), pass_fds=(ctl_r,), name="the wasm interpreter host",
                env={"PATH": _process.DEFAULT_PATH, "PYTHONPATH": _PACKAGE_ROOT}, inside=True, grace_s=STOP_GRACE_S,
                prestarted=True,
            )  # fmt: skip
        except SandboxError:
            os.close(ctl_w)
            with contextlib.suppress(OSError):
                root.rmdir()
            raise
        finally:
            os.close(ctl_r)
        sup.cleanups.append(root.rmdir)  # the host's tmpfs is private to it: this stays an empty directory
        host = Host(sup, ctl_w, parked)
        with self._cond:
            self._live = {h for h in self._live if h.sup.proc.returncode is None}
            self._live.add(host)
        return host

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._parked) >= self.size:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                host = self.spawn(RUNNER_ARGV, self.limits, parked=True)
            except SandboxError as exc:
                if self._closed:
                    return
                log.warning("wasm pool: %s", exc)
                time.sleep(1.0)
                continue
            if not _await_ready(host, START_DEADLINE_S):
                if self._closed:
                    host.discard()
                    return
                log.warning("wasm pool: an interpreter host did not start: %s", host._error() or "no ready marker")
                host.discard()
                time.sleep(0.5)
                continue
            with self._cond:
                if self._closed:
                    host.discard()
                    return
                self._parked.append(host)
                self._cond.notify_all()

    def take(self) -> Host | None:
        """A parked host, out of the pool (None when none is ready)."""
        with self._cond:
            while self._parked:
                host = self._parked.popleft()
                self._cond.notify_all()
                if host.sup.proc.poll() is None:
                    return host
                host.discard()
        return None

    def ready(self) -> int:
        """How many parked hosts are ready now."""
        with self._cond:
            return len(self._parked)

    def wait_full(self, timeout: float = 30.0) -> bool:
        """Blocks until the pool is full or ``timeout`` passes; whether it is full."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._parked) < self.size and time.monotonic() < deadline:
                self._cond.wait(0.05)
            return len(self._parked) >= self.size

    def close(self) -> None:
        """Stops the filler and ends every host this pool started."""
        with self._cond:
            self._closed = True
            self._parked.clear()
            live, self._live = list(self._live), set()
            self._cond.notify_all()
        for host in live:
            if host.sup.proc.returncode is None:
                host.discard()
        with contextlib.suppress(ValueError):
            atexit.unregister(self.close)


def _await_ready(host: Host, timeout_s: float) -> bool:
    """Reads the host's stdout up to the runner's ready marker (nothing else comes before it)."""
    stdout = host.sup.proc.stdout
    assert stdout is not None
    marker = _runner.READY_MARKER
    deadline = time.monotonic() + timeout_s
    seen = b""
    while len(seen) < len(marker):
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0 or not _readable(stdout.fileno(), remaining):
                return False
            chunk = os.read(stdout.fileno(), len(marker) - len(seen))
        except (ValueError, OSError):  # the pool closed (and discarded this host) meanwhile
            return False
        if not chunk:
            return False
        seen += chunk
    return seen == marker


def command_argv(argv: tuple[str, ...]) -> tuple[str, ...]:
    """``python [FLAGS] (-c CODE | -m MODULE | SCRIPT) ARGS...`` as interpreter argv running :data:`_COMMAND_SHIM`.

    Raises:
        SandboxError: No code, module or script is named.
    """
    args = list(argv[1:])
    flags: list[str] = []
    while args and args[0].startswith("-") and args[0] not in ("-c", "-m", "-") and len(args[0]) > 1:
        flags.append(args.pop(0))
    if not args or args[0] == "-" or (args[0] in ("-c", "-m") and len(args) < 2):
        raise SandboxError("wasm://: a python command needs -c CODE, -m MODULE or a script path (not stdin)")
    if args[0] in ("-c", "-m"):
        mode, target, rest = args[0], args[1], args[2:]
    else:
        mode, target, rest = "script", args[0], args[1:]
    return ("python", *flags, "-c", _COMMAND_SHIM, mode, target, *rest)
