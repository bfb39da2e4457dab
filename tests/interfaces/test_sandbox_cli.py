"""``stitchwork sandbox prepare | run`` and ``stitchwork doctor``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stitchwork.interfaces.cli.app import app

runner = CliRunner()


def summary(output: str) -> dict[str, object]:
    prefix = "stitchwork-sandbox-summary: "
    line = next(row for row in reversed(output.splitlines()) if row.startswith(prefix))
    parsed: dict[str, object] = json.loads(line[len(prefix) :])
    return parsed


def test_doctor_names_every_backend_and_why_not(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STITCHWORK_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("STITCHWORK_SERVER__HOST", "0.0.0.0")

    result = runner.invoke(app, ["doctor"])

    assert result.exit_code == 0, result.output
    for scheme in ("wasm://", "bwrap://", "gvisor://", "firecracker://", "nanos://", "inline://"):
        assert scheme in result.output
    assert "not loopback" in result.output


def test_sandbox_prepare_reports_the_cached_module() -> None:
    result = runner.invoke(app, ["sandbox", "prepare"])

    assert result.exit_code == 0, result.output
    assert ".cwasm" in result.output


@pytest.mark.parametrize("backend", ["wasm://", "bwrap://"])
def test_sandbox_run_a_python_file(backend: str, tmp_path: Path) -> None:
    script = tmp_path / "hello.py"
    script.write_text("import sys\nprint(6 * 7)\nsys.exit(3)\n")

    result = runner.invoke(app, ["sandbox", "run", "--backend", backend, "--timeout", "10", str(script)])

    assert result.exit_code == 1, result.output  # the program failed (exit 3)
    assert "42" in result.output
    assert summary(result.output)["exit_code"] == 3


def test_sandbox_run_reports_the_limit_that_stopped_it(tmp_path: Path) -> None:
    script = tmp_path / "spin.py"
    script.write_text("while True:\n    pass\n")

    result = runner.invoke(app, ["sandbox", "run", "--backend", "wasm://", "--cpu-s", "0.5", str(script)])

    assert summary(result.output)["killed"] == "cpu", result.output


def test_a_native_command_under_wasm_says_which_backends_can(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sandbox", "run", "--backend", "wasm://", "--", "/bin/echo", "hi"])

    assert result.exit_code == 2
    assert "bwrap://" in result.output and "usable on this host" in result.output
