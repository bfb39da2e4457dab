"""``wasm://`` interpreters: one CPython guest in its own wasmtime store and thread, for exactly one program.

An :class:`Instance` preopens the standard library at ``/usr``, the runner at ``/stitchwork``, its tool
directory at ``/tool`` and its ``/work``; reads stdin from a FIFO (so a parked interpreter blocks in a host read
until its call's request arrives); and captures stdout and stderr under the call's output cap. :func:`quiesce`
(registered with :mod:`atexit`) stops every guest of the process before the interpreter finalizes.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import itertools
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from stitchwork.errors import SandboxError
from stitchwork.isolation import _runner
from stitchwork.isolation._base import Limits
from stitchwork.isolation._wasm_runtime import Runtime, ticks

#: A parked interpreter must reach its read within this (generous: a loaded machine).
START_DEADLINE_S = 120.0
#: ``argv[0]`` names a :class:`~stitchwork.isolation.Command` may use (the interpreter is the only program).
PYTHON_NAMES = frozenset({"python", "python3", "python3.11"})
#: The runner's WASI entry point (:func:`._runner.wasi_main`), imported rather than run as a script: measured ~4x
#: faster from request to result (2-4 ms vs 10-14 ms).
RUNNER_ARGV = (
    "python", "-I", "-S", "-B", "-c",
    f"import sys; sys.path.append({str(Path(_runner.SANDBOX_PATH).parent)!r}); import _runner; "
    "sys.exit(_runner.wasi_main())",
)  # fmt: skip
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


@dataclass
class GuestOutcome:
    """How a guest ended."""

    exit_code: int | None = None  # None: still running or trapped
    trap: str | None = None  # "interrupt" (deadline), or the trap's message
    cpu_s: float = 0.0


class Instance:
    """One CPython interpreter in its own store and thread, for exactly one program."""

    _ids = itertools.count()

    def __init__(
        self,
        rt: Runtime,
        staging: Path,
        argv: tuple[str, ...],
        *,
        workdir: Path | None,
        tool_dir: Path | None = None,
        mounts: tuple[tuple[Path, str, bool], ...] = (),
        mem_mb: int,
        env: Mapping[str, str] | None = None,
        deadline_s: float = START_DEADLINE_S,
    ) -> None:
        self.rt = rt
        self.home = Path(tempfile.mkdtemp(prefix=f"inst{next(self._ids)}-", dir=staging))
        self.scratch_work = self.home / "work"
        self.tool_dir = tool_dir or self.home / "tool"
        self.scratch_work.mkdir()
        self.tool_dir.mkdir(exist_ok=True)
        self.work = workdir or self.scratch_work
        fifo = self.home / "stdin"
        os.mkfifo(fifo, 0o600)
        # Our end is a writer (so WASI's open for reading does not block) and non-blocking (see deliver).
        self.stdin_fd: int | None = os.open(fifo, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.cap = 1 << 62
        self.killed: str | None = None
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.outcome = GuestOutcome()
        self.lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._thread_id: int | None = None
        self.store: wasmtime.Store | None = wasmtime.Store(rt.engine)
        self.store.set_limits(memory_size=mem_mb * 1024 * 1024)
        self.store.set_epoch_deadline(ticks(deadline_s))
        config = wasmtime.WasiConfig()
        config.argv = list(argv)
        config.env = [[k, v] for k, v in (env or {}).items()]
        config.stdin_file = str(fifo)
        config.stdout_custom = self._on_stdout
        config.stderr_custom = self._on_stderr
        config.preopen_dir(str(rt.stdlib_root), "/usr", False)
        config.preopen_dir(str(rt.runner_dir), str(Path(_runner.SANDBOX_PATH).parent), False)
        config.preopen_dir(str(self.tool_dir), "/tool", False)
        config.preopen_dir(str(self.work), "/work", True)
        for source, target, writable in mounts:
            config.preopen_dir(str(source), target, writable)
        self.store.set_wasi(config)
        self.instance = rt.linker.instantiate(self.store, rt.module)
        self.thread = threading.Thread(target=self._main, name="stitchwork-wasm", daemon=True)
        _LIVE.add(self)
        self.thread.start()

    # -- guest thread ---------------------------------------------------------------------------------------

    def _main(self) -> None:
        self._thread_id = threading.get_ident()
        store = self.store
        assert store is not None
        started = time.thread_time()
        try:
            start = self.instance.exports(store)["_start"]
            assert isinstance(start, wasmtime.Func)
            start(store)
            self.outcome.exit_code = 0
        except wasmtime.ExitTrap as exc:
            self.outcome.exit_code = exc.code
        except wasmtime.Trap as exc:
            self.outcome.trap = "interrupt" if exc.trap_code == wasmtime.TrapCode.INTERRUPT else str(exc).strip()
        except Exception as exc:  # a host-side failure (WasmtimeError): reported like a trap
            self.outcome.trap = str(exc).strip() or type(exc).__name__
        finally:
            self.outcome.cpu_s = time.thread_time() - started
            self.instance = None  # type: ignore[assignment]
            self.store = None  # drop the store on this thread, not at interpreter shutdown
            self.ready.set()
            self.finished.set()
            self._notify()
            self._close_stdin()
            shutil.rmtree(self.home, ignore_errors=True)

    def _on_output(self, buffer: bytearray, data: bytes) -> int:
        with self.lock:
            room = self.cap - len(self.stdout) - len(self.stderr)
            overflow = len(data) > room
            if overflow:
                buffer += data[: max(room, 0)]
                if self.killed is None:
                    self.killed = "output"
                if self.store is not None:  # on the guest's own thread: stop it at the next epoch check
                    self.store.set_epoch_deadline(0)
            else:
                buffer += data
        if overflow:
            self._notify()
            return -errno.EIO
        return len(data)

    def _on_stdout(self, data: bytes) -> int:
        if not self.ready.is_set() and data.startswith(_runner.READY_MARKER):
            self.ready.set()
            data = data[len(_runner.READY_MARKER) :]
            if not data:
                return len(_runner.READY_MARKER)
        written = self._on_output(self.stdout, data)
        if _runner.RESULT_MARKER in data:
            self._notify()
        return written

    def _on_stderr(self, data: bytes) -> int:
        return self._on_output(self.stderr, data)

    # -- host side --------------------------------------------------------------------------------------------

    def _notify(self) -> None:
        with self.lock:
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future)

    def has_result(self) -> bool:
        return _runner.RESULT_MARKER in self.stdout or self.finished.is_set() or self.killed is not None

    async def wait(self) -> None:
        """Returns once the result line is out, the program ended, or output overflowed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self.lock:
            self._waiters.append((loop, future))
        if self.has_result():
            _settle(future)
        await future

    def deliver(self, data: bytes, limits: Limits, *, ticks: int | None) -> None:
        """Sets the call's output cap, and for a parked guest its memory limit and deadline; writes its stdin.

        A parked guest is blocked in a host read of stdin (it wrote :data:`~._runner.READY_MARKER` first), so
        no guest code reads the store's limits while they are changed here. A cold instance got its limits and
        deadline before its thread started (``ticks=None``).
        """
        with self.lock:
            self.stdout.clear()
            self.stderr.clear()
            self.cap = limits.max_output_bytes
            store = self.store
            if store is not None and ticks is not None:
                store.set_limits(memory_size=limits.mem_mb * 1024 * 1024)
                store.set_epoch_deadline(ticks)
        fd = self.stdin_fd
        if fd is None:
            return
        try:
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:  # the FIFO is full: wait for the guest to read, unless it is gone
                    if self.finished.wait(0.001):
                        break
        except OSError:  # the guest died meanwhile; its outcome says why
            pass
        finally:
            self._close_stdin()

    def _close_stdin(self) -> None:
        with self.lock:
            fd, self.stdin_fd = self.stdin_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def cpu_s(self) -> float:
        """CPU time of the guest thread so far."""
        if self.finished.is_set() or self._thread_id is None:
            return self.outcome.cpu_s
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(self._thread_id))
        except OSError:
            return self.outcome.cpu_s

    def discard(self) -> None:
        """Makes a parked or running guest end as soon as it can (EOF on stdin; its deadline traps it)."""
        self._close_stdin()


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


_LIVE: weakref.WeakSet[Instance] = weakref.WeakSet()


def quiesce(wait_s: float = 3.0) -> None:
    """Stops every guest of this process before the interpreter finalizes (registered with :mod:`atexit`).

    A guest that calls back into Python (its output callbacks) after finalization has begun takes its thread down
    with ``pthread_exit`` through Rust frames that cannot unwind, and the process aborts. So each live guest's
    deadline is set to now (a parked or blocked guest is not reading it; a running one reads the new value at its
    next check) and its stdin closed, and this waits for them to trap. A guest blocked in a long host call traps
    when it returns, before it can write anything.
    """
    live = [i for i in list(_LIVE) if not i.finished.is_set()]
    for instance in live:
        with instance.lock:
            store = instance.store
            if store is not None:
                with contextlib.suppress(Exception):
                    store.set_epoch_deadline(0)
        instance.discard()
    deadline = time.monotonic() + wait_s
    for instance in live:
        instance.finished.wait(max(0.0, deadline - time.monotonic()))


atexit.register(quiesce)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
