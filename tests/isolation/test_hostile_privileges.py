"""Sandboxed code never runs as host root: the setuid-copy attack and what the program holds, on every isolating
backend (``bwrap://``, ``gvisor://``, ``wasm://`` where the host has them)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stitchwork.isolation._base import Command, Limits, Mount, PythonCall, Sandbox, SandboxSpec

ToolFactory = Callable[[str], Path]

SETUID_TOOL = r"""
import os


def make_setuid(path, source):
    data = open(source, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o6755)
    return oct(os.stat(path).st_mode)


def try_chmod(path):
    with open(path, "w") as handle:
        handle.write("#!/bin/sh\nid -u\n")
    try:
        os.chmod(path, 0o6755)
    except (OSError, AttributeError, NotImplementedError) as exc:
        return f"refused: {type(exc).__name__}"
    return oct(os.stat(path).st_mode)
"""


@pytest.fixture
def sandbox(isolating_sandbox: Sandbox) -> Sandbox:
    return isolating_sandbox


def kind(sandbox: Sandbox) -> str:
    return sandbox.uri.split(":", 1)[0]


@pytest.fixture
def open_workdir() -> Iterator[Path]:
    """A work directory an unprivileged host user can reach (to run what the sandbox left there as that user)."""
    parent = Path(tempfile.mkdtemp(prefix="stitchwork-setuid-test-"))
    parent.chmod(0o755)
    work = parent / "work"
    work.mkdir()
    work.chmod(0o755)
    yield work
    shutil.rmtree(parent, ignore_errors=True)


def assert_not_setuid_root(path: Path) -> None:
    info = path.lstat()
    assert not info.st_mode & (stat.S_ISUID | stat.S_ISGID), f"{path} is {oct(info.st_mode)} on the host"
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return
    # Run what the sandbox left as an unprivileged host user: it must not become root.
    ran = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(path), "-u"],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert ran.stdout.strip() != "0", f"running {path} as nobody gave euid 0"


async def test_a_setuid_copy_in_the_workdir_is_not_setuid_root_on_the_host(
    sandbox: Sandbox, open_workdir: Path
) -> None:
    if not sandbox.native_commands:
        pytest.skip("wasm:// runs no host binaries (see the chmod test below)")
    script = "cp /usr/bin/id /work/evil && chmod u+s,g+s /work/evil && /work/evil -u"
    result = await sandbox.run(SandboxSpec(Command(("/bin/sh", "-c", script)), workdir=open_workdir))

    assert result.exit_code == 0, result
    assert result.stdout.decode().strip() != "0", "the sandboxed program ran as root"
    assert_not_setuid_root(open_workdir / "evil")


async def test_a_setuid_copy_in_a_writable_mount_is_not_setuid_root_on_the_host(
    sandbox: Sandbox, open_workdir: Path
) -> None:
    if not sandbox.native_commands:
        pytest.skip("wasm:// runs no host binaries")
    granted = open_workdir.parent / "granted"
    granted.mkdir()
    granted.chmod(0o755)
    spec = SandboxSpec(
        Command(("/bin/sh", "-c", "cp /usr/bin/id /granted/evil && chmod 6755 /granted/evil")),
        mounts=(Mount(granted, "/granted", writable=True),),
    )

    result = await sandbox.run(spec)

    assert result.exit_code == 0, result
    assert_not_setuid_root(granted / "evil")


async def test_a_tool_making_a_setuid_file_leaves_none_on_the_host(
    sandbox: Sandbox, make_tool: ToolFactory, open_workdir: Path
) -> None:
    tool = make_tool(SETUID_TOOL)
    if sandbox.native_commands:
        call = PythonCall(tool, "make_setuid", {"args": {"path": "/work/evil", "source": "/usr/bin/id"}})
    else:  # WASI: no host binary to copy, and no chmod to speak of; the attempt must leave nothing setuid
        call = PythonCall(tool, "try_chmod", {"args": {"path": "/work/evil"}})

    result = await sandbox.run(SandboxSpec(call, workdir=open_workdir))

    assert result.error is None, result
    assert_not_setuid_root(open_workdir / "evil")


async def test_the_program_holds_no_privilege(sandbox: Sandbox, workdir: Path) -> None:
    if not sandbox.native_commands:
        pytest.skip("WASI has no users, capabilities or privilege to gain")
    script = "id -u; id -g; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status"
    result = await sandbox.run(SandboxSpec(Command(("/bin/sh", "-c", script)), workdir=workdir))

    lines = result.stdout.decode().splitlines()
    fields = dict(line.split(":\t", 1) for line in lines[2:])
    assert lines[:2] == ["65534", "65534"], result  # never uid 0, not even inside
    assert fields["CapEff"] == fields["CapPrm"] == fields["CapBnd"] == "0000000000000000", fields
    assert fields["Seccomp"] == "2", fields
    if kind(sandbox) == "bwrap":  # gVisor's /proc does not show it; its OCI spec sets noNewPrivileges
        assert fields["NoNewPrivs"] == "1", fields


async def test_bwrap_maps_the_sandbox_user_to_an_unprivileged_host_uid(sandbox: Sandbox) -> None:
    if kind(sandbox) != "bwrap" or os.geteuid() != 0:
        pytest.skip("bwrap as root: the sandbox's own user namespace")
    result = await sandbox.run(SandboxSpec(Command(("/bin/cat", "/proc/self/uid_map", "/proc/self/gid_map"))))

    maps = [line.split() for line in result.stdout.decode().splitlines()]
    assert maps == [["65534", "65534", "1"], ["65534", "65534", "1"]], result  # host root is not mapped at all


async def test_writable_space_is_mounted_nosuid_nodev(sandbox: Sandbox, workdir: Path) -> None:
    if kind(sandbox) != "bwrap":
        pytest.skip("gVisor's mountinfo does not list mount flags; WASI has no mounts")
    result = await sandbox.run(SandboxSpec(Command(("/bin/cat", "/proc/self/mountinfo")), workdir=workdir))

    points = {}
    for line in result.stdout.decode().splitlines():
        fields = line.split()
        points[fields[4]] = fields[5]
    for point in ("/work", "/tmp", "/dev/shm"):
        assert {"nosuid", "nodev"} <= set(points[point].split(",")), (point, points[point])


async def test_a_device_node_cannot_be_made_in_the_workdir(sandbox: Sandbox, workdir: Path) -> None:
    if not sandbox.native_commands:
        pytest.skip("WASI has no mknod")
    result = await sandbox.run(
        SandboxSpec(Command(("/bin/sh", "-c", "mknod /work/mem c 1 1; echo $?")), workdir=workdir,
                    limits=Limits(timeout_s=20))
    )  # fmt: skip

    assert result.stdout.decode().strip() != "0", result
    assert not (workdir / "mem").exists()
