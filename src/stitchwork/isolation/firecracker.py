"""``firecracker://``: each program in a fresh Firecracker microVM (hosts with hardware KVM only).

URI: ``firecracker://?kernel=/path/vmlinux&rootfs=/path/rootfs.ext4&firecracker=/usr/bin/firecracker``.

The operator provides an uncompressed guest kernel and an ext4 root filesystem whose ``/sbin/stitchwork-init``
(Stitchwork does not build images) reads the request from the kernel command line parameter
``stitchwork.request=<base64 JSON>`` — ``{"argv": [...], "stdin": "<base64>", "env": {...}}`` for a
:class:`Command`, or the :mod:`~stitchwork.isolation._runner` request plus ``"python": true`` for a
:class:`PythonCall` (the tool file is copied into the request as ``"source"``) — runs it with ``/work`` mounted
from the second drive, prints ``stdout``/``stderr``/exit code as one JSON line after :data:`RESULT_MARKER` on the
serial console, and powers off. No network device is configured. ``mem_mb`` becomes the VM's memory size,
``timeout_s`` the wall-clock limit (the ``firecracker`` process is killed), ``cpu_s`` is bounded by it.

:meth:`FirecrackerSandbox.vm_config` builds the ``--config-file`` JSON; it is what the contract tests check on
hosts where no VM can boot.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from stitchwork.errors import BackendUnavailable, ConfigError, SandboxError
from stitchwork.isolation import _protocol
from stitchwork.isolation._base import Command, PythonCall, Sandbox, SandboxResult, SandboxSpec
from stitchwork.isolation._kvm import kvm_and_binary
from stitchwork.isolation._process import run_with_timeout

RESULT_MARKER = "\x1estitchwork-vm-result\x1e"
_OPTIONS = frozenset({"kernel", "rootfs", "firecracker", "vcpus"})


def _request(spec: SandboxSpec) -> dict[str, Any]:
    program = spec.program
    if isinstance(program, PythonCall):
        try:
            source = program.file.read_text(encoding="utf-8")
        except OSError as exc:
            raise SandboxError(f"cannot read the tool file {program.file}: {exc}") from exc
        request = _protocol.request(program, env=spec.env)
        return {"python": True, **request, "payload": dict(program.payload), "source": source}
    assert isinstance(program, Command)
    if not program.argv:
        raise SandboxError("command has an empty argv")
    return {"argv": list(program.argv), "stdin": base64.b64encode(program.stdin).decode(), "env": dict(spec.env)}


def parse_console(console: bytes) -> dict[str, Any] | None:
    """The guest's result line from the serial console output (None when it never printed one)."""
    text = console.decode("utf-8", "replace")
    _, marker, tail = text.rpartition(RESULT_MARKER)
    if not marker:
        return None
    try:
        value = json.loads(tail.splitlines()[0])
    except (ValueError, IndexError):
        return None
    return value if isinstance(value, dict) else None


class FirecrackerSandbox(Sandbox):
    """Firecracker microVM per program; see the module docs.

    Raises:
        BackendUnavailable: No usable KVM, no ``firecracker`` binary, or no kernel/rootfs configured.
    """

    def __init__(self, uri: str = "firecracker://", **options: Any) -> None:
        self.uri = uri
        merged = {**dict(parse_qsl(urlsplit(uri).query)), **{k: str(v) for k, v in options.items()}}
        unknown = set(merged) - _OPTIONS
        if unknown:
            raise ConfigError(f"firecracker sandbox: unknown option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
        self.firecracker = merged.get("firecracker") or shutil.which("firecracker") or ""
        self.kernel = Path(merged.get("kernel", "/var/lib/stitchwork/firecracker/vmlinux"))
        self.rootfs = Path(merged.get("rootfs", "/var/lib/stitchwork/firecracker/rootfs.ext4"))
        self.vcpus = int(merged.get("vcpus", "1"))
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailable(f"firecracker://: {reason}")

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Needs hardware KVM and the ``firecracker`` binary."""
        return kvm_and_binary("firecracker", "it is not packaged for Debian; install a release")

    def vm_config(self, spec: SandboxSpec, work_image: Path) -> dict[str, Any]:
        """The ``firecracker --config-file`` document for one run."""
        request = base64.b64encode(json.dumps(_request(spec), separators=(",", ":")).encode()).decode()
        return {
            "boot-source": {
                "kernel_image_path": str(self.kernel),
                "boot_args": f"console=ttyS0 reboot=k panic=1 pci=off quiet init=/sbin/stitchwork-init "
                f"stitchwork.request={request}",
            },
            "drives": [
                {"drive_id": "rootfs", "path_on_host": str(self.rootfs), "is_root_device": True, "is_read_only": True},
                {"drive_id": "work", "path_on_host": str(work_image), "is_root_device": False, "is_read_only": False},
            ],
            "machine-config": {"vcpu_count": self.vcpus, "mem_size_mib": spec.limits.mem_mb, "smt": False},
            "network-interfaces": [],
        }

    async def run(self, spec: SandboxSpec) -> SandboxResult:
        """Boots a microVM for ``spec.program`` and reads its result from the serial console."""
        if spec.egress:
            raise SandboxError("firecracker:// is configured without a network device: egress cannot be honoured")
        for path in (self.kernel, self.rootfs):
            if not path.is_file():
                raise SandboxError(f"firecracker://: {path} does not exist (kernel and rootfs are set by the operator)")
        scratch = Path(tempfile.mkdtemp(prefix="stitchwork-fc-"))
        started = time.perf_counter()
        try:
            work_image = scratch / "work.ext4"
            await _make_work_image(work_image, spec.workdir)
            config = scratch / "vm.json"
            config.write_text(json.dumps(self.vm_config(spec, work_image)))
            vm = await run_with_timeout(
                (self.firecracker, "--no-api", "--config-file", str(config)), spec.limits.timeout_s
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        duration = time.perf_counter() - started
        console, stderr, killed = vm.stdout, vm.stderr, vm.killed
        answer = parse_console(console)
        if killed or answer is None:
            return SandboxResult(exit_code=-signal.SIGKILL if killed else (vm.returncode or 1),
                                 stdout=console[-spec.limits.max_output_bytes:], stderr=stderr[-65536:],
                                 error=f"timed out after {spec.limits.timeout_s:g} s" if killed
                                 else "the VM printed no result", killed=killed, duration_s=duration)  # fmt: skip
        out = base64.b64decode(answer.get("stdout", ""))
        err = base64.b64decode(answer.get("stderr", ""))
        return SandboxResult(exit_code=int(answer.get("exit_code", 0)), stdout=out, stderr=err,
                             value=answer.get("value"), error=answer.get("error"), duration_s=duration)  # fmt: skip


async def _make_work_image(path: Path, workdir: Path | None, size_mb: int = 64) -> None:
    """An ext4 image holding ``workdir`` (``mkfs.ext4 -d``); the guest mounts it at ``/work``."""
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None:
        raise SandboxError("firecracker:// needs mkfs.ext4 (e2fsprogs) to build the /work drive")
    with path.open("wb") as handle:
        handle.truncate(size_mb * 1024 * 1024)
    args = [mkfs, "-q", "-F", *(["-d", str(workdir)] if workdir else []), str(path)]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode:
        raise SandboxError(f"firecracker://: mkfs.ext4 failed: {err.decode(errors='replace')[-300:]}")
