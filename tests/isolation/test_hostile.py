"""Hostile programs against every isolating backend (``bwrap://``, ``wasm://``, ``gvisor://`` where the host has
them): each attack must fail inside the sandbox and say why in the result."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from stitchwork.isolation._base import Limits, PythonCall, Sandbox, SandboxResult, SandboxSpec

ToolFactory = Callable[[str], Path]  # the make_tool fixture (tests/ is not a package)
REPO_FILE = Path(__file__).resolve().parents[2] / "pyproject.toml"

HOSTILE = r"""
import os
import signal
import socket


def read(path):
    with open(path, "rb") as handle:
        return handle.read().decode("utf-8", "replace")


def write(path):
    with open(path, "w") as handle:
        handle.write("owned")
    return "written"


def listdir(path):
    return sorted(os.listdir(path))


def inet_socket():
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    return "got a socket"


def unix_socketpair():
    left, right = socket.socketpair()
    left.sendall(b"ping")
    return right.recv(4).decode()


def dns():
    return socket.getaddrinfo("example.com", 443)


def fork_bomb():
    while True:
        os.fork()


def memory_bomb():
    hoard = []
    while True:
        hoard.append(bytearray(16 * 1024 * 1024))


def spin():
    while True:
        pass


def spew():
    chunk = b"x" * 65536
    while True:
        os.write(2, chunk)


def kill_everything():
    for target in (-1, 1):
        try:
            os.kill(target, signal.SIGKILL)
        except OSError:
            pass
    return "still here"


def unshare_user_namespace():
    import ctypes  # not under WASI

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return "unshared"


def seccomp_mode():
    for line in read("/proc/self/status").splitlines():
        if line.startswith("Seccomp:"):
            return line.split()[1]


def write_then_list(name):
    with open(name, "w") as handle:
        handle.write(name)
    import time
    time.sleep(0.3)
    return sorted(os.listdir("/work"))
