"""Truthful results through the real CLI process (``python -m stitchwork sandbox run``): every kill reason is a
clean result (exit status 1 and a summary naming the reason; never a Rust abort, exit 134), the summary cannot be
forged by the program's output, terminal control characters are escaped, and ``inline://`` is refused unless the
operator allows it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stitchwork.isolation._base import SANDBOXES

SUMMARY = "stitchwork-sandbox-summary: "
SRC = str(Path(__file__).resolve().parents[2] / "src")


def usable(name: str) -> bool:
    try:
        return bool(SANDBOXES.load(f"{name}://").available()[0])
    except Exception:
        return False


def sandbox_run(*args: str, state: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": SRC, "STITCHWORK_STATE_DIR": str(state), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "stitchwork", "sandbox", "run", *args],
        capture_output=True, text=True, env=environment, timeout=300, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def summary(stderr: str) -> dict[str, object]:
    """The CLI's own summary: the last line, which must carry the prefix."""
    last = stderr.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith(SUMMARY), stderr[-2000:]
    parsed: dict[str, object] = json.loads(last[len(SUMMARY) :])
    return parsed


KILLS = {
    # reason: (options, python code)
    "timeout": (["--timeout", "1"], "import time\ntime.sleep(60)\n"),
    "cpu": (["--cpu-s", "0.5", "--timeout", "30"], "while True:\n    pass\n"),
    "output": (["--output", "2000", "--timeout", "30"], "import sys\nwhile True:\n    sys.stdout.write('x' * 100)\n"),
    "memory": (["--mem", "48", "--timeout", "30"], "hoard = []\nwhile True:\n    hoard.append(bytearray(8 << 20))\n"),
    "disk": (["--disk-mb", "16", "--timeout", "30"],
             "f = open('/work/big', 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20))\n    f.flush()\n"),
}  # fmt: skip


@pytest.mark.parametrize("backend", ["wasm", "bwrap", "gvisor"])
@pytest.mark.parametrize("reason", sorted(KILLS))
def test_every_kill_reason_is_a_clean_result(backend: str, reason: str, tmp_path: Path) -> None:
    if not usable(backend):
        pytest.skip(f"{backend}:// is not usable here")
    options, code = KILLS[reason]
    script = tmp_path / "program.py"
    script.write_text(code)
    script.chmod(0o644)
    tmp_path.chmod(0o755)

    ran = sandbox_run("--backend", f"{backend}://", *options, str(script), state=tmp_path / "state")

    assert ran.returncode == 1, (ran.returncode, ran.stderr[-2000:])  # not 134 (abort), not a traceback
    assert "panic" not in ran.stderr.lower()
    assert "Traceback (most recent call last)" not in ran.stderr.split(SUMMARY)[-1]
    result = summary(ran.stderr)
    assert result["killed"] == reason, result
    assert result["backend"] == f"{backend}://" and result["isolation"] == "sandbox"


def test_a_forged_summary_and_truncated_output_cannot_pass_for_the_real_one(tmp_path: Path) -> None:
    if not usable("wasm"):
        pytest.skip("wasm:// is not usable here")
    script = tmp_path / "forge.py"
    fake = SUMMARY + json.dumps({"exit_code": 0, "killed": None, "error": None})
    script.write_text(
        "import sys\n"
        f"sys.stderr.write({fake!r} + '\\n')\n"
        "sys.stderr.write('\\x1b[2K\\r\\x1b[1A' + 'partial line without an end')\n"
        "sys.stderr.flush()\n"
        "sys.exit(3)\n"
    )
    report = tmp_path / "summary.json"

    ran = sandbox_run("--backend", "wasm://", "--json", str(report), str(script), state=tmp_path / "state")

    real = summary(ran.stderr)
    assert real["exit_code"] == 3 and ran.returncode == 1, real
    assert json.loads(report.read_text()) == real  # the file is a stream the program cannot reach
    assert "\x1b" not in ran.stderr and "\r" not in ran.stderr  # escape sequences arrive escaped
    assert "\\x1b[2K\\x0d" in ran.stderr
    assert ran.stderr.count(SUMMARY) == 2 and ran.stderr.rstrip().endswith(json.dumps(real))


def test_inline_is_refused_unless_allowed_and_labelled_no_isolation_when_it_is(tmp_path: Path) -> None:
    refused = sandbox_run("--backend", "inline://", "--", "/bin/echo", "hi", state=tmp_path / "state")
    allowed = sandbox_run("--backend", "inline://", "--", "/bin/echo", "hi", state=tmp_path / "state",
                          env={"STITCHWORK_ISOLATION__ALLOW_INLINE": "1"})  # fmt: skip

    assert refused.returncode == 2 and "allow_inline" in refused.stdout + refused.stderr, refused
    assert "hi" not in refused.stdout.split()
    assert allowed.returncode == 0, allowed.stderr
    assert "NO ISOLATION" in allowed.stdout + allowed.stderr
    assert summary(allowed.stderr)["isolation"] == "none"
