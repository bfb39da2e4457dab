"""``gvisor://``: each program in a fresh gVisor sandbox (``runsc run`` on a generated OCI bundle).

URI options: ``gvisor://?platform=ptrace&runsc=/usr/bin/runsc&python=/usr/bin/python3``. The ptrace platform is
the default because the KVM platform hangs on hosts like this one (PVM); ``systrap`` needs a newer runsc.

The bundle's root is an empty read-only directory; what a program sees is bound into it: ``/usr`` (and the
``/bin``, ``/lib*``, ``/sbin`` links), the interpreter's prefix when it lives outside ``/usr`` (its
``site-packages`` hidden under an empty tmpfs), the runner at ``/stitchwork/_runner.py`` and the tool file at
``/tool/<name>`` (read-only), a generated ``/etc/passwd`` and ``/etc/group``, ``/work`` (``spec.workdir``,
writable; else a tmpfs) and a tmpfs at ``/tmp``. Namespaces: pid, network (``--network=none``: loopback only),
ipc, uts, mount. No capabilities, ``noNewPrivileges``. Every system call is served by gVisor's user-space
kernel (the Sentry), not the host kernel.

Limits are OCI rlimits enforced by the Sentry: ``RLIMIT_AS`` (``mem_mb``), ``RLIMIT_CPU`` (``cpu_s``),
``RLIMIT_NPROC`` (``max_pids``), ``RLIMIT_FSIZE`` (64 MiB), ``RLIMIT_NOFILE`` (256), ``RLIMIT_CORE`` 0.
``timeout_s`` and ``max_output_bytes`` are enforced here as for ``bwrap://`` (same supervisor, same result
rules: see :mod:`stitchwork.isolation._process`); a killed sandbox is then removed with ``runsc delete --force``.

The environment (``spec.env``, where the gateway puts secrets) has to be in the bundle's ``config.json``; the
bundle lives in ``/dev/shm`` (memory, mode 0700) and is deleted when the run ends. ``spec.egress`` is refused.
"""

from __future__ import annotations

import asyncio
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

_OPTIONS = frozenset({"platform", "runsc", "python"})
_RESERVED = ("/proc", "/dev", "/stitchwork", "/tool", "/usr", "/etc", "/work", "/tmp")
_FSIZE_MB = 64
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


def _runsc_path() -> str | None:
    return shutil.which("runsc")