"""


@pytest.fixture
def hostile(make_tool: ToolFactory) -> Path:
    return make_tool(HOSTILE)


@pytest.fixture
def sandbox(isolating_sandbox: Sandbox) -> Sandbox:
    return isolating_sandbox


def kind(sandbox: Sandbox) -> str:
    return sandbox.uri.split(":", 1)[0]


def only(sandbox: Sandbox, *kinds: str, why: str) -> None:
    if kind(sandbox) not in kinds:
        pytest.skip(f"{kind(sandbox)}://: {why}")


# What WASI says when a path is outside every preopen, or a preopen is read-only.
NOT_CAPABLE = ("Capabilities insufficient", "Operation not permitted", "Read-only file system")


async def run(
    sandbox: Sandbox,
    tool: Path,
    function: str,
    *,
    workdir: Path | None = None,
    limits: Limits | None = None,
    **args: object,
) -> SandboxResult:
    spec = SandboxSpec(PythonCall(tool, function, {"args": args}), workdir=workdir, limits=limits or Limits())
    return await sandbox.run(spec)


def assert_error(result: SandboxResult, *fragments: str) -> None:
    assert result.value is None, f"the attack succeeded: {result.value!r}"
    assert result.error is not None, result
    assert any(fragment in result.error for fragment in fragments), result.error


# -- the filesystem ----------------------------------------------------------------------------------------


async def test_etc_shadow_is_not_there(sandbox: Sandbox, hostile: Path) -> None:
    assert_error(await run(sandbox, hostile, "read", path="/etc/shadow"), "FileNotFoundError", *NOT_CAPABLE)


@pytest.mark.parametrize("host_file", ["/root/.bashrc", str(REPO_FILE), "/proc/1/root/etc/shadow"])
async def test_host_files_outside_the_mounts_are_not_there(
    sandbox: Sandbox, hostile: Path, host_file: str
) -> None:
    result = await run(sandbox, hostile, "read", path=host_file)
    assert_error(result, "FileNotFoundError", "PermissionError")


async def test_an_unmounted_host_tmp_file_is_not_there(sandbox: Sandbox, hostile: Path, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host secret")

    assert_error(await run(sandbox, hostile, "read", path=str(secret)), "FileNotFoundError", *NOT_CAPABLE)


async def test_the_interpreters_site_packages_are_hidden(sandbox: Sandbox, hostile: Path) -> None:
    site = next(p for p in sys.path if p.endswith("site-packages"))
    site = os.path.join(os.path.realpath(sys.base_prefix), os.path.relpath(site, sys.prefix))

    result = await run(sandbox, hostile, "listdir", path=site)

    assert result.value == [] or result.error, result


async def test_host_proc_1_environ_is_not_visible(
    sandbox: Sandbox, hostile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STITCHWORK_PLANTED", "planted-in-the-host")

    environ = await run(sandbox, hostile, "read", path="/proc/1/environ")
    processes = await run(sandbox, hostile, "listdir", path="/proc")

    assert "planted-in-the-host" not in str(environ.value) + str(environ.error)
    if kind(sandbox) == "wasm":  # no /proc at all
        assert_error(environ, *NOT_CAPABLE)
        assert_error(processes, *NOT_CAPABLE)
    else:  # pid 1 is the sandboxed program itself, not the host's init
        assert environ.error is None, environ
        assert [name for name in processes.value if name.isdigit()] == ["1"], processes.value


@pytest.mark.parametrize(
    "path", ["/usr/owned", "/etc/owned", "/tool/owned", "/owned", "/stitchwork/_runner.py", "/dev/owned"]
)
async def test_writing_outside_work_fails(sandbox: Sandbox, hostile: Path, path: str) -> None:
    result = await run(sandbox, hostile, "write", path=path)

    if kind(sandbox) == "gvisor" and path == "/dev/owned":  # gVisor's /dev is a private in-memory tmpfs
        assert not os.path.exists(path)
        return
    assert_error(result, "Read-only file system", "Permission denied", *NOT_CAPABLE)
    assert path == "/stitchwork/_runner.py" or not os.path.exists(path)


async def test_proc_takes_no_new_files(sandbox: Sandbox, hostile: Path) -> None:
    result = await run(sandbox, hostile, "write", path="/proc/owned")
    assert_error(result, "No such file or directory", "Permission denied", *NOT_CAPABLE)


async def test_the_tool_file_itself_is_read_only(sandbox: Sandbox, hostile: Path) -> None:
    before = hostile.read_text()

    result = await run(sandbox, hostile, "write", path=f"/tool/{hostile.name}")
    assert_error(result, "Read-only file system", "Permission denied", *NOT_CAPABLE)
    assert hostile.read_text() == before


async def test_symlink_in_workdir_does_not_lead_out(
    sandbox: Sandbox, hostile: Path, workdir: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host secret")
    (workdir / "to_secret").symlink_to(secret)
    (workdir / "to_passwd").symlink_to("/etc/passwd")

    dangling = await run(sandbox, hostile, "read", workdir=workdir, path="/work/to_secret")
    passwd = await run(sandbox, hostile, "read", workdir=workdir, path="/work/to_passwd")
    written = await run(sandbox, hostile, "write", workdir=workdir, path="/work/to_passwd")

    assert_error(dangling, "FileNotFoundError", *NOT_CAPABLE)
    if kind(sandbox) == "wasm":  # WASI refuses symlinks that leave the preopen
        assert_error(passwd, *NOT_CAPABLE)
        assert_error(written, *NOT_CAPABLE)
    else:  # the sandbox's generated /etc/passwd, read-only, naming the sandbox's unprivileged user
        assert passwd.value is not None and "/root:/bin/bash" not in passwd.value
        assert "sandbox:x:65534:65534:sandbox:/work:" in passwd.value
        assert_error(written, "Read-only file system", "Permission denied")
    assert not Path("/etc/passwd").read_text().startswith("owned")


async def test_dotdot_stays_inside(sandbox: Sandbox, hostile: Path, workdir: Path) -> None:
    (workdir.parent / "beside-the-workdir.txt").write_text("host file next to the workdir")

    beside = await run(sandbox, hostile, "read", workdir=workdir, path="../beside-the-workdir.txt")
    deep = await run(sandbox, hostile, "read", workdir=workdir, path="/work/../../../../etc/shadow")
    root = await run(sandbox, hostile, "listdir", workdir=workdir, path="/work/../..")

    assert_error(beside, "FileNotFoundError", *NOT_CAPABLE)
    assert_error(deep, "FileNotFoundError", *NOT_CAPABLE)
    if root.value is None:
        assert_error(root, *NOT_CAPABLE)
    else:
        assert "home" not in root.value and "work" in root.value, root.value


async def test_two_sandboxes_cannot_see_each_others_workdir(
    sandbox: Sandbox, hostile: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()

    a, b = await asyncio.gather(
        run(sandbox, hostile, "write_then_list", workdir=first, name="a.txt"),
        run(sandbox, hostile, "write_then_list", workdir=second, name="b.txt"),
    )

    assert (a.value, b.value) == (["a.txt"], ["b.txt"])
    assert sorted(os.listdir(first)) == ["a.txt"] and sorted(os.listdir(second)) == ["b.txt"]


# -- the network and the kernel ----------------------------------------------------------------------------


async def test_inet_sockets_are_refused(sandbox: Sandbox, hostile: Path) -> None:
    result = await run(sandbox, hostile, "inet_socket")
    assert_error(result, "PermissionError", "Operation not permitted", "Not supported", "Address family")


async def test_unix_sockets_still_work(sandbox: Sandbox, hostile: Path) -> None:
    only(sandbox, "bwrap", "gvisor", why="WASI has no socketpair")
    assert (await run(sandbox, hostile, "unix_socketpair")).value == "ping"


async def test_dns_lookups_fail(sandbox: Sandbox, hostile: Path) -> None:
    assert_error(await run(sandbox, hostile, "dns"), "gaierror", "PermissionError", "getaddrinfo")


async def test_new_namespaces_are_refused_by_seccomp(sandbox: Sandbox, hostile: Path) -> None:
    only(sandbox, "bwrap", why="this checks bwrap's own seccomp filter")
    mode = await run(sandbox, hostile, "seccomp_mode")
    unshare = await run(sandbox, hostile, "unshare_user_namespace")

    assert mode.value == "2", mode  # SECCOMP_MODE_FILTER
    assert_error(unshare, "Operation not permitted")


async def test_egress_is_refused_not_ignored(sandbox: Sandbox, hostile: Path) -> None:
    from stitchwork.errors import SandboxError

    spec = SandboxSpec(PythonCall(hostile, "dns"), egress=("example.com",))
    with pytest.raises(SandboxError, match=r"egress|network"):
        await sandbox.run(spec)


# -- resource exhaustion -----------------------------------------------------------------------------------


async def test_fork_bomb_is_stopped_and_the_host_keeps_working(sandbox: Sandbox, hostile: Path) -> None:
    result = await run(sandbox, hostile, "fork_bomb", limits=Limits(max_pids=16, timeout_s=10))

    if kind(sandbox) == "wasm":  # there is no fork to call
        assert_error(result, "has no attribute 'fork'")
    else:
        assert result.killed == "pids", result
        assert result.error is not None and "BlockingIOError" in result.error
    assert result.duration_s < 10  # stopped before the 10 s timeout
    assert subprocess.run(["/bin/true"], check=False).returncode == 0
    assert (await run(sandbox, hostile, "read", path=f"/tool/{hostile.name}")).value is not None


async def test_memory_bomb_is_reported_as_memory(sandbox: Sandbox, hostile: Path) -> None:
    result = await run(sandbox, hostile, "memory_bomb", limits=Limits(mem_mb=128, timeout_s=10))

    assert result.killed == "memory", result
    assert result.error is not None and result.error.startswith("MemoryError")


async def test_infinite_loop_is_stopped_by_the_cpu_limit(sandbox: Sandbox, hostile: Path) -> None:
    result = await run(sandbox, hostile, "spin", limits=Limits(cpu_s=1, timeout_s=60))  # a loaded host: room

    assert result.killed == "cpu", result
    assert result.error is not None and "CPU time limit" in result.error
    # rusage lags the kernel's tick-based check; wasm:// enforces cpu_s as an epoch deadline on running guest code
    # (wall time while it runs), so on a busy host its thread may have had less CPU than the limit.
    used = result.cpu_s if kind(sandbox) == "bwrap" else result.duration_s  # gvisor: wall-clock bound too
    assert used >= 0.7 and result.duration_s < 60  # stopped by the CPU limit, before the timeout


async def test_infinite_loop_below_the_cpu_limit_hits_the_timeout(sandbox: Sandbox, hostile: Path) -> None:
    result = await run(sandbox, hostile, "spin", limits=Limits(cpu_s=30, timeout_s=0.5))

    assert result.killed == "timeout", result
    assert result.duration_s < 10  # the timeout, not the 30 s CPU limit


async def test_huge_output_is_truncated(sandbox: Sandbox, hostile: Path) -> None:
    result = await run(sandbox, hostile, "spew", limits=Limits(max_output_bytes=100_000, timeout_s=10))

    assert result.killed == "output" and result.truncated, result
    assert len(result.stdout) + len(result.stderr) == 100_000
    assert result.error is not None and "output exceeded" in result.error


async def test_killing_everything_from_inside_does_not_touch_the_host(sandbox: Sandbox, hostile: Path) -> None:
    bystander = subprocess.Popen(["/bin/sleep", "30"])
    try:
        result = await run(sandbox, hostile, "kill_everything")
        await asyncio.sleep(0.1)

        if kind(sandbox) == "wasm":  # no signals to send at all
            assert_error(result, "has no attribute 'kill'")
        elif kind(sandbox) == "gvisor":  # gVisor's kill(-1) takes the sandbox's own processes, itself included
            assert result.value == "still here" or result.killed == "signal", result
        else:  # kill(1) hits only the sandbox's own pid 1: itself, ignored
            assert result.value == "still here", result
        assert bystander.poll() is None, "a host process was killed from inside the sandbox"
        assert (await run(sandbox, hostile, "read", path=f"/tool/{hostile.name}")).value is not None
    finally:
        bystander.kill()
        bystander.wait()
