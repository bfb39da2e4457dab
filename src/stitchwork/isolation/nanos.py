"""``nanos://``: each program as a Nanos unikernel booted by NanoVMs' ``ops`` (hosts with hardware KVM only).

URI: ``nanos://?ops=/usr/local/bin/ops&python=/usr/bin/python3``.

A :class:`PythonCall` runs ``python3 -I -S -B /stitchwork/_runner.py`` in the unikernel with the runner and the
tool file packed into the image and the request file passed as ``/stitchwork/request.json`` (the image has no
stdin); a :class:`Command` runs its ``argv[0]`` (an ELF of the host, packed by ``ops``). :meth:`ops_config` builds
the ``ops run -c`` JSON: the files, ``/work`` mapped from ``spec.workdir``, ``Env`` = ``spec.env`` only,
``RunConfig.Memory`` = ``mem_mb``, no network (``ops`` gets no ``-p`` ports and ``RunConfig.Nics`` is empty).
``timeout_s`` kills ``ops`` and its QEMU. Output is the guest console.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
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

_OPTIONS = frozenset({"ops", "python"})
_REQUEST_PATH = "/stitchwork/request.json"


class NanosSandbox(Sandbox):
    """Nanos unikernel per program via ``ops``; see the module docs.

    Raises:
        BackendUnavailable: No usable KVM or no ``ops`` binary.
    """

    def __init__(self, uri: str = "nanos://", **options: Any) -> None:
        self.uri = uri
        merged = {**dict(parse_qsl(urlsplit(uri).query)), **{k: str(v) for k, v in options.items()}}
        unknown = set(merged) - _OPTIONS
        if unknown:
            raise ConfigError(f"nanos sandbox: unknown option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
        self.ops = merged.get("ops") or shutil.which("ops") or ""
        self.python = merged.get("python") or os.path.realpath(sys.executable)
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailable(f"nanos://: {reason}")

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Needs hardware KVM and NanoVMs' ``ops`` CLI."""
        return kvm_and_binary("ops", "NanoVMs' ops is not packaged for Debian or PyPI")

    def ops_config(self, spec: SandboxSpec, request_file: Path | None) -> dict[str, Any]:
        """The ``ops run -c`` document for one run."""
        program = spec.program
        files: dict[str, str] = {}
        if isinstance(program, PythonCall):
            args = [*_protocol.RUNNER_FLAGS, _protocol.SANDBOX_PATH, _REQUEST_PATH]
            files[_protocol.SANDBOX_PATH] = _protocol.RUNNER_HOST_PATH
            files[_protocol.tool_path(program)] = str(program.file)
            if request_file is not None:
                files[_REQUEST_PATH] = str(request_file)
        else:
            assert isinstance(program, Command)
            args = list(program.argv[1:])
        mapped = {"/work": str(spec.workdir)} if spec.workdir is not None else {}
        return {
            "Args": args,
            "Env": dict(spec.env),
            "MapDirs": mapped,
            "Files": sorted(files),
            "FileMap": files,
            "RunConfig": {"Memory": f"{spec.limits.mem_mb}M", "CPUs": 1, "Nics": [], "Ports": []},
        }

    async def run(self, spec: SandboxSpec) -> SandboxResult:
        """Builds and boots a unikernel image for ``spec.program``."""
        if spec.egress:
            raise SandboxError("nanos:// runs without a network interface: egress cannot be honoured")
        program = spec.program
        scratch = Path(tempfile.mkdtemp(prefix="stitchwork-nanos-"))
        started = time.perf_counter()
        try:
            request_file = None
            if isinstance(program, PythonCall):
                request_file = scratch / "request.json"
                request = {**_protocol.request(program), "payload": dict(program.payload)}
                request_file.write_text(json.dumps(request))
                target = self.python
            else:
                if not program.argv:
                    raise SandboxError("command has an empty argv")
                target = program.argv[0]
            config = scratch / "config.json"
            config.write_text(json.dumps(self.ops_config(spec, request_file)))
            argv = (self.ops, "run", target, "-c", str(config))
            vm = await run_with_timeout(argv, spec.limits.timeout_s, stdin=None)  # ops inherits this stdin
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        out, err, killed = vm.stdout, vm.stderr, vm.killed
        cap = spec.limits.max_output_bytes
        if isinstance(program, PythonCall) and killed is None:
            answer = _protocol.last_line_answer(out)
            if answer is not None:
                return SandboxResult(exit_code=vm.returncode or 0, stdout=out[:cap], stderr=err[:cap],
                                     value=answer.value, error=answer.error,
                                     duration_s=time.perf_counter() - started)  # fmt: skip
        return SandboxResult(
            exit_code=-signal.SIGKILL if killed else (vm.returncode or 0),
            stdout=out[:cap], stderr=err[:cap], killed=killed, truncated=len(out) + len(err) > cap,
            error=f"timed out after {spec.limits.timeout_s:g} s" if killed else None,
            duration_s=time.perf_counter() - started,
        )  # fmt: skip
