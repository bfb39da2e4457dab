"""The bubblewrap command line for long-running stdio servers (upstream MCP servers): what the process sees."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from stitchwork.errors import SandboxError
from stitchwork.isolation.stdio import bwrap_argv

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _prefix_under(base: Path) -> Path:
    """A program in an installation prefix of its own (``PREFIX/bin/show``) that prints a file of that prefix,
    as a virtual environment's entry point reads its site-packages."""
    prefix = base / "env"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "share").mkdir()
    (prefix / "share" / "data.txt").write_text("from the prefix\n")
    program = prefix / "bin" / "show"
    program.write_text(f"#!/bin/sh\ncat {prefix}/share/data.txt\n")
    for path in (base, prefix, prefix / "bin", prefix / "share"):
        path.chmod(0o755)
    program.chmod(0o755)
    (prefix / "share" / "data.txt").chmod(0o644)
    return prefix


def test_a_command_installed_under_tmp_sees_its_prefix(tmp_path: Path) -> None:
    """The private /tmp must not cover a prefix that lives under /tmp (a venv made there, as in a CI checkout)."""
    assert str(tmp_path).startswith("/tmp/")
    prefix = _prefix_under(tmp_path)
    result = _run(bwrap_argv([str(prefix / "bin" / "show")]))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from the prefix\n"


def test_tmp_is_private_and_the_prefix_is_read_only(tmp_path: Path) -> None:
    prefix = _prefix_under(tmp_path)
    marker = Path("/tmp") / f"stitchwork-host-marker-{os.getpid()}"
    marker.write_text("host")
    try:
        script = (f"test ! -e {marker} && echo private; "
                  f"touch {prefix}/share/new 2>/dev/null || echo read-only; "
                  f"touch /tmp/ok && echo tmp-writable")  # fmt: skip
        result = _run(bwrap_argv(["/bin/sh", "-c", script]))
    finally:
        marker.unlink()
    assert result.stdout.split() == ["private", "read-only", "tmp-writable"], result.stderr
    assert not (prefix / "share" / "new").exists()


def test_a_granted_directory_under_tmp_is_writable_and_the_working_directory(tmp_path: Path) -> None:
    granted = tmp_path / "granted"
    granted.mkdir()
    granted.chmod(0o777)
    tmp_path.chmod(0o755)
    result = _run(bwrap_argv(["/bin/sh", "-c", "pwd; echo hi > out.txt"], dirs=[str(granted)]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(granted.resolve())
    assert (granted / "out.txt").read_text() == "hi\n"


def test_bad_commands_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="empty"):
        bwrap_argv([])
    with pytest.raises(SandboxError, match="does not exist"):
        bwrap_argv(["/bin/true"], dirs=[str(tmp_path / "missing")])
