"""``inline://``: the in-process TEST DOUBLE of the isolation port. It provides NO ISOLATION whatsoever.

A :class:`~stitchwork.isolation.PythonCall` runs inside the calling process: the tool file is loaded as a fresh
module by :func:`stitchwork.isolation._runner.load_module` (the sandbox runner's own loader; a source-file spec
from :mod:`importlib.machinery`), cached per path, modification time and size (the file is re-checked at most
once a second), and the function is called with the same request shaping as the real sandboxes (the payload
and the result make a JSON round trip through the runner's encoder, so tuples become lists and unencodable
values ``repr`` strings). A
:class:`~stitchwork.isolation.Command` runs as a plain subprocess. Use it for tests, demos and the gateway
benchmark; never for untrusted code.

Where a synchronous tool function runs (URI option ``mode``):

* ``auto`` (default): in a worker thread until its function body has returned within
  :data:`CHEAP_CALL_S` three calls in a row; from then on directly in the event loop. A hand-off to a worker
  costs a thread wake-up and a loop wake-up, while direct calls reach ~15,000-20,000 calls/s, which is what the
  gateway benchmark needs. A direct call that turns out slow sends the function back to the worker threads:
  slow means more than :data:`CHEAP_CALL_S` of the loop thread's CPU time, or more than
  :data:`BLOCKING_CALL_S` of wall-clock time (a blocking wait). The wall-clock test alone would misjudge cheap
  calls on a busy interpreter, where the loop thread waits up to a GIL switch interval (5 ms) for other threads.
* ``thread``: always in a worker thread; ``timeout_s`` is enforced (the result says ``killed="timeout"`` on
  time), but Python cannot kill a thread: a timed-out call keeps running in the background until it returns,
  holding its worker (another is started for the next call). Workers are daemon threads of a small persistent
  pool (:class:`_WorkerPool`), so they never block loop shutdown or interpreter exit, and starting a thread per
  call (~1 ms, several under load) is avoided.
* ``direct``: always in the event loop; fastest, but a slow function blocks the loop. ``timeout_s`` is applied
  after the fact: a call that took longer is reported as ``killed="timeout"`` and its value dropped.

Coroutine functions always run in the event loop under :func:`asyncio.timeout` (timeouts are enforced).

Environment: ``SandboxSpec.env`` is the whole environment a program sees, and tools read it from
``os.environ``. So that the same tool code works here, the double replaces ``os.environ`` (once, on first use)
with a context-aware mapping: inside an inline call -- its task, and the worker thread it runs in -- it *is* the
call's environment (``spec.env`` plus ``PATH``/``HOME``/``LANG`` defaults, like the real sandboxes; a private
copy, so writes do not leak), everywhere else it passes straight through to the real ``os.environ``. Only
Python-level reads see it: C code and subprocesses the tool starts with the default ``env=None`` get the real
process environment. :func:`current_env` returns the same mapping explicitly. Commands get the call's
environment as their real environment.

Working directory: a process has one cwd, so Python calls run in the host process's cwd, not in
``spec.workdir``; tools meant to write relative paths in ``/work`` should be tested on a real backend.

Output: while a call runs, ``sys.stdout``/``sys.stderr`` writes from its context are captured into
``SandboxResult.stderr`` (prints go to stderr, like the runner does in a sandbox); other writers pass through.
``max_output_bytes`` caps the captured prints plus the JSON result line; beyond it the result is
``killed="output"``, ``truncated=True`` and carries no value.

Not provided: ``mounts`` (tools see the host filesystem), ``egress`` (the host network), ``mem_mb``/``cpu_s``/
``max_pids`` (a ``MemoryError`` is still reported as ``killed="memory"``), ``cpu_s``/``max_rss_kb`` reporting
for commands (``cpu_s`` of a Python call is the calling thread's CPU time).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import inspect
import io
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlsplit

from stitchwork.errors import ConfigError, SandboxError
from stitchwork.isolation import _process, _protocol, _runner
from stitchwork.isolation._base import Command, Limits, PythonCall, Sandbox, SandboxResult, SandboxSpec

#: A direct (in-loop) call must stay below this many seconds to keep running in the loop in ``auto`` mode.
CHEAP_CALL_S = 0.002
#: A direct call that waits (wall-clock) longer than this is sent back to the worker threads in ``auto`` mode.
BLOCKING_CALL_S = 0.02
_CHEAP_STREAK = 3
_MODES = ("auto", "thread", "direct")
_PIPE_GRACE_S = 2.0

_ENV: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("sw_inline_env", default=None)
_CAPTURE: contextvars.ContextVar[io.StringIO | None] = contextvars.ContextVar("sw_capture", default=None)


def current_env() -> dict[str, str]:
    """The environment of the inline call running in this context (``{}`` outside one).

    It is what ``os.environ`` shows inside the call: ``SandboxSpec.env`` plus ``PATH``/``HOME``/``LANG``
    defaults. Tools run by the real sandboxes read the same values from ``os.environ``.
    """
    env = _ENV.get()
    return dict(env) if env is not None else {}


class _ContextEnviron(MutableMapping[str, str]):
    """Stands in for ``os.environ``: the current inline call's environment inside one, the real one elsewhere."""

    def __init__(self, real: MutableMapping[str, str]) -> None:
        self._real = real

    def _target(self) -> MutableMapping[str, str]:
        env = _ENV.get()
        return env if env is not None else self._real

    def __getitem__(self, key: str) -> str:
        return self._target()[key]

    def __setitem__(self, key: str, value: str) -> None:
        self._target()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._target()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._target()))

    def __len__(self) -> int:
        return len(self._target())

    def __repr__(self) -> str:
        return f"environ({dict(self._target())!r})"

    def copy(self) -> dict[str, str]:
        """A plain dict of the visible environment (like ``os.environ.copy()``)."""
        return dict(self._target())

    def __getattr__(self, name: str) -> Any:  # _data, encodekey, ... of the real os._Environ
        return getattr(self._real, name)


