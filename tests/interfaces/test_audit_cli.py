"""`stitchwork audit report / export / compact / verify` on the demo's state, locally and through the HTTP API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from stitchwork.data.iceberg import IcebergArchive
from stitchwork.errors import ConfigError
from stitchwork.interfaces.cli.app import app
from stitchwork.interfaces.cli.audit import parse_time
from stitchwork.interfaces.cli.client import HttpClient, RemoteError

pytest.importorskip("pyiceberg", reason="needs pip install 'stitchwork[iceberg]'")
runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def demo_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STITCHWORK_STATE_DIR", str(state))
        for name in ("STITCHWORK_URL", "STITCHWORK_TOKEN", "STITCHWORK_VAULT_KEY"):
            mp.delenv(name, raising=False)
        code, out = invoke("demo")
    assert code == 0, out
    return state / "demo"


@pytest.fixture
def state(demo_state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import shutil

    copy = tmp_path / "demo"
    shutil.copytree(demo_state, copy)
    monkeypatch.setenv("STITCHWORK_STATE_DIR", str(copy))
    return copy


def test_reports_on_the_demo(state: Path) -> None:
    code, out = invoke("audit", "report", "denied", "--format", "json")
    assert code == 0, out
    rules = {(r["agent"], r["rule"]) for r in json.loads(out)}
    assert any(rule == "external-tainted-target" for _, rule in rules), rules
    code, out = invoke("audit", "report", "tokens", "--format", "csv")
    assert code == 0 and out.startswith("agent,provider,model,calls,prompt_tokens"), out
    code, out = invoke("audit", "report", "tools")
    assert code == 0 and "read_email" in out
    code, out = invoke("audit", "report", "runs", "--since", "7d", "--format", "json")
    assert code == 0 and json.loads(out), out
    code, out = invoke("audit", "report", "bogus")
    assert code == 2 and "unknown report" in out


def test_export_compact_and_verify_across(state: Path, tmp_path: Path) -> None:
    uri = f"iceberg+sqlite:///{tmp_path}/cat.db?warehouse=file://{tmp_path}/wh"
    code, out = invoke("audit", "export", "--to", uri)
    assert code == 0 and "exported" in out, out
    code, out = invoke("audit", "export", "--to", uri)
    assert code == 0 and "nothing new" in out, out
    total = IcebergArchive(uri).exported_seq()
    code, out = invoke("audit", "compact", "--to", uri, "--upto-seq", str(total - 3))
    assert code == 0 and f"checkpoint at seq {total - 3}" in out, out
    code, out = invoke("audit", "verify")
    assert code == 0 and "audit chain verified" in out, out
    with duckdb.connect(str(state / "stitchwork.duckdb")) as db:
        db.execute(f"UPDATE audit_events SET decision = 'tampered' WHERE seq = {total - 1}")
    code, out = invoke("audit", "verify")
    assert code == 1 and f"event {total - 1}" in out, out


def test_parse_time() -> None:
    assert parse_time("1700000000") == 1700000000.0
    assert parse_time("2026-11-01") == 1793491200.0
    assert parse_time("2d", now=1000000.0) == 1000000.0 - 172800
    assert parse_time(None) is None
    with pytest.raises(ConfigError):
        parse_time("yesterday-ish")


@pytest.fixture
def http(state: Path) -> Iterator[HttpClient]:
    from stitchwork.config import load_config
    from stitchwork.interfaces.http.app import create_app
    from stitchwork.platform import Platform
    from stitchwork.service import Service

    platform = Platform.open(load_config(None), role="server")
    service = Service(platform)
    token = service.create_operator_token()
    with TestClient(create_app(service, expiry_interval_s=3600)) as test_client:
        client = HttpClient("http://testserver", token)
        test_client.headers["Authorization"] = f"Bearer {token}"
        client.http = test_client
        yield client
    asyncio.run(platform.aclose())


def test_reports_export_and_retention_through_the_api(http: HttpClient, tmp_path: Path) -> None:
    denied = http.audit_report("denied")
    assert any(r["rule"] == "external-tainted-target" for r in denied)
    assert http.audit_report("denied", since=4e9) == []
    uri = f"iceberg+sqlite:///{tmp_path}/cat.db?warehouse=file://{tmp_path}/wh"
    first = http.audit_export(uri)
    assert first["exported"] > 0 and http.audit_export(uri)["exported"] == 0
    compacted = http.audit_compact(uri, upto_seq=first["last_seq"] - 2)
    assert compacted["checkpoint_seq"] == first["last_seq"] - 2
    assert http.audit_verify()["ok"]
    assert set(http.data_retention()) == {"runs", "run_provenance", "approvals", "revoked_tokens", "a2a_tasks"}
    with pytest.raises(RemoteError, match="unknown report"):
        http.audit_report("bogus")
