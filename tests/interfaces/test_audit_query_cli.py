"""`stitchwork audit query` in local mode: the old attacks are refused with a clear error and change nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stitchwork.interfaces.cli.app import app

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STITCHWORK_STATE_DIR", str(tmp_path / "state"))
    for name in ("STITCHWORK_URL", "STITCHWORK_TOKEN", "STITCHWORK_VAULT_KEY"):
        monkeypatch.delenv(name, raising=False)
    code, out = invoke("secrets", "set", "crm_api_key", "--value", "crm-abcdef-123456")
    assert code == 0, out
    return tmp_path / "state"


def _count(kind: str = "") -> int:
    where = f" WHERE kind = '{kind}'" if kind else ""
    code, out = invoke("audit", "query", f"SELECT count(*) AS n FROM audit_events{where}", "--json")
    assert code == 0, out
    return int(json.loads(out)[0]["n"])


def test_the_cli_refuses_writes_and_host_files(state: Path) -> None:
    before = _count()
    assert before >= 1
    files = [p for p in state.rglob("*") if p.is_file()]
    assert any(p.name == "vault.key" for p in files), files
    attacks = [
        "WITH d AS (DELETE FROM audit_events RETURNING seq) SELECT count(*) FROM d",
        "WITH d AS (INSERT INTO operator_tokens VALUES ('x', 'y', 0, false) RETURNING id) SELECT * FROM d",
        "SELECT * FROM operator_tokens",
        *(f"SELECT * FROM read_text('{p}')" for p in files),
        *(f"SELECT content FROM read_blob('{p}')" for p in files),
    ]
    for sql in attacks:
        code, out = invoke("audit", "query", sql)
        assert code == 2, (sql, out)
        assert "error" in out and ("may only read" in out or "not open to this query" in out
                                   or "no files" in out), (sql, out)
        for path in files:
            head = path.read_bytes()[:24]
            if len(head) >= 16:
                assert head[:16].decode("latin-1") not in out
    assert _count() == before
    code, out = invoke("audit", "verify")
    assert code == 0, out
