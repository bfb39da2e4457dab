"""Contract tests for the KVM backends (``firecracker://``, ``nanos://``).

Booting runs where the host has hardware KVM and the binaries; elsewhere those tests skip with the backend's own
reason. What each adapter hands its VM monitor (the Firecracker config, the ``ops`` config) is checked everywhere.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from stitchwork.errors import BackendUnavailable
from stitchwork.isolation._base import Command, Limits, PythonCall, SandboxSpec, open_sandbox
from stitchwork.isolation._kvm import kvm_usable
from stitchwork.isolation.firecracker import RESULT_MARKER, FirecrackerSandbox, parse_console
from stitchwork.isolation.nanos import NanosSandbox

ToolFactory = Callable[[str], Path]


def unbooted(cls: type) -> object:
    """An adapter object without the host check (to inspect the configuration it would boot)."""
    sandbox = object.__new__(cls)
    sandbox.uri = f"{cls.__name__}://"
    return sandbox


@pytest.mark.parametrize("uri", ["firecracker://", "nanos://"])
async def test_boots_and_runs_python_where_the_host_can(uri: str, make_tool: ToolFactory) -> None:
    cls = FirecrackerSandbox if uri.startswith("firecracker") else NanosSandbox
    ok, reason = cls.available()
    if not ok:
        pytest.skip(f"{uri} unavailable: {reason}")
    async with open_sandbox(uri) as sandbox:
        result = await sandbox.run(SandboxSpec(PythonCall(make_tool("def f():\n    return 41 + 1\n"), "f")))
    assert result.value == 42, result


@pytest.mark.parametrize("uri", ["firecracker://", "nanos://"])
def test_unavailable_hosts_get_a_precise_reason(uri: str) -> None:
    cls = FirecrackerSandbox if uri.startswith("firecracker") else NanosSandbox
    ok, reason = cls.available()
    kvm_ok, kvm_reason = kvm_usable()
    if ok:
        pytest.skip(f"{uri} is usable here")
    assert reason
    if not kvm_ok:
        assert reason == kvm_reason  # the KVM problem is named first: a binary would not help
    with pytest.raises(BackendUnavailable, match=re.escape(reason)):
        open_sandbox(uri)


def test_firecracker_config_carries_the_request_and_limits(make_tool: ToolFactory, tmp_path: Path) -> None:
    sandbox = unbooted(FirecrackerSandbox)
    assert isinstance(sandbox, FirecrackerSandbox)
    sandbox.kernel, sandbox.rootfs, sandbox.vcpus = Path("/k/vmlinux"), Path("/k/rootfs.ext4"), 1
    tool = make_tool("def f(x):\n    return x\n")
    spec = SandboxSpec(PythonCall(tool, "f", {"args": {"x": 1}}), env={"K": "v"}, limits=Limits(mem_mb=256))

    config = sandbox.vm_config(spec, tmp_path / "work.ext4")

    assert config["machine-config"]["mem_size_mib"] == 256
    assert config["network-interfaces"] == []
    root, work = config["drives"]
    assert root["is_read_only"] and root["path_on_host"] == "/k/rootfs.ext4" and not work["is_read_only"]
    encoded = config["boot-source"]["boot_args"].split("stitchwork.request=", 1)[1]
    request = json.loads(base64.b64decode(encoded))
    assert request["function"] == "f" and request["payload"] == {"args": {"x": 1}} and request["env"] == {"K": "v"}
    assert "return x" in request["source"]


def test_firecracker_reads_the_result_after_the_marker() -> None:
    console = b"[ 0.1] booting\nnoise\n" + RESULT_MARKER.encode() + b'{"exit_code": 0, "value": 42}\n[ 0.3] reboot\n'

    assert parse_console(console) == {"exit_code": 0, "value": 42}
    assert parse_console(b"kernel panic\n") is None


def test_nanos_config_maps_only_the_workdir_and_granted_env(make_tool: ToolFactory, tmp_path: Path) -> None:
    sandbox = unbooted(NanosSandbox)
    assert isinstance(sandbox, NanosSandbox)
    tool = make_tool("def f():\n    return 1\n")
    spec = SandboxSpec(PythonCall(tool, "f"), workdir=tmp_path, env={"K": "v"}, limits=Limits(mem_mb=128))

    config = sandbox.ops_config(spec, tmp_path / "request.json")
    command = sandbox.ops_config(SandboxSpec(Command(("/bin/echo", "hi"))), None)

    assert config["Env"] == {"K": "v"} and config["MapDirs"] == {"/work": str(tmp_path)}
    assert config["RunConfig"]["Memory"] == "128M" and config["RunConfig"]["Nics"] == []
    assert config["FileMap"][f"/tool/{tool.name}"] == str(tool)
    assert config["Args"][-1] == "/stitchwork/request.json"
    assert command["Args"] == ["hi"] and command["MapDirs"] == {}
