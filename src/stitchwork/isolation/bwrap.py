"""``bwrap://``: bubblewrap namespaces + a seccomp filter, as an unprivileged user, in a cgroup, on a disk quota.

URI options (query string, or keyword arguments of :func:`~stitchwork.isolation.open_sandbox`)::

    bwrap://?python=/usr/bin/python3&uid=65534&nofile=256&limits=sandbox&bwrap=/usr/bin/bwrap

``python`` runs :class:`~stitchwork.isolation.PythonCall` tools (default: the real path behind
:data:`sys.executable`). When it lives outside ``/usr`` only its installation prefix is bound, read-only and at
the same path, with ``site-packages`` hidden: tools get the standard library (the runner uses ``-I -S -B``).

**Never host root.** When this process is root, the program runs as ``uid`` (default 65534) in a user
namespace that maps it to the same unprivileged host uid (made by the process guard, handed to bwrap with
``--userns``): files it creates belong to that uid on the host, a setuid bit it sets is a setuid-nobody bit (and
is stripped anyway when its work directory is written back). Otherwise bwrap's own user namespace maps the
caller's uid. Always: no capabilities (``--cap-drop ALL``), ``no_new_privs`` (bwrap sets it before exec), every
mount ``nosuid,nodev``.

What a program sees (everything else of the host is absent, not merely unreadable):

* read-only: ``/usr`` (plus the ``/bin``, ``/sbin``, ``/lib*`` links), six ``/etc`` entries the loader and libc
  need (``ld.so.cache``, ``ld.so.conf[.d]``, ``localtime``, ``alternatives``, ``nsswitch.conf``), a generated
  ``/etc/passwd`` and ``/etc/group``, the interpreter prefix, the runner at ``/stitchwork/_runner.py``, the
  tool file at ``/tool/<name>`` and ``spec.mounts`` (unless ``writable``); the root is remounted read-only;
* writable: ``/work``, ``/tmp`` and ``/dev/shm``, all three on the sandbox's one size-limited tmpfs (``disk_mb``,
  which also counts against ``mem_mb``: tmpfs is memory). ``spec.workdir`` and writable ``spec.mounts`` are
  copied in before the run and written back after it (see :mod:`._stage`); a write past the quota fails with
  ``ENOSPC`` and a program that fails after it is reported as ``killed="disk"``; ``/dev`` itself is read-only;
* its own ``/proc`` and a minimal ``/dev``; new mount, pid, network (loopback only), ipc, uts (hostname
  ``sandbox``) and cgroup namespaces; a new session (no ``TIOCSTI`` into the host terminal). The program is
  pid 1 of its namespace (``--as-pid-1``): when it exits, everything it started dies with it.

Environment: exactly ``spec.env`` over ``PATH``, ``HOME=/work`` and ``LANG=C.UTF-8`` defaults (plus ``PWD``,
which bwrap sets), passed as ``--clearenv --setenv ...`` through a sealed memory file (``--args``): secrets are
never in a command line (``/proc/<pid>/cmdline`` is world-readable) and never in bwrap's own environment.

Seccomp (pyseccomp; compiled once per process; loaded by bwrap with ``--seccomp``): default allow; ``EPERM``
for ``socket()`` of every family but ``AF_UNIX``, for namespace, mount, module, kexec, bpf, perf, keyring,
ptrace/``process_vm_*``, io_uring, clock, swap, reboot and file-handle syscalls (see :mod:`._seccomp`), for
``clone`` with namespace flags, for ``personality`` changes and the ``TIOCSTI`` ioctl; ``ENOSYS`` for ``clone3``
(its flags cannot be inspected, libc falls back to ``clone``). Other architectures' syscalls kill the process.

Limits, for the sandbox as a whole (the process supervisor, :mod:`stitchwork.isolation._process`): a cgroup per
sandbox with ``mem_mb`` (swap off), a ``cpus`` quota and ``max_pids`` (+1 for bwrap's monitor; threads count),
joined before bwrap starts; ``cpu_s`` as a budget of the CPU time of all its processes; ``timeout_s`` wall-clock;
``max_output_bytes``; ``disk_mb`` as above. Per process, inside the sandbox (util-linux ``prlimit``, just before
the program, so bwrap is not limited): ``RLIMIT_AS`` = ``mem_mb`` (a clean ``MemoryError`` rather than an OOM
kill for a single process), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` = ``disk_mb``, ``RLIMIT_NOFILE`` = ``nofile`` and
``RLIMIT_CORE=0``. Where this host offers no cgroups the backend refuses to run (``available()`` says why)
unless opened with ``limits=process``: per-process rlimits only (``RLIMIT_NPROC`` for ``max_pids``), which
children multiply; :meth:`BwrapSandbox.features` and ``stitchwork doctor`` say which is in force.

The sandbox is bound to this process from before anything of it executes (the process guard: when this
process dies, by any signal, the sandbox dies with it).

Results follow the process supervisor's rules: ``killed`` is ``"timeout"``/``"output"``/``"cpu"`` when the
supervisor ended the sandbox, ``"memory"``, ``"pids"``, ``"disk"``, ``"cpu"`` or ``"signal"`` as it classifies
the program's end. Like a shell, bwrap reports a signal death as exit code ``128 + signal``; so does
``exit_code``. ``cpu_s`` and ``max_rss_kb`` are the cgroup's figures (every process of the sandbox).

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
from stitchwork.isolation import _process, _protocol, _rootfs
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
#: The sandbox's user when this process is root (nobody/nogroup): unprivileged on the host.
SANDBOX_UID = 65534
#: The bwrap monitor process counts against the pids cgroup (the program itself is pid 1: --as-pid-1).
_OVERHEAD_PIDS = 1
_LIMIT_MODES = ("sandbox", "process")


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


def whole_sandbox_limits() -> tuple[bool, str]:
    """Whether this host can hold memory, CPU and process limits for a sandbox as a whole (cgroups), and why not."""
    support = _process.cgroup_support()
    if support.complete:
        return True, ""
    missing = ", ".join(f"{c} ({why})" for c, why in support.missing)
    return False, (
        f"no cgroup for {missing}: memory, CPU and process limits cannot be enforced for the sandbox as a whole; "
        "run as root or in a delegated cgroup, or accept per-process limits only with limits=process"
    )


# -- options ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BwrapOptions:
    """Settings of one :class:`BwrapSandbox` (from the URI query string and keyword options)."""

    python: str
    bwrap: str
    uid: int = SANDBOX_UID
    nofile: int = 256
    limits: str = "sandbox"

    @classmethod
    def parse(cls, uri: str, options: Mapping[str, Any]) -> BwrapOptions:
        """Reads ``bwrap://?python=...&bwrap=...&uid=...&nofile=...&limits=sandbox|process``.

        Raises:
            ConfigError: Unknown option or a value of the wrong type.
        """
        values: dict[str, Any] = {**dict(parse_qsl(urlsplit(uri).query)), **options}
        known = {"python", "bwrap", "uid", "nofile", "limits"}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"bwrap sandbox: unknown option(s) {sorted(unknown)} in {uri!r}; known: {sorted(known)}")
        python = os.path.realpath(str(values.get("python") or sys.executable))
        bwrap = str(values.get("bwrap") or shutil.which("bwrap") or "/usr/bin/bwrap")
        numbers: dict[str, int] = {}
        for key in ("uid", "nofile"):
            if key in values:
                try:
                    numbers[key] = int(values[key])
                except ValueError as exc:
                    raise ConfigError(f"bwrap sandbox: {key} must be an integer, not {values[key]!r}") from exc
                if numbers[key] <= 0:
                    raise ConfigError(f"bwrap sandbox: {key} must be positive (the sandbox never runs as root)")
        mode = str(values.get("limits", "sandbox"))
        if mode not in _LIMIT_MODES:
            raise ConfigError(f"bwrap sandbox: limits must be one of {', '.join(_LIMIT_MODES)}, not {mode!r}")
        return cls(python=python, bwrap=bwrap, limits=mode, **numbers)


# -- the sandbox ------------------------------------------------------------------------------------------


class BwrapSandbox(Sandbox):
    """Runs each program in a fresh bubblewrap sandbox; see the module docs for what that means.

    Args:
        uri: ``bwrap://`` with optional query options (``python``, ``bwrap``, ``uid``, ``nofile``, ``limits``).
        **options: The same options as keywords (they win over the URI).

    Raises:
        BackendUnavailable: bwrap, prlimit or pyseccomp is missing, bwrap cannot create namespaces here, or (with
            ``limits=sandbox``) this host has no cgroups to hold the limits.
        ConfigError: Bad options.
    """

    def __init__(self, uri: str = "bwrap://", **options: Any) -> None:
        self.uri = uri
        self.options = BwrapOptions.parse(uri, options)
        ok, reason = _check_tools(self.options.bwrap)
        if not ok:
            raise BackendUnavailable(reason)
        if self.options.limits == "sandbox":
            ok, reason = whole_sandbox_limits()
            if not ok:
                raise BackendUnavailable(f"bwrap://: {reason}")
        else:
            log.warning("bwrap sandbox opened with limits=process: memory, CPU and process limits are per process")
        if not os.access(self.options.python, os.X_OK):
            raise ConfigError(f"bwrap sandbox: python interpreter {self.options.python} is not executable")
        self._prlimit = _prlimit_path() or "/usr/bin/prlimit"  # checked by _check_tools
        self._root = os.geteuid() == 0
        self._uid = self.options.uid if self._root else os.geteuid()
        self._gid = self.options.uid if self._root else os.getegid()
        self._cgroups = self.options.limits == "sandbox"
        self._layout = self._static_layout()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether bwrap, prlimit and pyseccomp are present, bwrap can create namespaces and cgroups can hold the
        limits (cached)."""
        ok, reason = _check_tools(shutil.which("bwrap") or "/usr/bin/bwrap")
        if not ok:
            return ok, reason
        return whole_sandbox_limits()

    @classmethod
    def features(cls) -> dict[str, Any]:
        """Which protection mechanisms are active on this host (for ``stitchwork doctor`` and the docs)."""
        ok, reason = cls.available()
        support = _process.cgroup_support()
        root = os.geteuid() == 0
        return {
            "available": ok,
            "reason": reason,
            "user": f"uid {SANDBOX_UID} in a user namespace mapped to host uid {SANDBOX_UID}"
            if root
            else f"the caller's uid {os.geteuid()} (bwrap's user namespace)",
            "namespaces": ok,
            "seccomp": ok,
            "cgroup": support.describe(),
            "limits": "whole sandbox (cgroup)" if support.complete else "per process only (limits=process)",
            "disk_quota": "size-limited tmpfs per sandbox (copied in, written back)",
            "landlock_abi": _landlock_abi(),
            "landlock_applied": False,
        }

    def _static_layout(self) -> list[str]:
        """bwrap arguments that are the same for every run (writable and staged paths come per run)."""
        args = [
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--as-pid-1",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            "sandbox",
        ]
        if self._root:
            args += ["--userns", "{userns}", "--uid", str(self._uid), "--gid", str(self._gid)]
        else:
            args += ["--unshare-user"]
        args += ["--ro-bind", "/usr", "/usr"]
        for name in _rootfs.ROOT_LINKS:
            path = "/" + name
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for path in _ETC_FILES:
            if os.path.exists(path):
                args += ["--ro-bind", path, path]
        return args

    async def run(self, spec: SandboxSpec) -> SandboxResult:
        """Runs ``spec.program`` in a fresh sandbox.

        Raises:
            SandboxError: The spec cannot be honoured (egress, missing paths, bad mounts, a payload that is not
                JSON, a work directory larger than the disk quota) or bwrap failed to set the sandbox up.
        """
        if spec.egress:
            raise SandboxError(
                f"bwrap egress allowlist not supported yet: {', '.join(spec.egress)}; "
                "run without egress or use a backend that supports it"
            )
        program = spec.program
        if isinstance(program, PythonCall):
            if not program.file.is_file():
                raise SandboxError(f"tool file {program.file} does not exist")
            inner = _protocol.runner_argv(self.options.python)
            stdin = _protocol.encode_request(program)
        else:
            if not program.argv:
                raise SandboxError("command has an empty argv")
            inner, stdin = list(program.argv), program.stdin
        env = _process.program_env(spec.env)
        limits = spec.limits
        layout = _rootfs.Layout(limits.disk_mb * 1024 * 1024, uid=self._uid, gid=self._gid)
        try:
            args = [*self._layout, *self._stage_args(spec, layout)]
            args += ["--remount-ro", "/", "--chdir", "/work"]
            outcome = await self._execute(args, inner, stdin, env, limits, layout.stage())
        finally:
            layout.remove()
        if outcome.killed is None and _setup_failed(outcome):
            text = outcome.stderr.decode(errors="replace").strip()
            raise SandboxError(f"bwrap could not set up the sandbox: {text}")
        return _process.sandbox_result(program, outcome, limits)

    def _stage_args(self, spec: SandboxSpec, layout: _rootfs.Layout) -> list[str]:
        """Binds of everything that comes from the stage: writable space, private copies, the interpreter."""
        args: list[str] = []
        etc = _rootfs.generated_etc(self._uid, self._gid)
        args += ["--ro-bind", layout.file(etc / "passwd", "ro/passwd"), "/etc/passwd"]
        args += ["--ro-bind", layout.file(etc / "group", "ro/group"), "/etc/group"]
        prefix = _rootfs.python_prefix(self.options.python)
        if prefix is not None:
            args += ["--ro-bind", layout.bind(prefix, "ro/python"), prefix]
            for site in _rootfs.site_packages(prefix):
                args += ["--tmpfs", site, "--remount-ro", site]
        program = spec.program
        if isinstance(program, PythonCall):
            args += ["--ro-bind", layout.file(_protocol.RUNNER_HOST_PATH, "ro/runner.py"), _protocol.SANDBOX_PATH]
            args += ["--ro-bind", layout.file(program.file, "ro/tool"), _protocol.tool_path(program)]
        # /dev itself is an unbounded tmpfs: read-only after /dev/shm is in place (device nodes stay usable).
        shm = layout.scratch("shm")
        args += ["--proc", "/proc", "--dev", "/dev", "--bind", shm, "/dev/shm", "--remount-ro", "/dev"]
        args += ["--bind", layout.scratch("tmp"), "/tmp"]
        _rootfs.check_workdir(spec.workdir)
        if spec.workdir is not None:
            args += ["--bind", layout.copy(spec.workdir, "work"), "/work"]
        else:
            args += ["--bind", layout.scratch("work"), "/work"]
        for index, mount in enumerate(spec.mounts):
            _rootfs.check_mount(mount, reserved=("/work", "/tmp"), reserved_trees=_RESERVED_TARGETS)
            if mount.writable:
                if not mount.source.is_dir():
                    raise SandboxError(f"writable mount {mount.source} must be a directory (it is copied in)")
                args += ["--bind", layout.copy(mount.source, f"rw/{index}"), mount.target]
            else:
                args += ["--ro-bind", layout.bind(mount.source, f"ro/mount-{index}"), mount.target]
        return args

    async def _execute(
        self,
        args: list[str],
        inner: list[str],
        stdin: bytes,
        env: dict[str, str],
        limits: Limits,
        stage: _process.Stage,
    ) -> _process.Outcome:
        seccomp_read, seccomp_write = os.pipe()
        env_fd = -1
        try:
            bpf = seccomp_bpf()
            os.write(seccomp_write, bpf)  # a few hundred bytes: fits the pipe buffer
            os.close(seccomp_write)
            seccomp_write = -1
            setenv = ["--clearenv"]
            for key, value in env.items():
                setenv += ["--setenv", key, value]
            env_fd = _process._memfd("stitchwork-bwrap-env", b"".join(a.encode() + b"\0" for a in setenv))
            argv = [
                self.options.bwrap,
                "--args",
                str(env_fd),
                *args,
                "--seccomp",
                str(seccomp_read),
                "--",
                *self._prlimit_argv(limits),
                *inner,
            ]
            confinement = _process.Confinement(
                cgroup=self._cgroups,
                overhead_pids=_OVERHEAD_PIDS,
                stage=stage,
                userns=(self._uid, self._gid) if self._root else None,
            )
            return await _process.supervise(
                argv, env={"PATH": _process.DEFAULT_PATH}, stdin=stdin, limits=limits,
                pass_fds=(seccomp_read, env_fd), confinement=confinement, name="bwrap",
            )  # fmt: skip
        finally:
            os.close(seccomp_read)
            if seccomp_write != -1:
                os.close(seccomp_write)
            if env_fd != -1:
                os.close(env_fd)

    def _prlimit_argv(self, limits: Limits) -> list[str]:
        """``prlimit --as=... --cpu=... ... --``: the rlimits, set inside the sandbox just before the program."""
        values = _process.rlimits(limits, fsize_mb=limits.disk_mb, nofile=self.options.nofile,
                                  nproc=not self._cgroups)  # fmt: skip
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
    return outcome.code == 1 and not outcome.stdout and outcome.stderr.startswith(b"bwrap: ")