def _install_context_environ() -> None:
    if not isinstance(os.environ, _ContextEnviron):
        vars(os)["environ"] = _ContextEnviron(os.environ)


class _RoutedStream(io.TextIOBase):
    """Stands in for ``sys.stdout``/``sys.stderr``: writes from a capturing context go to its buffer."""

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self.target = target

    def write(self, text: str) -> int:
        buffer = _CAPTURE.get()
        if buffer is not None:
            return buffer.write(text)
        return self.target.write(text)

    def flush(self) -> None:
        if _CAPTURE.get() is None:
            self.target.flush()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.target.fileno()

    def isatty(self) -> bool:
        return _CAPTURE.get() is None and self.target.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")


def _route_std_streams() -> None:
    # Re-checked on every call: test harnesses (pytest's capture) swap sys.stdout/sys.stderr around.
    if not isinstance(sys.stdout, _RoutedStream):
        sys.stdout = _RoutedStream(sys.stdout)
    if not isinstance(sys.stderr, _RoutedStream):
        sys.stderr = _RoutedStream(sys.stderr)


class _ToolCache:
    """Tool modules by file path, reloaded when the file's mtime or size changes.

    The file is stat'ed at most once per :data:`REVALIDATE_S` per path: a stat releases the GIL, and on a busy
    interpreter getting it back costs far more than the call it guards.
    """

    REVALIDATE_S = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._modules: dict[str, tuple[tuple[int, int], types.ModuleType]] = {}
        self._checked: dict[str, float] = {}

    def get(self, path: Path) -> types.ModuleType:
        key = str(path)
        now = time.monotonic()
        cached = self._modules.get(key)
        if cached is not None and now - self._checked.get(key, -1e9) < self.REVALIDATE_S:
            return cached[1]
        self._checked[key] = now
        stat = os.stat(key)
        version = (stat.st_mtime_ns, stat.st_size)
        cached = self._modules.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        with self._lock:
            cached = self._modules.get(key)
            if cached is not None and cached[0] == version:
                return cached[1]
            digest = hashlib.sha256(key.encode()).hexdigest()[:12]
            name = f"_stitchwork_inline_tool_{digest}_{version[0]}"
            module = _runner.load_module(key, name)
            if cached is not None:
                sys.modules.pop(cached[1].__name__, None)
            self._modules[key] = (version, module)
            return module


