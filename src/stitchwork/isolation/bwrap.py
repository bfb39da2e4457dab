"""``bwrap://``: bubblewrap namespaces + a seccomp filter + rlimits (+ a pids cgroup where the host has one).

URI options (query string, or keyword arguments of :func:`~stitchwork.isolation.open_sandbox`)::

    bwrap://?python=/usr/bin/python3&tmp_mb=64&fsize_mb=64&nofile=256&bwrap=/usr/bin/bwrap

``python`` runs :class:`~stitchwork.isolation.PythonCall` tools (default: the real path behind
:data:`sys.executable`). When it lives outside ``/usr`` only its installation prefix is bound, read-only and at
the same path, with ``site-packages`` hidden: tools get the standard library (the runner uses ``-I -S -B``).

What a program sees (everything else of the host is absent, not merely unreadable):

* read-only: ``/usr`` (plus the ``/bin``, ``/sbin``, ``/lib*`` links), six ``/etc`` entries the loader and libc
  need (``ld.so.cache``, ``ld.so.conf[.d]``, ``localtime``, ``alternatives``, ``nsswitch.conf``), a generated
  ``/etc/passwd`` and ``/etc/group``, the interpreter prefix, the runner at ``/stitchwork/_runner.py``, the
  tool file at ``/tool/<name>`` and ``spec.mounts`` (unless ``writable``); the root is remounted read-only;
* writable: ``/work`` (``spec.workdir``, else a size-limited tmpfs; the cwd) and size-limited tmpfs at
  ``/tmp`` and ``/dev/shm`` (``/dev`` itself is read-only; its device nodes work);
* its own ``/proc`` and a minimal ``/dev``; new user, mount, pid, network (loopback only), ipc, uts (hostname
  ``sandbox``) and cgroup namespaces; no capabilities; a new session (no ``TIOCSTI`` into the host terminal);
  it dies with the process that started it. The program is pid 1 of its namespace (``--as-pid-1``): when it
  exits, everything it started dies with it.

Environment: exactly ``spec.env`` over ``PATH``, ``HOME=/work`` and ``LANG=C.UTF-8`` defaults (plus ``PWD``,
which bwrap sets). It is bwrap's own process environment (bwrap passes it on), not ``--setenv`` arguments, so
secrets never appear in a command line (``/proc/<pid>/cmdline`` is world-readable; ``environ`` is not).

Seccomp (pyseccomp; compiled once per process; loaded by bwrap with ``--seccomp``): default allow; ``EPERM``
for ``socket()`` of every family but ``AF_UNIX``, for namespace, mount, module, kexec, bpf, perf, keyring,
ptrace/``process_vm_*``, io_uring, clock, swap, reboot and file-handle syscalls (see ``_DENIED_SYSCALLS``), for
``clone`` with namespace flags, for ``personality`` changes and the ``TIOCSTI`` ioctl; ``ENOSYS`` for ``clone3``
(its flags cannot be inspected, libc falls back to ``clone``). Other architectures' syscalls kill the process.

Limits: ``mem_mb`` → ``RLIMIT_AS``; ``cpu_s`` → ``RLIMIT_CPU`` rounded up to whole seconds, soft = hard, so
the kernel SIGKILLs at the limit; ``max_pids`` → ``RLIMIT_NPROC``; plus ``RLIMIT_FSIZE`` (``fsize_mb``),
``RLIMIT_NOFILE`` (``nofile``) and ``RLIMIT_CORE=0``. util-linux ``prlimit`` sets them inside the sandbox just
before the program, so bwrap is not limited and no ``preexec_fn`` runs in this (threaded) process. The kernel
does not apply ``RLIMIT_NPROC`` to processes whose real uid is host root, which is what the sandbox runs as
when this process is root (its user namespace maps to root). ``max_pids`` is then enforced by a ``pids``
cgroup per sandbox (a delegated v2 subtree or the v1 hierarchy, whichever is writable), which bwrap joins
before it starts through a one-line ``/bin/sh`` wrapper; ``pids.max`` is ``max_pids + 1`` for bwrap's monitor
process, and threads count. :meth:`BwrapSandbox.features` tells which mechanism is active. ``timeout_s`` is
wall-clock: the bwrap process group is SIGKILLed, which takes the whole pid namespace with it. Output past
``max_output_bytes`` (stdout and stderr together) is dropped and the sandbox killed.

``killed``: ``"timeout"``/``"output"`` when this class killed the sandbox; ``"memory"`` for a Python
``MemoryError`` (or a failed program whose stderr ends with an out-of-memory message such as ``Cannot allocate
memory``); ``"pids"`` when the program failed after the cgroup refused a fork; ``"cpu"`` for death by
``SIGXCPU``, or by ``SIGKILL`` with the CPU limit used up; ``"signal"`` for other deaths by a fatal signal.
Like a shell, bwrap reports a signal death as exit code ``128 + signal``; so does ``exit_code``.

``duration_s`` is wall-clock. ``cpu_s`` and ``max_rss_kb`` of a Python call are measured by the runner itself;
otherwise they come from ``wait4()`` on the bwrap monitor, which reaps the program: ``cpu_s`` is then exact
for programs that exit, but misses the program's share when the sandbox is killed; ``max_rss_kb`` is reported
as 0 when it does not exceed this process's own peak RSS (``exec`` folds the spawning process's peak into the
child's figure, so a smaller value cannot be told apart from it).

Landlock is not applied: the mount namespace already hides every path that is not bound, and every bind but
``/work``, ``/tmp``, ``/dev/shm`` and writable mounts is read-only, so it would add defence in depth only.
:meth:`BwrapSandbox.features` reports the kernel's Landlock ABI for when it is added.

``spec.egress`` is not supported yet: a non-empty allowlist raises :class:`SandboxError` (so nothing silently
gets network); an egress proxy comes with a later issue.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import errno
import functools
import glob
import itertools
import json
import logging
import math
import os
import posixpath
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from stitchwork.errors import BackendUnavailable, ConfigError, SandboxError
from stitchwork.isolation import _runner
from stitchwork.isolation._base import Command, Limits, PythonCall, Sandbox, SandboxResult, SandboxSpec

log = logging.getLogger(__name__)

_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_RUNNER_HOST_PATH = str(Path(_runner.__file__).resolve())
#: ``/etc`` entries bound read-only when they exist: the dynamic loader's cache and config, time zone,
#: Debian's alternatives symlinks and the NSS switch. No passwd/shadow/hosts/resolv.conf of the host.
_ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/alternatives",
    "/etc/nsswitch.conf",
)
_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_RESERVED_TARGETS = ("/proc", "/dev", "/stitchwork", "/tool")
_BWRAP_OVERHEAD_PIDS = 1  # the bwrap monitor process (the program itself is pid 1: --as-pid-1)
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

# Syscalls that fail with EPERM inside the sandbox. Names unknown on this architecture are skipped.
_DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "open_by_handle_at", "name_to_handle_at",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "create_module",
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init", "lookup_dcookie",
    "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "reboot", "swapon", "swapoff", "acct", "syslog", "quotactl", "vhangup",
    "clock_settime", "clock_adjtime", "settimeofday", "adjtimex", "stime",
    "sethostname", "setdomainname", "iopl", "ioperm", "uselib", "nfsservctl", "vm86", "vm86old",
)  # fmt: skip
_CLONE_NAMESPACE_FLAGS = (
    0x00000080,  # CLONE_NEWTIME
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
_TIOCSTI = 0x5412
_PERSONALITY_QUERY = 0xFFFFFFFF


# -- host facts (computed once per process) ---------------------------------------------------------------


@functools.cache
def _seccomp_bpf() -> bytes:
    """The compiled seccomp filter (classic BPF) for ``bwrap --seccomp``."""
    import pyseccomp as sc

    filt = sc.SyscallFilter(sc.ALLOW)
    for name in _DENIED_SYSCALLS:
        with contextlib.suppress(OSError):  # EINVAL: no such syscall on this architecture
            filt.add_rule(sc.ERRNO(errno.EPERM), name)
    filt.add_rule(sc.ERRNO(errno.EPERM), "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
    filt.add_rule(sc.ERRNO(errno.EPERM), "personality", sc.Arg(0, sc.NE, _PERSONALITY_QUERY))
    filt.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, _TIOCSTI))
    for flag in _CLONE_NAMESPACE_FLAGS:
        filt.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    with contextlib.suppress(OSError):
        filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        filt.export_bpf(out)
        out.seek(0)
        return out.read()


def _landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: not available)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        landlock_create_ruleset = 444  # same number on every architecture that has it
        version = libc.syscall(landlock_create_ruleset, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except (OSError, AttributeError):
        return 0
    return max(int(version), 0)


@dataclass(frozen=True)
class _PidsCgroup:
    """A writable ``pids`` cgroup directory under which each sandbox gets its own child cgroup."""

    base: Path
    version: int
    _counter: itertools.count[int] = field(default_factory=itertools.count, compare=False)

    def create(self, max_pids: int) -> Path:
        path = self.base / f"sbx-{next(self._counter)}"
        path.mkdir()
        (path / "pids.max").write_text(f"{max_pids}\n")
        return path

    @staticmethod
    def refused_forks(path: Path) -> int:
        """How often the cgroup refused a fork (``max`` in ``pids.events``)."""
        try:
            text = (path / "pids.events").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "max":
                return int(value)
        return 0

    @staticmethod
    def remove(path: Path) -> bool:
        """Kills what is left in the cgroup and removes it; False while tasks are still exiting."""
        with contextlib.suppress(OSError):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


def _own_cgroup_paths() -> dict[str, str]:
    """``controller → path`` from ``/proc/self/cgroup`` (``""`` is the v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def _try_cgroup_dir(base: Path, version: int) -> _PidsCgroup | None:
    probe = base / f"probe-{os.getpid()}"
    try:
        base.mkdir(exist_ok=True)
        if version == 2:
            controllers = (base / "cgroup.subtree_control").read_text().split()
            if "pids" not in controllers:
                (base / "cgroup.subtree_control").write_text("+pids\n")
        probe.mkdir()
        (probe / "pids.max").write_text("1\n")
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return _PidsCgroup(base, version)


@functools.cache
def _pids_cgroup() -> _PidsCgroup | None:
    """The first writable pids cgroup hierarchy for this process, or None."""
    own = _own_cgroup_paths()
    name = f"stitchwork-{os.getpid()}"
    candidates: list[tuple[Path, int]] = []
    if "" in own:  # v2: a child of our own cgroup (works when the cgroup is delegated to us, or is the root)
        for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
            if (mount / "cgroup.controllers").exists() and "pids" in (mount / "cgroup.controllers").read_text():
                candidates.append((mount / own[""].lstrip("/") / name, 2))
    if "pids" in own:
        candidates.append((Path("/sys/fs/cgroup/pids") / own["pids"].lstrip("/") / name, 1))
    for base, version in candidates:
        _sweep_stale_cgroups(base.parent)
        found = _try_cgroup_dir(base, version)
        if found is not None:
            atexit.register(_remove_cgroup_tree, base)
            return found
    return None


def _remove_cgroup_tree(base: Path) -> None:
    """Removes a process's ``stitchwork-<pid>`` cgroup and what is left under it."""
    with contextlib.suppress(OSError):
        for child in base.iterdir():
            if child.is_dir():
                _PidsCgroup.remove(child)
    with contextlib.suppress(OSError):
        base.rmdir()


def _sweep_stale_cgroups(parent: Path) -> None:
    """Removes ``stitchwork-<pid>`` cgroups of processes that are gone (killed before their atexit ran)."""
    with contextlib.suppress(OSError):
        for stale in parent.glob("stitchwork-*"):
            try:
                os.kill(int(stale.name.removeprefix("stitchwork-")), 0)
            except ValueError:
                continue
            except ProcessLookupError:
                _remove_cgroup_tree(stale)
            except PermissionError:  # alive, someone else's
                continue


@functools.cache
def _check_bwrap(bwrap: str) -> tuple[bool, str]:
    try:
        probe = subprocess.run(
            [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"],
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"bwrap at {bwrap} cannot run: {exc}"
    if probe.returncode != 0:
        text = probe.stderr.decode(errors="replace").strip()
        if "namespace" in text.lower() or "permission" in text.lower():
            return False, f"user namespaces disabled or not permitted here ({text})"
        return False, f"bwrap does not work on this host: {text or f'exit code {probe.returncode}'}"
    return True, ""


@functools.cache
def _generated_etc() -> Path:
    """A private directory with a minimal ``passwd`` and ``group`` for the sandbox (created once)."""
    directory = Path(tempfile.mkdtemp(prefix="stitchwork-bwrap-etc-"))
    atexit.register(shutil.rmtree, directory, True)
    (directory / "passwd").write_text(
        "root:x:0:0:sandbox:/work:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    (directory / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for entry in directory.iterdir():
        entry.chmod(0o444)
    return directory


# -- options ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BwrapOptions:
    """Settings of one :class:`BwrapSandbox` (from the URI query string and keyword options)."""

    python: str
    bwrap: str
    tmp_mb: int = 64
    fsize_mb: int = 64
    nofile: int = 256

    @classmethod
    def parse(cls, uri: str, options: Mapping[str, Any]) -> BwrapOptions:
        """Reads ``bwrap://?python=...&bwrap=...&tmp_mb=...&fsize_mb=...&nofile=...``.

        Raises:
            ConfigError: Unknown option or a value of the wrong type.
        """
        values: dict[str, Any] = {**dict(parse_qsl(urlsplit(uri).query)), **options}
        known = {"python", "bwrap", "tmp_mb", "fsize_mb", "nofile"}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"bwrap sandbox: unknown option(s) {sorted(unknown)} in {uri!r}; known: {sorted(known)}")
        python = os.path.realpath(str(values.get("python") or sys.executable))
        bwrap = str(values.get("bwrap") or shutil.which("bwrap") or "/usr/bin/bwrap")
        numbers: dict[str, int] = {}
        for key in ("tmp_mb", "fsize_mb", "nofile"):
            if key in values:
                try:
                    numbers[key] = int(values[key])
                except ValueError as exc:
                    raise ConfigError(f"bwrap sandbox: {key} must be an integer, not {values[key]!r}") from exc
                if numbers[key] <= 0:
                    raise ConfigError(f"bwrap sandbox: {key} must be positive")
        return cls(python=python, bwrap=bwrap, **numbers)


def _python_prefix(python: str) -> str | None:
    """The installation prefix to bind for ``python`` (None when it is under ``/usr``)."""
    if python.startswith("/usr/"):
        return None
    if python == os.path.realpath(sys.executable) and not sys.base_prefix.startswith("/usr"):
        return sys.base_prefix
    prefix = os.path.dirname(os.path.dirname(python))
    if prefix in ("/", ""):
        raise ConfigError(f"bwrap sandbox: cannot tell the installation prefix of {python}")
    return prefix


# -- the sandbox ------------------------------------------------------------------------------------------


@dataclass
class _Exit:
    status: int
    rusage: resource.struct_rusage | None


@dataclass
class _Outcome:
    stdout: bytes
    stderr: bytes
    exit: _Exit
    killed: str | None
    duration_s: float
    spawner_rss_kb: int


class BwrapSandbox(Sandbox):
    """Runs each program in a fresh bubblewrap sandbox; see the module docs for what that means.

    Args:
        uri: ``bwrap://`` with optional query options (``python``, ``bwrap``, ``tmp_mb``, ``fsize_mb``,
            ``nofile``).
        **options: The same options as keywords (they win over the URI).

    Raises:
        BackendUnavailable: bwrap, prlimit or pyseccomp is missing, or bwrap cannot create namespaces here.
        ConfigError: Bad options.
    """

    def __init__(self, uri: str = "bwrap://", **options: Any) -> None:
        self.uri = uri
        self.options = BwrapOptions.parse(uri, options)
        ok, reason = _check_tools(self.options.bwrap)
        if not ok:
            raise BackendUnavailable(reason)
        if not os.access(self.options.python, os.X_OK):
            raise ConfigError(f"bwrap sandbox: python interpreter {self.options.python} is not executable")
        self._prlimit = _prlimit_path() or "/usr/bin/prlimit"  # checked by _check_tools
        self._cgroup = _pids_cgroup()
        if self._cgroup is None and os.getuid() == 0:
            log.warning(
                "bwrap sandbox: no writable pids cgroup and running as root, so max_pids is NOT enforced "
                "(RLIMIT_NPROC does not apply to root); fork bombs are only stopped by timeout_s"
            )
        self._layout = self._static_layout()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether bwrap, prlimit and pyseccomp are present and bwrap can create namespaces (cached)."""
        return _check_tools(shutil.which("bwrap") or "/usr/bin/bwrap")

    @classmethod
    def features(cls) -> dict[str, Any]:
        """Which protection mechanisms are active on this host (for ``stitchwork doctor`` and the docs)."""
        ok, reason = cls.available()
        cgroup = _pids_cgroup()
        if cgroup is not None:
            pids = f"cgroup v{cgroup.version} ({cgroup.base})"
        elif os.getuid() != 0:
            pids = "RLIMIT_NPROC"
        else:
            pids = "none (root without a writable pids cgroup)"
        return {
            "available": ok,
            "reason": reason,
            "namespaces": ok,
            "seccomp": ok,
            "pids_limit": pids,
            "landlock_abi": _landlock_abi(),
            "landlock_applied": False,
        }

    def _static_layout(self) -> list[str]:
        """bwrap arguments that are the same for every run."""
        args = [
            "--unshare-all",
            "--die-with-parent",
            "--as-pid-1",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            "sandbox",
            "--ro-bind",
            "/usr",
            "/usr",
        ]
        for name in _ROOT_LINKS:
            path = "/" + name
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for path in _ETC_FILES:
            if os.path.exists(path):
                args += ["--ro-bind", path, path]
        etc = _generated_etc()
        args += [
            "--ro-bind",
            str(etc / "passwd"),
            "/etc/passwd",
            "--ro-bind",
            str(etc / "group"),
            "/etc/group",
        ]
        prefix = _python_prefix(self.options.python)
        if prefix is not None:
            args += ["--ro-bind", prefix, prefix]
            for site in sorted(glob.glob(os.path.join(glob.escape(prefix), "lib", "python3*", "site-packages"))):
                args += ["--tmpfs", site, "--remount-ro", site]
        tmp_bytes = str(self.options.tmp_mb * 1024 * 1024)
        # /dev itself is an unbounded tmpfs: read-only after /dev/shm is in place (device nodes stay usable).
        args += ["--proc", "/proc", "--dev", "/dev", "--size", tmp_bytes, "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]
        args += ["--size", tmp_bytes, "--tmpfs", "/tmp"]
        return args

    async def run(self, spec: SandboxSpec) -> SandboxResult:
        """Runs ``spec.program`` in a fresh sandbox.

        Raises:
            SandboxError: The spec cannot be honoured (egress, missing paths, bad mounts, a payload that is not
                JSON) or bwrap failed to set the sandbox up.
        """
        if spec.egress:
            raise SandboxError(
                f"bwrap egress allowlist not supported yet: {', '.join(spec.egress)}; "
                "run without egress or use a backend that supports it"
            )
        program = spec.program
        args = [*self._layout, *self._mount_args(spec)]
        if isinstance(program, PythonCall):
            if not program.file.is_file():
                raise SandboxError(f"tool file {program.file} does not exist")
            tool_path = f"/tool/{program.file.name}"
            args += [
                "--ro-bind",
                _RUNNER_HOST_PATH,
                _runner.SANDBOX_PATH,
                "--ro-bind",
                str(program.file),
                tool_path,
            ]
            inner = [self.options.python, "-I", "-S", "-B", _runner.SANDBOX_PATH]
            request = {"file": tool_path, "function": program.function, "payload": program.payload}
            try:
                stdin = json.dumps(request).encode()
            except (TypeError, ValueError) as exc:
                raise SandboxError(f"payload for {program.file}:{program.function} is not JSON: {exc}") from exc
        else:
            if not program.argv:
                raise SandboxError("command has an empty argv")
            inner, stdin = list(program.argv), program.stdin
        args += ["--remount-ro", "/", "--chdir", "/work"]
        limits = spec.limits
        env = _sandbox_env(spec.env)
        cgroup = self._cgroup.create(limits.max_pids + _BWRAP_OVERHEAD_PIDS) if self._cgroup else None
        try:
            outcome = await self._execute(args, inner, stdin, env, limits, cgroup)
            refused_forks = _PidsCgroup.refused_forks(cgroup) if cgroup else 0
        finally:
            if cgroup is not None:
                _remove_cgroup_later(cgroup)
        return _result(program, outcome, limits, refused_forks)

    def _mount_args(self, spec: SandboxSpec) -> list[str]:
        args: list[str] = []
        if spec.workdir is not None:
            if not spec.workdir.is_dir():
                raise SandboxError(f"workdir {spec.workdir} is not a directory")
            args += ["--bind", str(spec.workdir), "/work"]
        else:
            args += ["--size", str(self.options.tmp_mb * 1024 * 1024), "--tmpfs", "/work"]
        for mount in spec.mounts:
            target = mount.target
            if (
                not target.startswith("/")
                or posixpath.normpath(target) != target
                or target in ("/", "/work", "/tmp")
                or any(target == r or target.startswith(r + "/") for r in _RESERVED_TARGETS)
            ):
                raise SandboxError(f"mount target {target!r} is not allowed (absolute, normalised, not reserved)")
            if not mount.source.exists():
                raise SandboxError(f"mount source {mount.source} does not exist")
            args += ["--bind" if mount.writable else "--ro-bind", str(mount.source), target]
        return args

    async def _execute(
        self,
        args: list[str],
        inner: list[str],
        stdin: bytes,
        env: dict[str, str],
        limits: Limits,
        cgroup: Path | None,
    ) -> _Outcome:
        seccomp_read, seccomp_write = os.pipe()
        try:
            bpf = _seccomp_bpf()
            os.write(seccomp_write, bpf)  # a few hundred bytes: fits the pipe buffer
            os.close(seccomp_write)
            seccomp_write = -1
            argv = [
                self.options.bwrap,
                *args,
                "--seccomp",
                str(seccomp_read),
                "--",
                *self._prlimit_argv(limits),
                *inner,
            ]
            if cgroup is not None:
                argv = ["/bin/sh", "-c", 'unset PWD; echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *argv]
            return await _supervise(argv, env, stdin, (seccomp_read,), limits, cgroup)
        finally:
            os.close(seccomp_read)
            if seccomp_write != -1:
                os.close(seccomp_write)

    def _prlimit_argv(self, limits: Limits) -> list[str]:
        cpu = _cpu_rlimit(limits)
        return [
            self._prlimit,
            f"--as={limits.mem_mb * 1024 * 1024}",
            f"--cpu={cpu}",
            f"--nproc={limits.max_pids}",
            f"--fsize={self.options.fsize_mb * 1024 * 1024}",
            f"--nofile={self.options.nofile}",
            "--core=0",
            "--",
        ]


def _prlimit_path() -> str | None:
    """util-linux ``prlimit`` under ``/usr`` (the only place the sandbox can see it)."""
    for path in ("/usr/bin/prlimit", "/usr/sbin/prlimit", "/usr/local/bin/prlimit"):
        if os.access(path, os.X_OK):
            return path
    return None


@functools.cache
def _check_tools(bwrap: str) -> tuple[bool, str]:
    if not (os.path.isfile(bwrap) and os.access(bwrap, os.X_OK)):
        return False, "bwrap not installed: apt-get install bubblewrap (or dnf install bubblewrap)"
    if _prlimit_path() is None:
        return False, "prlimit not installed in /usr/bin: apt-get install util-linux"
    try:
        _seccomp_bpf()
    except ImportError:
        return False, "pyseccomp not installed: pip install 'stitchwork[bwrap]'"
    except OSError as exc:
        return (
            False,
            f"cannot build the seccomp filter (is libseccomp installed? apt-get install libseccomp2): {exc}",
        )
    return _check_bwrap(bwrap)


def _cpu_rlimit(limits: Limits) -> int:
    """``RLIMIT_CPU`` counts whole seconds: the limit rounded up, at least one."""
    return max(1, math.ceil(limits.cpu_s))


def _sandbox_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {"PATH": _DEFAULT_PATH, "HOME": "/work", "LANG": "C.UTF-8"}
    for key, value in extra.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise SandboxError(f"invalid environment variable name or value: {key!r}")
        env[key] = value
    return env


def _remove_cgroup_later(path: Path, attempt: int = 0) -> None:
    """Removes a finished sandbox's cgroup; retries for a while if its tasks are still being reaped."""
    if _PidsCgroup.remove(path) or attempt >= 50:
        return
    with contextlib.suppress(RuntimeError):  # no running loop (interpreter shutdown): leave it
        asyncio.get_running_loop().call_later(0.05, _remove_cgroup_later, path, attempt + 1)


# -- process supervision ----------------------------------------------------------------------------------


async def _supervise(
    argv: list[str],
    env: dict[str, str],
    stdin: bytes,
    pass_fds: tuple[int, ...],
    limits: Limits,
    cgroup: Path | None,
) -> _Outcome:
    """Runs ``argv`` in its own process group, feeding ``stdin``, collecting capped output, enforcing the timeout.

    The exit status and resource usage come from ``wait4()``, driven by a pidfd in the event loop (or a worker
    thread where pidfds are not available).
    """
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
        raise SandboxError(f"cannot start bwrap: {exc}") from exc
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    pid = proc.pid
    killed: list[str] = []
    budget = [limits.max_output_bytes]
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    eof: dict[int, asyncio.Future[None]] = {fd: loop.create_future() for fd in chunks}
    exited: asyncio.Future[_Exit] = loop.create_future()
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
            _PidsCgroup.remove(cgroup)  # belt and braces: anything that is still in the cgroup

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
            exited.set_result(_Exit(status, usage))

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
    return _Outcome(
        stdout=b"".join(chunks[out_fd]),
        stderr=b"".join(chunks[err_fd]),
        exit=done,
        killed=killed[0] if killed else None,
        duration_s=time.perf_counter() - start,
        spawner_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )


# -- classification ---------------------------------------------------------------------------------------


def _exit_code(status: int) -> int:
    """The shell-style exit code: bwrap already maps its child's signal death to ``128 + signal``."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _setup_failed(code: int, stdout: bytes, stderr: bytes) -> bool:
    """bwrap itself failed (bad bind source, no namespaces...): it exits 1 with ``bwrap: ...`` and no output."""
    return code == 1 and not stdout and stderr.startswith(b"bwrap: ")


def _answer(stdout: bytes) -> dict[str, Any] | None:
    """The runner's result line (the last line of stdout), if there is a valid one."""
    try:
        message = json.loads(stdout.rstrip(b"\n").rsplit(b"\n", 1)[-1])
    except ValueError:
        return None
    return message if isinstance(message, dict) and isinstance(message.get("ok"), bool) else None


def _result(program: PythonCall | Command, outcome: _Outcome, limits: Limits, refused_forks: int) -> SandboxResult:
    code = _exit_code(outcome.exit.status)
    stdout, stderr = outcome.stdout, outcome.stderr
    if outcome.killed is None and _setup_failed(code, stdout, stderr):
        raise SandboxError(f"bwrap could not set up the sandbox: {stderr.decode(errors='replace').strip()}")
    usage = outcome.exit.rusage
    cpu_s = usage.ru_utime + usage.ru_stime if usage is not None else 0.0
    # wait4()'s peak RSS is at least the spawning process's own (exec records the old mm's peak): only a
    # larger figure can be the sandbox's.
    max_rss_kb = usage.ru_maxrss if usage is not None and usage.ru_maxrss > outcome.spawner_rss_kb else 0
    value: Any = None
    error: str | None = None
    answer = _answer(stdout) if isinstance(program, PythonCall) and outcome.killed is None else None
    if answer is not None:
        value = answer.get("value")
        error = None if answer["ok"] else str(answer.get("error"))
        reported = answer.get("usage")
        if isinstance(reported, dict):
            cpu_s = float(reported.get("cpu_s", cpu_s))
            max_rss_kb = int(reported.get("max_rss_kb", max_rss_kb))
    killed = outcome.killed
    signum = code - 128 if 128 < code < 128 + 65 else 0
    if killed is None:
        if error is not None and error.startswith("MemoryError"):
            killed = "memory"
        elif refused_forks and (code != 0 or error is not None):
            killed = "pids"
        elif signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_s >= 0.8 * _cpu_rlimit(limits)):
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


_OUT_OF_MEMORY_MESSAGES = (
    b"MemoryError",
    b"Cannot allocate memory",
    b"std::bad_alloc",
    b"out of memory",
    b"failed to map segment",  # the dynamic loader, when RLIMIT_AS is below what the program needs to start
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
