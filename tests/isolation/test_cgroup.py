"""The cgroup per sandbox (``_cgroup``): the files it writes and reads on cgroup v1 and v2 (against a directory laid
out like each), and the real thing on whichever version this host delegates (the other skips with the reason)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stitchwork.config import Limits
from stitchwork.isolation import _cgroup

V1_FILES = {
    "memory": ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.swappiness",
               "memory.max_usage_in_bytes", "memory.oom_control"],
    "cpu": ["cpu.cfs_period_us", "cpu.cfs_quota_us"],
    "cpuacct": ["cpuacct.usage"],
    "pids": ["pids.max", "pids.events"],
}  # fmt: skip
V2_FILES = ["memory.max", "memory.swap.max", "memory.peak", "memory.events", "cpu.max", "cpu.stat", "pids.max",
            "pids.events", "cgroup.kill"]  # fmt: skip


def fake_v1(root: Path) -> _cgroup.SandboxCgroup:
    dirs = []
    for controller, files in V1_FILES.items():
        path = root / controller / "sbx-0"
        path.mkdir(parents=True)
        for name in [*files, "cgroup.procs"]:
            (path / name).write_text("0\n")
        if controller == "memory":
            (path / "memory.limit_in_bytes").write_text(f"{1 << 62}\n")
        dirs.append((_cgroup.Hierarchy(1, root / controller, frozenset({controller})), path))
    return _cgroup.SandboxCgroup(tuple(dirs))


def fake_v2(root: Path) -> _cgroup.SandboxCgroup:
    path = root / "sbx-0"
    path.mkdir(parents=True)
    for name in [*V2_FILES, "cgroup.procs"]:
        (path / name).write_text("")
    hierarchy = _cgroup.Hierarchy(2, root, frozenset({"memory", "cpu", "pids", "cpuacct"}))
    return _cgroup.SandboxCgroup(((hierarchy, path),))


def read(cgroup: _cgroup.SandboxCgroup, name: str) -> str:
    for _, path in cgroup.dirs:
        if (path / name).exists():
            return (path / name).read_text().strip()
    raise FileNotFoundError(name)


LIMITS = Limits(mem_mb=64, cpus=0.5, max_pids=16)


def test_v1_limits_memory_without_swap_cpu_quota_and_pids(tmp_path: Path) -> None:
    cgroup = fake_v1(tmp_path)

    cgroup.apply(LIMITS, overhead_pids=1, swap=True)

    assert read(cgroup, "memory.limit_in_bytes") == read(cgroup, "memory.memsw.limit_in_bytes") == str(64 << 20)
    assert read(cgroup, "memory.swappiness") == "0"
    assert (read(cgroup, "cpu.cfs_quota_us"), read(cgroup, "cpu.cfs_period_us")) == ("50000", "100000")
    assert read(cgroup, "pids.max") == "17"


def test_v1_figures_are_read_from_their_files(tmp_path: Path) -> None:
    cgroup = fake_v1(tmp_path)
    files = {path.name: path for _, d in cgroup.dirs for path in d.iterdir()}
    files["cpuacct.usage"].write_text("1500000000\n")
    files["memory.max_usage_in_bytes"].write_text("52428800\n")
    files["memory.oom_control"].write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    files["pids.events"].write_text("max 7\n")

    assert cgroup.stats() == _cgroup.Stats(cpu_s=1.5, memory_peak_bytes=50 << 20, oom_kills=3, refused_forks=7)


def test_v2_limits_memory_without_swap_cpu_quota_and_pids(tmp_path: Path) -> None:
    cgroup = fake_v2(tmp_path)

    cgroup.apply(LIMITS, overhead_pids=1, swap=True)

    assert read(cgroup, "memory.max") == str(64 << 20) and read(cgroup, "memory.swap.max") == "0"
    assert read(cgroup, "cpu.max") == "50000 100000"
    assert read(cgroup, "pids.max") == "17"


def test_v2_figures_are_read_from_their_files_and_kill_uses_cgroup_kill(tmp_path: Path) -> None:
    cgroup = fake_v2(tmp_path)
    path = cgroup.dirs[0][1]
    (path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    (path / "memory.peak").write_text("1048576\n")
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n")
    (path / "pids.events").write_text("max 1\n")

    assert cgroup.stats() == _cgroup.Stats(cpu_s=2.5, memory_peak_bytes=1 << 20, oom_kills=2, refused_forks=1)
    assert cgroup.kill()
    assert (path / "cgroup.kill").read_text().strip() == "1"


def test_describe_says_what_is_missing() -> None:
    empty = _cgroup.Support(missing=(("memory", "no cgroup file system is mounted"),))

    assert not empty.complete and empty.version == 0
    assert "no cgroup file system is mounted" in empty.describe()


# -- the real cgroups of this host -------------------------------------------------------------------------------


def real(version: int) -> _cgroup.Support:
    support = _cgroup.support()
    if not support.complete or support.version != version:
        pytest.skip(f"this host does not delegate cgroup v{version} memory, cpu and pids here: {support.describe()}")
    return support


@pytest.mark.parametrize("version", [1, 2])
def test_a_real_sandbox_cgroup_holds_a_process_and_kills_it(version: int) -> None:
    support = real(version)
    cgroup = support.create(Limits(mem_mb=32, max_pids=4, cpus=1.0))
    try:
        child = subprocess.Popen(["/bin/sh", "-c", f'echo $$ > "{cgroup.procs[0]}"; exec sleep 30'])
        deadline = time.monotonic() + 10
        while child.pid not in cgroup.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        for procs in cgroup.procs[1:]:
            procs.write_text(f"{child.pid}\n")
        assert child.pid in cgroup.pids()
        assert cgroup.kill()
        assert child.wait(10) == -9
        assert cgroup.stats().cpu_s >= 0.0
    finally:
        deadline = time.monotonic() + 5
        while not cgroup.remove() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not any(path.exists() for _, path in cgroup.dirs)


@pytest.mark.parametrize("version", [1, 2])
def test_a_real_memory_limit_is_enforced_by_the_kernel(version: int) -> None:
    support = real(version)
    cgroup = support.create(Limits(mem_mb=32, max_pids=8))
    try:
        code = "x = bytearray(256 << 20)"
        ran = subprocess.run(
            ["/bin/sh", "-c", f'echo $$ > "{cgroup.procs[0]}"; for p in {" ".join(map(str, cgroup.procs[1:]))}; '
             f'do echo $$ > "$p"; done; exec {os.path.realpath(sys.executable)} -I -S -c "{code}"'],
            check=False, timeout=60,
        )  # fmt: skip
        assert ran.returncode == -9  # SIGKILLed by the out-of-memory killer, not a MemoryError
        assert cgroup.oom_kills() >= 1
        assert cgroup.stats().memory_peak_bytes <= (32 << 20) + (1 << 20)
    finally:
        deadline = time.monotonic() + 5
        while not cgroup.remove() and time.monotonic() < deadline:
            time.sleep(0.05)


# -- a host without cgroups: say so, refuse what cannot be enforced ------------------------------------------------


NONE_HERE = _cgroup.Support(missing=tuple((c, "no writable cgroup hierarchy (not root)") for c in _cgroup.CONTROLLERS))


def test_without_cgroups_bwrap_and_gvisor_refuse_and_doctor_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from typer.testing import CliRunner

    from stitchwork.errors import BackendUnavailable
    from stitchwork.interfaces.cli.app import app
    from stitchwork.isolation import bwrap, gvisor

    monkeypatch.setattr(_cgroup, "support", lambda: NONE_HERE)
    if shutil.which("bwrap") is not None and bwrap._check_tools(shutil.which("bwrap") or "")[0]:
        with pytest.raises(BackendUnavailable, match=r"no cgroup for memory .*limits=process"):
            bwrap.BwrapSandbox("bwrap://")
        bwrap.BwrapSandbox("bwrap://?limits=process")  # the operator's explicit choice: per-process limits only
    assert bwrap.BwrapSandbox.available() == (False, bwrap.whole_sandbox_limits()[1])
    if gvisor._runsc_path() is not None and os.geteuid() == 0:
        ok, reason = gvisor.GvisorSandbox.available()
        assert not ok and "cannot be enforced" in reason, reason

    doctor = CliRunner().invoke(app, ["doctor", "--json"])
    assert doctor.exit_code == 0, doctor.output
    import json

    report = json.loads(doctor.stdout)
    assert "NOT enforceable" in report["limits_rest_on"]["whole-sandbox limits"]
    assert report["limits_rest_on"]["cgroups"].startswith("none")
    usable = {b["backend"]: b["usable"] for b in report["backends"]}
    assert usable["bwrap://"] is False and usable["gvisor://"] is False
