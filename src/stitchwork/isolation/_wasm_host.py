"""A ``wasm://`` interpreter host: one process running one CPython-on-wasmtime guest, for exactly one program.

Started by :mod:`stitchwork.isolation.wasm` as ``python -B -m stitchwork.isolation._wasm_host FD`` (``FD``: a sealed
memory file holding the plan, as for the process guard: :func:`._guard.read_plan`). Running each guest in a process
of its own is what makes its limits real: the host descriptors it opens are this process's (``RLIMIT_NOFILE`` caps
them; the caller's process holds none), its memory and CPU are this process's cgroup's, its scratch space is this
process's tmpfs, and a guest that is killed takes nothing down with it but this process (no Rust panic can cross into
the caller).

In order, before any guest code runs:

1. bind to the parent (a pidfd; a watcher thread ends this process the moment the parent ends) and join the
   sandbox's cgroups;
2. ``RLIMIT_NOFILE`` = ``nofile``; a private mount namespace with one size-limited tmpfs (the disk quota) holding
   the guest's ``/work`` and ``/tool``;
3. load the compiled module, make a store with the memory limit, an epoch deadline (the host stops the guest by
   advancing the epoch) and WASI: the guest's stdin, stdout and stderr are this process's (pipes to the caller,
   which caps and reads them), preopens ``/usr`` (the standard library, read-only), ``/stitchwork`` (the runner),
   ``/tool``, ``/work`` and the plan's mounts;
4. start the guest in a thread. A Python call's runner prints its ready marker and blocks reading its request.

Then the host waits for its call on the control descriptor: ``{"tool": {"name", "source"}, "workdir", "mem_mb"}``
(one JSON line; the tool file written, the work directory copied into ``/work``, the memory limit and disk quota
set), answers ``{"ready": True}`` on the status descriptor (frames: :func:`._guard.write_frame`), and waits for the
guest to end, or for ``SIGTERM`` (the caller's deadline: the guest is stopped at its next instruction, or abandoned
if it is blocked in a host call). Finally it writes the work directory back (:func:`._stage.commit`), reports one
status frame::

    {"code": 0, "trap": None, "disk": {...}, "commit": {...}, "error": None}

and leaves with ``os._exit`` (no interpreter finalization that a guest thread could call into).
"""

from __future__ import annotations

import base64
import json
import os
import resource
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from stitchwork.isolation import _stage
from stitchwork.isolation._guard import read_plan, write_frame
from stitchwork.isolation._runner import SANDBOX_PATH

#: Exit code when the parent went away, or the host could not set up (the status line says why).
ORPHANED, SETUP_FAILED = 137, 125
#: How long a stopped guest may take to reach its next instruction before it is abandoned.
STOP_GRACE_S = 0.2


def _bind_to_parent(expected: int) -> int:
    """A pidfd of the parent, which must be ``expected``; ends this process when it is already gone."""
    if os.getppid() != expected:
        os._exit(ORPHANED)
    try:
        pidfd = os.pidfd_open(expected)
    except ProcessLookupError:
        os._exit(ORPHANED)
    if os.getppid() != expected or _ready(pidfd, 0):
        os._exit(ORPHANED)
    return pidfd


def _ready(fd: int, timeout_ms: int | None) -> bool:
    """Whether ``fd`` is readable (a pidfd: its process ended) within ``timeout_ms`` (``None``: wait); ``poll``
    works for any descriptor number, ``select`` only below 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout_ms))


def _watch_parent(pidfd: int) -> None:
    """Ends this process the moment the parent ends."""

    def watch() -> None:
        _ready(pidfd, None)
        os._exit(ORPHANED)

    threading.Thread(target=watch, name="stitchwork-wasm-parent", daemon=True).start()


def _read_line(fd: int) -> bytes:
    """One line from ``fd`` (blocking; empty at EOF)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            return b""
        data += chunk
    return data


class Guest:
    """The guest interpreter and its thread."""

    def __init__(self, plan: dict[str, Any], stage: str, wake: threading.Event) -> None:
        import wasmtime

        from stitchwork.isolation._wasm_runtime import runtime

        self.wasmtime = wasmtime
        cache = plan.get("cache")
        rt = runtime(Path(cache) if cache else None)
        self.engine = rt.engine
        self.store = wasmtime.Store(rt.engine)
        self.store.set_limits(memory_size=int(plan["mem_mb"]) * 1024 * 1024)
        self.store.set_epoch_deadline(1)  # the host advances the epoch once to stop the guest
        config = wasmtime.WasiConfig()
        config.argv = list(plan["argv"])
        config.env = [[str(k), str(v)] for k, v in plan.get("env", {}).items()]
        config.inherit_stdin()
        config.inherit_stdout()
        config.inherit_stderr()
        config.preopen_dir(str(rt.stdlib_root), "/usr", False)
        config.preopen_dir(str(rt.runner_dir), str(Path(SANDBOX_PATH).parent), False)
        config.preopen_dir(os.path.join(stage, "tool"), "/tool", False)
        config.preopen_dir(os.path.join(stage, "work"), "/work", True)
        for source, target, writable in plan.get("mounts", ()):
            config.preopen_dir(str(source), str(target), bool(writable))
        self.store.set_wasi(config)
        self.instance = rt.linker.instantiate(self.store, rt.module)
        self.done = threading.Event()
        self.wake = wake
        self.cpu_at_end = 0.0
        self.code: int | None = None
        self.trap: str | None = None
        self.thread = threading.Thread(target=self._main, name="stitchwork-wasm-guest", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        wasmtime = self.wasmtime
        started = time.thread_time()
        try:
            start = self.instance.exports(self.store)["_start"]
            assert isinstance(start, wasmtime.Func)
            start(self.store)
            self.code = 0
        except wasmtime.ExitTrap as exc:
            self.code = exc.code
        except wasmtime.Trap as exc:
            self.trap = "interrupt" if exc.trap_code == wasmtime.TrapCode.INTERRUPT else str(exc).strip()
        except Exception as exc:  # a host-side failure (WasmtimeError): reported like a trap
            self.trap = str(exc).strip() or type(exc).__name__
        finally:
            self.cpu_at_end = time.thread_time() - started
            self.done.set()
            self.wake.set()

    def stop(self) -> None:
        """Traps the guest at its next instruction (a guest blocked in a host call traps when it returns)."""
        self.engine.increment_epoch()

    def cpu_s(self) -> float:
        """CPU time of the guest thread so far."""
        ident = self.thread.ident
        if ident is None or self.done.is_set():
            return self.cpu_at_end
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(ident))
        except OSError:
            return self.cpu_at_end


