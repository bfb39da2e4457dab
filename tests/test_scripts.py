"""scripts/_venv.sh, the part of the set-up commands that picks the interpreter and makes the project venv.

Run with stand-ins for `apt-get` and for interpreters that are too old or lack `venv`, so nothing on this machine
changes; `.ci/run` runs the real commands with Debian's /usr/bin/python3.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shell(project: Path, script: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs ``script`` in bash in ``project`` after sourcing scripts/_venv.sh."""
    return subprocess.run(["bash", "-c", f". {ROOT / 'scripts' / '_venv.sh'}\n{script}"], cwd=project,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def stand_in(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    return directory


def test_an_old_python_is_refused_by_name(tmp_path: Path, bin_dir: Path) -> None:
    old = stand_in(bin_dir, "python3.10", 'case "$*" in *version_info*) exit 1;; *python_version*) echo 3.10.12;; '
                                          'esac\n')
    result = shell(tmp_path, "sw_python", PYTHON=str(old))
    assert result.returncode == 2
    assert f"{old} is Python 3.10.12; Stitchwork needs 3.11 or newer" in result.stderr


def test_a_missing_interpreter_is_refused(tmp_path: Path) -> None:
    result = shell(tmp_path, "sw_python", PYTHON="/nonexistent/python3")
    assert result.returncode == 2 and "no Python interpreter '/nonexistent/python3'" in result.stderr


def test_a_python_without_venv_gets_it_from_apt(tmp_path: Path, bin_dir: Path) -> None:
    """Debian/Ubuntu ship ensurepip in pythonX.Y-venv: it is installed with apt-get (as root here)."""
    log = tmp_path / "apt.log"
    stand_in(bin_dir, "apt-get", f'echo "$*" >> {log}\n')
    real = sys.executable
    bare = stand_in(bin_dir, "python3", f'case "$*" in *"import ensurepip, venv"*) exit 1;; esac\nexec {real} "$@"\n')
    result = shell(tmp_path, "sw_python && sw_venv_module && echo ok", PYTHON=str(bare),
                   PATH=f"{bin_dir}:{os.environ['PATH']}")
    if os.getuid() != 0 and shutil.which("sudo") is None:
        assert result.returncode == 2 and "python3-venv" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    calls = log.read_text().splitlines()
    assert calls[0] == "update -qq"
    assert calls[1] == f"install -y -qq python{version}-venv"
    assert f"has no venv module: installing python{version}-venv" in result.stderr


def test_a_failed_apt_install_says_what_to_run(tmp_path: Path, bin_dir: Path) -> None:
    stand_in(bin_dir, "apt-get", "exit 100\n")
    bare = stand_in(bin_dir, "python3", f'case "$*" in *"import ensurepip, venv"*) exit 1;; esac\n'
                                        f'exec {sys.executable} "$@"\n')
    result = shell(tmp_path, "sw_python && sw_venv_module", PYTHON=str(bare), PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert result.returncode == 2 and "apt-get install python3-venv" in result.stderr


@pytest.mark.slow
def test_the_venv_is_made_once_and_remade_for_another_interpreter(tmp_path: Path, bin_dir: Path) -> None:
    path = f"{bin_dir}:{os.environ['PATH']}"
    made = shell(tmp_path, "sw_venv", PYTHON=sys.executable, PATH=path)
    assert made.returncode == 0, made.stderr
    assert ("-m venv" in made.stderr or "uv venv" in made.stderr) and (tmp_path / ".venv" / "bin" / "python").exists()
    recorded = (tmp_path / ".venv" / ".stitchwork-python").read_text().strip()
    assert recorded == os.path.realpath(sys.executable)
    again = shell(tmp_path, "sw_venv", PYTHON=sys.executable, PATH=path)
    assert again.returncode == 0 and "using the virtual environment" in again.stderr
    assert "-m venv" not in again.stderr and "uv venv" not in again.stderr
    (tmp_path / ".venv" / ".stitchwork-python").write_text("/some/other/python3\n")
    remade = shell(tmp_path, "sw_venv", PYTHON=sys.executable, PATH=path)
    assert remade.returncode == 0, remade.stderr
    assert "was made with /some/other/python3: making it again" in remade.stderr


def test_a_non_venv_directory_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "precious.txt").write_text("keep me")
    result = shell(tmp_path, "sw_venv", PYTHON=sys.executable)
    assert result.returncode == 2 and "is not a virtual environment" in result.stderr
    assert (tmp_path / ".venv" / "precious.txt").read_text() == "keep me"


def test_install_needs_the_lock(tmp_path: Path) -> None:
    result = shell(tmp_path, 'VENV="$PWD/.venv"; sw_install server')
    assert result.returncode == 2 and "requirements.lock" in result.stderr and "scripts/lock.sh" in result.stderr


def test_install_system_is_idempotent_and_quiet_when_nothing_is_missing(tmp_path: Path, bin_dir: Path) -> None:
    log = tmp_path / "apt.log"
    stand_in(bin_dir, "apt-get", f'echo "$*" >> {log}\n')
    stand_in(bin_dir, "dpkg-query", 'echo "install ok installed"\n')
    result = subprocess.run(["bash", str(ROOT / "scripts" / "install-system.sh"), "extra-package"],
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert not log.exists()


def test_install_system_installs_only_what_is_missing(tmp_path: Path, bin_dir: Path) -> None:
    log = tmp_path / "apt.log"
    stand_in(bin_dir, "apt-get", f'echo "$*" >> {log}\n')
    stand_in(bin_dir, "dpkg-query", 'case "$*" in *bubblewrap*) echo "install ok installed";; esac\n')
    result = subprocess.run(["bash", str(ROOT / "scripts" / "install-system.sh"), "extra-package"],
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                            capture_output=True, text=True, timeout=60)
    if os.getuid() != 0 and shutil.which("sudo") is None:
        pytest.skip("neither root nor sudo")
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "update -qq"
    assert {c.split()[-1] for c in calls[1:]} == {"extra-package", "runsc", "chromium"}
    assert "bubblewrap" not in log.read_text()
