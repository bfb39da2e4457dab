"""`stitchwork demo mcp`: a LangGraph agent, real upstream MCP servers through /mcp, the hijacked call refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stitchwork.interfaces.cli.app import app

pytest.importorskip("langgraph", reason="the langgraph extra is not installed")
pytest.importorskip("mcp", reason="the mcp extra is not installed")


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (upstream servers run in it)")
def test_demo_mcp_refuses_the_hijacked_call_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STITCHWORK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("STITCHWORK_ISOLATION__DEFAULT", "bwrap://")
    result = CliRunner().invoke(app, ["demo", "mcp"])
    out = result.output
    assert result.exit_code == 0, out
    assert "SCRIPTED" in out and "✘" not in out and "verified" in out
    assert "the hijacked send (its recipient read from vendor.md) was refused by policy" in out
    assert "read both notes from the upstream file server through" in out
    assert (tmp_path / "state" / "demo-mcp" / "files" / "notes" / "vendor.md").exists()


def test_an_unknown_demo_scenario_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STITCHWORK_STATE_DIR", str(tmp_path / "state"))
    result = CliRunner().invoke(app, ["demo", "nope"])
    assert result.exit_code != 0 and "unknown demo scenario 'nope'" in result.output