class GvisorSandbox(Sandbox):
    """Runs each program under gVisor (``runsc``); see the module docs.

    Args:
        uri: ``gvisor://`` with optional ``platform``, ``runsc`` and ``python`` query options.
        **options: The same options as keywords (they win over the URI).

    Raises:
        BackendUnavailable: No ``runsc`` here, or it cannot run as this user.
        ConfigError: Unknown options.
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
        self._state = Path(tempfile.mkdtemp(prefix="stitchwork-runsc-state-"))
        self._etc = _rootfs.generated_etc()
        self._prefix = _rootfs.python_prefix(self.python)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether ``runsc`` is installed and this process is root (rootless runsc needs more set-up)."""
        if _runsc_path() is None:
            return False, "runsc (gVisor) is not installed: apt-get install runsc"
        if os.getuid() != 0:
            return False, "runsc needs root here (rootless gVisor is not set up)"
        return True, ""

    async def aclose(self) -> None:
        """Removes the runsc state directory."""
        shutil.rmtree(self._state, ignore_errors=True)

    def _mounts(self, spec: SandboxSpec, tool: Path | None) -> list[dict[str, Any]]:
        def bind(source: str, target: str, writable: bool = False) -> dict[str, Any]:
            return {"destination": target, "type": "bind", "source": source,
                    "options": ["rbind", "rw" if writable else "ro"]}  # fmt: skip

        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["size=64m", "mode=1777"]},
            bind("/usr", "/usr"),
            bind(str(self._etc / "passwd"), "/etc/passwd"),
            bind(str(self._etc / "group"), "/etc/group"),
        ]
        for name in ("ld.so.cache", "localtime", "nsswitch.conf"):
            if os.path.exists(f"/etc/{name}"):
                mounts.append(bind(os.path.realpath(f"/etc/{name}"), f"/etc/{name}"))
        if self._prefix is not None:
            mounts.append(bind(self._prefix, self._prefix))
            for site in _rootfs.site_packages(self._prefix):
                mounts.append({"destination": site, "type": "tmpfs", "source": "tmpfs", "options": ["size=1k"]})
        _rootfs.check_workdir(spec.workdir)
        if spec.workdir is not None:
            mounts.append(bind(str(spec.workdir), "/work", writable=True))
        else:
            mounts.append({"destination": "/work", "type": "tmpfs", "source": "tmpfs", "options": ["size=64m"]})
        if tool is not None:
            mounts.append(bind(_protocol.RUNNER_HOST_PATH, _protocol.SANDBOX_PATH))
            mounts.append(bind(str(tool), f"/tool/{tool.name}"))
        for mount in spec.mounts:
            _rootfs.check_mount(mount, reserved=(), reserved_trees=_RESERVED)
            mounts.append(bind(str(mount.source), mount.target, mount.writable))
        return mounts

    @staticmethod
    def _rlimits(limits: Limits) -> list[dict[str, Any]]:
        values = _process.rlimits(limits, fsize_mb=_FSIZE_MB, nofile=_NOFILE)
        return [{"type": f"RLIMIT_{name}", "hard": value, "soft": value} for name, value in values.items()]

    def _bundle(self, root: Path, spec: SandboxSpec, args: list[str], tool: Path | None) -> None:
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
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": [f"{k}={v}" for k, v in env.items()],
                "cwd": "/work",
                "capabilities": {},
                "rlimits": self._rlimits(spec.limits),
                "noNewPrivileges": True,
            },
            "root": {"path": "rootfs", "readonly": True},
            "hostname": "sandbox",
            "mounts": self._mounts(spec, tool),
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
        tool: Path | None = None
        if isinstance(program, PythonCall):
            if not program.file.is_file():
                raise SandboxError(f"tool file {program.file} does not exist")
            tool = program.file.resolve()
            args = _protocol.runner_argv(self.python)
            stdin = _protocol.encode_request(program, tool=f"/tool/{tool.name}")
        else:
            if not program.argv:
                raise SandboxError("command has an empty argv")
            args, stdin = list(program.argv), program.stdin
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        root = Path(tempfile.mkdtemp(prefix="stitchwork-gvisor-", dir=shm))
        name = f"sw-{uuid.uuid4().hex[:16]}"
        outcome = None
        try:
            self._bundle(root, spec, args, tool)
            argv = [self.runsc, "--root", str(self._state), f"--platform={self.platform}", "--network=none",
                    "--oci-seccomp", "run", "--bundle", str(root), name]  # fmt: skip
            # RLIMIT_CPU is not enforced by the Sentry on the ptrace platform: cpu_s becomes a wall-clock bound.
            limits = spec.limits
            wall = dataclasses.replace(limits, timeout_s=min(limits.timeout_s, limits.cpu_s))
            env = {"PATH": "/usr/bin:/bin"}
            outcome = await _process.supervise(argv, env=env, stdin=stdin, limits=wall, name="runsc")
        finally:
            if outcome is None or outcome.killed:  # `runsc run` removes a container that exited by itself
                await self._delete(name)
            shutil.rmtree(root, ignore_errors=True)
        result = _process.sandbox_result(program, outcome, wall)
        if result.killed == "timeout" and limits.cpu_s < limits.timeout_s:
            message = f"CPU time limit exceeded ({limits.cpu_s:g} s, enforced as wall time under gVisor)"
            result = dataclasses.replace(result, killed="cpu", error=message)
        elif result.killed is None and (result.error or "").startswith("BlockingIOError"):
            result = dataclasses.replace(result, killed="pids")  # RLIMIT_NPROC refused a fork
        return result

    async def _delete(self, name: str) -> None:
        with contextlib.suppress(OSError):
            proc = await asyncio.create_subprocess_exec(
                self.runsc, "--root", str(self._state), "delete", "--force", name,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            await proc.wait()


def features() -> Mapping[str, Any]:
    """What ``stitchwork doctor`` reports for gVisor."""
    ok, reason = GvisorSandbox.available()
    return {"available": ok, "reason": reason, "runsc": _runsc_path()}
