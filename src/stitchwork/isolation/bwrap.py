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
ptrace/``process_vm_*``, io_uring, clock, swap, reboot and file-handle syscalls (see :mod:`._seccomp`), for
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

Results follow the process supervisor's rules (:mod:`stitchwork.isolation._process`): ``killed`` is
``"timeout"``/``"output"`` when the supervisor killed the sandbox, ``"memory"``, ``"pids"``, ``"cpu"`` or
``"signal"`` as it classifies the program's end. Like a shell, bwrap reports a signal death as exit code
``128 + signal``; so does ``exit_code``. ``duration_s`` is wall-clock. ``cpu_s`` and ``max_rss_kb`` of a Python
call are measured by the runner itself; otherwise they come from ``wait4()`` on the bwrap monitor, which reaps
the program (exact for programs that exit; see the supervisor for what is missed when the sandbox is killed).

Landlock is not applied: the mount namespace already hides every path that is not bound, and every bind but
``/work``, ``/tmp``, ``/dev/shm`` and writable mounts is read-only, so it would add defence in depth only.
:meth:`BwrapSandbox.features` reports the kernel's Landlock ABI for when it is added.

``spec.egress`` is not supported yet: a non-empty allowlist raises :class:`SandboxError` (so nothing silently
gets network); an egress proxy comes with a later issue.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from stitchwork.errors import BackendUnavailable, ConfigError, SandboxError
from stitchwork.isolation import _cgroup, _process, _protocol, _rootfs
from stitchwork.isolation._base import Limits, PythonCall, Sandbox, SandboxResult, SandboxSpec
from stitchwork.isolation._seccomp import seccomp_bpf

log = logging.getLogger(__name__)

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
_RESERVED_TARGETS = ("/proc", "/dev", "/stitchwork", "/tool")
#: The bwrap monitor process counts against the pids cgroup (the program itself is pid 1: --as-pid-1).
_CONFINEMENT = _process.Confinement(pids_cgroup=True, overhead_pids=1)


# -- host facts (computed once per process) ---------------------------------------------------------------


def _landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: not available)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        landlock_create_ruleset = 444  # same number on every architecture that has it
        version = libc.syscall(landlock_create_ruleset, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except (OSError, AttributeError):
        return 0
    return max(int(version), 0)


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


# -- the sandbox ------------------------------------------------------------------------------------------


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
        if _cgroup.pids_cgroup() is None and os.getuid() == 0:
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
        cgroup = _cgroup.pids_cgroup()
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
        for name in _rootfs.ROOT_LINKS:
            path = "/" + name
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for path in _ETC_FILES:
            if os.path.exists(path):
                args += ["--ro-bind", path, path]
        etc = _rootfs.generated_etc()
        args += [
            "--ro-bind",
            str(etc / "passwd"),
            "/etc/passwd",
            "--ro-bind",
            str(etc / "group"),
            "/etc/group",
        ]
        prefix = _rootfs.python_prefix(self.options.python)
        if prefix is not None:
            args += ["--ro-bind", prefix, prefix]
            for site in _rootfs.site_packages(prefix):
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
            args += [
                "--ro-bind",
                _protocol.RUNNER_HOST_PATH,
                _protocol.SANDBOX_PATH,
                "--ro-bind",
                str(program.file),
                _protocol.tool_path(program),
            ]
            inner = _protocol.runner_argv(self.options.python)
            stdin = _protocol.encode_request(program)
        else:
            if not program.argv:
                raise SandboxError("command has an empty argv")
            inner, stdin = list(program.argv), program.stdin
        args += ["--remount-ro", "/", "--chdir", "/work"]
        limits = spec.limits
        outcome = await self._execute(args, inner, stdin, _process.program_env(spec.env), limits)
        if outcome.killed is None and _setup_failed(outcome):
            text = outcome.stderr.decode(errors="replace").strip()
            raise SandboxError(f"bwrap could not set up the sandbox: {text}")
        return _process.sandbox_result(program, outcome, limits)

    def _mount_args(self, spec: SandboxSpec) -> list[str]:
        args: list[str] = []
        _rootfs.check_workdir(spec.workdir)
        if spec.workdir is not None:
            args += ["--bind", str(spec.workdir), "/work"]
        else:
            args += ["--size", str(self.options.tmp_mb * 1024 * 1024), "--tmpfs", "/work"]
        for mount in spec.mounts:
            _rootfs.check_mount(mount, reserved=("/work", "/tmp"), reserved_trees=_RESERVED_TARGETS)
            args += ["--bind" if mount.writable else "--ro-bind", str(mount.source), mount.target]
        return args

    async def _execute(
        self,
        args: list[str],
        inner: list[str],
        stdin: bytes,
        env: dict[str, str],
        limits: Limits,
    ) -> _process.Outcome:
        seccomp_read, seccomp_write = os.pipe()
        try:
            bpf = seccomp_bpf()
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
            return await _process.supervise(
                argv, env=env, stdin=stdin, limits=limits, pass_fds=(seccomp_read,), confinement=_CONFINEMENT
            )
        finally:
            os.close(seccomp_read)
            if seccomp_write != -1:
                os.close(seccomp_write)

    def _prlimit_argv(self, limits: Limits) -> list[str]:
        """``prlimit --as=... --cpu=... ... --``: the rlimits, set inside the sandbox just before the program."""
        values = _process.rlimits(limits, fsize_mb=self.options.fsize_mb, nofile=self.options.nofile)
        return [self._prlimit, *(f"--{name.lower()}={value}" for name, value in values.items()), "--"]


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
        seccomp_bpf()
    except ImportError:
        return False, "pyseccomp not installed: pip install 'stitchwork[bwrap]'"
    except OSError as exc:
        return (
            False,
            f"cannot build the seccomp filter (is libseccomp installed? apt-get install libseccomp2): {exc}",
        )
    return _check_bwrap(bwrap)


def _setup_failed(outcome: _process.Outcome) -> bool:
    """bwrap itself failed (bad bind source, no namespaces...): it exits 1 with ``bwrap: ...`` and no output."""
    return outcome.exit.code == 1 and not outcome.stdout and outcome.stderr.startswith(b"bwrap: ")