def main() -> int:
    """Runs the plan read from the descriptor named by ``argv[1]``."""
    plan = read_plan(int(sys.argv[1]))
    status_fd, ctl_fd = int(plan["status_fd"]), int(plan["ctl_fd"])
    parent = _bind_to_parent(int(plan["ppid"]))
    stopping, wake = threading.Event(), threading.Event()

    def on_term(*_: object) -> None:
        stopping.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_term)
    stage = str(plan["stage"]["root"])
    try:
        for procs in plan.get("cgroups", ()):
            with open(procs, "w") as cgroup:
                cgroup.write("0\n")
        nofile = int(plan["nofile"])
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        _stage.private_mounts()  # while single-threaded (a user namespace requires it)
        _watch_parent(parent)
        _stage.mount_tmpfs(stage, int(plan["stage"]["size"]), mode=0o700)
        for name in ("work", "tool"):
            os.mkdir(os.path.join(stage, name), 0o755)
        guest = Guest(plan, stage, wake)
    except Exception as exc:  # the plan, the cgroup, the mounts or the runtime: nothing has run yet
        write_frame(status_fd, {"code": SETUP_FAILED, "error": f"{type(exc).__name__}: {exc}"})
        os._exit(SETUP_FAILED)
    line = _read_line(ctl_fd)
    if not line:  # discarded before its call
        os._exit(0)
    workdir: str | None = None
    cpu_budget = 0.0
    try:
        call = json.loads(line)
        tool = call.get("tool")
        if tool:
            target = os.path.join(stage, "tool", os.path.basename(str(tool["name"])))
            with open(target, "xb") as handle:
                handle.write(base64.b64decode(tool["source"]))
            os.chmod(target, 0o444)
        if call.get("disk_bytes"):  # the call's own quota (a parked host's tmpfs was sized for the pool)
            _stage.resize_tmpfs(stage, int(call["disk_bytes"]))
        workdir = call.get("workdir")
        if workdir:
            _stage.copy_in(workdir, os.path.join(stage, "work"), uid=os.getuid(), gid=os.getgid())
        if call.get("mem_mb"):
            guest.store.set_limits(memory_size=int(call["mem_mb"]) * 1024 * 1024)  # parked: not running
        cpu_budget = float(call.get("cpu_s") or 0.0)
    except (ValueError, KeyError, OSError, _stage.StageError) as exc:
        write_frame(status_fd, {"code": SETUP_FAILED, "error": f"{type(exc).__name__}: {exc}"})
        os._exit(SETUP_FAILED)
    write_frame(status_fd, {"ready": True})
    killed = None
    base = guest.cpu_s()
    while not guest.done.is_set():
        wake.wait(0.01 if cpu_budget else None)  # SIGTERM and the guest's end wake it; a CPU budget polls
        wake.clear()
        if guest.done.is_set():
            break
        if cpu_budget and guest.cpu_s() - base >= cpu_budget:  # where no cgroup counts CPU for the caller
            killed = "cpu"
        elif stopping.is_set():
            killed = "stopped"
        if killed:
            guest.stop()
            guest.done.wait(STOP_GRACE_S)
            break
    status: dict[str, Any] = {
        "code": guest.code,
        "trap": guest.trap,
        "stopped": killed,
        "cpu_s": guest.cpu_s() - base,
        "error": None,
    }
    try:
        memory = guest.instance.exports(guest.store)["memory"]
        if isinstance(memory, guest.wasmtime.Memory):
            status["memory_bytes"] = int(memory.data_len(guest.store))
    except Exception:
        pass
    size, used = _stage.usage(stage)
    status["disk"] = {"size": size, "used": used, "full": _stage.full(stage)}
    if workdir:
        try:
            status["commit"] = {workdir: _stage.commit(os.path.join(stage, "work"), workdir).to_json()}
        except (_stage.StageError, OSError, RecursionError) as exc:
            status["error"] = f"write-back failed: {exc}"
    write_frame(status_fd, status)
    time.sleep(0)  # let the report leave before the process does
    os._exit(guest.code if guest.code is not None and 0 <= guest.code < 256 else 1)


if __name__ == "__main__":
    main()