class _WorkerPool:
    """Daemon worker threads that run calls handed over from event loops.

    A call goes to an idle worker; when none is idle a new one is started, so a call that never returns (a
    timed-out tool keeps running: Python cannot kill a thread) only ever holds its own worker. A worker that
    stays idle for :attr:`IDLE_S` exits unless it is the last idle one. Daemon threads: they never block loop
    shutdown or interpreter exit. Handing a call to a waiting worker costs a queue put and a wake-up instead of a
    thread start (about 1 ms, more on a busy interpreter).
    """

    IDLE_S = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Callable[[], Callable[[], None]]] = queue.SimpleQueue()
        self._idle = 0  # idle workers not yet claimed by a submitted job
        self._started = 0

    def submit(self, job: Callable[[], Callable[[], None]]) -> None:
        """Runs ``job`` in a worker thread, then what it returns once the worker counts as idle again.

        Neither may raise. Handing the result over only after the worker is idle lets the caller's next call
        reuse this worker rather than start another.
        """
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                spawn = False
            else:
                spawn = True
                self._started += 1
                name = f"stitchwork-inline-call-{self._started}"
        self._jobs.put(job)
        if spawn:
            threading.Thread(target=self._work, name=name, daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    # Exit only while another idle worker remains unclaimed; else a job is (about to be) queued
                    # for this one, or it is the last idle worker and stays.
                    if self._idle > 1:
                        self._idle -= 1
                        return
                continue
            deliver = job()
            with self._lock:
                self._idle += 1
            deliver()

    def after_fork(self) -> None:
        """In a forked child: the parent's workers are not there (only the forking thread survives ``fork``), so
        none is idle; without this, a call would wait for a worker counted idle that does not exist."""
        self._lock = threading.Lock()
        self._jobs = queue.SimpleQueue()
        self._idle = 0


_POOL = _WorkerPool()
os.register_at_fork(after_in_child=_POOL.after_fork)


def _in_worker_thread(function: Callable[[], Any]) -> asyncio.Future[tuple[Any, BaseException | None]]:
    """Runs ``function`` (in a copy of the current context) in a worker thread of the shared pool.

    The future's result is ``(value, None)`` or ``(None, exception)``: exceptions travel as values because a
    future cannot carry every exception (``StopIteration``). Not the loop's default executor: a timed-out call
    that never returns would keep an executor thread busy and make loop shutdown and interpreter exit wait; the
    pool's daemon workers do neither, and a worker held by such a call is replaced by a new one.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[tuple[Any, BaseException | None]] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: tuple[Any, BaseException | None]) -> None:
        if not future.done():  # else: timed out or cancelled meanwhile
            future.set_result(outcome)

    def target() -> Callable[[], None]:
        outcome: tuple[Any, BaseException | None]
        try:
            outcome = (context.run(function), None)
        except BaseException as exc:  # handed to the awaiting task, which decides
            outcome = (None, exc)

        def deliver() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, outcome)

        return deliver

    _POOL.submit(target)
    return future


def _parse_mode(uri: str, options: Mapping[str, Any]) -> str:
    query = dict(parse_qsl(urlsplit(uri).query))
    unknown = (set(query) | set(options)) - {"mode"}
    if unknown:
        raise ConfigError(f"inline sandbox: unknown option(s) {sorted(unknown)} in {uri!r}; known: mode")
    mode = str(options.get("mode", query.get("mode", "auto")))
    if mode not in _MODES:
        raise ConfigError(f"inline sandbox: mode must be one of {', '.join(_MODES)}, not {mode!r}")
    return mode


def _call_env(spec: SandboxSpec, home: str) -> dict[str, str]:
    """The environment a program sees: ``spec.env`` over ``PATH``, ``HOME`` and ``LANG`` defaults."""
    return _process.program_env(spec.env, home=home, check=False)


def _capped(stderr: bytes, stdout: bytes, cap: int) -> tuple[bytes, bytes, bool]:
    """Keeps the first ``cap`` bytes of stderr-then-stdout; returns (stderr, stdout, truncated)."""
    if len(stderr) + len(stdout) <= cap:
        return stderr, stdout, False
    kept_err = stderr[:cap]
    return kept_err, stdout[: cap - len(kept_err)], True


async def _exit_code(proc: asyncio.subprocess.Process, wait_s: float, kill: Callable[[str], None]) -> int:
    """The process's exit code, never waiting forever on asyncio's child watcher: past ``wait_s`` the process is
    killed and reaped here (a watcher whose exit notice never reaches this loop left a call hanging for good)."""
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(asyncio.shield(proc.wait()), wait_s)
    kill("timeout")
    for _ in range(200):
        if proc.returncode is not None:
            return proc.returncode
        try:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by the watcher after all
            await asyncio.sleep(0.05)
            if proc.returncode is not None:
                return proc.returncode
            return -signal.SIGKILL
        if pid:
            return os.waitstatus_to_exitcode(status)
        await asyncio.sleep(0.05)
    return -signal.SIGKILL


class InlineSandbox(Sandbox):
    """In-process test double (``inline://?mode=auto|thread|direct``): no isolation; see the module docs.

    Args:
        uri: ``inline://`` with an optional ``mode`` query option.
        **options: ``mode=...`` (overrides the URI).

    Opened by URI (:func:`~stitchwork.isolation.open_sandbox`), it is refused unless the operator allows it
    (``[isolation] allow_inline = true``); constructing it directly is the explicit choice of a test.
    """

    isolated = False

    def __init__(self, uri: str = "inline://", **options: Any) -> None:
        self.uri = uri
        self.mode = _parse_mode(uri, options)
        self._tools = _ToolCache()
        self._cheap_streak: dict[tuple[str, str], int] = {}

    async def run(self, spec: SandboxSpec) -> SandboxResult:
        """Runs ``spec.program`` in this process (PythonCall) or as a plain subprocess (Command)."""
        if isinstance(spec.program, PythonCall):
            return await self._run_python(spec.program, spec)
        return await self._run_command(spec.program, spec)

    # -- Python calls ---------------------------------------------------------------------------------------

    async def _run_python(self, call: PythonCall, spec: SandboxSpec) -> SandboxResult:
        payload = _protocol.json_payload(call)
        limits = spec.limits
        _route_std_streams()
        _install_context_environ()
        capture = io.StringIO()
        home = str(spec.workdir) if spec.workdir is not None else tempfile.gettempdir()
        env_token = _ENV.set(_call_env(spec, home))
        capture_token = _CAPTURE.set(capture)
        start = time.perf_counter()
        cpu = [0.0]
        killed: str | None = None
        line = b""
        try:
            line, killed = await self._invoke(call, payload, limits, cpu)
        finally:
            _CAPTURE.reset(capture_token)
            _ENV.reset(env_token)
        duration = time.perf_counter() - start
        stderr = capture.getvalue().encode("utf-8", "replace")
        return self._python_result(line, stderr, killed, limits, duration, cpu[0])

    async def _invoke(
        self, call: PythonCall, payload: Any, limits: Limits, cpu: list[float]
    ) -> tuple[bytes, str | None]:
        """Calls the tool; returns (result line, killed)."""
        key = (str(call.file), call.function)

        def invoke() -> Any:
            started, wall = time.thread_time(), time.perf_counter()
            try:
                return function(**_runner.call_args(payload))
            finally:
                spent[0] = time.thread_time() - started
                cpu[0] += spent[0]
                took[0] = time.perf_counter() - wall

        took = [0.0]
        spent = [0.0]
        cheap = False
        deadline = asyncio.timeout(limits.timeout_s)
        try:
            function = _runner.resolve_function(self._tools.get(call.file), call.function)
            is_async = inspect.iscoroutinefunction(function)
            if not is_async and self._runs_direct(key):
                # No await, so no asyncio deadline (arming one costs more than a cheap call): it is checked after.
                value = invoke()
                if took[0] > limits.timeout_s:
                    self._cheap_streak[key] = 0
                    return b"", "timeout"
                cheap = spent[0] <= CHEAP_CALL_S and took[0] <= BLOCKING_CALL_S
                if isinstance(value, types.CoroutineType):
                    async with deadline:
                        value = await value
            else:
                async with deadline:
                    if is_async:
                        value = await invoke()
                    else:
                        value, raised = await _in_worker_thread(invoke)
                        cheap = took[0] < CHEAP_CALL_S
                        if raised is not None:
                            raise raised
                    if isinstance(value, types.CoroutineType):
                        value = await value
            if not is_async:
                self._cheap_streak[key] = self._cheap_streak.get(key, 0) + 1 if cheap else 0
        except TimeoutError as exc:
            if not deadline.expired():  # the tool's own TimeoutError
                return _runner.encode_error(exc), None
            self._cheap_streak[key] = 0
            return b"", "timeout"
        except (Exception, SystemExit) as exc:  # like the runner; cancellation and Ctrl-C propagate
            return _runner.encode_error(exc), None
        return _runner.encode_ok(value), None

    def _runs_direct(self, key: tuple[str, str]) -> bool:
        if self.mode == "direct":
            return True
        if self.mode == "thread":
            return False
        return self._cheap_streak.get(key, 0) >= _CHEAP_STREAK

    @staticmethod
    def _python_result(
        line: bytes, stderr: bytes, killed: str | None, limits: Limits, duration: float, cpu: float
    ) -> SandboxResult:
        if killed == "timeout":
            return SandboxResult(
                exit_code=-signal.SIGKILL,
                stderr=stderr[: limits.max_output_bytes],
                error=f"timed out after {limits.timeout_s:g} s",
                killed="timeout",
                duration_s=duration,
                cpu_s=cpu,
            )
        kept_err, kept_out, truncated = _capped(stderr, line, limits.max_output_bytes)
        if truncated:
            return SandboxResult(
                exit_code=-signal.SIGKILL,
                stdout=kept_out,
                stderr=kept_err,
                error=f"output exceeded {limits.max_output_bytes} bytes",
                killed="output",
                truncated=True,
                duration_s=duration,
                cpu_s=cpu,
            )
        answer = _protocol.parse_answer(line)
        if answer is None:  # the runner's own encoder wrote the line: cannot happen
            raise SandboxError(f"inline://: not a result line: {line[:200]!r}")
        return SandboxResult(
            exit_code=0,
            stdout=line,
            stderr=stderr,
            value=answer.value,
            error=answer.error,
            killed="memory" if _protocol.is_memory_error(answer.error) else None,
            duration_s=duration,
            cpu_s=cpu,
        )

    # -- Commands -------------------------------------------------------------------------------------------

    async def _run_command(self, command: Command, spec: SandboxSpec) -> SandboxResult:
        if not command.argv:
            raise SandboxError("command has an empty argv")
        if spec.workdir is not None:
            return await self._supervise(command, spec, str(spec.workdir))
        scratch = tempfile.mkdtemp(prefix="stitchwork-inline-")
        try:
            return await self._supervise(command, spec, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def _supervise(self, command: Command, spec: SandboxSpec, cwd: str) -> SandboxResult:
        limits = spec.limits
        start = time.perf_counter()
        try:
            proc = await asyncio.create_subprocess_exec(
                *command.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=_call_env(spec, cwd),
                start_new_session=True,
            )
        except OSError as exc:
            raise SandboxError(f"cannot start {command.argv[0]!r}: {exc}") from exc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        budget = [limits.max_output_bytes]
        killed: list[str] = []
        out: list[bytes] = []
        err: list[bytes] = []

        def kill(reason: str) -> None:
            if not killed:
                killed.append(reason)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        async def feed(stream: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                if command.stdin:
                    stream.write(command.stdin)
                    await stream.drain()
                stream.close()

        async def drain(stream: asyncio.StreamReader, chunks: list[bytes]) -> None:
            while chunk := await stream.read(65536):
                if len(chunk) > budget[0]:
                    chunks.append(chunk[: budget[0]])
                    budget[0] = 0
                    kill("output")
                    return
                budget[0] -= len(chunk)
                chunks.append(chunk)

        timer = asyncio.get_running_loop().call_later(limits.timeout_s, kill, "timeout")
        io_done = asyncio.gather(feed(proc.stdin), drain(proc.stdout, out), drain(proc.stderr, err))
        try:
            # The grace period covers a grandchild that left the process group and keeps a pipe open.
            await asyncio.wait_for(io_done, limits.timeout_s + _PIPE_GRACE_S)
        except TimeoutError:
            kill("timeout")
        finally:
            timer.cancel()
            if proc.returncode is None and not killed and io_done.cancelled():
                kill("cancelled")
        try:
            # Already killed (output cap, timeout): its exit is due at once; else it may run out its time.
            code = await _exit_code(proc, _PIPE_GRACE_S if killed else limits.timeout_s + _PIPE_GRACE_S, kill)
        except asyncio.CancelledError:
            kill("cancelled")
            raise
        reason = killed[0] if killed else None
        return SandboxResult(
            exit_code=code,
            stdout=b"".join(out),
            stderr=b"".join(err),
            killed=reason,
            truncated=reason == "output",
            duration_s=time.perf_counter() - start,
        )
