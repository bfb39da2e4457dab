"""The `stitchwork` CLI on embedded defaults (no server running: the CLI opens the platform itself)."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from stitchwork.interfaces.cli.app import app

runner = CliRunner()


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STITCHWORK_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def invoke(*args: str, input: str | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), input=input)
    return result.exit_code, result.output


def test_demo_stops_the_injection_and_verifies(state: Path) -> None:
    code, out = invoke("demo")
    assert code == 0, out
    assert "SCRIPTED" in out
    assert "the injected send to the attacker was refused by policy" in out
    assert "✘" not in out
    assert "verified" in out


def test_audit_verify_names_the_first_tampered_event(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert invoke("demo")[0] == 0
    monkeypatch.setenv("STITCHWORK_STATE_DIR", str(state / "demo"))
    code, out = invoke("audit", "verify")
    assert code == 0, out
    assert "audit chain verified" in out
    with duckdb.connect(str(state / "demo" / "stitchwork.duckdb")) as db:
        db.execute("UPDATE audit_events SET decision = 'tampered' WHERE seq = 7")
    code, out = invoke("audit", "verify")
    assert code == 1
    assert "BROKEN" in out and "event 7" in out


def test_audit_tail_and_query(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert invoke("demo")[0] == 0
    monkeypatch.setenv("STITCHWORK_STATE_DIR", str(state / "demo"))
    code, out = invoke("audit", "tail", "-n", "3", "--format", "json")
    assert code == 0 and len(json.loads(out)) == 3
    code, out = invoke("audit", "query", "SELECT kind, count(*) AS n FROM audit_events GROUP BY kind ORDER BY kind",
                       "--format", "csv")
    assert code == 0 and out.startswith("kind,n") and "decision," in out
    code, out = invoke("audit", "query", "DELETE FROM audit_events")
    assert code == 2 and "only SELECT queries" in out
    code, out = invoke("audit", "query", "SELEC nonsense")
    assert code == 2 and "does not parse" in out


def test_secrets_never_print_values(state: Path) -> None:
    assert invoke("secrets", "set", "api_token", "--value", "tok-secret-9876")[0] == 0
    assert invoke("secrets", "set", "other", input="from-stdin-1234\n")[0] == 0
    code, out = invoke("secrets", "list")
    assert code == 0 and out.split() == ["api_token", "other"]
    assert "tok-secret-9876" not in out
    assert invoke("secrets", "rm", "other")[0] == 0
    code, out = invoke("secrets", "rm", "other")
    assert code == 2 and "other" in out
    code, out = invoke("secrets", "set", "bad name!", "--value", "x")
    assert code == 2
    assert b"tok-secret-9876" not in (state / "vault.enc").read_bytes()


def test_run_waits_for_approval_then_resumes(state: Path, make_config, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from tests.gateway.test_gateway import APPROVAL_RUN

    config = make_config(APPROVAL_RUN, state=state)
    config_file = state.parent / "stitchwork.toml"
    config_file.write_text(
        f'state_dir = "{state}"\ntool_dirs = ["{config.tool_dirs[0]}"]\nagent_dirs = ["{config.agent_dirs[0]}"]\n'
    )
    monkeypatch.setenv("STITCHWORK_CONFIG", str(config_file))
    code, out = invoke("run", "tester", "write then delete n.txt", "--json")
    assert code == 4, out  # waiting for approval
    record = json.loads(out)
    assert record["status"] == "waiting_approval"
    (approval_id,) = record["pending_approvals"]
    code, out = invoke("approvals", "--format", "json")
    assert [a["id"] for a in json.loads(out)] == [approval_id]
    code, out = invoke("approve", approval_id, "--note", "ok")
    assert code == 0 and "approved" in out
    code, out = invoke("approve", approval_id)
    assert code == 2 and "already" in out
    code, out = invoke("audit", "query", f"SELECT status FROM runs WHERE id = '{record['id']}'", "--format", "json")
    assert json.loads(out) == [{"status": "completed"}]


def test_unknown_agent_is_a_clear_error(state: Path) -> None:
    code, out = invoke("run", "nobody", "do things")
    assert code == 2 and "unknown agent 'nobody'" in out
