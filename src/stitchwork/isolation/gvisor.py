"""``gvisor://``: each program in a fresh gVisor sandbox (``runsc run`` on a generated OCI bundle).

URI options: ``gvisor://?platform=ptrace&runsc=/usr/bin/runsc&python=/usr/bin/python3&uid=65534&overhead_mb=160``.
The ptrace platform is the default because the KVM platform hangs on hosts like this one (PVM); ``systrap``
needs a newer runsc.

The bundle's root is an empty read-only directory; what a program sees is bound into it: ``/usr`` (and the
``/bin``, ``/lib*``, ``/sbin`` links), the interpreter's prefix when it lives outside ``/usr`` (its
``site-packages`` hidden under an empty tmpfs), the runner at ``/stitchwork/_runner.py`` and the tool file at
``/tool/<name>`` (private read-only copies), a generated ``/etc/passwd`` and ``/etc/group``; writable ``/work``,
``/tmp`` and ``/dev/shm`` from the sandbox's stage: one size-limited tmpfs (``disk_mb``) in the process guard's
private mount namespace, with ``spec.workdir`` (and writable mounts) copied in and written back after the run
(:mod:`stitchwork.isolation._stage`). Every mount is ``nosuid,nodev``. Namespaces: pid, network
(``--network=none``: loopback only), ipc, uts, mount. Every system call is served by gVisor's user-space kernel
(the Sentry), not the host kernel.

**Never host root.** The program runs as ``uid`` (default 65534) with no capabilities and ``noNewPrivileges``:
files it creates through the gofer belong to that uid on the host, and its staged work directory is written back
with setuid and setgid bits stripped. (``runsc`` itself needs root here.)

Limits, for the sandbox as a whole: ``runsc`` starts inside the sandbox's cgroup (the process supervisor,
:mod:`stitchwork.isolation._process`), so the Sentry, the gofer and every guest process are counted: memory
``mem_mb + overhead_mb`` (the Sentry's own memory is in it; guest memory, its ``/dev/shm`` and page cache
are the Sentry's, so they count too), a ``cpus`` quota, ``max_pids`` plus the Sentry's threads, and ``cpu_s``
as a budget of the CPU time of all of them (guest code and the Sentry's work for it, measured by the cgroup).
Inside, per guest process, OCI rlimits enforced by the Sentry: ``RLIMIT_AS`` (``mem_mb``), ``RLIMIT_NPROC``
(``max_pids``), ``RLIMIT_FSIZE`` (``disk_mb``), ``RLIMIT_NOFILE`` (256), ``RLIMIT_CORE`` 0. ``timeout_s`` and
``max_output_bytes`` as for every process sandbox; a killed sandbox is then removed with ``runsc delete --force``.

The environment (``spec.env``, where the gateway puts secrets) has to be in the bundle's ``config.json``; the
bundle lives in ``/dev/shm`` (memory, mode 0700) and is deleted when the run ends. ``spec.egress`` is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from stitchwork.errors import BackendUnavailable, ConfigError, SandboxError
from stitchwork.isolation import _process, _protocol, _rootfs
from stitchwork.isolation._base import Limits, PythonCall, Sandbox, SandboxResult, SandboxSpec

_OPTIONS = frozenset({"platform", "runsc", "python", "uid", "overhead_mb"})
_RESERVED = ("/proc", "/dev", "/stitchwork", "/tool", "/usr", "/etc", "/work", "/tmp")
_AF_UNIX = 1
#: OCI seccomp profile applied by the Sentry (``--oci-seccomp``): no sockets but ``AF_UNIX`` (``--network=none``
#: leaves a loopback-only netstack; refusing the socket says so at once, as under ``bwrap://``).
_SECCOMP = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "architectures": ["SCMP_ARCH_X86_64"],
    "syscalls": [
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1,
            "args": [{"index": 0, "value": _AF_UNIX, "op": "SCMP_CMP_NE"}],
        }
    ],
}
_NOFILE = 256
#: Tasks of runsc's own (the Sentry's and the gofer's threads, ``runsc run``) on top of ``max_pids``.
_OVERHEAD_PIDS = 256
_MOUNT_OPTIONS = ["nosuid", "nodev"]


def _runsc_path() -> str | None:
    return shutil.which("runsc")


class GvisorSandbox(Sandbox):
    """Runs each program under gVisor (``runsc``); see the module docs.

    Args:
        uri: ``gvisor://`` with optional ``platform``, ``runsc``, ``python``, ``uid`` and ``overhead_mb`` options.
        **options: The same options as keywords (they win over the URI).

    Raises:
        BackendUnavailable: No ``runsc`` here, it cannot run as this user, or no cgroups hold the limits.
        ConfigError: Unknown or bad options.
    """

    def __init__(self, uri: str = "gvisor://", **options: Any) -> None:
        self.uri = uri
        query = dict(parse_qsl(urlsplit(uri).query))
        merged = {**query, **{k: str(v) for k, v in options.items()}}
        unknown = set(merged) - _OPTIONS
        if unknown:
            raise ConfigError(f"gvisor sandbox: unknown option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
        ok, reason = self.available()
        if not ok and "runsc" not in merged:
            raise BackendUnavailable(reason)
        self.runsc = merged.get("runsc") or _runsc_path() or "runsc"
        self.platform = merged.get("platform", "ptrace")
        self.python = merged.get("python") or os.path.realpath(sys.executable)
        try:
            self.uid = int(merged.get("uid", "65534"))
            self.overhead_mb = int(merged.get("overhead_mb", "160"))
        except ValueError as exc:
            raise ConfigError(f"gvisor sandbox: uid and overhead_mb must be integers ({exc})") from exc
        if self.uid <= 0 or self.overhead_mb < 0:
            raise ConfigError("gvisor sandbox: uid must be positive (never root) and overhead_mb >= 0")
        self._state = Path(tempfile.mkdtemp(prefix="stitchwork-runsc-state-"))
        self._prefix = _rootfs.python_prefix(self.python)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether ``runsc`` is installed, this process is root (rootless runsc needs more set-up) and cgroups can
        hold the limits."""
        if _runsc_path() is None:
            return False, "runsc (gVisor) is not installed: apt-get install runsc"
        if os.getuid() != 0:
            return False, "runsc needs root here (rootless gVisor is not set up)"
        support = _process.cgroup_support()
        if not support.complete:
            missing = ", ".join(f"{c} ({why})" for c, why in support.missing)
            return False, f"no cgroup for {missing}: the sandbox's limits cannot be enforced as a whole"
        return True, ""

    async def aclose(self) -> None:
        """Removes the runsc state directory."""
        shutil.rmtree(self._state, ignore_errors=True)

    def _mounts(self, spec: SandboxSpec, layout: _rootfs.Layout) -> list[dict[str, Any]]:
        def bind(source: str, target: str, writable: bool = False) -> dict[str, Any]:
            return {"destination": target, "type": "bind", "source": source,
                    "options": ["rbind", "rw" if writable else "ro", *_MOUNT_OPTIONS]}  # fmt: skip

        etc = _rootfs.generated_etc(self.uid, self.uid)
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            bind(layout.scratch("tmp"), "/tmp", writable=True),
            bind(layout.scratch("shm"), "/dev/shm", writable=True),
            bind("/usr", "/usr"),
            bind(layout.file(etc / "passwd", "ro/passwd"), "/etc/passwd"),
            bind(layout.file(etc / "group", "ro/group"), "/etc/group"),
        ]
        for name in ("ld.so.cache", "localtime", "nsswitch.conf"):
            if os.path.exists(f"/etc/{name}"):
                mounts.append(bind(os.path.realpath(f"/etc/{name}"), f"/etc/{name}"))
        if self._prefix is not None:
            mounts.append(bind(self._prefix, self._prefix))
            for site in _rootfs.site_packages(self._prefix):
                mounts.append({"destination": site, "type": "tmpfs", "source": "tmpfs",
                               "options": ["size=1k", "ro", *_MOUNT_OPTIONS]})  # fmt: skip
        _rootfs.check_workdir(spec.workdir)
        if spec.workdir is not None:
            mounts.append(bind(layout.copy(spec.workdir, "work"), "/work", writable=True))
        else:
            mounts.append(bind(layout.scratch("work"), "/work", writable=True))
        program = spec.program
        if isinstance(program, PythonCall):
            mounts.append(bind(layout.file(_protocol.RUNNER_HOST_PATH, "ro/runner.py"), _protocol.SANDBOX_PATH))
            mounts.append(bind(layout.file(program.file, "ro/tool"), _protocol.tool_path(program)))
        for index, mount in enumerate(spec.mounts):
            _rootfs.check_mount(mount, reserved=(), reserved_trees=_RESERVED)
            if mount.writable:
                if not mount.source.is_dir():
                    raise SandboxError(f"writable mount {mount.source} must be a directory (it is copied in)")
                mounts.append(bind(layout.copy(mount.source, f"rw/{index}"), mount.target, writable=True))
            else:
                mounts.append(bind(str(mount.source), mount.target))
        return mounts

    @staticmethod
    def _rlimits(limits: Limits) -> list[dict[str, Any]]:
        values = _process.rlimits(limits, fsize_mb=limits.disk_mb, nofile=_NOFILE)
        return [{"type": f"RLIMIT_{name}", "hard": value, "soft": value} for name, value in values.items()]

    def _bundle(self, root: Path, spec: SandboxSpec, args: list[str], layout: _rootfs.Layout) -> None:
        rootfs = root / "rootfs"
        for directory in ("usr", "proc", "dev", "work", "tmp", "tool", "stitchwork", "etc"):
            (rootfs / directory).mkdir(parents=True, exist_ok=True)
        if self._prefix is not None:
            (rootfs / self._prefix.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for link in _rootfs.ROOT_LINKS:
            if os.path.islink(f"/{link}"):
                (rootfs / link).symlink_to(os.readlink(f"/{link}").lstrip("/"))
        env = _process.program_env(spec.env)
        config = {
            "ociVersion": "1.0.0",
            "process": {
                "terminal": False,
                "user": {"uid": self.uid, "gid": self.uid},
                "args": args,
                "env": [f"{k}={v}" for k, v in env.items()],
                "cwd": "/work",
                "capabilities": {},
                "rlimits": self._rlimits(spec.limits),
                "noNewPrivileges": True,
            },
            "root": {"path": "rootfs", "readonly": True},
            "hostname": "sandbox",
            "mounts": self._mounts(spec, layout),
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
                "seccomp": _SECCOMP,
            },
        }
        descriptor = os.open(root / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(config, handle)

    async def run(self, spec: SandboxSpec) -> SandboxResult:
        """Runs ``spec.program`` in a fresh gVisor sandbox."""
        if spec.egress:
            raise SandboxError(f"gvisor:// has no network: egress to {', '.join(spec.egress)} cannot be honoured")
        program = spec.program
        if isinstance(program, PythonCall):
            if not program.file.is_file():
                raise SandboxError(f"tool file {program.file} does not exist")
            args = _protocol.runner_argv(self.python)
            stdin = _protocol.encode_request(program)
        else:
            if not program.argv:
                raise SandboxError("command has an empty argv")
            args, stdin = list(program.argv), program.stdin
        limits = spec.limits
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        root = Path(tempfile.mkdtemp(prefix="stitchwork-gvisor-", dir=shm))
        name = f"sw-{uuid.uuid4().hex[:16]}"
        layout = _rootfs.Layout(limits.disk_mb * 1024 * 1024, uid=self.uid, gid=self.uid)
        outcome = None
        try:
            self._bundle(root, spec, args, layout)
            # --ignore-cgroups: runsc would move the Sentry and the gofer out of the sandbox's cgroup into its own.
            argv = [self.runsc, "--root", str(self._state), f"--platform={self.platform}", "--network=none",
                    "--ignore-cgroups", "--oci-seccomp", "run", "--bundle", str(root), name]  # fmt: skip
            # The cgroup holds runsc's own processes too: room for the Sentry's memory and threads.
            outer = dataclasses.replace(limits, mem_mb=limits.mem_mb + self.overhead_mb)
            confinement = _process.Confinement(overhead_pids=_OVERHEAD_PIDS, stage=layout.stage(), mount_proc=True)
            sup = _process.spawn_guarded(argv, env={"PATH": "/usr/bin:/bin"}, limits=outer,
                                         confinement=confinement, name="runsc")  # fmt: skip
            outcome = await sup.run(stdin, limits)
            _process.check_report(outcome, "runsc")
        finally:
            if outcome is None or outcome.killed or outcome.code != 0:  # `runsc run` removes what exited by itself
                await self._delete(name)
            shutil.rmtree(root, ignore_errors=True)
            layout.remove()
        result = _process.sandbox_result(program, outcome, limits)
        if result.killed is None and (result.error or "").startswith("BlockingIOError"):
            result = dataclasses.replace(result, killed="pids")  # RLIMIT_NPROC refused a fork inside the Sentry
        return result

    async def _delete(self, name: str) -> None:
        """Forgets a container whose processes are gone (they died with the guard's pid namespace).

        ``runsc delete --force`` would spend seconds trying to reach the dead sandbox: its state files are removed
        instead.
        """
        for entry in self._state.glob(f"*{name}*"):
            with contextlib.suppress(OSError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


def features() -> Mapping[str, Any]:
    """What ``stitchwork doctor`` reports for gVisor."""
    ok, reason = GvisorSandbox.available()
    return {"available": ok, "reason": reason, "runsc": _runsc_path(), "cgroup": _process.cgroup_support().describe()}
